"""The HTTP API (Starlette): GET /api/v1/recommendations/{homepage,similar,cart,also-viewed}
(serving/recommend.py), POST /api/v1/events into the clickstream topic, GET /openapi.json, GET /healthz
(liveness) and GET /readyz (readiness: the agents can answer; serving/recommend.py path_status).

Delivery: 202 {"accepted": n} is answered only after Kafka acknowledged every event of the
request (acks=all, idempotent producer). Validation is all-or-nothing: one bad event and nothing
of the request is sent. Sending is not: when Kafka cannot acknowledge within produce_timeout_ms
(timeout, KafkaError, producer not connected) the answer is 503 with `Retry-After: 1`, and some
events of that request may already be written. A client that retries after a 503 may therefore
duplicate events; that is the at-least-once contract of the clickstream, and consumers drop
repeats by `event_id` (idempotent consumers, see README "Delivery guarantees"). After a failed send
the producer is replaced by a new one (EventSink._renew): an idempotent producer whose batches
expired during a broker outage would otherwise be refused for good (out-of-order sequence).

Also mounted: the admin API (serving/admin.py), GET /metrics (Prometheus) and the on-call
dashboard, GET /dashboard and GET /api/v1/ops/summary (serving/ops.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any, cast

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from recstream.privacy import pseudonym, pseudonymise_events
from recstream.settings import Settings
from schemas import Event, Exposure, jsonschema
from serving import ingest, params
from serving.admin import admin_routes
from serving.errors import ApiError, OrjsonResponse, error_response
from serving.experiments import Experiments, exposure
from serving.journal import RECOVER_S, Journal, Segment
from serving.ops import OpsMonitor, ops_routes
from serving.recommend import Recommender, reply_body, shed_reason, status
from streams.erasures import erase
from streams.producer import create_producer

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
CONNECT_BACKOFF_S = (0.2, 5.0)  # first and longest wait between producer start attempts (seconds)


class KafkaUnavailable(Exception):
    """Kafka could not take a request's events in the bounded time: the client should retry."""


