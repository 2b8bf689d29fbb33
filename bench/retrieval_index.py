"""Benchmark: the retrieval index (models/index.py): build time, recall@200 against exact search and
query time per kind, beside raw FAISS flat search.

Run from the repository root (no services needed):

    .venv/bin/python bench/retrieval_index.py             # the run: bench/results/retrieval_index.json
    .venv/bin/python bench/retrieval_index.py --items 200000 --hnsw-items 50000   # a quicker one

Two catalogues:
(a) ALS item embeddings of the Taobao head (../shared/data/taobao-userbehavior-head): implicit ALS
    (the reference ALS of pyproject's dev extra) at the settings' rank, iterations, regularisation
    and alpha, event weights view 1 / click 2 / cart 3 / purchase 5, confidence 1 + alpha * weight.
    Queries: every user embedding (homepage retrieval) and --queries sampled item embeddings
    (similar items).
(b) A structured synthetic catalogue, --items x 128: 100 topic centres N(0, I), 2000 sub-topics
    around them (+ N(0, 0.6^2 I)), items around a sub-topic (+ N(0, 0.5^2 I)), each scaled by a
    lognormal(0, 0.25) "popularity" norm, as ALS norms vary. Queries: user-like mixtures of 1-3
    topic centres (+ N(0, 0.5^2 I)) and sampled items. HNSW is built on the first --hnsw-items items
    only (its build is ~100 s per million items on 2 cores; STACK_FACTS) with its own exact search.

Recall@200 is tie-aware (models.index.recall_against) against IndexFlatIP over the same vectors.
query_ms is the wall time of one batched RetrievalIndex.search call (ids mapped) over all queries of
a set, divided by their number; single_query_ms is the median of one-query calls. faiss uses every
core it is given (2 here, shared with other jobs: the load average is recorded).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import threadpoolctl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench import harness  # noqa: E402
from models.artifacts import Embeddings  # noqa: E402
from models.index import RetrievalIndex, build, recall_against  # noqa: E402
from recstream.data import import_events  # noqa: E402
from recstream.settings import load  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "retrieval_index.json"
TAOBAO = ROOT.parent / "shared" / "data" / "taobao-userbehavior-head" / "UserBehavior_head.csv"
K = 200
NPROBE_SWEEP = (8, 16, 32, 64, 128, 256, 512)
EF_SWEEP = (128, 256, 512)


def taobao_embeddings(path: Path) -> tuple[Embeddings, np.ndarray, dict]:
    from implicit.cpu.als import AlternatingLeastSquares

    s = load()
    t0 = time.perf_counter()
    data = import_events("taobao", path)
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    rows, cols, vals = [], [], []
    for e in data.events:
        rows.append(users.setdefault(e.user_id, len(users)))
        cols.append(items.setdefault(e.product_id, len(items)))
        vals.append(s.event_weights[e.event_type])
    m = sp.csr_matrix((np.array(vals, np.float32), (rows, cols)), shape=(len(users), len(items)))
    m.sum_duplicates()
    m.data = 1 + s.als_alpha * m.data
    t1 = time.perf_counter()
    with threadpoolctl.threadpool_limits(1, "blas"):
        als = AlternatingLeastSquares(factors=s.als_rank, iterations=s.als_iterations, regularization=s.als_reg,
                                      random_state=1, num_threads=len(os.sched_getaffinity(0)))
        als.fit(m, show_progress=False)
    meta = {"events": len(data.events), "users": len(users), "items": len(items), "rank": s.als_rank,
            "iterations": s.als_iterations, "reg": s.als_reg, "alpha": s.als_alpha,
            "import_s": t1 - t0, "als_fit_s": time.perf_counter() - t1}
    return Embeddings(list(items), als.item_factors), np.asarray(als.user_factors, np.float32), meta


def synthetic(n: int, dim: int = 128, seed: int = 5) -> tuple[Embeddings, np.ndarray]:
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((100, dim), dtype=np.float32)
    subs = topics[rng.integers(100, size=2000)] + 0.6 * rng.standard_normal((2000, dim), dtype=np.float32)
    x = subs[rng.integers(2000, size=n)]
    x += 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
    x *= rng.lognormal(0.0, 0.25, size=(n, 1)).astype(np.float32)
    mix = [topics[rng.choice(100, size=int(m), replace=False)].mean(axis=0) for m in rng.integers(1, 4, size=500)]
    users = np.stack(mix) + 0.5 * rng.standard_normal((500, dim), dtype=np.float32)
    return Embeddings([f"s{i}" for i in range(n)], x), users.astype(np.float32)


def timed_search(idx: RetrievalIndex, q: np.ndarray) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    ids, _ = idx.search(q, K)
    return ids, (time.perf_counter() - t) * 1000 / len(q)


def single_query_ms(idx: RetrievalIndex, q: np.ndarray, n: int = 50) -> float:
    times = []
    for row in q[:n]:
        t = time.perf_counter()
        idx.search_rows(row, K)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def measure(idx: RetrievalIndex, x: np.ndarray, sets: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Recall@200 and batched query time per query set; sets: name -> (queries, exact top-k scores)."""
    out: dict = {"faiss_recall_at_200": {}, "query_ms": {}}
    for name, (q, exact) in sets.items():
        t = time.perf_counter()
        rows, _ = idx.search_rows(q, K)
        out["query_ms"][name] = (time.perf_counter() - t) * 1000 / len(q)
        out["faiss_recall_at_200"][name] = recall_against(x, q, rows, exact)
    return out


