"""Orderings of a candidate set, per task (pure): the ranker serves a task only where it earned it.

The orderings: window popularity, the ALS dot product, the rules (a fixed preference between sources,
recstream.rules.heuristic_scores), reciprocal rank fusion of the sources' lists, and the ranker.

The homepage on arrival, the next step inside a live session (the homepage again, a product page's
similar and also-viewed items) and the cart are different tasks. The trainer scores its held-out
groups of each task with every ordering below and keeps, per task, the best simple one on NDCG@k,
unless the ranker beats it clearly (by more than two standard errors of the paired difference): a
ranker earns its place, a tie within the noise goes to the simpler ordering. The served version
carries the choice (`ServingModel.orderings`); the ranking agent orders each request by its task's
choice, with the same functions.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from recstream.rules import heuristic_scores

TASKS = ("home", "next", "cart")
# simplest first: a tie between two orderings goes to the one earlier here
ORDERINGS = ("popular", "als", "rules", "fusion", "ranker")
FUSION_K = 60.0     # reciprocal rank fusion's constant (Cormack et al., SIGIR 2009)
BASKET_EVENTS = ("add_to_cart", "purchase")
MIN_GROUPS = 30     # held-out groups a task needs before its figures overrule the rules
Z = 1.96            # the ranker serves a task only where it wins by more than this many standard errors


def task_of_request(kind: str, live: bool) -> str:
    """A request's task: the cart widget; the homepage of a shopper without a live session (arrival);
    anything else continues a session (the homepage mid-visit, a product page's widgets)."""
    if kind == "cart":
        return "cart"
    return "home" if kind == "homepage" and not live else "next"


def task_of_target(event_type: str, live: bool, basket: bool) -> str:
    """The task a training target stands for: filling a basket the session already holds ("cart"),
    opening a visit ("home", the homepage on arrival), or the next step of a live session ("next")."""
    if not live:
        return "home"
    return "cart" if basket and event_type in BASKET_EVENTS else "next"


def scores(ordering: str, sources: np.ndarray, popularity: np.ndarray, trending: np.ndarray,
           ui_dot: np.ndarray | None, ranker: np.ndarray | None,
           popularity_window: np.ndarray | None = None, fusion_weights: np.ndarray | None = None) -> np.ndarray:
    """Scores (higher first) of one ordering for candidates given by their source matrix (NaN: not
    proposed), the last days' popularity (views, clicks and purchases: a shop that logs only
    purchases has all of it there), trending weight, ALS dot product (NaN or None: no vector), the
    ranker's scores (None: no ranker, then the rules), the weighted events over the model's
    training window (None or NaN: unknown) and fusion's weight per source column (None: 1 each).

    "popular" orders by the training window's counts where the version has them, the last days'
    breaking ties: a week holds a few hundred baskets of a small shop, too few to rank its staples."""
    trend = np.nan_to_num(np.asarray(trending, np.float64))
    if ordering == "ranker" and ranker is not None:
        return np.asarray(ranker, np.float64)
    if ordering == "popular":
        recent = np.log1p(np.nan_to_num(np.asarray(popularity, np.float64))) + 1e-3 * np.log1p(trend)
        if popularity_window is None:
            return recent
        return np.log1p(np.nan_to_num(np.asarray(popularity_window, np.float64))) + 1e-3 * recent
    if ordering == "fusion":
        return fusion_scores(sources, fusion_weights) + 1e-6 * np.log1p(trend)
    if ordering == "als" and ui_dot is not None:
        dot = np.asarray(ui_dot, np.float64)
        if not np.isnan(dot).all():   # no vector at all (an unknown user, no session): the rules decide
            return np.where(np.isnan(dot), -np.inf, dot)
    return heuristic_scores(sources, trend)


def fusion_scores(sources: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Reciprocal rank fusion of the sources' own orders: each source that proposed a candidate adds
    weight / (FUSION_K + its rank there) (rank 1 = the source's best; `weights` per column, None: 1
    each, 0: the source is left out), so an item high in several lists (ALS and item kNN, say) goes
    first, whatever the scales of their scores."""
    out = np.zeros(sources.shape[0])
    for j in range(sources.shape[1]):
        w = 1.0 if weights is None else float(weights[j])
        col = sources[:, j]
        has = np.flatnonzero(~np.isnan(col))
        if not len(has) or not w:
            continue
        order = has[np.argsort(-col[has], kind="stable")]
        out[order] += w / (FUSION_K + np.arange(1, len(order) + 1))
    return out


def parse_weights(text: str, sources: tuple[str, ...]) -> np.ndarray | None:
    """'als=1,knn=1' -> a weight per source column, in `sources` order, 0 for a source not named; ''
    -> None (every source 1). ValueError naming what is wrong."""
    if not text.strip():
        return None
    out = np.zeros(len(sources))
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = (x.strip() for x in part.partition("="))
        if not sep or name not in sources:
            raise ValueError(f"{part!r} is not SOURCE=WEIGHT with a source of {', '.join(sources)}")
        try:
            out[sources.index(name)] = weight = float(value)
        except ValueError:
            raise ValueError(f"{part!r}: the weight {value!r} is not a number") from None
        if not 0 <= weight < float("inf"):
            raise ValueError(f"{part!r}: a weight is 0 or more")
    if not out.any():
        raise ValueError(f"{text!r} gives every source weight 0")
    return out


def choose(ndcg: Mapping[str, np.ndarray], min_groups: int = MIN_GROUPS, z: float = Z) -> str:
    """The ordering a task serves, from each ordering's NDCG per held-out group (the same groups for
    all): the best of the simpler ones (ties to the simplest), unless the ranker beats it by more
    than `z` standard errors of the paired difference; with fewer than `min_groups` groups, the rules."""
    groups = len(next(iter(ndcg.values()))) if ndcg else 0
    if groups < min_groups:
        return "rules"
    simple = [o for o in ORDERINGS if o in ndcg and o != "ranker"]
    best = max(simple, key=lambda o: (float(np.mean(ndcg[o])), -simple.index(o))) if simple else "rules"
    if "ranker" not in ndcg:
        return best
    diff = np.asarray(ndcg["ranker"], np.float64) - (np.asarray(ndcg[best], np.float64) if simple else 0.0)
    return "ranker" if diff.mean() > z * diff.std(ddof=1) / np.sqrt(len(diff)) else best


def parse_pins(text: str) -> dict[str, str]:
    """'next=rules,cart=popular' -> {"next": "rules", "cart": "popular"}; ValueError naming what is wrong."""
    pins: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        task, sep, chosen = (x.strip() for x in part.partition("="))
        if not sep or task not in TASKS or chosen not in ORDERINGS:
            raise ValueError(f"{part!r} is not TASK=ORDERING with a task of {', '.join(TASKS)} and an ordering of "
                             f"{', '.join(ORDERINGS)}")
        if task in pins:
            raise ValueError(f"task {task!r} is pinned twice")
        pins[task] = chosen
    return pins


def resolve(orderings: Mapping[str, str], task: str, has_ranker: bool) -> str:
    """The ordering a request of `task` gets from a served version: the task's choice; a version
    without choices (trained before them) ranks with its ranker where it has one."""
    chosen = orderings.get(task)
    if chosen is None:
        return "ranker" if has_ranker else "rules"
    return chosen if chosen != "ranker" or has_ranker else "rules"
