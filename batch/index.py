"""The retrieval index over item embeddings: FAISS flat, IVF or HNSW, inner product, on a GPU when faiss has one.

ALS scores a user-item pair by the dot product of their embeddings, so every index here ranks by
inner product (METRIC_INNER_PRODUCT); vectors are not normalised. Rows of the FAISS index are rows of
the `Embeddings` it was built from; `RetrievalIndex` maps them back to item ids.

HNSW searches by inner product directly (the ip-NSW of Morozov & Babenko, "Non-metric similarity
graphs for maximum inner product search", NeurIPS 2018). On our ALS and clustered vectors, faiss's
default efConstruction 40 gave better recall@200 than 64 or 128 (0.97 vs 0.68 on Taobao item
queries at efSearch 256; why was not established: a likely cause is that with inner product a
wider construction search links more items to the few long vectors, so the graph loses reach), and the Euclidean transform of Bachrach et al.
(RecSys 2014: an extra coordinate sqrt(max|x|^2 - |x|^2), then L2) gave 0.2-0.4 on ALS vectors,
whose norms vary widely.

The GPU path (faiss-gpu builds): flat and IVF indexes are copied to GPU 0 when
`faiss.get_num_gpus() > 0` (or `use_gpu=True`), copied back to the CPU to serialise, and to the GPU
again on load. HNSW has no FAISS GPU implementation and is the CPU fallback of the design: it stays
on the CPU. All GPU calls go through `GPU` (a `FaissGpu`), so tests can stand a fake in for it.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import faiss
import numpy as np

from batch.artifacts import Embeddings

Kind = Literal["auto", "flat", "flat16", "ivf", "hnsw"]
KINDS = ("auto", "flat", "flat16", "ivf", "hnsw")
FLAT_BELOW = 5_000          # "auto": exact search below this many items (a 5k x 128 scan is ~0.05 ms per query)
MIN_POINTS_PER_LIST = 39    # faiss k-means warns below 39 training points per centroid (ClusteringParameters)
TRAIN_POINTS_PER_LIST = 64  # IVF trains on at most this many sampled points per list (faiss wiki: 30 to 256)
GPU_MAX_K = 2048            # faiss GPU k-selection limit for k and nprobe
FORMAT = 1                  # to_bytes layout version


def choose_nlist(n: int) -> int:
    """Inverted lists for an IVF index over n items: round(4 * sqrt(n)), at most n // 39, at least 1.

    4*sqrt(n) is the low end of the faiss wiki's "between 4*sqrt(N) and 16*sqrt(N)" (Guidelines to
    choose an index): fewer, larger lists keep recall high at a small nprobe, which matters for
    k = 200 candidates. The cap n // 39 lets every centroid train on >= 39 points (faiss's k-means
    minimum). 55k items -> 940 lists, 1M -> 4000, 20k -> 512 (capped).
    """
    if n < 1:
        return 1
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def choose_nprobe(nlist: int) -> int:
    """Lists an IVF query visits by default: round(2 * sqrt(nlist)), at least 8, at most nlist.

    A default only: the batch job should call tune_nprobe with real user embeddings. Measured
    recall@200 against exact search (bench/results/retrieval_index.json, 2 cores): on a structured
    synthetic 1M x 128 catalogue (nlist 4000) nprobe 64 gave 0.97 (users) / 1.00 (items), 128 gave
    0.999 / 1.00 at 0.9 ms per query against 12 ms for exact search; this rule gives 126. On the
    clustered test set (20k x 32, nlist 512) it gives 45, recall 1.0. On ALS embeddings of the
    Taobao head (814 users, 55k items, nearly unclustered) it gives 61 and recall 0.87 / 0.74:
    there 0.95 needs 256-512 of 940 lists, which tune_nprobe finds.
    """
    return max(1, min(nlist, max(8, round(2 * math.sqrt(nlist)))))


class FaissGpu:
    """The GPU half of faiss (faiss-gpu builds only): availability and CPU <-> GPU copies."""

    def __init__(self) -> None:
        self._resources: Any = None

    def available(self) -> bool:
        return faiss.get_num_gpus() > 0

    def to_gpu(self, index: faiss.Index, params: dict[str, Any]) -> faiss.Index:
        if self._resources is None:  # one StandardGpuResources per process: it owns the temp memory
            self._resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(self._resources, 0, index)
        if "nprobe" in params:
            self.set_nprobe(gpu_index, params["nprobe"])
        return gpu_index

    def set_nprobe(self, index: faiss.Index, nprobe: int) -> None:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", min(nprobe, GPU_MAX_K))

    def to_cpu(self, index: faiss.Index) -> faiss.Index:
        return faiss.index_gpu_to_cpu(index)


GPU = FaissGpu()


def _wants_gpu(use_gpu: bool | None, kind: str) -> bool:
    if kind in ("hnsw", "flat16"):
        return False
    if use_gpu is None:
        return GPU.available()
    if use_gpu and not GPU.available():
        raise RuntimeError("use_gpu=True but faiss sees no GPU (faiss.get_num_gpus() == 0, or a faiss-cpu build)")
    return use_gpu


def _as_queries(queries: np.ndarray, d: int) -> np.ndarray:
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != d:
        raise ValueError(f"queries must have shape (n, {d}), got {np.shape(queries)}")
    return q


@dataclass
class RetrievalIndex:
    index: faiss.Index          # on the GPU when on_gpu
    ids: np.ndarray             # row -> item id (object array of str)
    kind: str                   # "flat" | "flat16" | "ivf" | "hnsw" (never "auto": what was built)
    params: dict[str, Any] = field(default_factory=dict)  # n, dim, nlist, nprobe, hnsw_m, ef_search, ef_construction
    on_gpu: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.params["dim"])

    def search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS rows (-1 where fewer than k were found) and inner products, best first, shape (nq, k)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if self.on_gpu and k > GPU_MAX_K:
            raise ValueError(f"k={k} is above the faiss GPU limit of {GPU_MAX_K}")
        q = _as_queries(queries, self.dim)
        scores, rows = self.index.search(q, k)
        return rows, scores

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item ids (object array, None where fewer than k were found) and scores (-inf there)."""
        rows, scores = self.search_rows(queries, k)
        missing = rows < 0
        ids = self.ids[np.where(missing, 0, rows)] if len(self.ids) else np.full(rows.shape, None, dtype=object)
        ids[missing] = None
        scores[missing] = -np.inf
        return ids, scores

    def set_nprobe(self, nprobe: int) -> None:
        if self.kind != "ivf":
            raise ValueError(f"nprobe applies to ivf indexes, not {self.kind}")
        self.params["nprobe"] = nprobe = max(1, min(int(nprobe), self.params["nlist"]))
        if self.on_gpu:
            GPU.set_nprobe(self.index, nprobe)
        else:
            faiss.extract_index_ivf(self.index).nprobe = nprobe

    def to_bytes(self) -> bytes:
        """One npz: the faiss index (serialised from a CPU copy), the ids and the parameters as JSON."""
        cpu = GPU.to_cpu(self.index) if self.on_gpu else self.index
        meta = {"format": FORMAT, "kind": self.kind, "params": self.params}
        buf = io.BytesIO()
        np.savez(buf, index=faiss.serialize_index(cpu),
                 ids=np.frombuffer(json.dumps(self.ids.tolist()).encode(), dtype=np.uint8),
                 meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, use_gpu: bool | None = None) -> "RetrievalIndex":
        """Load what to_bytes wrote; onto the GPU when one exists (use_gpu=None) or when asked."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            if meta.get("format") != FORMAT:
                raise ValueError(f"unknown retrieval index format {meta.get('format')!r}")
            ids = np.array(json.loads(z["ids"].tobytes()), dtype=object)
            index = faiss.deserialize_index(z["index"])
        out = cls(index, ids, meta["kind"], meta["params"])
        _apply_params(out.index, out.kind, out.params)
        if _wants_gpu(use_gpu, out.kind):
            out.index, out.on_gpu = GPU.to_gpu(out.index, out.params), True
        return out


def _apply_params(index: faiss.Index, kind: str, params: dict[str, Any]) -> None:
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
    elif kind == "hnsw":
        index.hnsw.efSearch = params["ef_search"]


def build(emb: Embeddings, kind: Kind = "auto", *, nprobe: int | None = None, nlist: int | None = None,
          hnsw_m: int = 32, ef_search: int = 128, ef_construction: int = 40, use_gpu: bool | None = None,
          seed: int = 1234) -> RetrievalIndex:
    """The index over emb's item vectors (inner product).

    kind: "flat" exact; "flat16" exact over float16 copies of the vectors (half the memory, 2.4x
    faster on the CPU: 0.8 vs 1.9 ms a query over 100k x 128, recall@200 0.9999; CPU only, like
    HNSW, since a GPU scans fp32 fast enough); "ivf" IVF-Flat with nlist = choose_nlist(n) lists and nprobe =
    choose_nprobe(nlist) unless given; "hnsw" HNSW-Flat (M = hnsw_m, efSearch = ef_search), the CPU
    alternative; "auto" flat below FLAT_BELOW items (exact is cheap there), IVF above.
    use_gpu: None = when faiss sees a GPU; True = require one; False = CPU.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; known: {', '.join(KINDS)}")
    n, d = emb.vectors.shape
    if d < 1:
        raise ValueError("embeddings have no dimensions")
    if kind == "auto":
        kind = "flat" if n < FLAT_BELOW else "ivf"
    if kind not in ("flat", "flat16") and n == 0:
        raise ValueError(f"cannot build a {kind} index over no items (use flat)")
    x = emb.vectors
    params: dict[str, Any] = {"n": n, "dim": d}
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(d)
    elif kind == "flat16":
        index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        index.train(np.ascontiguousarray(x[:1]) if n else np.zeros((1, d), np.float32))  # fp16 needs no statistics
    elif kind == "ivf":
        params["nlist"] = lists = max(1, min(nlist or choose_nlist(n), n))
        params["nprobe"] = max(1, min(nprobe or choose_nprobe(lists), lists))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        sample = min(n, TRAIN_POINTS_PER_LIST * lists)
        rows = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False)) if sample < n else slice(None)
        index.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST  # no second subsampling inside faiss
        index.train(np.ascontiguousarray(x[rows]))
    else:
        params.update(hnsw_m=hnsw_m, ef_search=ef_search, ef_construction=ef_construction)
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
    if n:
        index.add(x)
    _apply_params(index, kind, params)
    out = RetrievalIndex(index, np.array(emb.ids, dtype=object), kind, params)
    if _wants_gpu(use_gpu, kind):
        out.index, out.on_gpu = GPU.to_gpu(out.index, params), True
    return out


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k rows and inner products (faiss IndexFlatIP): the reference for recall."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    scores, rows = flat.search(_as_queries(queries, x.shape[1]), k)
    return rows, scores