def bench_catalogue(label: str, emb: Embeddings, sets_q: dict[str, np.ndarray], hnsw_items: int, log) -> dict:
    x = emb.vectors
    res: dict = {"items": len(emb.ids), "dim": emb.rank}
    # flat: the exact reference, and raw FAISS (IndexFlatIP) speed
    t = time.perf_counter()
    flat = build(emb, "flat")
    res["flat"] = {"build_s": time.perf_counter() - t, "kind": "flat"}
    exact = {}
    for name, q in sets_q.items():
        t = time.perf_counter()
        scores, _ = flat.index.search(q, K)  # raw faiss (distances, labels), no id mapping
        ms = (time.perf_counter() - t) * 1000 / len(q)
        exact[name] = (q, scores)
        res["flat"].setdefault("raw_faiss_query_ms", {})[name] = ms
        res["flat"].setdefault("raw_faiss_qps", {})[name] = 1000 / ms
    res["flat"]["query_ms"] = {name: timed_search(flat, q)[1] for name, q in sets_q.items()}
    res["flat"]["single_query_ms"] = single_query_ms(flat, next(iter(sets_q.values())))
    res["flat"]["faiss_recall_at_200"] = {name: 1.0 for name in sets_q}
    log(f"{label}: flat {res['flat']['raw_faiss_query_ms']} ms/query")
    del flat
    # IVF at the default nprobe, then the nprobe sweep
    t = time.perf_counter()
    ivf = build(emb, "ivf")
    build_s = time.perf_counter() - t
    default_nprobe = ivf.params["nprobe"]
    res["ivf"] = {"build_s": build_s, "nlist": ivf.params["nlist"], "nprobe": default_nprobe,
                  **measure(ivf, x, exact), "single_query_ms": single_query_ms(ivf, next(iter(sets_q.values())))}
    sweep = []
    for nprobe in [p for p in NPROBE_SWEEP if p <= ivf.params["nlist"]]:
        ivf.set_nprobe(nprobe)
        sweep.append({"nprobe": nprobe, **measure(ivf, x, exact)})
    res["ivf"]["nprobe_sweep"] = sweep
    good = [s["nprobe"] for s in sweep if min(s["faiss_recall_at_200"].values()) >= 0.95]
    res["ivf"]["smallest_nprobe_for_0_95"] = good[0] if good else None
    log(f"{label}: ivf nlist {ivf.params['nlist']} nprobe {default_nprobe}: {res['ivf']['faiss_recall_at_200']}, "
        f"build {build_s:.1f} s; nprobe for 0.95: {res['ivf']['smallest_nprobe_for_0_95']}")
    del ivf
    # HNSW (on a prefix of the catalogue when it is large), with its own exact search
    n_h = min(hnsw_items, len(emb.ids))
    sub = emb if n_h == len(emb.ids) else Embeddings(emb.ids[:n_h], x[:n_h])
    sub_exact = exact if sub is emb else {}
    if sub is not emb:
        ref = build(sub, "flat")
        sub_exact = {name: (q, ref.index.search(q, K)[0]) for name, q in sets_q.items()}
        del ref
    t = time.perf_counter()
    hnsw = build(sub, "hnsw")
    res["hnsw"] = {"build_s": time.perf_counter() - t, "items": n_h, **{k: hnsw.params[k] for k in
                   ("hnsw_m", "ef_construction", "ef_search")}, **measure(hnsw, sub.vectors, sub_exact),
                   "single_query_ms": single_query_ms(hnsw, next(iter(sets_q.values())))}
    res["hnsw"]["ef_sweep"] = []
    for ef in EF_SWEEP:
        hnsw.index.hnsw.efSearch = ef
        res["hnsw"]["ef_sweep"].append({"ef_search": ef, **measure(hnsw, sub.vectors, sub_exact)})
    log(f"{label}: hnsw on {n_h} items: {res['hnsw']['faiss_recall_at_200']}, build {res['hnsw']['build_s']:.1f} s")
    return res


