"""A/B testing in the API process: each request is assigned to its experiments' variants, runs with
their changes, and what it was served is logged to the exposures topic.

Assignment (recstream.experiments.assignment): the unit is the user id, else the session id; a
request with neither is in no experiment. The unit hashes to the same variants in every API process
and after every restart, as long as the experiments file is the same. The file is re-read when it
changes (checked every `experiments_reload_s`); a file that became invalid is logged and the last
good one kept. The file's [defaults] apply to every request; an assigned variant's changes override
them. The result travels to the agents as the request's `overrides`, so the agents need no file.

Exposure log: one `schemas.Exposure` per served list (in an experiment or not; fallback and cached
answers included), written to the process's exposure journal (serving/journal.py: one write() to a
local file) before the HTTP answer leaves, then produced through the events producer (acks=all,
idempotent) without holding the answer for the ack. Delivery is therefore at least once: a line
whose send failed, or that a process took with it when it died, is sent again from the journal
(by this process, or by the next API process to start on the host), and the attribution worker
counts an exposure once by its request id. Only a journal write that fails (disk full) or a
machine crash before the page cache reached the disk can lose one (`exposures_lost`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from recstream.experiments.assignment import resolve, unit_for
from recstream.experiments.definition import Changes
from recstream.experiments.store import ExperimentStore
from recstream.settings import Settings
from schemas import Exposure, Overrides, RecommendationReply, RecommendationRequest

log = logging.getLogger(__name__)


def unit_of(req: RecommendationRequest) -> str | None:
    return unit_for(req.user_id, req.session_id) if req.user_id or req.session_id else None


def overrides_of(changes: Changes) -> Overrides | None:
    values = {f.name: getattr(changes, f.name) for f in dataclasses.fields(Overrides)}
    return Overrides(**values) if any(v is not None for v in values.values()) else None


def exposure(req: RecommendationRequest, reply: RecommendationReply, status: str, now: float) -> Exposure:
    items = tuple(i.product_id for i in reply.items)
    return Exposure(request_id=req.request_id, ts=now, kind=req.kind,
                    unit=unit_of(req) or "r:" + req.request_id,   # no user, no session: the request alone
                    user_id=req.user_id, session_id=req.session_id, experiments=req.experiments or None,
                    items=items, positions=tuple(range(1, len(items) + 1)), model_version=reply.model_version,
                    status=status, latency_ms=max(0.0, (now - req.created_at) * 1000))


class Experiments:
    def __init__(self, s: Settings, store: ExperimentStore | None = None):
        self.s = s
        self.store = store or ExperimentStore(s.experiments_file)
        self.store.refresh()

    async def run(self) -> None:
        """Follow the file: re-read it when it changed."""
        while True:
            await asyncio.sleep(self.s.experiments_reload_s)
            try:
                if await asyncio.to_thread(self.store.refresh):
                    log.info("experiments file revision %d loaded", self.store.current.revision)
            except Exception as exc:  # serving goes on with the last good set
                log.error("experiments file not re-read: %r", exc)

    def assign(self, req: RecommendationRequest, now: float | None = None) -> RecommendationRequest:
        es = self.store.current
        unit = unit_of(req)
        if unit is None:
            chosen, changes = {}, es.defaults
        else:
            chosen, changes = resolve(es, unit, time.time() if now is None else now, req.kind)
        return dataclasses.replace(req, experiments=chosen or None, overrides=overrides_of(changes))
