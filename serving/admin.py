"""The admin API for A/B experiments: read and change the experiments file over HTTP.

    GET    /api/v1/admin/experiments        200 {"revision", "defaults", "experiments": [...], "file_error"}
    GET    /api/v1/admin/experiments/{id}   200 experiment | 404
    PUT    /api/v1/admin/experiments/{id}   201 created | 200 replaced | 400 invalid | 409 conflict | 413
    DELETE /api/v1/admin/experiments/{id}   200 {"deleted": id} | 404 | 409
    PUT    /api/v1/admin/defaults           200 {"revision", "defaults"} | 400 | 409 | 413
    DELETE /api/v1/admin/users/{id}         200 what was erased where (streams/erasures.py) | 400 | 503

DELETE .../users/{id} erases a shopper on request (README "Personal data"): idempotent, a repeat answers
200 with "erased_before": true. The id is the shop's own (hashed with RECSTREAM_USER_ID_KEY when set);
the answer comes once Redis is clean and the erasure is on the erasures topic; the archive worker
rewrites the archive in the background when it reads it.

Every request needs `Authorization: Bearer <admin_token>` (401 otherwise); with no admin_token set
the API is off (403). Experiments are JSON in the file's shape (recstream.experiments.definition:
experiment_to_json), with "slice" and "active" added on the way out. Changes go through
ExperimentStore's one write path (locked, validated, atomic, revision + 1); a running experiment may
only change its description and end, and may not be deleted, unless `?force=1`. A rejected request
writes nothing. Refusals carry the API's one error body (serving/errors.py), each problem of an
experiment as a field: {"error": "invalid experiment", "fields": [{"field": "variants", "reason": ...}]}.
"""
from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import orjson
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from recstream.experiments.definition import (
    Experiment,
    ExperimentError,
    ExperimentSet,
    UnknownExperiment,
    changes_from_json,
    changes_to_json,
    experiment_from_json,
    experiment_to_json,
)
from recstream.experiments.store import ExperimentStore
from recstream.settings import Settings
from schemas.base import Id, Invalid
from serving.errors import ApiError, OrjsonResponse, located

PREFIX = "/api/v1/admin"
MAX_BODY_BYTES = 64 * 1024
_TRUE = {"1", "true", "yes"}

Handler = Callable[[Request], Awaitable[Response]]
Eraser = Callable[[str], Awaitable[dict[str, Any]]]   # a user id -> the erasure's report (serving/app.py)


class _Refused(ApiError):
    """A request answered with an error status and the one error body (serving/errors.py); `problems`,
    the experiments' 'location: message' lines, become its fields."""

    def __init__(self, status: int, error: str, problems: list[str] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, error, located(problems or []), headers)