def table(figures: dict) -> str:
    lines = [f"{'catalogue':<22}{'kind':<6}{'items':>9}{'build_s':>9}{'nlist':>7}{'nprobe/ef':>10}"
             f"{'recall users':>14}{'recall items':>14}{'ms/q batch':>12}{'ms/q single':>13}"]
    for label, res in figures.items():
        for kind in ("flat", "ivf", "hnsw"):
            r = res[kind]
            rec, ms = r["faiss_recall_at_200"], r.get("query_ms", {})
            setting = r.get("nprobe", r.get("ef_search", "-"))
            lines.append(f"{label:<22}{kind:<6}{r.get('items', res['items']):>9}{r['build_s']:>9.2f}"
                         f"{r.get('nlist', '-'):>7}{setting:>10}{rec['users']:>14.3f}{rec['items']:>14.3f}"
                         f"{ms['users']:>12.3f}{r['single_query_ms']:>13.3f}")
        flat = res["flat"]
        lines.append(f"{'':<22}raw faiss flat: {flat['raw_faiss_qps']['users']:.0f} queries/s batched "
                     f"({flat['raw_faiss_query_ms']['users']:.2f} ms/query)")
        sweep = ", ".join(f"{s['nprobe']}: {s['faiss_recall_at_200']['users']:.3f}/{s['faiss_recall_at_200']['items']:.3f}"
                          f" {s['query_ms']['users']:.2f}ms" for s in res["ivf"]["nprobe_sweep"])
        lines.append(f"{'':<22}ivf nprobe sweep (recall users/items, ms): {sweep}")
        efs = ", ".join(f"{s['ef_search']}: {s['faiss_recall_at_200']['users']:.3f}/{s['faiss_recall_at_200']['items']:.3f}"
                        f" {s['query_ms']['users']:.2f}ms" for s in res["hnsw"]["ef_sweep"])
        lines.append(f"{'':<22}hnsw efSearch sweep: {efs}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000, help="synthetic catalogue size")
    ap.add_argument("--hnsw-items", type=int, default=200_000, help="HNSW is built on at most this many items")
    ap.add_argument("--queries", type=int, default=500, help="item queries per catalogue (and synthetic user queries)")
    ap.add_argument("--taobao", type=Path, default=TAOBAO)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    started = time.perf_counter()
    load_start = os.getloadavg()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", flush=True)

    rng = np.random.default_rng(0)
    figures: dict = {}
    emb, user_vecs, als_meta = taobao_embeddings(args.taobao)
    log(f"taobao: {als_meta['items']} items, {als_meta['users']} users, ALS {als_meta['als_fit_s']:.1f} s")
    item_q = emb.vectors[rng.choice(len(emb.ids), size=min(args.queries, len(emb.ids)), replace=False)]
    figures["taobao_head_als128"] = bench_catalogue("taobao", emb, {"users": user_vecs, "items": item_q},
                                                    args.hnsw_items, log)
    figures["taobao_head_als128"]["als"] = als_meta
    t = time.perf_counter()
    emb, user_vecs = synthetic(args.items)
    log(f"synthetic: {args.items} x 128 generated in {time.perf_counter() - t:.1f} s")
    item_q = emb.vectors[rng.choice(len(emb.ids), size=args.queries, replace=False)]
    label = f"synthetic_{args.items // 1000}k_x128"
    figures[label] = bench_catalogue(label, emb, {"users": user_vecs[:args.queries], "items": item_q},
                                     args.hnsw_items, log)
    print(table(figures))
    harness.write_result("retrieval_index", figures, out=args.out, parameters={
                       "k": K, "flat_below": "models.index.FLAT_BELOW", "nlist_rule": "choose_nlist: round(4*sqrt(n)), <= n//39",
                       "nprobe_rule": "choose_nprobe: max(8, round(2*sqrt(nlist))), <= nlist", "queries": args.queries,
                       "synthetic_items": args.items, "hnsw_items": args.hnsw_items,
                       "faiss_threads": __import__("faiss").omp_get_max_threads(),
                       "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
                       "wall_s": time.perf_counter() - started})
    log(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
