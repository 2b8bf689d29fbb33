"""What the recommendation endpoints call: homepage cache -> Kafka request/reply -> popularity fallback.

Each API process has a reply topic of its own (made at start, deleted at stop) and a table of
pending requests by request_id. A request is produced to the requests topic and awaited within
`serving_deadline_ms`; on a deadline miss, a failed agent, or Kafka or Redis trouble the answer
comes from an in-memory list of trending items, refreshed from Redis in the background, so the
fallback needs neither Redis nor Kafka at request time. A reply that arrives after its deadline
is dropped.

Homepage replies are cached in Redis per user (and A/B variants, count, device, page) for
`homepage_cache_ttl_s`, tagged with the user's event count and the published model version; any
new event of that user changes the count, so the next request recomputes and real-time adaptation
is kept, and a new model is served at once. A cached reply naming a
product now out of stock is recomputed too (one SMISMEMBER per hit).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from agents.runner import serving_producer
from recstream.rules import Rules, select
from recstream.settings import Settings
from schemas import RecommendationReply, RecommendationRequest, RecommendedItem, SchemaError
from schemas.base import FieldError
from serving.params import ParamError
from streams.online_store import open_store
from streams.redisconn import AnyRedis, connect
from streams.store import Store
from streams.topics import delete_topics, ensure_topics, reply_spec

log = logging.getLogger(__name__)

FALLBACK_ITEMS = 100         # trending items kept in memory, overall and per category
FALLBACK_CATEGORIES = 500    # categories with a list kept in memory at most (the most recently named)
FALLBACK_NEW = 50            # categories without a list looked up per refresh at most (the most recently named)
FALLBACK_CATEGORY_AGE_S = 3600   # a category no request named for this long is forgotten
DEADLINE_MISSED = "no reply within"   # a fallback reply's error when the agents were too slow
OVERLOADED = "overloaded:"            # ... when the API shed the request (shed_reason)
AGENT_FRESH_S = 10.0         # a serving agent that has not reported (keys.AGENTS) for this long is taken as gone
AGENT_FORGET_S = 3600.0      # ... and its entry is removed after this long
PATH_CHECK_S = 1.0           # the API reads the agents' reports this often


@dataclass(frozen=True)
class PathStatus:
    """Whether requests can be answered by the agents, and if not, why (the fallback reply says so)."""
    ready: bool
    reason: str = ""               # why not ("" when ready)
    model_version: str = "none"    # the version the agents serve: the published one where they have it


def path_status(reports: Mapping[str, Mapping], roles: Sequence[str], published: str | None, now: float) -> PathStatus:
    """From the serving agents' reports (keys.AGENTS: "group:host:pid" -> {ts, model_version}): ready when
    every consumer group the path needs (`roles`: each retrieval shard's group, then "ranking") has an agent
    that reported within AGENT_FRESH_S, and, once a version is published, one with a model loaded (a
    model swap keeps the old version meanwhile: still ready)."""
    live: dict[str, list[str | None]] = {r: [] for r in roles}
    for name, rep in reports.items():
        role = name.split(":", 1)[0]
        if role in live and now - float(rep.get("ts") or 0.0) <= AGENT_FRESH_S:
            live[role].append(rep.get("model_version"))
    serving = [v for versions in live.values() for v in versions if v]
    version = published if published in serving else (max(serving, key=_version_key) if serving else "none")
    for role, versions in live.items():
        if not versions:
            return PathStatus(False, f"no {role} agent has reported in the last {AGENT_FRESH_S:g} s", version)
        if published and not any(versions):
            return PathStatus(False, f"the {role} agents have not loaded a model yet (version {published} is "
                                     f"published)", version)
    return PathStatus(True, "", version)


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), v) if v.isdigit() else (-1, v)


class Fallback:
    """Trending items in memory: overall, and per category for the categories requests named.

    Requests name any category they like, so what is kept is bounded: a category is looked up on the
    next refresh (at most FALLBACK_NEW of them, the latest named) and kept only if it has a trending
    list; at most FALLBACK_CATEGORIES are kept, the most recently named, each until no request has
    named it for FALLBACK_CATEGORY_AGE_S. Made-up categories thus cost one lookup each and never push
    out a real one's list."""

    def __init__(self, s: Settings, store: Store):
        self.s, self.store = s, store
        self.overall: list[tuple[str, float, str | None]] = []          # (product, weight, category)
        self.by_category: dict[str, list[tuple[str, float, str | None]]] = {}
        self.asked: dict[str, float] = {}    # category with a list -> when a request last named it
        self.new: dict[str, None] = {}       # categories named, no list yet: looked up on the next refresh
        self.refreshed_at = 0.0

    def note(self, category: str, now: float) -> None:
        """A request named `category`."""
        if category in self.by_category:
            self.asked[category] = now
            return
        self.new.pop(category, None)
        self.new[category] = None
        if len(self.new) > FALLBACK_NEW:
            del self.new[next(iter(self.new))]   # the least recently named

    async def refresh(self) -> None:
        now = time.time()
        half_life = self.s.trending_half_life_s
        recent = sorted((c for c, t in self.asked.items() if now - t < FALLBACK_CATEGORY_AGE_S),
                        key=self.asked.__getitem__, reverse=True)
        new = list(self.new)
        wanted = list(dict.fromkeys(new[::-1] + recent))   # the most recently named first
        overall = await self.store.trending(now, half_life, FALLBACK_ITEMS)
        per_cat = {c: await self.store.trending(now, half_life, FALLBACK_ITEMS // 2, category=c) for c in wanted}
        ids = list(dict.fromkeys([p for p, _ in overall] + [p for rows in per_cat.values() for p, _ in rows]))
        stock = dict(zip(ids, await self.store.in_stock(ids)))
        cats = await self.store.categories(ids)

        def keep(rows):
            return [(p, w, cats.get(p)) for p, w in rows if stock.get(p, True)]

        self.overall = keep(overall)
        lists = [(c, rows) for c, rows in ((c, keep(r)) for c, r in per_cat.items()) if rows]
        self.by_category = dict(lists[:FALLBACK_CATEGORIES])
        self.asked = {c: self.asked.get(c, now) for c in self.by_category}
        for c in new:       # looked up (categories first named while this ran stay for the next refresh)
            self.new.pop(c, None)
        self.refreshed_at = now

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # keep serving the last list
                if _stopping():
                    raise
                log.warning("fallback refresh failed (serving the list from %.0f s ago): %r",
                            time.time() - self.refreshed_at, exc)
            await _pause(self.s.fallback_refresh_s)

    def reply(self, req: RecommendationRequest, error: str, model_version: str = "none") -> RecommendationReply:
        category = req.ctx("category", "")
        rows = self.by_category.get(category) if category else None
        if category:
            self.note(category, time.time())
        if not rows:
            rows, category = self.overall, ""
        exclude = frozenset({*req.cart_items, *([req.product_id] if req.product_id else [])})
        ids = [p for p, _, _ in rows]
        chosen = select(ids, [w for _, w, _ in rows], [c for _, _, c in rows], [True] * len(rows),
                        Rules(req.count, self.s.max_per_category, exclude))
        items = tuple(RecommendedItem(product_id=rows[i][0], score=float(rows[i][1]),
                                      reason=f"trending in {category or rows[i][2]}" if (category or rows[i][2])
                                      else "trending now", source="popular") for i in chosen)
        return RecommendationReply(request_id=req.request_id, kind=req.kind, items=items, experiments=req.experiments,
                                   fallback=True, error=error[:512], model_version=model_version)



def shed_reason(s: Settings, loop_late_s: float, features_behind_s: float | None) -> str | None:
    """Why the API answers a recommendation request from the fallback at once, asking neither Redis nor
    the agents, or None to serve it. Its event loop stays late (RECSTREAM_SERVING_SHED_LOOP_LAG_MS): the
    request already waited that long and more work would only make the next ones wait longer. Or the
    real-time feature consumer is behind (RECSTREAM_SERVING_SHED_FEATURE_LAG_S): freshness first, the
    serving path gives the host's CPU to the features before they pass the on-call alert, and every
    answer computed meanwhile would read stale sessions anyway."""
    if s.serving_shed_loop_lag_ms and loop_late_s * 1000 > s.serving_shed_loop_lag_ms:
        return (f"{OVERLOADED} the API's event loop runs {loop_late_s * 1000:.0f} ms late "
                f"(shedding above {s.serving_shed_loop_lag_ms:g} ms)")
    if s.serving_shed_feature_lag_s and features_behind_s is not None and features_behind_s > s.serving_shed_feature_lag_s:
        return (f"{OVERLOADED} the real-time features are {features_behind_s:.1f} s behind "
                f"(shedding above {s.serving_shed_feature_lag_s:g} s)")
    return None

class Recommender:
    def __init__(self, s: Settings, client: AnyRedis | None = None, store: Store | None = None):
        """`store`: the online store (tests pass a MemoryStore), else one on `client` (else one connected here)."""
        self.s = s
        self.instance = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}".lower()
        self.reply_topic = reply_spec(s, self.instance).name
        self.client = client or connect(s, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.store: Store = store or open_store(s, self.client)
        self.fallback = Fallback(s, self.store)
        self.pending: dict[str, asyncio.Future] = {}
        self.producer = None
        self.consumer: AIOKafkaConsumer | None = None
        self.connected = False
        self._tasks: list[asyncio.Task] = []
        self._writes: set[asyncio.Task] = set()   # homepage cache writes in flight
        self.late_replies = 0
        self.path = PathStatus(False, "the API has not read the agents' reports yet")

    async def start(self) -> None:
        await ensure_topics(self.s, [reply_spec(self.s, self.instance)])
        self.producer = serving_producer(self.s)
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.s.kafka_bootstrap, enable_auto_commit=False,
                                         fetch_max_wait_ms=100)
        await self.consumer.start()
        tp = TopicPartition(self.reply_topic, 0)
        self.consumer.assign([tp])
        await self.consumer.seek_to_end(tp)
        await self.consumer.position(tp)
        with contextlib.suppress(Exception):
            await self.fallback.refresh()
        self._tasks = [asyncio.create_task(self._read_replies(), name="reply-reader"),
                       asyncio.create_task(self.fallback.run(), name="fallback-refresh"),
                       asyncio.create_task(self._watch_path(), name="path-status")]
        self.connected = True

    async def stop(self) -> None:
        self.connected = False
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for closer in (self.consumer, self.producer):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer.stop()
        with contextlib.suppress(Exception):
            await delete_topics(self.s, [self.reply_topic])
        await self.client.aclose()

    async def check_path(self) -> PathStatus:
        """Read the agents' reports and the published version (one round trip); forget long-gone agents."""
        now = time.time()
        reports, published = await self.store.serving_path(AGENT_FORGET_S, now)
        version = str(published["version"]) if published and published.get("name") == self.s.model_name else None
        self.path = path_status(reports, [*self.s.retrieval_agents(), "ranking"], version, now)
        return self.path

    async def _watch_path(self) -> None:
        while True:
            try:
                await self.check_path()
            except Exception as exc:   # Redis trouble: the last status stands, and requests fall back anyway
                if _stopping():
                    raise
                log.info("agent reports not read: %r", exc)
            await _pause(PATH_CHECK_S)

    async def _read_replies(self) -> None:
        assert self.consumer is not None
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=1000)
            except Exception as exc:  # Kafka trouble: requests fall back meanwhile; keep reading
                if _stopping():
                    raise
                log.warning("reading replies failed: %r; retrying", exc)
                await _pause(0.5)
                continue
            for records in batches.values():
                for r in records:
                    fut = self.pending.get(r.key.decode()) if r.key else None
                    if fut is None or fut.done():
                        self.late_replies += 1
                        continue
                    try:
                        fut.set_result(RecommendationReply.from_json(r.value))
                    except SchemaError as exc:
                        fut.set_exception(exc)

    async def check_products(self, req: RecommendationRequest) -> RecommendationRequest:
        """404 for products the catalogue does not know; the product's category goes into the context
        (the fallback's trending list comes from it). Redis trouble: proceed (the fallback will serve)."""
        ids = [req.product_id] if req.product_id else list(req.cart_items)
        if not ids:
            return req
        try:
            async with asyncio.timeout(self._remaining_s(req)):
                categories = await self.store.categories(ids)
                exists = await self.store.existing_items(ids) if len(categories) < len(ids) else set(ids)
        except Exception:
            return req
        unknown = [x for x in ids if x not in exists]
        field = "product_id" if req.product_id else "cart_items"
        if req.product_id and unknown or len(unknown) == len(ids):
            raise ParamError([FieldError(field, f"unknown product {', '.join(map(repr, unknown[:5]))}")], status=404,
                             title="unknown product")
        context = dict(req.context or {})
        if "category" not in context and ids[0] in categories:
            context["category"] = categories[ids[0]]
        known = tuple(x for x in req.cart_items if x in exists)
        return dataclasses.replace(req, context=context, cart_items=known)

    def _remaining_s(self, req: RecommendationRequest) -> float:
        """What is left of the deadline, which runs from the request's creation (parameter parsing)."""
        return max(0.0, req.created_at + self.s.serving_deadline_ms / 1000 - time.time())

    async def recommend(self, req: RecommendationRequest) -> RecommendationReply:
        req = dataclasses.replace(req, reply_to=self.reply_topic, deadline_ms=self.s.serving_deadline_ms)
        cache_key = tag = None
        try:
            async with asyncio.timeout(self._remaining_s(req)):
                if req.kind == "homepage" and req.user_id:
                    cache_key = self.store.homepage_key(req.user_id, _variant_tag(req), req.count,
                                                        req.ctx("device"), req.ctx("page"))
                    cached, tag = await self.store.homepage_cached(cache_key, req.user_id)
                    if cached is not None:
                        reply = RecommendationReply.from_json(cached)
                    # a product that sold out since leaves at once: recompute rather than serve it
                    if cached is not None and all(await self.store.in_stock([i.product_id for i in reply.items])):
                        return dataclasses.replace(reply, request_id=req.request_id, cached=True,
                                                   timings_ms=_total(req) if req.debug else None)
                reply = await self._ask(req)
        except TimeoutError:
            return self._fallback(req, f"{DEADLINE_MISSED} {self.s.serving_deadline_ms} ms")
        except Exception as exc:  # Kafka, Redis, a bad reply: the shopper still gets items
            return self._fallback(req, f"{type(exc).__name__}: {exc}")
        # a shopper the store knows no event of (a new visitor, an erased shopper) is not cached: the reply
        # is the anonymous one, and a key named by the id would outlive an erasure (README "Personal data")
        if cache_key and tag is not None and not reply.fallback and not tag.startswith("0@"):
            task = asyncio.create_task(self._cache(cache_key, tag, reply))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)
        if req.debug:
            reply = dataclasses.replace(reply, timings_ms={**(reply.timings_ms or {}), **_total(req)})
        return reply

    async def _ask(self, req: RecommendationRequest) -> RecommendationReply:
        """Send the request and wait for its reply, never past the deadline. The deadline is also
        checked here, not only by the enclosing asyncio.timeout: a library that swallows the
        timeout's cancellation (seen under load: a request then waited forever for a reply the
        agents had rightly dropped) must not leave the caller waiting."""
        if not self.connected or self.producer is None:
            raise ConnectionError("not connected to Kafka")
        if self._remaining_s(req) <= 0:
            raise TimeoutError("deadline passed before the request was sent")
        fut = asyncio.get_running_loop().create_future()
        self.pending[req.request_id] = fut
        try:
            await self.producer.send(self.s.topic("rec.requests"), req.to_json(), key=req.key)
            done, _ = await asyncio.wait([fut], timeout=self._remaining_s(req))
            if not done:
                raise TimeoutError("no reply within the deadline")
            return fut.result()
        finally:
            self.pending.pop(req.request_id, None)

    async def _cache(self, key: str, tag: str, reply: RecommendationReply) -> None:
        try:
            body = dataclasses.replace(reply, timings_ms=None, session_recent=None).to_json()
            await self.store.cache_homepage(key, tag, body, self.s.homepage_cache_ttl_s)
        except Exception as exc:
            log.info("homepage cache write failed: %r", exc)

    def shed(self, req: RecommendationRequest, reason: str) -> RecommendationReply:
        """The fallback at once, asking neither Redis nor the agents (`shed_reason` says why)."""
        return self._fallback(req, reason)

    def _fallback(self, req: RecommendationRequest, error: str) -> RecommendationReply:
        """The trending list, naming the version the agents serve and, where the agents' reports show
        why they did not answer (none alive, no model loaded), that reason before the immediate one."""
        path = self.path
        if not path.ready and self.connected:
            error = f"{path.reason} ({error})"
        reply = self.fallback.reply(req, error, path.model_version)
        return dataclasses.replace(reply, timings_ms=_total(req)) if req.debug else reply


