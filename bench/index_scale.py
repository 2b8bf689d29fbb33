"""Benchmark: the retrieval index at catalogue scale: flat (exact), IVF-Flat, IVF-PQ (with and without
float16 re-ranking), HNSW and a sharded IVF (scatter-gather), on one synthetic catalogue.

Run from the repository root (no services needed); heavy run on a 16-core machine, about 5-8 minutes:

    .venv/bin/python bench/index_scale.py                     # n = 1,000,000 x 128 -> bench/results/scale.json
    .venv/bin/python bench/index_scale.py --n 20000           # smoke run
    .venv/bin/python bench/index_scale.py --gpu               # also the GPU flat / IVF / IVF-PQ (faiss-gpu)

Catalogue: bench/gpu_index.py's `catalogue(n, dim, seed)`: items around n // 1000 cluster centres with
lognormal norms (like ALS factors) and 1,024 user-like queries around the same centres; the first
--queries of them are measured, the first --tune-queries of those also tune nprobe / efSearch (to
recall@200 >= --target), so the reported recall is on a superset of the tuning queries.

Per kind: build_s: wall time of build() with k-means training (ivfpq_refine: + add_refine; sharded: +
the split). bytes_per_item: the vector index proper, i.e. the serialised faiss index plus, for
ivfpq_refine, the float16 re-ranking copy, / n (the id map is the same for every kind: reported once as
ids_bytes_per_item). rss_bytes_per_item: growth of the resident set over the build / n, freed heap
handed back (malloc_trim) before and after; includes build()'s 8-byte id pointer array and faiss's
list over-allocation; indicative, noisy at small n. recall_at_200: tie-aware, against exact search
(models.index.recall_against). ms_per_query_b1 / _b64: wall time of RetrievalIndex.search (ids mapped)
per query at batch 1 and 64, over a --seconds window after a warm-up (bench/gpu_index.py's
per_query_ms). faiss uses every core (printed); IVF-PQ re-ranking is faiss IndexRefine over the
float16 copy, on the CPU (in the GPU runs too). HNSW is added in chunks with progress; if its build
would pass --hnsw-budget-s it stops and is measured on the prefix built (hnsw_items; own exact search).
The sharded index is --shards IVF indexes over a split by models.index.shard_of, each tuned on its own
items, searched in threads and merged (models.index.merge_topk).

Figures go to --out (bench/results/scale.json), merged into "figures" beside other parts' keys; this
part's run details go under "index_scale".
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench import harness  # noqa: E402
from bench.gpu_index import catalogue, per_query_ms  # noqa: E402
from models import index as fx  # noqa: E402
from models.artifacts import Embeddings  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "scale.json"
K = 200
BATCHES = (1, 64)
EF_SWEEP = (64, 128, 256, 512, 1024)


def rss_bytes() -> int:
    """Resident set size, after handing freed heap memory back to the OS (glibc malloc_trim), so that a
    delta is what the objects built since hold rather than what the allocator happened to keep or reuse."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.perf_counter()
        self.figures: dict[str, float] = {}
        self.settings: dict[str, dict] = {}

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f} s] {msg}", flush=True)

    def record(self, kind: str, search, n: int, q: np.ndarray, recall: float, build_s: float,
               nbytes: int | None, rss: int | None, setting: dict) -> None:
        f = self.figures
        f[f"{kind}_build_s"] = build_s
        if nbytes is not None:
            f[f"{kind}_bytes_per_item"] = nbytes / n
        if rss is not None:
            f[f"{kind}_rss_bytes_per_item"] = rss / n
        f[f"{kind}_recall_at_200"] = recall
        for b in BATCHES:
            f[f"{kind}_ms_per_query_b{b}"] = per_query_ms(search, q, b, self.args.seconds)
        self.settings[kind] = setting
        self.log(f"{kind}: build {build_s:.1f} s, " + (f"{nbytes / n:.1f} B/item, " if nbytes is not None else "")
                 + f"recall@200 {recall:.4f}, {f[f'{kind}_ms_per_query_b1']:.3f} ms/q b1, "
                 f"{f[f'{kind}_ms_per_query_b64']:.3f} ms/q b64, {setting}")


def tuned_recall(idx, x: np.ndarray, q: np.ndarray, exact_scores: np.ndarray, tune: int, target: float) -> float:
    fx.tune_nprobe(idx, x, q[:tune], K, target=target)
    return fx.recall_against(x, q, idx.search_rows(q, K)[0], exact_scores)