class EventSink:
    """Owns the producer for the app's lifetime and sends one request's events with bounded waits.

    Start-up: the app waits up to produce_timeout_ms for the producer to connect, then serves
    anyway and keeps connecting in the background (backing off up to 5 s). Until connected,
    POST answers 503 and /healthz 503, so the server comes up, and recovers, even when Kafka is
    down at boot. The sink starts and stops the producer, also one passed in (tests)."""

    def __init__(self, s: Settings, producer: AIOKafkaProducer | None = None, journal: Journal | None = None):
        self._settings = s
        self._producer = producer
        self._connect_task: asyncio.Task[None] | None = None
        self.topic = s.topic("clickstream")
        self.exposures_topic = s.topic("exposures")
        self.journal = journal            # exposures written before the answer leaves (serving/journal.py)
        self.exposures_lost = 0           # neither acknowledged nor journaled
        self.exposures_logged = 0         # acknowledged by Kafka
        self.exposures_deferred = 0       # not acknowledged, kept in the journal for a resend
        self.exposures_resent = 0         # sent again from the journal (this process's or a dead one's)
        self._exposing: set[asyncio.Task] = set()
        self._recovering: asyncio.Task[None] | None = None
        self.timeout_s = s.produce_timeout_ms / 1000
        self.connected = False

    async def start(self) -> None:
        if self._producer is None:  # aiokafka binds to the running loop: create it inside it
            self._producer = create_producer(self._settings)
        self._connect_task = asyncio.create_task(self._connect(self._producer), name="kafka-producer-connect")
        await asyncio.wait([self._connect_task], timeout=self.timeout_s)
        if self.journal is not None:
            self._recovering = asyncio.create_task(self._recover(), name="exposure-journal-recovery")
        if not self.connected:
            log.warning("Kafka at %s not reachable yet; answering 503 while connecting in the background",
                        self._settings.kafka_bootstrap)

    async def stop(self) -> None:
        for task in (self._connect_task, self._recovering):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._exposing:
            await asyncio.wait(self._exposing, timeout=self.timeout_s)
        if self.journal is not None:
            self.journal.close()
        if self._producer is not None:
            await self._producer.stop()  # flushes what is still in flight
        self.connected = False

    async def _connect(self, producer: AIOKafkaProducer) -> None:
        backoff_s, longest_s = CONNECT_BACKOFF_S
        while True:
            try:
                await producer.start()
            except Exception as exc:  # aiokafka raises KafkaError, OSError or TimeoutError here
                log.info("Kafka producer start failed (%s); next try in %.1f s", exc, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, longest_s)
            else:
                self.connected = True
                return

    @property
    def producer(self) -> AIOKafkaProducer | None:
        """The connected producer (None until connected): others that send from the API process share it."""
        return self._producer if self.connected else None

    async def send(self, events: list[Event]) -> None:
        """Return once Kafka acknowledged every event, or raise KafkaUnavailable within the timeout."""
        if not self.connected or self._producer is None:
            raise KafkaUnavailable("Kafka is not connected yet")
        try:
            await asyncio.wait_for(self._send_all(self._producer, events), self.timeout_s)
        except TimeoutError:
            self._renew()
            raise KafkaUnavailable(f"Kafka did not acknowledge within {self._settings.produce_timeout_ms} ms") from None
        except KafkaError as exc:
            self._renew()
            raise KafkaUnavailable(f"Kafka refused the events: {exc}") from None

    def _renew(self) -> None:
        """A send failed: replace the producer. An idempotent producer whose batches expired during an
        outage keeps a gap in its sequence numbers, and the broker refuses everything it sends after
        (OutOfOrderSequenceNumber; aiokafka #1017) until the process restarts; a new producer gets a
        new producer id. Until it has connected, POST answers 503 at once."""
        if not self.connected or self._producer is None:
            return   # renewing already
        self.connected = False
        old, self._producer = self._producer, create_producer(self._settings)
        self._connect_task = asyncio.create_task(self._replace(old, self._producer), name="kafka-producer-renew")

    async def _replace(self, old: AIOKafkaProducer, new: AIOKafkaProducer) -> None:
        with contextlib.suppress(Exception):   # its unsent records fail: their requests answer 503
            await asyncio.wait_for(old.stop(), self.timeout_s)
        await self._connect(new)

    def expose(self, exposure: Exposure) -> None:
        """Journal one exposure record (before the answer leaves) and queue it; no wait for the ack
        (serving/experiments.py: at least once)."""
        line, seg = exposure.to_json(), None
        if self.journal is not None:
            try:
                seg = self.journal.append(line)
            except OSError as exc:   # disk full: this one is at most once
                log.warning("exposure %s not journaled: %r", exposure.request_id, exc)
        if not self.connected or self._producer is None:
            self._settle(seg, False)
            return
        task = asyncio.create_task(self._expose(self._producer, exposure, line, seg))
        self._exposing.add(task)
        task.add_done_callback(self._exposing.discard)

    async def _expose(self, producer: AIOKafkaProducer, exposure: Exposure, line: bytes, seg: Segment | None) -> None:
        try:
            ack = await producer.send(self.exposures_topic, line, key=exposure.key)
            await asyncio.wait_for(ack, self.timeout_s)
        except Exception as exc:  # Kafka trouble: the answer has gone out; the journal keeps the impression
            log.warning("exposure %s not logged: %r", exposure.request_id, exc)
            self._settle(seg, False)
        else:
            self._settle(seg, True)

    def _settle(self, seg: Segment | None, ok: bool) -> None:
        if ok:
            self.exposures_logged += 1
        elif seg is not None:
            self.exposures_deferred += 1
        else:
            self.exposures_lost += 1
        if seg is not None:
            self.journal.settle(seg, ok)

    async def _recover(self) -> None:
        """Send again what the journal holds of dead processes (and this one's failed sends)."""
        assert self.journal is not None
        while True:
            if self.connected and self._producer is not None:
                producer = self._producer

                async def send(line: bytes) -> None:
                    key = Exposure.from_json(line).key
                    await asyncio.wait_for(await producer.send(self.exposures_topic, line, key=key), self.timeout_s)
                try:
                    self.exposures_resent += await self.journal.recover(send)
                except Exception as exc:   # a line that no longer parses, a file system error: logged, retried
                    log.warning("exposure journal recovery failed: %r", exc)
            await asyncio.sleep(RECOVER_S)

    async def _send_all(self, producer: AIOKafkaProducer, events: list[Event]) -> None:
        # send() only queues (the producer batches them); the returned futures resolve on acks
        acks = [await producer.send(self.topic, e.to_json(), key=e.key) for e in events]
        await asyncio.gather(*acks)