def _stopping() -> bool:
    """True when the current task is being cancelled: a library may turn the cancellation into
    another exception (seen with aiokafka under pytest), and a retry loop must still end."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _pause(seconds: float) -> None:
    """Sleep between the rounds of a background loop, unless the task is being cancelled: a library
    may also swallow the cancellation whole (seen here: the fallback's refresh, cancelled in its Redis
    reads, returned normally), and the loop then slept on; the API took 5 s to stop, the stop's bound."""
    if _stopping():
        raise asyncio.CancelledError
    await asyncio.sleep(seconds)


def _total(req: RecommendationRequest) -> dict[str, float]:
    """Milliseconds since the request was parsed: the clock every other stage offset starts from."""
    return {"total": (time.time() - req.created_at) * 1000}


def status(reply: RecommendationReply) -> str:
    """How a list was served (schemas.experiments.STATUSES): agents, cache, or which fallback."""
    if reply.cached:
        return "cached"
    if reply.fallback:
        return "fallback_deadline" if (reply.error or "").startswith(DEADLINE_MISSED) else "fallback_error"
    return "ok"


def _variant_tag(req: RecommendationRequest) -> str:
    """The homepage cache key's part for the request's variants and overrides ("-": none)."""
    if not req.experiments and req.overrides is None:
        return "-"
    raw = orjson.dumps([sorted((req.experiments or {}).items()), req.overrides.to_dict() if req.overrides else None])
    return hashlib.blake2b(raw, digest_size=6).hexdigest()


def reply_body(reply: RecommendationReply) -> bytes:
    """The HTTP body: the reply without the wire format's schema version fields."""
    d = reply.to_dict()
    d.pop("version", None)
    for item in d["items"]:
        item.pop("version", None)
    return orjson.dumps(d)