def admin_routes(s: Settings, store: ExperimentStore, eraser: Eraser | None = None) -> list[Route]:
    """The admin API's routes, each behind the bearer token. Why this long: the handlers are closures
    over the settings and the experiments' store, each a few lines, and end in one route table."""
    def guarded(handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                _authorize(s.admin_token, request.headers.get("authorization", ""))
                return await handler(request)
            except _Refused as r:
                return r.response()
        return endpoint

    async def list_experiments(request: Request) -> Response:
        store.refresh()
        es = store.current
        return OrjsonResponse({"revision": es.revision, "defaults": changes_to_json(es.defaults),
                               "experiments": [_out(es, e, time.time()) for e in es.experiments],
                               "file_error": store.error})

    async def get_experiment(request: Request) -> Response:
        store.refresh()
        es = store.current
        return OrjsonResponse(_out(es, _lookup(es, request.path_params["id"]), time.time()))

    async def put_experiment(request: Request) -> Response:
        eid = request.path_params["id"]
        body = await _json_body(request)
        if isinstance(body, dict):
            if "id" in body and body["id"] != eid:
                raise _Refused(HTTPStatus.BAD_REQUEST, "invalid experiment",
                               [f"body.id: must equal the path's id {eid!r}, got {body['id']!r}"])
            body = {**body, "id": eid}
        try:
            e = experiment_from_json(body)
        except ExperimentError as exc:
            raise _Refused(HTTPStatus.BAD_REQUEST, "invalid experiment", exc.problems) from None
        now, force = time.time(), _force(request)
        created = await _write(lambda: store.put(e, force=force, now_s=now))
        es = store.current
        return OrjsonResponse(_out(es, es.get(eid), now),
                              status_code=HTTPStatus.CREATED if created else HTTPStatus.OK)

    async def delete_experiment(request: Request) -> Response:
        eid = request.path_params["id"]
        force = _force(request)
        await _write(lambda: store.delete(eid, force=force))
        return OrjsonResponse({"deleted": eid})

    async def put_defaults(request: Request) -> Response:
        body = await _json_body(request)
        try:
            changes = changes_from_json(body)
        except ExperimentError as exc:
            raise _Refused(HTTPStatus.BAD_REQUEST, "invalid defaults", exc.problems) from None
        es = await _write(lambda: store.set_defaults(changes))
        return OrjsonResponse({"revision": es.revision, "defaults": changes_to_json(es.defaults)})

    async def erase_user(request: Request) -> Response:
        uid = request.path_params["id"]
        try:
            Id()(uid, time.time())
        except Invalid as exc:
            raise _Refused(HTTPStatus.BAD_REQUEST, "invalid user id", [f"id: {exc}"]) from None
        if eraser is None:
            raise _Refused(HTTPStatus.SERVICE_UNAVAILABLE, "erasure is not available in this process")
        try:
            return OrjsonResponse(await eraser(uid))
        except (OSError, KafkaError, RedisError, TimeoutError) as exc:   # nothing half done is lost: a retry repeats it
            raise _Refused(HTTPStatus.SERVICE_UNAVAILABLE, f"erasure incomplete, retry: {type(exc).__name__}",
                           headers={"Retry-After": "1"}) from None

    one = PREFIX + "/experiments/{id}"
    return [Route(PREFIX + "/experiments", guarded(list_experiments), methods=["GET"]),
            Route(one, guarded(get_experiment), methods=["GET"]),
            Route(one, guarded(put_experiment), methods=["PUT"]),
            Route(one, guarded(delete_experiment), methods=["DELETE"]),
            Route(PREFIX + "/defaults", guarded(put_defaults), methods=["PUT"]),
            Route(PREFIX + "/users/{id}", guarded(erase_user), methods=["DELETE"])]


def _authorize(token: str, header: str) -> None:
    if not token:
        raise _Refused(HTTPStatus.FORBIDDEN, "admin API disabled: set RECSTREAM_ADMIN_TOKEN")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise _Refused(HTTPStatus.UNAUTHORIZED, "missing or wrong admin token (Authorization: Bearer <token>)",
                       headers={"WWW-Authenticate": "Bearer"})


async def _json_body(request: Request) -> Any:
    """The JSON body, refused (413) as soon as it is over MAX_BODY_BYTES, (400) when not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body: over {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body: over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        return orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as exc:
        raise _Refused(HTTPStatus.BAD_REQUEST, f"body: not valid JSON: {exc}") from None


async def _write(change: Callable[[], Any]) -> Any:
    """Run a store write off the event loop (it may wait for the file lock); errors become 404 / 409."""
    try:
        return await run_in_threadpool(change)
    except UnknownExperiment as exc:
        raise _Refused(HTTPStatus.NOT_FOUND, str(exc)) from None
    except ExperimentError as exc:
        raise _Refused(HTTPStatus.CONFLICT, "rejected: conflicts with the stored experiments", exc.problems) from None


def _lookup(es: ExperimentSet, eid: str) -> Experiment:
    try:
        return es.get(eid)
    except UnknownExperiment as exc:
        raise _Refused(HTTPStatus.NOT_FOUND, str(exc)) from None


def _force(request: Request) -> bool:
    return request.query_params.get("force", "").lower() in _TRUE


def _out(es: ExperimentSet, e: Experiment, now_s: float) -> dict[str, Any]:
    return {**experiment_to_json(e), "slice": list(es.slices[e.id]), "active": e.active(now_s)}
