"""The retrieval index on a GPU: checks that models/index.py's GPU path gives the CPU's answers, and times it.

Needs a faiss build with GPU support (faiss-gpu-cu12 / faiss-cuda wheels; `pip install .[gpu]`)
and a GPU. It checks, with asserts: flat and IVF indexes land on the GPU by themselves
(use_gpu=None), flat top-200 equals exact CPU search, IVF recall@200 after tune_nprobe matches a
CPU IVF of the same lists, to_bytes/from_bytes returns to the GPU with the same answers, k above
faiss's GPU limit is refused, HNSW stays on the CPU. Then it times search per batch size against
raw faiss (GpuIndexFlatIP / the same IVF object, called directly) and the CPU's flat and flat16.

    python bench/gpu_index.py --n 1000000 --out bench/results/gpu_index.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness  # noqa: E402
from models import index as fx  # noqa: E402
from models.artifacts import Embeddings  # noqa: E402

K = 200


def catalogue(n: int, dim: int, seed: int = 0) -> tuple[Embeddings, np.ndarray]:
    """Clustered item vectors with varied norms (like ALS factors) and user-like queries."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(16, n // 1000), dim)).astype(np.float32)
    x = centres[rng.integers(len(centres), size=n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    x *= rng.lognormal(0, 0.3, size=(n, 1)).astype(np.float32)
    q = centres[rng.integers(len(centres), size=1024)] + 0.5 * rng.normal(size=(1024, dim)).astype(np.float32)
    return Embeddings([f"p{i}" for i in range(n)], x.astype(np.float32)), q.astype(np.float32)


def per_query_ms(search, q: np.ndarray, batch: int, seconds: float = 1.0) -> float:
    search(q[:batch])                                   # warm-up (kernels, temp memory)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        at = (done * batch) % (len(q) - batch + 1)
        search(q[at:at + batch])
        done += 1
    return (time.perf_counter() - t0) * 1000 / (done * batch)


def checks(emb: Embeddings, q: np.ndarray) -> dict[str, float]:
    assert fx.GPU.available(), "faiss sees no GPU"
    exact_rows, exact_s = fx.exact_search(emb.vectors, q, K)
    flat = fx.build(emb, "flat")
    assert flat.on_gpu, "flat index did not go to the GPU by itself"
    rows, scores = flat.search_rows(q, K)
    same = np.mean([len(set(a) & set(b)) / K for a, b in zip(rows, exact_rows)])
    assert same >= 0.999, f"GPU flat top-{K} differs from exact search: {same:.4f}"
    assert np.allclose(scores[:, 0], exact_s[:, 0], rtol=1e-3, atol=1e-3)

    ivf = fx.build(emb, "ivf")
    assert ivf.on_gpu and ivf.kind == "ivf"
    nprobe, gpu_recall = fx.tune_nprobe(ivf, emb, q[:256], K, target=0.95)
    cpu_ivf = fx.build(emb, "ivf", use_gpu=False, nlist=ivf.params["nlist"], nprobe=nprobe)
    cpu_recall = fx.recall_at_k(cpu_ivf, emb, q[:256], K)
    assert gpu_recall >= 0.95 and abs(gpu_recall - cpu_recall) < 0.03, (gpu_recall, cpu_recall)

    back = fx.RetrievalIndex.from_bytes(ivf.to_bytes())
    assert back.on_gpu and back.params["nprobe"] == nprobe
    a, _ = ivf.search(q[:64], K)
    b, _ = back.search(q[:64], K)
    agree = np.mean([len(set(x) & set(y)) / K for x, y in zip(a, b)])
    assert agree >= 0.99, f"reloaded IVF answers differently: {agree:.4f}"
    try:
        flat.search(q[:1], fx.GPU_MAX_K + 1)
        raise AssertionError("k above the GPU limit was not refused")
    except ValueError:
        pass
    hnsw = fx.build(Embeddings(emb.ids[:20_000], emb.vectors[:20_000]), "hnsw")
    assert not hnsw.on_gpu
    return {"flat_top200_agreement": float(same), "ivf_nlist": float(ivf.params["nlist"]), "ivf_nprobe": float(nprobe),
            "ivf_recall_at_200_gpu": float(gpu_recall), "ivf_recall_at_200_cpu": float(cpu_recall),
            "reload_agreement": float(agree)}


def timings(emb: Embeddings, q: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    flat = fx.build(emb, "flat")
    res = faiss.StandardGpuResources()
    raw = faiss.GpuIndexFlatIP(res, emb.vectors.shape[1])
    raw.add(emb.vectors)
    ivf = fx.build(emb, "ivf")
    fx.tune_nprobe(ivf, emb, q[:256], K, target=0.95)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    cpu_flat = fx.build(emb, "flat", use_gpu=False)
    cpu_flat16 = fx.build(emb, "flat16", use_gpu=False)
    for batch in (1, 16, 256):
        out[f"gpu_flat_ms_b{batch}"] = per_query_ms(lambda x: flat.search(x, K), q, batch)
        out[f"raw_gpu_flat_ms_b{batch}"] = per_query_ms(lambda x: raw.search(x, K), q, batch)
        out[f"gpu_ivf_ms_b{batch}"] = per_query_ms(lambda x: ivf.search(x, K), q, batch)
        out[f"raw_gpu_ivf_ms_b{batch}"] = per_query_ms(lambda x: ivf.index.search(x, K), q, batch)
        out[f"cpu_flat_ms_b{batch}"] = per_query_ms(lambda x: cpu_flat.search(x, K), q, batch)
        out[f"cpu_flat16_ms_b{batch}"] = per_query_ms(lambda x: cpu_flat16.search(x, K), q, batch)
        out[f"flat_vs_raw_b{batch}"] = out[f"gpu_flat_ms_b{batch}"] / out[f"raw_gpu_flat_ms_b{batch}"]
        print(f"batch {batch:>3}: " + "  ".join(f"{k.rsplit('_ms', 1)[0]} {v:.4f} ms" for k, v in out.items()
                                                if k.endswith(f"_ms_b{batch}")), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--out", default="bench/results/gpu_index.json")
    args = p.parse_args()
    t0 = time.perf_counter()
    emb, q = catalogue(args.n, args.dim)
    figures = checks(emb, q)
    print("checks passed:", json.dumps(figures), flush=True)
    figures |= timings(emb, q)
    result = harness.write_result(
        "gpu_index", figures, out=Path(args.out), command=f"python bench/gpu_index.py --n {args.n} --dim {args.dim}",
        machine_facts={"gpus": faiss.get_num_gpus(), "faiss": faiss.__version__},
        n=args.n, dim=args.dim, k=K, wall_s=time.perf_counter() - t0)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
