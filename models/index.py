"""The retrieval index over item embeddings: FAISS flat, IVF, IVF-PQ or HNSW, inner product, on a GPU when
faiss has one; and a sharded index (items split across shards by a stable hash, scatter-gather top-k).

ALS scores a user-item pair by the dot product of their embeddings, so every index here ranks by
inner product (METRIC_INNER_PRODUCT); vectors are not normalised. Rows of the FAISS index are rows of
the `Embeddings` it was built from; `RetrievalIndex` maps them back to item ids.

HNSW searches by inner product directly (the ip-NSW of Morozov & Babenko, "Non-metric similarity
graphs for maximum inner product search", NeurIPS 2018). On our ALS and clustered vectors, faiss's
default efConstruction 40 gave better recall@200 than 64 or 128 (0.97 vs 0.68 on Taobao item
queries at efSearch 256; why was not established: a likely cause is that with inner product a
wider construction search links more items to the few long vectors, so the graph loses reach), and the
Euclidean transform of Bachrach et al.
(RecSys 2014: an extra coordinate sqrt(max|x|^2 - |x|^2), then L2) gave 0.2-0.4 on ALS vectors,
whose norms vary widely.

The GPU path (faiss-gpu builds): flat and IVF indexes are copied to GPU 0 when
`faiss.get_num_gpus() > 0` (or `use_gpu=True`), copied back to the CPU to serialise, and to the GPU
again on load (IVF-PQ likewise: only its faiss index goes to the GPU; its float16 re-ranking copy
stays in host memory and re-ranking runs on the CPU). HNSW has no FAISS GPU implementation and is
the CPU fallback of the design: it stays on the CPU. All GPU calls go through `GPU` (a `FaissGpu`),
so tests can stand a fake in for it.

Memory at the design's scale, 100M items x 128 dimensions (bytes per item, before the id map):
    flat / flat16            512 / 256 B        51.2 / 25.6 GB  (51.2: over a 40/48 GB GPU, most of an 80 GB one)
    ivf (IVF-Flat)           512 + 8 (id)       52.0 GB + centroids
    hnsw (M=32)              512 + ~272 (links) ~78 GB (CPU only; level 0 keeps 2M = 64 4-byte links)
    ivfpq, M=32 x 8 bits     32 + 8 (id)        4.0 GB + centroids (40,000 x 128 x 4 = 20 MB) + codebooks (128 KB)
    ivfpq + refine (fp16)    40 + 256           4.0 GB on the GPU + 25.6 GB fp16 copy in host memory
See "ivfpq" in build() for the choices; bench/index_scale.py measures these per item at 1M. The id map
(row -> item id) is extra and the same for every kind. Beyond one machine, ShardedIndex / merge_topk:
items split by shard_of, every shard searched, the global top k merged by score.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from models.artifacts import Embeddings
from recstream.settings import INDEX_KINDS

Kind = Literal["auto", "flat", "flat16", "ivf", "ivfpq", "hnsw"]
KINDS = INDEX_KINDS   # the kinds RECSTREAM_INDEX_KIND may name
IVF_KINDS = ("ivf", "ivfpq")
FLAT_BELOW = 5_000          # "auto": exact search below this many items (a 5k x 128 scan is ~0.05 ms per query)
MIN_POINTS_PER_LIST = 39    # faiss k-means warns below 39 training points per centroid (ClusteringParameters)
TRAIN_POINTS_PER_LIST = 64  # IVF trains on at most this many sampled points per list (faiss wiki: 30 to 256)
GPU_MAX_K = 2048            # faiss GPU k-selection limit for k and nprobe
GPU_PQ_LUT_BYTES = 48 << 10  # faiss GPU IVF-PQ keeps a query's M x 2^nbits lookup table in shared memory
PQ_NBITS = 8                # bits per IVF-PQ sub-quantiser code: 256 centroids each, one byte
PQ_TRAIN_POINTS = 64 * 2 ** PQ_NBITS   # IVF-PQ trains on at least this many points (64 per PQ centroid)
REFINE_FACTOR = 4           # ivfpq re-ranking: the PQ search returns k * this many candidates
FORMAT = 2                  # to_bytes layout version (2: optional float16 "refine" array for ivfpq)
READ_FORMATS = (1, 2)       # 1 is 2 without the refine array


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


def choose_pq_m(d: int) -> int:
    """IVF-PQ sub-quantisers for d dimensions: about 4 dimensions each (d // 4; 32 for d = 128, i.e.
    32 bytes a vector at 8 bits), rounded down to a divisor of d, since faiss needs d % M == 0."""
    target = max(1, d // 4)
    return max(m for m in range(1, target + 1) if d % m == 0)


def choose_pq_nbits(n: int) -> int:
    """Bits per PQ code: 8 (one byte, what faiss GPU IVF-PQ supports) unless there are too few items to
    train 256 centroids per sub-quantiser on >= 39 points each; then fewer (small test catalogues)."""
    if n >= MIN_POINTS_PER_LIST * 2 ** PQ_NBITS:
        return PQ_NBITS
    return max(1, min(PQ_NBITS, int(math.log2(max(2, n // MIN_POINTS_PER_LIST)))))


class FaissGpu:
    """The GPU half of faiss (faiss-gpu builds only): availability and CPU <-> GPU copies."""

    def __init__(self) -> None:
        self._resources: Any = None

    def available(self) -> bool:
        return faiss.get_num_gpus() > 0

    def to_gpu(self, index: faiss.Index, params: dict[str, Any]) -> faiss.Index:
        if self._resources is None:  # one StandardGpuResources per process: it owns the temp memory
            self._resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        if isinstance(index, faiss.IndexIVFPQ) and index.pq.M * index.pq.ksub * 4 > GPU_PQ_LUT_BYTES:
            options.useFloat16 = True  # IVF-PQ lookup tables in float16 when float32 ones pass shared memory
        gpu_index = faiss.index_cpu_to_gpu(self._resources, 0, index, options)
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
    kind: str                   # "flat" | "flat16" | "ivf" | "ivfpq" | "hnsw" (never "auto": what was built)
    params: dict[str, Any] = field(default_factory=dict)  # n, dim, nlist, nprobe, pq_m, pq_nbits, refine_factor,
    #                                                       hnsw_m, ef_search, ef_construction
    on_gpu: bool = False
    refine: faiss.Index | None = None  # ivfpq re-ranking: float16 copy of the vectors (IndexScalarQuantizer
    #                                    QT_fp16), row-aligned, always in host memory

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
        if self.refine is None or not len(self):
            scores, rows = self.index.search(q, k)
            return rows, scores
        # IVF-PQ then re-ranking (faiss IndexRefine: C++, all cores): the PQ index (CPU or GPU) returns
        # candidates(k) rows, re-scored against the float16 copy; the best k are kept
        refine = faiss.IndexRefine(self.index, self.refine)
        refine.k_factor = self.candidates(k) / k
        scores, rows = refine.search(q, k)
        return rows, scores

    def candidates(self, k: int) -> int:
        """How many PQ candidates an ivfpq search with re-ranking re-scores for a top k: k * refine_factor,
        at most the items, at most faiss's GPU k limit on a GPU, at least k."""
        wide = min(k * int(self.params.get("refine_factor", REFINE_FACTOR)), len(self))
        if self.on_gpu:
            wide = min(wide, GPU_MAX_K)
        return max(k, wide)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item ids (object array, None where fewer than k were found) and scores (-inf there)."""
        rows, scores = self.search_rows(queries, k)
        missing = rows < 0
        ids = self.ids[np.where(missing, 0, rows)] if len(self.ids) else np.full(rows.shape, None, dtype=object)
        ids[missing] = None
        scores[missing] = -np.inf
        return ids, scores

    def set_nprobe(self, nprobe: int) -> None:
        if self.kind not in IVF_KINDS:
            raise ValueError(f"nprobe applies to ivf and ivfpq indexes, not {self.kind}")
        self.params["nprobe"] = nprobe = max(1, min(int(nprobe), self.params["nlist"]))
        if self.on_gpu:
            GPU.set_nprobe(self.index, nprobe)
        else:
            faiss.extract_index_ivf(self.index).nprobe = nprobe

    def to_bytes(self) -> bytes:
        """One npz: the faiss index (serialised from a CPU copy), the ids, the parameters as JSON and, for
        ivfpq with re-ranking, the float16 vectors ("refine")."""
        cpu = GPU.to_cpu(self.index) if self.on_gpu else self.index
        meta = {"format": FORMAT, "kind": self.kind, "params": self.params}
        arrays = {"index": faiss.serialize_index(cpu),
                  "ids": np.frombuffer(json.dumps(self.ids.tolist()).encode(), dtype=np.uint8),
                  "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
        if self.refine is not None:
            arrays["refine"] = faiss.serialize_index(self.refine)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def nbytes(self) -> int:
        """Bytes of the vector index proper: the serialised faiss index plus the re-ranking copy, without
        the id map (the same for every kind)."""
        cpu = GPU.to_cpu(self.index) if self.on_gpu else self.index
        refine = 0 if self.refine is None else int(faiss.serialize_index(self.refine).nbytes)
        return int(faiss.serialize_index(cpu).nbytes) + refine

    @classmethod
    def from_bytes(cls, data: bytes, use_gpu: bool | None = None) -> RetrievalIndex:
        """Load what to_bytes wrote; onto the GPU when one exists (use_gpu=None) or when asked."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            if meta.get("format") not in READ_FORMATS:
                raise ValueError(f"unknown retrieval index format {meta.get('format')!r}")
            ids = np.array(json.loads(z["ids"].tobytes()), dtype=object)
            index = faiss.deserialize_index(z["index"])
            refine = faiss.deserialize_index(z["refine"]) if "refine" in z.files else None
        out = cls(index, ids, meta["kind"], meta["params"], refine=refine)
        _apply_params(out.index, out.kind, out.params)
        if _wants_gpu(use_gpu, out.kind):
            out.index, out.on_gpu = GPU.to_gpu(out.index, out.params), True
        return out