def recall_at_k(index: RetrievalIndex, exact_vectors: np.ndarray | Embeddings, queries: np.ndarray, k: int) -> float:
    """Recall@k of the index against exact search (IndexFlatIP) over the same rows, for the same queries.

    Tie-aware, as ann-benchmarks counts it: a returned item is a hit when its exact inner product
    reaches the k-th best exact score (less 1e-5 of the best), so items tied with the k-th do not
    count as misses whichever of them exact search happened to list.
    """
    x = _vectors(exact_vectors, index)
    k = min(k, len(x))
    if k < 1:
        raise ValueError("recall needs k >= 1 and a non-empty index")
    q = _as_queries(queries, x.shape[1])
    return recall_against(x, q, index.search_rows(q, k)[0], exact_search(x, q, k)[1])


def _vectors(exact_vectors: np.ndarray | Embeddings, index: RetrievalIndex) -> np.ndarray:
    x = exact_vectors.vectors if isinstance(exact_vectors, Embeddings) else np.asarray(exact_vectors, np.float32)
    if len(x) != len(index):
        raise ValueError(f"exact vectors have {len(x)} rows, the index {len(index)}")
    return x


def recall_against(x: np.ndarray, q: np.ndarray, got: np.ndarray, exact_scores: np.ndarray) -> float:
    """Tie-aware recall of result rows `got` for queries q over vectors x, given the exact top-k
    scores (exact_search): to score many settings against one exact search."""
    kth = exact_scores[:, -1] - 1e-5 * np.abs(exact_scores[:, :1]).ravel()
    true_scores = np.einsum("qd,qkd->qk", q, x[np.maximum(got, 0)])
    hits = ((true_scores >= kth[:, None]) & (got >= 0)).sum(axis=1)
    return float(np.minimum(hits, exact_scores.shape[1]).sum() / exact_scores.size)


def tune_nprobe(index: RetrievalIndex, exact_vectors: np.ndarray | Embeddings, queries: np.ndarray, k: int,
                target: float = 0.95) -> tuple[int, float]:
    """The smallest nprobe in 1, 2, 4, ... nlist whose recall@k reaches target; sets it on the index.

    Returns (nprobe, recall). Where no power of two reaches the target, nlist (exhaustive) is chosen.
    """
    x = _vectors(exact_vectors, index)
    q = _as_queries(queries, x.shape[1])
    k = min(k, len(x))
    exact_scores = exact_search(x, q, k)[1]
    nlist = index.params["nlist"]
    nprobe = 1
    while True:
        index.set_nprobe(min(nprobe, nlist))
        recall = recall_against(x, q, index.search_rows(q, k)[0], exact_scores)
        if recall >= target or nprobe >= nlist:
            return index.params["nprobe"], recall
        nprobe *= 2
