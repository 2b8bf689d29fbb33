"""Baseline recommenders for offline evaluation (`Method`s): popularity, S-POP, item/session kNN, iALS, genre, random."""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from recstream.evaluation.core import Query, Split
from recstream.settings import Settings

_CELLS = 2_000_000   # scores held at once (queries x items): bounds memory on large catalogues
TUNED = Path(__file__).with_name("tuned_baselines.json")   # written by bench/tune_baselines.py


def tuned_params(protocol: str, path: Path | None = None) -> dict[str, dict[str, Any]]:
    """Per baseline name, the constructor arguments chosen on `protocol`'s validation split by
    bench/tune_baselines.py (figures: bench/results/baseline_tuning.json); empty where none were."""
    path = path or TUNED
    if not path.exists():
        return {}
    table: dict[str, dict[str, dict[str, Any]]] = json.loads(path.read_text())["protocols"]
    return table.get(protocol, {})


class _Baseline:
    """Shared machinery. The item index is the training items (sorted ids), then catalogue-only and held-out
    items (rankable only when a query's universe names them). Ranking is by (score desc, training popularity
    desc, a seeded random order): every list is padded with popularity, and items of equal popularity (all
    the new items of the new-items protocol) are not ordered by id, which can carry signal (MovieLens ids
    grow with the date a movie was added)."""
    name = "baseline"

    def __init__(self, seed: int | None = None, weights: Mapping[str, float] | None = None):
        self._seed = seed
        self.weights = dict(weights or Settings().event_weights)   # view 1, click 2, add_to_cart 3, purchase 5

    def fit(self, split: Split) -> None:
        self.seed = split.seed if self._seed is None else self._seed
        train = split.train
        trained = sorted({e.product_id for e in train})
        rest = sorted(({p.product_id for p in split.products} | split.held_out_items) - set(trained))
        self.items = np.array(trained + rest, dtype=object)
        self.n_train = len(trained)
        self.idx = {item: i for i, item in enumerate(self.items)}
        self.users = {u: i for i, u in enumerate(dict.fromkeys(e.user_id for e in train))}
        self.ev_item = np.array([self.idx[e.product_id] for e in train], dtype=np.int64)
        self.ev_user = np.array([self.users[e.user_id] for e in train], dtype=np.int64)
        self.ev_weight = np.array([self.weights.get(e.event_type, 1.0) for e in train])
        self.ev_time = np.array([e.timestamp for e in train], dtype=float)
        sessions = {key: i for i, key in enumerate(dict.fromkeys((e.user_id, e.session_id) for e in train))}
        self.ev_session = np.array([sessions[(e.user_id, e.session_id)] for e in train], dtype=np.int64)
        self.pop = np.bincount(self.ev_item, weights=self.ev_weight, minlength=len(self.items))
        order = np.lexsort((np.random.default_rng(self.seed).permutation(len(self.items)), -self.pop))
        self.pop_rank = np.empty(len(self.items), dtype=np.int64)
        self.pop_rank[order] = np.arange(len(self.items))
        self._universe: frozenset[str] | None = None
        self._fit(split)

    def _fit(self, split: Split) -> None:
        pass

    def _scores(self, queries: Sequence[Query]) -> np.ndarray:
        """Queries x items scores; higher first. Zero everywhere: pure popularity."""
        return np.zeros((len(queries), len(self.items)))

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        step = max(1, _CELLS // max(1, len(self.items)))
        out: list[list[str]] = []
        for start in range(0, len(queries), step):
            chunk = queries[start:start + step]
            out += [self._top(q, row, k) for q, row in zip(chunk, self._scores(chunk))]
        return out

    def _top(self, q: Query, row: np.ndarray, k: int) -> list[str]:
        s = np.array(row, dtype=float)
        if q.universe is None:
            s[self.n_train:] = -np.inf
        else:
            s[~self._universe_mask(q.universe)] = -np.inf
        s[[self.idx[x] for x in q.exclude if x in self.idx]] = -np.inf
        ok = np.flatnonzero(s > -np.inf)
        m = min(k, ok.size)
        if m < ok.size:   # a partial sort first: only the items scoring at least the m-th best (ties kept)
            threshold = np.partition(s[ok], ok.size - m)[ok.size - m]
            ok = ok[s[ok] >= threshold]
        top = ok[np.lexsort((self.pop_rank[ok], -s[ok]))][:m]
        out: list[str] = self.items[top].tolist()
        if q.universe is not None and len(out) < k:   # universe items we know nothing of, by id
            out += sorted(x for x in q.universe - q.exclude if x not in self.idx)[:k - len(out)]
        return out

    def _universe_mask(self, universe: frozenset[str]) -> np.ndarray:
        if universe is not self._universe and universe != self._universe:   # queries share a universe: cache it
            self._universe, self._mask = universe, np.zeros(len(self.items), dtype=bool)
            self._mask[[self.idx[x] for x in universe if x in self.idx]] = True
        return self._mask

    def _matrix(self, rows: Iterable[Mapping[str, float]]) -> sp.csr_matrix:
        """Rows of {item: value} -> a sparse rows x items matrix; unknown items dropped."""
        rows = list(rows)
        cells = [(r, self.idx[item], value)
                 for r, row in enumerate(rows) for item, value in row.items() if item in self.idx]
        r, c, v = zip(*cells) if cells else ((), (), ())
        return sp.csr_matrix((v, (r, c)), shape=(len(rows), len(self.items)), dtype=float)

    def _sessions(self, mask: np.ndarray | None = None) -> sp.csr_matrix:
        """Binary training sessions x items (a session = (user_id, session_id); an item once per session),
        sessions ordered by their last event, oldest first."""
        mask = np.ones(len(self.ev_item), dtype=bool) if mask is None else mask
        items, times = self.ev_item[mask], self.ev_time[mask]
        uniq, sess = np.unique(self.ev_session[mask], return_inverse=True)
        last = np.full(len(uniq), -np.inf)
        np.maximum.at(last, sess, times)
        order = np.argsort(last, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        x = sp.csr_matrix((np.ones(len(items)), (rank[sess], items)), shape=(len(uniq), len(self.items)))
        x.data[:] = 1.0   # duplicates were summed
        return x


class Popularity(_Baseline):
    """Most popular items: summed event weights in training, optionally over its last `window_days` only."""

    def __init__(self, window_days: float | None = None,
                 *, seed: int | None = None, weights: Mapping[str, float] | None = None):
        super().__init__(seed=seed, weights=weights)
        self.window_days = window_days
        self.name = "pop" if window_days is None else f"pop{window_days:g}d"

    def _fit(self, split: Split) -> None:
        w = self.ev_weight
        if self.window_days is not None and len(self.ev_time):
            w = np.where(self.ev_time >= self.ev_time.max() - self.window_days * 86400, w, 0.0)
        self.score = np.bincount(self.ev_item, weights=w, minlength=len(self.items))

    def _scores(self, queries: Sequence[Query]) -> np.ndarray:
        return np.broadcast_to(self.score, (len(queries), len(self.items)))


class SessionPopularity(_Baseline):
    """S-POP: the session's own items (history and cart) by how often they occur there, then global
    popularity (Hidasi et al., "Session-based recommendations with recurrent neural networks", ICLR 2016)."""
    name = "spop"

    def _scores(self, queries: Sequence[Query]) -> np.ndarray:
        counts = []
        for q in queries:
            c: dict[str, float] = {}
            for item in q.history + q.cart:
                c[item] = c.get(item, 0.0) + 1.0
            counts.append(c)
        scores: np.ndarray = self._matrix(counts).toarray()
        return scores


def _cosine_top(x: sp.csr_matrix, neighbours: int, shrink: float = 0.0) -> sp.csr_matrix:
    """Item-item cosine over binary baskets, sim(a, b) = c_ab / (sqrt(c_a c_b) + shrink), each row pruned to
    its `neighbours` most similar items (Sarwar et al., "Item-based collaborative filtering", WWW 2001; the
    shrink term, which discounts pairs seen together rarely, as in Ferrari Dacrema et al.'s ItemKNN-CF)."""
    c = (x.T @ x).tocoo()
    norm = np.sqrt(c.diagonal())
    denom = norm[c.row] * norm[c.col] + shrink
    data = np.divide(c.data, denom, out=np.zeros_like(c.data, dtype=float), where=denom > 0)
    sim = sp.csr_matrix((data, (c.row, c.col)), shape=c.shape)
    sim.setdiag(0.0)
    sim.eliminate_zeros()
    for r in range(sim.shape[0]):
        lo, hi = sim.indptr[r], sim.indptr[r + 1]
        if hi - lo > neighbours:
            row = sim.data[lo:hi]
            row[np.argpartition(row, hi - lo - neighbours)[:hi - lo - neighbours]] = 0.0
    sim.eliminate_zeros()
    return sim


class ItemKNN(_Baseline):
    """Item-to-item kNN on session co-occurrence: a candidate scores the summed similarity to the query's
    anchors (the cart, else the last `anchors` history items weighted 1/position, newest first), the
    similarity shrunk by `shrink` (see `_cosine_top`). Cart queries use purchase baskets when training has
    purchases ("frequently bought together")."""
    name = "iknn"

    def __init__(self, neighbours: int = 100, anchors: int = 5, shrink: float = 0.0,
                 *, seed: int | None = None, weights: Mapping[str, float] | None = None):
        super().__init__(seed=seed, weights=weights)
        self.neighbours, self.anchors, self.shrink = neighbours, anchors, shrink

    def _fit(self, split: Split) -> None:
        self.sim = _cosine_top(self._sessions(), self.neighbours, self.shrink)
        bought = np.array([e.event_type == "purchase" for e in split.train], dtype=bool)
        self.sim_cart = (_cosine_top(self._sessions(bought), self.neighbours, self.shrink) if bought.any()
                         else self.sim)

    def _scores(self, queries: Sequence[Query]) -> np.ndarray:
        cart, browse = [], []
        for q in queries:
            a: dict[str, float] = {}
            if q.cart:
                for item in q.cart:
                    a[item] = 1.0
            else:
                for pos, item in enumerate(reversed(q.history[-self.anchors:]), 1):
                    a[item] = a.get(item, 0.0) + 1.0 / pos
            is_cart = bool(q.cart) and q.kind == "cart"
            cart.append(a if is_cart else {})
            browse.append({} if is_cart else a)
        scores: np.ndarray = (self._matrix(cart) @ self.sim_cart + self._matrix(browse) @ self.sim).toarray()
        return scores


# V-SKNN's weight of the current session's item at position p of L (1 = oldest, L = newest), session-rec's
# vsknn.py choices (Ludewig & Jannach 2018). "linear" is the decay the paper describes, 1 - 0.1 (L - p) down to
# 0 (the newest ten items); session-rec's code has a condition `p <= 10` that zeroes the newest items of
# sessions longer than ten, not taken here.
POSITION_WEIGHTS: dict[str, Callable[[int, int], float]] = {
    "same": lambda p, n: 1.0,
    "div": lambda p, n: p / n,
    "linear": lambda p, n: max(0.0, 1.0 - 0.1 * (n - p)),
    "log": lambda p, n: 1.0 / math.log10(n - p + 1.7),
    "quadratic": lambda p, n: (p / n) ** 2,
}


class SessionKNN(_Baseline):
    """V-SKNN (Ludewig & Jannach, "Evaluation of session-based recommendation algorithms", UMUAI 2018;
    session-rec's vsknn.py): candidate neighbours are the `sample` most recent training sessions sharing an
    item with the current session (history, then cart); similarity = sum over shared items of the item's
    position weight in the current session (`weighting`, see POSITION_WEIGHTS; its last occurrence counts);
    the `k` most similar are kept; an item scores the summed similarity of the neighbours holding it."""
    name = "vsknn"

    def __init__(self, k: int = 100, sample: int = 500, weighting: str = "div",
                 *, seed: int | None = None, weights: Mapping[str, float] | None = None):
        super().__init__(seed=seed, weights=weights)
        if weighting not in POSITION_WEIGHTS:
            raise ValueError(f"weighting {weighting!r}: one of {', '.join(POSITION_WEIGHTS)}")
        self.k, self.sample, self.weighting = k, sample, weighting

    def _fit(self, split: Split) -> None:
        self.x = self._sessions()   # row number = recency rank

    def _scores(self, queries: Sequence[Query]) -> np.ndarray:
        weights = []
        for q in queries:
            session = q.history + q.cart
            w = POSITION_WEIGHTS[self.weighting]
            weights.append({item: w(p, len(session)) for p, item in enumerate(session, 1)})   # later overwrite
        sims = (self.x @ self._matrix(weights).T).tocsc()   # sessions x queries: only sessions sharing an item
        r, c, v = [], [], []
        for j in range(len(queries)):
            lo, hi = sims.indptr[j], sims.indptr[j + 1]
            rows, vals = sims.indices[lo:hi], sims.data[lo:hi]
            if rows.size > self.sample:   # the most recent: highest rows
                keep = np.argpartition(rows, rows.size - self.sample)[rows.size - self.sample:]
                rows, vals = rows[keep], vals[keep]
            best = np.lexsort((-rows, -vals))[:self.k]   # most similar, ties to the more recent
            r += [j] * best.size
            c += rows[best].tolist()
            v += vals[best].tolist()
        neighbours = sp.csr_matrix((v, (r, c)), shape=(len(queries), self.x.shape[0]))
        scores: np.ndarray = (neighbours @ self.x).toarray()
        return scores


class ImplicitALS(_Baseline):
    """iALS (Hu, Koren & Volinsky, "Collaborative filtering for implicit feedback datasets", ICDM 2008) with
    the `implicit` library. Confidence c = 1 + alpha * r, r = summed event weights: implicit uses the matrix
    value itself as the confidence, so it gets 1 + alpha * r with its own alpha left at 1. Training users
    without new history use their factors; others (new users, sessions) are folded in from training row plus
    history and cart (each item a click), least squares against the fixed item factors."""
    name = "ials"

    def __init__(self, factors: int = 128, regularization: float = 0.01, alpha: float = 10.0,
                 iterations: int = 15, *, seed: int | None = None, weights: Mapping[str, float] | None = None):
        super().__init__(seed=seed, weights=weights)
        self.factors, self.regularization, self.alpha, self.iterations = factors, regularization, alpha, iterations

    def _fit(self, split: Split) -> None:
        from implicit.cpu.als import AlternatingLeastSquares  # imported here: only this baseline needs it
        r = sp.csr_matrix((self.ev_weight, (self.ev_user, self.ev_item)), shape=(len(self.users), len(self.items)))
        self.r = r.tocsr()   # duplicates summed
        with threadpool_limits(1, "blas"):   # implicit warns (an error under pytest) when BLAS threads itself
            self.model = AlternatingLeastSquares(factors=self.factors, regularization=self.regularization,
                                                 alpha=1.0, iterations=self.iterations, random_state=self.seed,
                                                 num_threads=2)
            self.model.fit(self._confidence(self.r), show_progress=False)

    def _confidence(self, r: sp.csr_matrix) -> sp.csr_matrix:
        c = r.astype(np.float32, copy=True)
        c.data = 1.0 + self.alpha * c.data
        return c

    def _scores(self, queries: Sequence[Query]) -> np.ndarray:
        u = np.zeros((len(queries), self.factors), dtype=np.float32)
        rows, fold = [], []
        for j, q in enumerate(queries):
            user = self.users.get(q.user_id)
            if user is not None and not (q.history or q.cart):
                u[j] = self.model.user_factors[user]
                continue
            row: dict[str, float] = {}
            if user is not None:
                lo, hi = self.r.indptr[user], self.r.indptr[user + 1]
                row = dict(zip(self.items[self.r.indices[lo:hi]], self.r.data[lo:hi]))
            for item in q.history + q.cart:
                row[item] = row.get(item, 0.0) + self.weights.get("click", 1.0)
            rows.append(row)
            fold.append(j)
        if fold:
            with threadpool_limits(1, "blas"):
                u[fold] = self.model.recalculate_user(np.arange(len(fold)), self._confidence(self._matrix(rows)))
        scores: np.ndarray = (u @ self.model.item_factors.T).astype(float)
        scores[:, self.n_train:] = -1e30   # items never trained on: after every trained one
        return scores


class GenreProfile(_Baseline):
    """Content baseline for new items: the user's profile sums the genre (category_path) one-hot vectors of
    the items they interacted with, weighted by event weight (plus history and cart items as clicks); an item
    scores cosine(profile, its genres). Items without catalogue entry use the events' category."""
    name = "genre"

    def _fit(self, split: Split) -> None:
        genres: dict[str, tuple[str, ...]] = {e.product_id: (e.category,) for e in split.train if e.category}
        genres.update({p.product_id: tuple(p.category_path) for p in split.products})
        names = {g: i for i, g in enumerate(sorted({g for gs in genres.values() for g in gs}))}
        pairs = [(self.idx[p], names[g]) for p, gs in genres.items() if p in self.idx for g in set(gs)]
        r, c = (np.array(x, dtype=np.int64) for x in (zip(*pairs) if pairs else ((), ())))
        self.g = sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(self.items), len(names)))
        norm = np.sqrt(np.asarray(self.g.sum(axis=1)).ravel())
        self.g_unit = (sp.diags(np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)) @ self.g).tocsr()
        ui = sp.csr_matrix((self.ev_weight, (self.ev_user, self.ev_item)), shape=(len(self.users), len(self.items)))
        self.profiles = (ui @ self.g).tocsr()

    def _scores(self, queries: Sequence[Query]) -> np.ndarray:
        click = self.weights.get("click", 1.0)
        extra = [{item: click * (q.history + q.cart).count(item) for item in q.history + q.cart} for q in queries]
        p = (self._matrix(extra) @ self.g).toarray()
        for j, q in enumerate(queries):
            if q.user_id in self.users:
                p[j] += self.profiles[self.users[q.user_id]].toarray().ravel()
        norm = np.linalg.norm(p, axis=1, keepdims=True)
        p = np.divide(p, norm, out=np.zeros_like(p), where=norm > 0)
        return np.asarray(self.g_unit @ p.T).T


class Random(_Baseline):
    """Uniformly random order of the candidates; each query's draw is seeded by (seed, qid), so a list
    does not depend on how queries are batched."""
    name = "random"

    def _scores(self, queries: Sequence[Query]) -> np.ndarray:
        return np.array([np.random.default_rng([self.seed, q.qid]).random(len(self.items)) for q in queries])
