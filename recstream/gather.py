"""Scatter-gather over index shards, the ranking side: a request's candidate sets, one per retrieval
shard, merged into the one set an unsharded index would have given.

Every shard searches its own items with the same query and returns its top k by inner product, so
the global top k is the best k of their union (models.index.merge_topk does the same in one process).
Shard 0 also carries every source besides ANN (session, co-view, co-purchase, trending, brand); the
others carry ANN candidates only. A shard's ANN answer keeps the request's on-screen items: they take
their slots in the global top k, then the merge drops them, as retrieval over one index does. ANN
candidates of a shard on another model version than shard 0 (a swap under way) are dropped: their
scores come from another embedding space.

`Gather` keeps the parts of requests still waiting, without clocks or tasks of its own: the ranking
agent offers parts as they come and expires a request when its wait is over.
"""
from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict

from recstream.rules import Proposals
from schemas import CandidateSet, RecommendationRequest

ANN = "als"


def ann_k(r: RecommendationRequest, default: int) -> int:
    """ANN neighbours asked of the index (of each shard): the candidate count, `default` unless an A/B
    variant changes it, plus one for the query's own item."""
    return (r.overrides.candidates if r.overrides and r.overrides.candidates else default) + 1


def merge_parts(parts: list[CandidateSet], k: int) -> CandidateSet:
    """One candidate set from the parts of one request (any non-empty subset of its shards), with the
    best `k` ANN candidates of all (ann_k: what each shard was asked for)."""
    if not parts:
        raise ValueError("nothing to merge")
    parts = sorted(parts, key=lambda p: p.shard)
    lead = parts[0]   # shard 0 when it answered: the sources besides ANN, the query, the version
    proposals = Proposals()
    ann: list[tuple[float, str, str | None]] = []
    for p in parts:
        ann_scores, ann_anchors = p.scores.get(ANN), p.anchors.get(ANN)
        if ann_scores is not None and p.model_version == lead.model_version:
            ann += [(sc, pid, ann_anchors[i] if ann_anchors else None)
                    for i, (pid, sc) in enumerate(zip(p.product_ids, ann_scores)) if _proposed(sc)]
        for source, col in p.scores.items():
            if source == ANN:
                continue
            source_anchors = p.anchors.get(source)
            for i, (pid, sc) in enumerate(zip(p.product_ids, col)):
                if _proposed(sc):
                    proposals.add(pid, source, sc, source_anchors[i] if source_anchors else None)
    ann.sort(key=lambda x: -x[0])   # stable: ties keep shard order
    proposals.exclude = set(lead.request.on_screen)   # they took their slots in the top k, as in one index
    for sc, pid, anchor in ann[:k]:
        proposals.add(pid, ANN, sc, anchor)
    ids, scores, anchors = proposals.columns()
    timings: dict[str, float] = {}
    for p in parts:   # the slowest shard's time per stage
        for name, ms in (p.timings_ms or {}).items():
            timings[name] = max(timings.get(name, ms), ms)
    return dataclasses.replace(lead, product_ids=tuple(ids),
                               scores={s: tuple(math.nan if x is None else x for x in c) for s, c in scores.items()},
                               anchors={s: tuple(c) for s, c in anchors.items()}, timings_ms=timings or None,
                               shard=0, shards=1)


def _proposed(score: float | None) -> bool:
    """A candidate set's score column holds NaN where the source did not propose the item (None before JSON)."""
    return score is not None and not math.isnan(score)


class Gather:
    """Parts of requests that wait for their other shards; requests already merged are remembered
    (the latest `remember` of them) so a part that comes after its request's wait is dropped.
    `candidates`: the ANN candidates a request asks for unless its A/B variant says otherwise."""

    def __init__(self, candidates: int, remember: int = 100_000):
        self.candidates, self.remember = candidates, remember
        self._waiting: dict[str, dict[int, CandidateSet]] = {}
        self._done: OrderedDict[str, None] = OrderedDict()
        self.complete = self.partial = self.late = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def offer(self, cs: CandidateSet) -> tuple[CandidateSet | None, bool]:
        """(the merged set if this part completed its request, else None; whether it was the first part)."""
        rid = cs.request.request_id
        if rid in self._done:
            self.late += 1
            return None, False
        parts = self._waiting.setdefault(rid, {})
        first = not parts
        parts[cs.shard] = cs
        if len(parts) < cs.shards:
            return None, first
        self.complete += 1
        return self._finish(rid), first

    def expire(self, request_id: str) -> CandidateSet | None:
        """The merge of what came for a request whose wait is over; None if it was merged already."""
        if request_id not in self._waiting:
            return None
        self.partial += 1
        return self._finish(request_id)

    def _finish(self, rid: str) -> CandidateSet:
        parts = self._waiting.pop(rid)
        self._done[rid] = None
        while len(self._done) > self.remember:
            self._done.popitem(last=False)
        return merge_parts(list(parts.values()), ann_k(next(iter(parts.values())).request, self.candidates))