def bench_cpu(run: Run, emb: Embeddings, q: np.ndarray) -> None:
    a, x, n = run.args, emb.vectors, len(emb.ids)
    tune = min(a.tune_queries, len(q))

    # flat: the exact reference
    r0, t = rss_bytes(), time.perf_counter()
    flat = fx.build(emb, "flat", use_gpu=False)
    build_s, rss = time.perf_counter() - t, rss_bytes() - r0
    t = time.perf_counter()
    exact_scores = flat.search_rows(q, K)[1]
    run.log(f"flat: exact top-{K} for {len(q)} queries in {time.perf_counter() - t:.2f} s")
    run.record("flat", lambda b: flat.search(b, K), n, q, 1.0, build_s, flat.nbytes(), rss, {})
    flat = None
    gc.collect()

    # IVF-Flat
    r0, t = rss_bytes(), time.perf_counter()
    ivf = fx.build(emb, "ivf", use_gpu=False)
    build_s, rss = time.perf_counter() - t, rss_bytes() - r0
    recall = tuned_recall(ivf, x, q, exact_scores, tune, a.target)
    run.record("ivf", lambda b: ivf.search(b, K), n, q, recall, build_s, ivf.nbytes(), rss,
               {"nlist": ivf.params["nlist"], "nprobe": ivf.params["nprobe"]})
    ivf = None
    gc.collect()

    # IVF-PQ: the compressed index alone, then with the float16 re-ranking copy added to the same index
    r0, t = rss_bytes(), time.perf_counter()
    plain = fx.build(emb, "ivfpq", use_gpu=False, refine_factor=0)
    build_s, rss = time.perf_counter() - t, rss_bytes() - r0
    r1, t = rss_bytes(), time.perf_counter()
    refined = fx.add_refine(plain, x, a.refine_factor)
    refine_s, refine_rss = time.perf_counter() - t, rss_bytes() - r1
    recall = tuned_recall(refined, x, q, exact_scores, tune, a.target)   # nprobe tuned with re-ranking on
    nprobe = refined.params["nprobe"]
    plain.set_nprobe(nprobe)
    plain_recall = fx.recall_against(x, q, plain.search_rows(q, K)[0], exact_scores)
    pq = {"nlist": plain.params["nlist"], "nprobe": nprobe, "pq_m": plain.params["pq_m"],
          "pq_nbits": plain.params["pq_nbits"]}
    run.record("ivfpq", lambda b: plain.search(b, K), n, q, plain_recall, build_s, plain.nbytes(), rss,
               {**pq, "refine_factor": 0})
    run.record("ivfpq_refine", lambda b: refined.search(b, K), n, q, recall, build_s + refine_s, refined.nbytes(),
               rss + refine_rss, {**pq, "refine_factor": a.refine_factor, "refine": "float16 copy, host memory"})
    if a.pq_sweep:   # what more probes buy the PQ codes alone
        sweep = {}
        for p in (nprobe, 2 * nprobe, 4 * nprobe):
            plain.set_nprobe(p)
            sweep[str(plain.params["nprobe"])] = fx.recall_against(x, q, plain.search_rows(q, K)[0], exact_scores)
        run.settings["ivfpq"]["recall_by_nprobe"] = sweep
        run.log(f"ivfpq (no re-ranking) recall@200 by nprobe: {sweep}")
    plain = refined = None
    gc.collect()

    # HNSW, added in chunks (progress; stops at --hnsw-budget-s and is measured on the prefix built)
    cap = min(n, a.hnsw_max_items or n)
    chunk = max(1000, min(100_000, cap // 10 or cap))
    r0, t = rss_bytes(), time.perf_counter()
    first = min(chunk, cap)
    hnsw = fx.build(Embeddings(emb.ids[:first], x[:first]), "hnsw", use_gpu=False, hnsw_m=a.hnsw_m,
                    ef_construction=a.ef_construction)
    done = first
    while done < cap:
        elapsed = time.perf_counter() - t
        if elapsed * (done + chunk) / done > a.hnsw_budget_s:
            run.log(f"hnsw: stopping at {done} items: the next chunk would pass --hnsw-budget-s {a.hnsw_budget_s}")
            break
        end = min(cap, done + chunk)
        hnsw.index.add(x[done:end])
        done = end
        run.log(f"hnsw: {done}/{cap} items added, {time.perf_counter() - t:.1f} s")
    build_s, rss = time.perf_counter() - t, rss_bytes() - r0
    hnsw.ids = np.array(emb.ids[:done], dtype=object)
    hnsw.params["n"] = done
    hx = x[:done]
    h_exact = exact_scores if done == n else fx.exact_search(hx, q, K)[1]
    ef_recall = {}
    for ef in EF_SWEEP:
        hnsw.index.hnsw.efSearch = ef
        ef_recall[ef] = fx.recall_against(hx, q[:tune], hnsw.search_rows(q[:tune], K)[0], h_exact[:tune])
        if ef_recall[ef] >= a.target:
            break
    hnsw.params["ef_search"] = ef
    recall = fx.recall_against(hx, q, hnsw.search_rows(q, K)[0], h_exact)
    run.record("hnsw", lambda b: hnsw.search(b, K), done, q, recall, build_s, hnsw.nbytes(), rss,
               {"hnsw_m": a.hnsw_m, "ef_construction": a.ef_construction, "ef_search": ef, "items": done,
                "tune_recall_by_ef": {str(k): v for k, v in ef_recall.items()}})
    run.figures["hnsw_items"] = done
    hnsw = None
    gc.collect()

    # sharded IVF: scatter-gather over --shards IVF indexes split by item
    t = time.perf_counter()
    parts = fx.split_by_shard(emb, a.shards)
    split_s = time.perf_counter() - t
    r0, t = rss_bytes(), time.perf_counter()
    shards = [fx.build(p, "ivf" if len(p.ids) else "flat", use_gpu=False) for p in parts]
    build_s, rss = time.perf_counter() - t + split_s, rss_bytes() - r0
    for p, s in zip(parts, shards):
        if s.kind == "ivf":
            fx.tune_nprobe(s, p, q[:tune], K, target=a.target)
    sharded = fx.ShardedIndex(shards)
    row = emb.index()
    ids, _ = sharded.search(q, K)
    rows = np.array([row[i] if i is not None else -1 for i in ids.ravel()], dtype=np.int64).reshape(ids.shape)
    recall = fx.recall_against(x, q, rows, exact_scores)
    run.record(f"sharded{a.shards}_ivf", lambda b: sharded.search(b, K), n, q, recall, build_s, sharded.nbytes(),
               rss,
               {"shards": a.shards, "items_per_shard": [len(s) for s in shards], "split_s": split_s,
                "nlist": [s.params.get("nlist") for s in shards], "nprobe": [s.params.get("nprobe") for s in shards]})
    sharded = shards = parts = row = None
    gc.collect()


def bench_gpu(run: Run, emb: Embeddings, q: np.ndarray) -> None:
    a, x, n = run.args, emb.vectors, len(emb.ids)
    tune = min(a.tune_queries, len(q))
    exact_scores = fx.exact_search(x, q, K)[1]
    for kind in ("flat", "ivf", "ivfpq"):
        t = time.perf_counter()
        idx = fx.build(emb, kind, use_gpu=True, **({"refine_factor": a.refine_factor} if kind == "ivfpq" else {}))
        build_s = time.perf_counter() - t
        if kind == "flat":
            recall = fx.recall_against(x, q, idx.search_rows(q, K)[0], exact_scores)
            setting: dict = {}
        else:
            recall = tuned_recall(idx, x, q, exact_scores, tune, a.target)
            setting = {"nlist": idx.params["nlist"], "nprobe": idx.params["nprobe"]}
        name = "gpu_ivfpq_refine" if kind == "ivfpq" else f"gpu_{kind}"
        run.record(name, lambda b: idx.search(b, K), n, q, recall, build_s, idx.nbytes(), None, setting)
        if kind == "ivfpq":
            plain = fx.RetrievalIndex(idx.index, idx.ids, "ivfpq", {**idx.params, "refine_factor": 0}, on_gpu=True)
            recall = fx.recall_against(x, q, plain.search_rows(q, K)[0], exact_scores)
            run.record("gpu_ivfpq", lambda b: plain.search(b, K), n, q, recall, build_s, plain.nbytes(), None,
                       {**setting, "refine_factor": 0})
            plain = None
        idx = None
        gc.collect()


def table(f: dict, kinds: list[str]) -> str:
    lines = [f"{'kind':<18}{'build_s':>9}{'B/item':>10}{'RSS B/item':>12}{'recall@200':>12}"
             f"{'ms/q b1':>10}{'ms/q b64':>10}"]
    for k in kinds:
        if f"{k}_recall_at_200" not in f:
            continue
        rss = f.get(f"{k}_rss_bytes_per_item")
        lines.append(f"{k:<18}{f[f'{k}_build_s']:>9.2f}{f.get(f'{k}_bytes_per_item', float('nan')):>10.1f}"
                     f"{'-' if rss is None else f'{rss:.1f}':>12}{f[f'{k}_recall_at_200']:>12.4f}"
                     f"{f[f'{k}_ms_per_query_b1']:>10.3f}{f[f'{k}_ms_per_query_b64']:>10.4f}")
    return "\n".join(lines)


def write(out: Path, run: Run, extra: dict) -> None:
    data = json.loads(out.read_text()) if out.exists() else {}
    data.setdefault("name", "scale")
    data.setdefault("figures", {}).update(run.figures)
    data["index_scale"] = extra
    for key in ("date", "machine", "command"):   # the record's own fields: kept if another part wrote them
        data.setdefault(key, extra[key])
    harness.write_json(out, data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="catalogue size")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000, help="measured queries (at most 1024)")
    ap.add_argument("--tune-queries", type=int, default=256, help="queries that tune nprobe / efSearch")
    ap.add_argument("--target", type=float, default=0.95, help="recall@200 that tuning aims for")
    ap.add_argument("--refine-factor", type=int, default=fx.REFINE_FACTOR,
                    help="IVF-PQ re-ranking: k * this many candidates")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=40)
    ap.add_argument("--hnsw-max-items", type=int, default=0, help="build HNSW on at most this many items (0: all)")
    ap.add_argument("--hnsw-budget-s", type=float, default=150.0, help="stop adding to HNSW past this build time")
    ap.add_argument("--no-pq-sweep", dest="pq_sweep", action="store_false", help="skip IVF-PQ recall at 2x/4x nprobe")
    ap.add_argument("--seconds", type=float, default=1.0, help="timing window per kind and batch size")
    ap.add_argument("--gpu", action="store_true", help="also time GPU flat / IVF / IVF-PQ (faiss-gpu and a GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    run = Run(args)
    threads = len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(threads)
    run.log(f"threads: {threads} (faiss omp_get_max_threads {faiss.omp_get_max_threads()}), "
            f"faiss {faiss.__version__}, GPUs seen by faiss: {faiss.get_num_gpus()}, load {os.getloadavg()}")
    emb, q = catalogue(args.n, args.dim, args.seed)
    q = q[:args.queries]
    run.log(f"catalogue: {args.n} x {args.dim}, {len(q)} queries")
    ids_json = len(json.dumps(emb.ids).encode())
    run.figures["ids_bytes_per_item"] = ids_json / args.n
    bench_cpu(run, emb, q)
    kinds = ["flat", "ivf", "ivfpq", "ivfpq_refine", "hnsw", f"sharded{args.shards}_ivf"]
    if args.gpu:
        if faiss.get_num_gpus() > 0:
            bench_gpu(run, emb, q)
            kinds += ["gpu_flat", "gpu_ivf", "gpu_ivfpq", "gpu_ivfpq_refine"]
        else:
            run.log("--gpu: faiss sees no GPU (faiss-cpu build or no device): GPU kinds skipped")
    wall = time.perf_counter() - run.started
    print(f"\n{args.n} x {args.dim}, {len(q)} queries, k = {K}, {threads} threads\n" + table(run.figures, kinds))
    extra = {"date": harness.now_iso(),
             "machine": {**harness.machine(), "faiss": faiss.__version__, "gpus": faiss.get_num_gpus()},
             "command": harness.command_line(),
             "n": args.n, "dim": args.dim, "k": K, "queries": len(q), "tune_queries": args.tune_queries,
             "target": args.target, "threads": threads, "settings": run.settings, "wall_s": wall,
             "load_average_at_end": os.getloadavg(),
             "notes": "bytes_per_item: serialised faiss index (+ float16 re-ranking copy for ivfpq_refine) / n, "
                      "ids excluded (ids_bytes_per_item: the JSON id map, the same for all kinds); "
                      "rss_bytes_per_item: resident-set growth over the build / n after malloc_trim, indicative; "
                      "ivfpq = IVF-PQ codes alone at the nprobe tuned for ivfpq_refine."}
    write(args.out, run, extra)
    run.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