async def _read_body(request: Request, max_body_bytes: int) -> bytes:
    """The body, read chunk by chunk, refused as soon as it is over the limit (not read to the end)."""
    ingest.check_content_length(request.headers.get("content-length"), max_body_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        ingest.check_body_size(size, max_body_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


# -- the one place where exceptions become HTTP statuses -----------------------------------------

async def _api_error(request: Request, exc: Exception) -> Response:
    return cast(ApiError, exc).response()   # IngestError, ParamError: status, message, fields


async def _kafka_unavailable(request: Request, exc: Exception) -> Response:
    return error_response(HTTPStatus.SERVICE_UNAVAILABLE, f"{exc}; retry later",
                          headers={"Retry-After": str(RETRY_AFTER_S)})


async def _http_exception(request: Request, exc: Exception) -> Response:
    error = cast(HTTPException, exc)   # Starlette's own: 404 no route, 405 method not allowed
    return error_response(error.status_code, error.detail, headers=error.headers)


async def _client_disconnect(request: Request, exc: Exception) -> Response:
    # nobody is listening; keeps it out of the 500 log
    return error_response(HTTPStatus.BAD_REQUEST, "client disconnected")


async def _server_error(request: Request, exc: Exception) -> Response:
    # Starlette's ServerErrorMiddleware answers with this, then re-raises for uvicorn's log
    return error_response(HTTPStatus.INTERNAL_SERVER_ERROR, "Internal Server Error")


EXCEPTION_HANDLERS = {
    ApiError: _api_error,
    KafkaUnavailable: _kafka_unavailable,
    HTTPException: _http_exception,
    ClientDisconnect: _client_disconnect,
    Exception: _server_error,
}

RECOMMENDATION_PREFIX = "/api/v1/recommendations/"
ENDPOINTS = {"homepage", "similar", "cart", "also_viewed"}


def endpoint_of(path: str) -> str | None:
    """The metrics label of a path: the recommendation kind, "events", "other" for an unknown
    kind; None for paths not measured (health, metrics, dashboard, admin)."""
    if path.startswith(RECOMMENDATION_PREFIX):
        kind = path[len(RECOMMENDATION_PREFIX):].replace("-", "_")
        return kind if kind in ENDPOINTS else "other"
    return "events" if path == "/api/v1/events" else None


class RequestMetrics:
    """ASGI middleware: count and time the API's requests by endpoint and status (serving/ops.py)."""

    def __init__(self, app, ops: OpsMonitor):
        self.app, self.ops = app, ops

    async def __call__(self, scope, receive, send) -> None:
        endpoint = endpoint_of(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        code = 500

        async def send_status(message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.ops.observe_request(endpoint, code, time.perf_counter() - t0)


def create_app(s: Settings, producer: AIOKafkaProducer | None = None, recommender: Recommender | None = None,
               experiments: Experiments | None = None) -> Starlette:
    """The API app; its lifespan starts and stops `producer` (default: create_producer(s)), the
    recommender (its reply topic, reply reader and fallback) and the experiments file's follower.
    Why this long: the route handlers are closures over the app's state and one route table lists
    them; each handler is a few lines calling serving.params, serving.recommend or serving.ingest."""
    rec = recommender or Recommender(s)
    # one folder per exposures topic: a process recovers only lines meant for its own topic
    sink = EventSink(s, producer, Journal(s.home_dir / "exposures" / s.topic("exposures"), rec.instance))
    ab = experiments or Experiments(s)
    ops = OpsMonitor(s, client=rec.client,
                     running=lambda: {e.id for e in ab.store.current.experiments if e.active(time.time())})
    ops.metrics.late_replies = lambda: rec.late_replies
    ops.metrics.exposures_lost = lambda: sink.exposures_lost
    ops.metrics.exposures_logged = lambda: sink.exposures_logged
    ops.metrics.exposures_deferred = lambda: sink.exposures_deferred
    ops.metrics.exposures_resent = lambda: sink.exposures_resent

    async def recommendations(request: Request) -> Response:
        t0 = time.perf_counter()
        req = params.parse(request.path_params["kind"], request.query_params.multi_items())
        if s.user_id_key and req.user_id:   # README "Personal data": the id is stored, logged and exposed hashed
            req = dataclasses.replace(req, user_id=pseudonym(req.user_id, s.user_id_key))
        shed = shed_reason(s, ops.loop_lag.sustained(time.perf_counter()), ops.features_behind_s(time.time()))
        if shed:
            req = ab.assign(req)
            reply = rec.shed(req, shed)
        else:
            req = ab.assign(await rec.check_products(req))
            reply = await rec.recommend(req)
        body = reply_body(reply)
        served = status(reply)
        sink.expose(exposure(req, reply, served, time.time()))
        ops.observe_reply(req.kind, served, reply, time.perf_counter() - t0)
        if req.kind == "homepage" and req.user_id:
            ops.metrics.observe_cache(reply.cached)
        return Response(body, media_type="application/json")

    async def erase_user(user_id: str) -> dict[str, Any]:
        """DELETE /api/v1/admin/users/{id} (serving/admin.py): the shopper erased (streams/erasures.py)."""
        report = await erase(s, rec.store, rec.client, [user_id], source="api", producer=sink.producer)
        return report.to_json()

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(ops.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request) -> Response:
        return OrjsonResponse(params.openapi())

    schema_files = jsonschema.published()

    async def record_schema(request: Request) -> Response:
        """The Kafka contract's record schemas (docs/publishing.md), as docs/schemas holds them."""
        return Response(schema_files[request.url.path.rsplit("/", 1)[1]], media_type="application/schema+json")

    async def post_events(request: Request) -> Response:
        """Validate the whole request, send it, answer 202 after every ack (see module docstring)."""
        ingest.check_content_type(request.headers.get("content-type"))
        body = await _read_body(request, s.http_max_body_bytes)
        events = pseudonymise_events(ingest.parse_events(body, max_events=s.http_max_batch_events), s.user_id_key)
        await sink.send(events)
        return OrjsonResponse({"accepted": len(events)}, status_code=HTTPStatus.ACCEPTED)

    async def healthz(request: Request) -> Response:
        if sink.connected:
            return OrjsonResponse({"status": "ok"})
        return error_response(HTTPStatus.SERVICE_UNAVAILABLE, "kafka unavailable",
                              headers={"Retry-After": str(RETRY_AFTER_S)}, status="kafka unavailable")

    async def readyz(request: Request) -> Response:
        """Liveness says the process is up; readiness says a request would be answered by the agents."""
        path = rec.path
        if not sink.connected or not rec.connected:
            status = "kafka unavailable"
        else:
            status = "ready" if path.ready else path.reason
        if status == "ready":
            return OrjsonResponse({"status": status, "model_version": path.model_version})
        return error_response(HTTPStatus.SERVICE_UNAVAILABLE, status, headers={"Retry-After": str(RETRY_AFTER_S)},
                              status=status, model_version=path.model_version)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await sink.start()
        follow = asyncio.create_task(ab.run(), name="experiments-file")
        try:
            await rec.start()
        except Exception as exc:  # recommendations still answer, from the fallback
            log.error("recommendation request/reply not started (%r): serving the fallback", exc)
        await ops.start()
        try:
            yield
        finally:
            follow.cancel()
            await ops.stop()
            await rec.stop()
            await sink.stop()

    app = Starlette(
        routes=[Route("/api/v1/recommendations/{kind}", recommendations, methods=["GET"]),
                Route("/api/v1/events", post_events, methods=["POST"]), Route("/openapi.json", openapi, methods=["GET"]),
                *(Route(f"/schemas/{name}", record_schema, methods=["GET"]) for name in schema_files),
                Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz, methods=["GET"]),
                *admin_routes(s, ab.store, erase_user),
                Route("/metrics", metrics, methods=["GET"]), *ops_routes(ops)],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[Middleware(RequestMetrics, ops=ops)],
        lifespan=lifespan,
    )
    app.state.sink = sink
    app.state.recommender = rec
    app.state.experiments = ab
    app.state.ops = ops
    return app


def serve(s: Settings, host: str, port: int) -> None:
    """Run the API under uvicorn (uvloop, httptools, no access log) until SIGINT/SIGTERM. Idle keep-alive
    connections stay open RECSTREAM_HTTP_KEEPALIVE_S: with uvicorn's 5 s, equal to httpx's own idle expiry,
    a client reusing a connection as the server closed it got a ReadError (1 in 27,000 soak requests)."""
    import uvicorn

    uvicorn.run(create_app(s), host=host, port=port, loop="uvloop", http="httptools",
                access_log=False, lifespan="on", log_level="info", timeout_keep_alive=s.http_keepalive_s)