def _fp16_copy(x: np.ndarray) -> faiss.Index:
    """The ivfpq re-ranking store: the vectors as float16 (faiss IndexScalarQuantizer QT_fp16, inner product)."""
    sq = faiss.IndexScalarQuantizer(x.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    sq.train(np.ascontiguousarray(x[:1]))   # fp16 needs no statistics
    sq.add(x)
    return sq


def _apply_params(index: faiss.Index, kind: str, params: dict[str, Any]) -> None:
    if kind in IVF_KINDS:
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
    elif kind == "hnsw":
        index.hnsw.efSearch = params["ef_search"]


def add_refine(index: RetrievalIndex, vectors: np.ndarray, refine_factor: int = REFINE_FACTOR) -> RetrievalIndex:
    """The same ivfpq index (sharing its faiss index) with a float16 re-ranking copy of `vectors` (its rows)."""
    if index.kind != "ivfpq" or len(vectors) != len(index) or refine_factor < 1:
        raise ValueError("add_refine needs an ivfpq index, its own vectors and refine_factor >= 1")
    return RetrievalIndex(index.index, index.ids, "ivfpq", {**index.params, "refine_factor": int(refine_factor)},
                          index.on_gpu, _fp16_copy(np.ascontiguousarray(vectors, dtype=np.float32)))


def build(emb: Embeddings, kind: Kind = "auto", *, nprobe: int | None = None, nlist: int | None = None,
          hnsw_m: int = 32, ef_search: int = 128, ef_construction: int = 40, use_gpu: bool | None = None,
          seed: int = 1234, pq_m: int | None = None, pq_nbits: int | None = None,
          refine_factor: int = REFINE_FACTOR) -> RetrievalIndex:
    """The index over emb's item vectors (inner product).

    kind: "flat" exact; "flat16" exact over float16 copies of the vectors (half the memory, 2.4x
    faster on the CPU: 0.8 vs 1.9 ms a query over 100k x 128, recall@200 0.9999; CPU only, like
    HNSW, since a GPU scans fp32 fast enough); "ivf" IVF-Flat with nlist = choose_nlist(n) lists and nprobe =
    choose_nprobe(nlist) unless given; "hnsw" HNSW-Flat (M = hnsw_m, efSearch = ef_search), the CPU
    alternative; "auto" flat below FLAT_BELOW items (exact is cheap there), IVF above.
    "ivfpq": IVF with product quantisation (faiss IndexIVFPQ, inner product, residuals encoded), the
    compressed index for catalogues whose float vectors do not fit a GPU: nlist and nprobe as for
    "ivf" (tune nprobe with tune_nprobe), pq_m sub-quantisers (choose_pq_m: d // 4, 32 for d = 128) of
    pq_nbits bits (8: M bytes a vector; fewer only for tiny catalogues, choose_pq_nbits), so
    M + 8 bytes an item with faiss's 8-byte list ids: 40 B at d = 128, 4.0 GB for 100M items against
    51.2 GB flat. PQ scores are approximate (32 bytes cannot rank 200 near neighbours exactly), so by
    default (refine_factor > 0) it re-ranks: the PQ search returns k * refine_factor candidates, re-scored
    exactly (up to float16 rounding) against a float16 copy of the vectors kept beside the index, in
    host memory (faiss IndexScalarQuantizer QT_fp16 through faiss IndexRefine, 2 * d bytes an item:
    +256 B at d = 128, 25.6 GB at 100M: host RAM, not GPU memory; on a GPU only the IVF-PQ index moves).
    Chosen over faiss IndexRefineFlat, whose float32 copy (4 * d = 512 B an item) is as large as the
    flat index it replaces; an int8 copy (QT_8bit, d bytes) would halve it again at some recall.
    refine_factor=0 keeps the 40 B/item index alone.
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
    elif kind == "ivfpq":
        params["nlist"] = lists = max(1, min(nlist or choose_nlist(n), n))
        params["nprobe"] = max(1, min(nprobe or choose_nprobe(lists), lists))
        m = pq_m or choose_pq_m(d)
        if d % m:
            raise ValueError(f"pq_m={m} does not divide the dimension {d}")
        bits = pq_nbits or choose_pq_nbits(n)
        params.update(pq_m=m, pq_nbits=bits, refine_factor=max(0, int(refine_factor)))
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, lists, m, bits, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.pq.cp.seed = seed
        sample = min(n, max(TRAIN_POINTS_PER_LIST * lists, PQ_TRAIN_POINTS))
        rows = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False)) if sample < n else slice(None)
        index.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
        index.pq.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST  # PQ k-means: 64 x 2^bits residuals (16k)
        index.train(np.ascontiguousarray(x[rows]))
    else:
        params.update(hnsw_m=hnsw_m, ef_search=ef_search, ef_construction=ef_construction)
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
    if n:
        index.add(x)
    _apply_params(index, kind, params)
    out = RetrievalIndex(index, np.array(emb.ids, dtype=object), kind, params)
    if kind == "ivfpq" and params["refine_factor"] > 0:
        out.refine = _fp16_copy(x)
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


def recall_at_k(index: RetrievalIndex | ShardedIndex, exact_vectors: np.ndarray | Embeddings, queries: np.ndarray,
                k: int) -> float:
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
    if isinstance(index, RetrievalIndex):
        rows = index.search_rows(q, k)[0]
    elif isinstance(exact_vectors, Embeddings):   # a sharded index answers ids: back to rows of the vectors
        row_of = exact_vectors.index()
        rows = np.vectorize(lambda i: row_of.get(i, -1) if i is not None else -1, otypes=[np.int64])(index.search(q, k)[0])
    else:
        raise ValueError("the recall of a sharded index needs the Embeddings (ids) it was built from")
    return recall_against(x, q, rows, exact_search(x, q, k)[1])


def _vectors(exact_vectors: np.ndarray | Embeddings, index: RetrievalIndex | ShardedIndex) -> np.ndarray:
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


# -- sharding: items split across shards by a stable hash; search scatters to every shard, gathers top-k --

def shard_of(item_id: str, n_shards: int) -> int:
    """The shard of an item: blake2b-64 of its id (UTF-8) modulo n_shards. Stable across processes,
    machines and Python versions (unlike hash(), which is salted per process)."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be at least 1, got {n_shards}")
    digest = hashlib.blake2b(str(item_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n_shards


def split_by_shard(emb: Embeddings, n_shards: int) -> list[Embeddings]:
    """emb's items split into n_shards Embeddings by shard_of (each keeps emb's row order; some may be empty)."""
    which = np.fromiter((shard_of(i, n_shards) for i in emb.ids), dtype=np.int64, count=len(emb.ids))
    ids = np.array(emb.ids, dtype=object)
    out = []
    for s in range(n_shards):
        rows = np.flatnonzero(which == s)
        out.append(Embeddings(ids[rows].tolist(), emb.vectors[rows].reshape(len(rows), emb.rank)))
    return out


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top lists into the global top k by score.

    results: one (ids, scores) per shard, each shape (nq, k_s) with k_s any width (0 for an empty shard),
    best first, None / -inf where a shard found fewer. Returns (ids, scores), shape (nq, k), best
    first, None / -inf where all shards together found fewer than k. Ties keep shard order, then each
    shard's own order (a stable sort), so the merge is deterministic for a given shard list.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    results = [(np.asarray(i, dtype=object), np.asarray(s, dtype=np.float32)) for i, s in results]
    nqs = {s.shape[0] for _, s in results}
    if len(nqs) > 1:
        raise ValueError(f"shards answered different numbers of queries: {sorted(nqs)}")
    nq = nqs.pop() if nqs else 0
    ids_out = np.full((nq, k), None, dtype=object)
    scores_out = np.full((nq, k), -np.inf, dtype=np.float32)
    if not results or nq == 0:
        return ids_out, scores_out
    ids = np.concatenate([i.reshape(nq, -1) for i, _ in results], axis=1)
    scores = np.concatenate([s.reshape(nq, -1) for _, s in results], axis=1)
    take = min(k, scores.shape[1])
    if take == 0:
        return ids_out, scores_out
    order = np.argsort(-scores, axis=1, kind="stable")[:, :take]
    ids_out[:, :take] = np.take_along_axis(ids, order, axis=1)
    scores_out[:, :take] = np.take_along_axis(scores, order, axis=1)
    ids_out[np.isneginf(scores_out)] = None
    return ids_out, scores_out


@dataclass
class ShardedIndex:
    """Scatter-gather over shards (RetrievalIndex each, any kind): every query goes to every shard, which
    returns its top min(k, its size); merge_topk keeps the global top k. In one process the shards are
    searched in threads (faiss releases the GIL); across workers the same merge applies to their answers."""
    shards: list[RetrievalIndex]
    parallel: bool = True
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def _shard_search(self, shard: RetrievalIndex, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not len(shard):
            return np.empty((len(q), 0), dtype=object), np.empty((len(q), 0), dtype=np.float32)
        return shard.search(q, min(k, len(shard)))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item ids (None where fewer than k) and scores (-inf there), best first, over all shards."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if not self.shards:
            raise ValueError("a sharded index needs at least one shard")
        q = _as_queries(queries, self.shards[0].dim)
        if self.parallel and len(self.shards) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(len(self.shards), thread_name_prefix="shard")
            parts = list(self._pool.map(lambda s: self._shard_search(s, q, k), self.shards))
        else:
            parts = [self._shard_search(s, q, k) for s in self.shards]
        return merge_topk(parts, k)

    @property
    def kind(self) -> str:
        """The shards' kind ("flat+ivf" when they differ: "auto" chooses per shard size)."""
        return "+".join(sorted({s.kind for s in self.shards if len(s)})) or "flat"

    @property
    def params(self) -> dict[str, Any]:
        return {"shards": len(self.shards), "n": len(self), "dim": self.shards[0].dim if self.shards else 0}

    def set_nprobe(self, nprobe: int) -> None:
        for s in self.shards:
            if len(s):
                s.set_nprobe(nprobe)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.shards)


def build_sharded(emb: Embeddings, n_shards: int, kind: Kind = "auto", **kwargs: Any) -> ShardedIndex:
    """n_shards indexes over emb split by split_by_shard, each built by build(shard, kind, **kwargs) with
    its own nlist/nprobe defaults for its size; an empty shard gets an (empty) flat index."""
    shards = [build(part, kind if len(part.ids) else "flat", **kwargs) for part in split_by_shard(emb, n_shards)]
    return ShardedIndex(shards)


# -- files: a model version's index is index.faiss, or one file per shard ------------------------------

def shard_file(shard: int, n_shards: int) -> str:
    return f"index-{shard}-of-{n_shards}.faiss"


def index_files(index: RetrievalIndex | ShardedIndex) -> dict[str, bytes]:
    """File name -> bytes of an index, as a model bundle keeps it."""
    if isinstance(index, ShardedIndex):
        return {shard_file(i, len(index.shards)): s.to_bytes() for i, s in enumerate(index.shards)}
    return {"index.faiss": index.to_bytes()}


def load_index(folder: Path, shard: int = 0, n_shards: int = 1) -> RetrievalIndex | ShardedIndex:
    """What a retrieval worker serving `shard` of `n_shards` loads from a bundle folder: its shard's file;
    with n_shards 1, the whole index (index.faiss, or every shard's file searched in one process)."""
    if n_shards == 1 and (folder / "index.faiss").exists():
        return RetrievalIndex.from_bytes((folder / "index.faiss").read_bytes())
    trained = sorted(folder.glob("index-*-of-*.faiss"))
    counts = {int(p.stem.rsplit("-", 1)[1]) for p in trained}
    if n_shards == 1 and len(counts) == 1:
        m = counts.pop()
        return ShardedIndex([RetrievalIndex.from_bytes((folder / shard_file(i, m)).read_bytes()) for i in range(m)],
                            parallel=False)   # the caller's thread, with its OpenMP thread count
    path = folder / shard_file(shard, n_shards)
    if not path.exists():
        have = f"{sorted(counts)[0]} shards" if counts else "one index"
        raise ValueError(f"this worker serves shard {shard} of {n_shards} but the version was trained with {have}: "
                         f"set RECSTREAM_RETRIEVAL_SHARDS alike for the trainer and the retrieval workers")
    return RetrievalIndex.from_bytes(path.read_bytes())
