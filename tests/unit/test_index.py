import math

import faiss
import numpy as np
import pytest

from models import index as index_mod
from models.artifacts import Embeddings
from models.index import RetrievalIndex, build, choose_nlist, choose_nprobe, exact_search, recall_at_k, tune_nprobe

K = 200


def clustered(n: int = 20_000, dim: int = 32, clusters: int = 50, noise: float = 0.5, seed: int = 1):
    """Items and queries drawn around the same cluster centres: recall is meaningful on these,
    unlike on pure Gaussian vectors whose neighbours are all about equally far."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    items = centres[rng.integers(clusters, size=n)] + noise * rng.normal(size=(n, dim))
    queries = centres[rng.integers(clusters, size=100)] + noise * rng.normal(size=(100, dim))
    return Embeddings([f"p{i:05d}" for i in range(n)], items), queries.astype(np.float32)


@pytest.fixture(scope="module")
def data():
    return clustered()


@pytest.fixture(scope="module")
def indexes(data):
    emb, _ = data
    return {kind: build(emb, kind, use_gpu=False) for kind in ("flat", "flat16", "ivf", "hnsw")}


@pytest.mark.parametrize("n", [0, 1, 38, 39, 77, 78, 1_000, 20_000, 55_233, 1_000_000, 100_000_000])
def test_choose_nlist_bounds(n):
    nlist = choose_nlist(n)
    assert 1 <= nlist <= max(1, n // 39)
    if n >= 39 and n // 39 >= round(4 * math.sqrt(n)):
        assert nlist == round(4 * math.sqrt(n))


@pytest.mark.parametrize("nlist,want", [(1, 1), (5, 5), (10, 8), (100, 20), (512, 45), (4000, 126)])
def test_choose_nprobe(nlist, want):
    assert choose_nprobe(nlist) == want


def test_ivf_recall_at_the_chosen_nprobe(data, indexes):
    emb, queries = data
    ivf = indexes["ivf"]
    assert ivf.kind == "ivf" and ivf.params["nlist"] == choose_nlist(len(emb.ids))
    assert ivf.params["nprobe"] == choose_nprobe(ivf.params["nlist"])
    assert recall_at_k(ivf, emb, queries, K) >= 0.95


def test_tune_nprobe_finds_a_small_nprobe(data):
    emb, queries = data
    ivf = build(emb, "ivf", use_gpu=False)
    nprobe, recall = tune_nprobe(ivf, emb, queries, K, target=0.95)
    assert recall >= 0.95 and nprobe < ivf.params["nlist"] // 4 and ivf.params["nprobe"] == nprobe
    ivf.set_nprobe(1)
    assert recall_at_k(ivf, emb, queries, K) < recall  # one list is not enough: the sweep matters


def test_hnsw_recall(data, indexes):
    emb, queries = data
    assert recall_at_k(indexes["hnsw"], emb, queries, K) >= 0.9


def test_flat_is_exact(data, indexes):
    emb, queries = data
    rows, scores = indexes["flat"].search_rows(queries, K)
    want_rows, want_scores = exact_search(emb.vectors, queries, K)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
    assert recall_at_k(indexes["flat"], emb, queries, K) == 1.0


def test_flat16_is_exact_up_to_float16_rounding(data, indexes):
    emb, queries = data
    assert recall_at_k(indexes["flat16"], emb, queries, K) >= 0.999
    assert indexes["flat16"].index.sa_code_size() == 2 * emb.rank   # two bytes a dimension


@pytest.mark.parametrize("kind", ["flat", "flat16", "ivf", "hnsw"])
def test_search_returns_ids_best_first(data, indexes, kind):
    emb, queries = data
    ids, scores = indexes[kind].search(queries[:5], 10)
    assert ids.shape == scores.shape == (5, 10)
    assert set(ids.ravel()) <= set(emb.ids)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # the scores are the inner products of the returned items
    row = emb.index()
    rtol = 5e-3 if kind == "flat16" else 1e-4   # float16 keeps ~3 significant digits per dimension
    np.testing.assert_allclose(scores[0], [emb.vectors[row[i]] @ queries[0] for i in ids[0]], rtol=rtol)
    one_ids, _ = indexes[kind].search(queries[0], 10)  # a single query as a 1-D vector
    assert one_ids.shape == (1, 10) and list(one_ids[0]) == list(ids[0])


@pytest.mark.parametrize("kind", ["flat", "flat16", "ivf", "hnsw"])
def test_serialisation_round_trip(data, indexes, kind):
    _, queries = data
    idx = indexes[kind]
    back = RetrievalIndex.from_bytes(idx.to_bytes(), use_gpu=False)
    assert (back.kind, back.params, list(back.ids)) == (idx.kind, idx.params, list(idx.ids))
    for got, want in zip(back.search(queries, K), idx.search(queries, K)):
        np.testing.assert_array_equal(got, want)


def test_auto_is_flat_when_small_and_ivf_when_large(data):
    emb, _ = data
    small = Embeddings(emb.ids[:1000], emb.vectors[:1000])
    assert build(small).kind == "flat"
    assert build(emb).kind == "ivf"


def test_fewer_items_than_k_pads_with_none():
    emb = Embeddings(["a", "b", "c"], np.eye(3, dtype=np.float32))
    ids, scores = build(emb, "flat").search(np.array([1.0, 0.5, 0.0]), 5)
    assert list(ids[0]) == ["a", "b", "c", None, None] and np.isneginf(scores[0, 3:]).all()
    empty = build(Embeddings([], np.zeros((0, 3))), "auto")
    ids, _ = empty.search(np.ones(3), 2)
    assert list(ids[0]) == [None, None]


@pytest.mark.parametrize("call,error", [
    (lambda e: build(e, "annoy"), "unknown index kind"),
    (lambda e: build(Embeddings([], np.zeros((0, 4))), "ivf"), "no items"),
    (lambda e: build(e, "flat").search(np.ones((2, 5)), 3), "shape"),
    (lambda e: build(e, "flat").search(np.ones(4), 0), "at least 1"),
    (lambda e: build(e, "hnsw").set_nprobe(4), "ivf"),
])
def test_bad_input_is_a_clear_error(call, error):
    emb = Embeddings([f"i{i}" for i in range(100)], np.random.default_rng(0).normal(size=(100, 4)))
    with pytest.raises(ValueError, match=error):
        call(emb)


# -- the GPU path: real only with faiss-gpu and a GPU; its plumbing runs here with a stand-in ---------

class FakeGpu:
    """Stands in for faiss's GPU half: the 'GPU index' is the CPU index itself, calls are recorded."""

    def __init__(self):
        self.calls: list[str] = []

    def available(self) -> bool:
        return True

    def to_gpu(self, index, params):
        self.calls.append("to_gpu")
        if "nprobe" in params:
            self.set_nprobe(index, params["nprobe"])
        return index

    def set_nprobe(self, index, nprobe):
        self.calls.append(f"nprobe={nprobe}")
        faiss.extract_index_ivf(index).nprobe = nprobe

    def to_cpu(self, index):
        self.calls.append("to_cpu")
        return index


def test_without_a_gpu_the_cpu_path_runs_and_forcing_a_gpu_fails(data):
    if faiss.get_num_gpus() > 0:
        pytest.fail("this test expects a machine without a GPU; the GPU path is covered by the stand-in below")
    emb, _ = data
    small = Embeddings(emb.ids[:500], emb.vectors[:500])
    assert not build(small, "flat").on_gpu
    with pytest.raises(RuntimeError, match="no GPU"):
        build(small, "flat", use_gpu=True)


@pytest.mark.parametrize("kind,on_gpu", [("flat", True), ("ivf", True), ("hnsw", False), ("flat16", False)])
def test_gpu_path_copies_to_the_gpu_and_back_for_serialisation(data, monkeypatch, kind, on_gpu):
    emb, queries = data
    fake = FakeGpu()
    monkeypatch.setattr(index_mod, "GPU", fake)
    idx = build(emb, kind)  # use_gpu=None: the GPU, since one is "available"
    assert idx.on_gpu is on_gpu
    if kind == "ivf":
        idx.set_nprobe(16)
        assert fake.calls == ["to_gpu", f"nprobe={choose_nprobe(idx.params['nlist'])}", "nprobe=16"]
    before = idx.search(queries, K)
    fake.calls.clear()
    back = RetrievalIndex.from_bytes(idx.to_bytes())
    want = {"flat": ["to_cpu", "to_gpu"], "ivf": ["to_cpu", "to_gpu", "nprobe=16"], "hnsw": [], "flat16": []}[kind]
    assert fake.calls == want and back.on_gpu is on_gpu
    for got, was in zip(back.search(queries, K), before):
        np.testing.assert_array_equal(got, was)


# -- IVF-PQ (compressed) and the sharded index -----------------------------------------------------

from models.index import (  # noqa: E402
    ShardedIndex,
    add_refine,
    build_sharded,
    choose_pq_m,
    choose_pq_nbits,
    merge_topk,
    shard_of,
    split_by_shard,
)


@pytest.fixture(scope="module")
def ivfpq(data):
    """One IVF-PQ build without re-ranking, and the same faiss index with a float16 copy added."""
    emb, _ = data
    plain = build(emb, "ivfpq", use_gpu=False, refine_factor=0)
    assert plain.refine is None
    return add_refine(plain, emb.vectors), plain


@pytest.mark.parametrize("d,m", [(128, 32), (32, 8), (100, 25), (30, 6), (7, 1), (3, 1), (1, 1)])
def test_choose_pq_m_is_a_divisor_near_four_dims_each(d, m):
    assert choose_pq_m(d) == m and d % m == 0


def test_choose_pq_nbits_is_one_byte_unless_too_few_items():
    assert choose_pq_nbits(1_000_000) == choose_pq_nbits(39 * 256) == 8
    assert 1 <= choose_pq_nbits(39 * 256 - 1) < 8 and choose_pq_nbits(10) == 1


def test_ivfpq_is_compressed_and_recall_comes_from_reranking(data, ivfpq):
    emb, queries = data
    refined, plain = ivfpq
    p = refined.params
    assert refined.kind == "ivfpq" and p["pq_m"] == 8 and p["pq_nbits"] == 8 and p["refine_factor"] == 4
    assert refined.index.code_size == p["pq_m"]                 # 8 x 8 bits: one byte per sub-quantiser
    assert refined.refine.sa_code_size() == 2 * emb.rank and refined.refine.ntotal == len(emb.ids)   # float16
    flat_bytes = 4 * emb.rank
    assert plain.nbytes() / len(emb.ids) < flat_bytes / 3        # codes + ids + centroids + codebooks
    assert 0 <= refined.nbytes() - plain.nbytes() - 2 * emb.vectors.size < 1000   # + a header
    r_plain, r_refined = recall_at_k(plain, emb, queries, K), recall_at_k(refined, emb, queries, K)
    assert 0.5 < r_plain < r_refined and r_refined >= 0.95


def test_ivfpq_tune_nprobe_and_exact_scores_after_reranking(data):
    emb, queries = data
    idx = build(emb, "ivfpq", use_gpu=False, nlist=128, refine_factor=2)
    nprobe, recall = tune_nprobe(idx, emb, queries, K, target=0.95)
    assert recall >= 0.95 and idx.params["nprobe"] == nprobe < 128
    ids, scores = idx.search(queries[:3], 10)
    row = emb.index()
    assert np.all(np.diff(scores, axis=1) <= 0)
    np.testing.assert_allclose(scores[0], [emb.vectors[row[i]] @ queries[0] for i in ids[0]], rtol=5e-3)
    with pytest.raises(ValueError, match="does not divide"):
        build(emb, "ivfpq", use_gpu=False, pq_m=5)
    with pytest.raises(ValueError, match="add_refine"):
        add_refine(idx, emb.vectors[:10])


def test_ivfpq_with_fewer_items_than_k_pads_with_none():
    rng = np.random.default_rng(3)
    emb = Embeddings([f"i{i}" for i in range(60)], rng.normal(size=(60, 8)))
    idx = build(emb, "ivfpq", use_gpu=False, nlist=1)
    assert idx.params["pq_m"] == 2 and idx.params["pq_nbits"] == 1
    ids, scores = idx.search(emb.vectors[0], 100)
    assert sorted(ids[0, :60]) == sorted(emb.ids) and (ids[0, 60:] == None).all()  # noqa: E711
    assert np.isneginf(scores[0, 60:]).all() and ids[0, 0] == "i0"


@pytest.mark.parametrize("which", [0, 1])
def test_ivfpq_serialisation_round_trip(data, ivfpq, which):
    _, queries = data
    idx = ivfpq[which]
    back = RetrievalIndex.from_bytes(idx.to_bytes(), use_gpu=False)
    assert (back.kind, back.params) == (idx.kind, idx.params)
    assert (back.refine is None) == (idx.refine is None)
    for got, want in zip(back.search(queries, K), idx.search(queries, K)):
        np.testing.assert_array_equal(got, want)


def test_format_1_files_still_load(data, indexes):
    import io
    import json
    z = dict(np.load(io.BytesIO(indexes["flat"].to_bytes())))
    meta = json.loads(z["meta"].tobytes())
    z["meta"] = np.frombuffer(json.dumps({**meta, "format": 1}).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **z)
    assert RetrievalIndex.from_bytes(buf.getvalue(), use_gpu=False).kind == "flat"


def test_ivfpq_gpu_path_moves_the_faiss_index_and_keeps_the_fp16_copy_on_the_host(data, monkeypatch):
    emb, queries = data
    small = Embeddings(emb.ids[:4000], emb.vectors[:4000])
    fake = FakeGpu()
    monkeypatch.setattr(index_mod, "GPU", fake)
    idx = build(small, "ivfpq", nlist=32, nprobe=8)    # 4000 items: 6-bit codes, quick to train
    assert idx.on_gpu and fake.calls == ["to_gpu", "nprobe=8"]
    idx.set_nprobe(16)
    before = idx.search(queries, K)
    fake.calls.clear()
    back = RetrievalIndex.from_bytes(idx.to_bytes())
    assert fake.calls == ["to_cpu", "to_gpu", "nprobe=16"] and back.on_gpu and back.refine is not None
    for got, was in zip(back.search(queries, K), before):
        np.testing.assert_array_equal(got, was)
    # on a GPU the candidate list is capped at faiss's k limit
    assert idx.candidates(100) == 400 and idx.candidates(1000) == index_mod.GPU_MAX_K
    assert idx.candidates(2048) == 2048 and idx.params["pq_nbits"] == 6
    idx.on_gpu = False
    assert idx.candidates(1000) == 4000 and idx.candidates(3000) == 4000


def test_shard_of_is_stable_and_balanced():
    # blake2b-64 of the UTF-8 id: fixed values, the same in every process (hash() is salted)
    assert [shard_of(x, 4) for x in ["p0", "p1", "item-42", ""]] == [1, 0, 2, 0]
    assert shard_of("p0", 1_000_003) == 572769
    counts = np.bincount([shard_of(f"p{i}", 8) for i in range(8000)], minlength=8)
    assert counts.min() > 850 and counts.max() < 1150
    with pytest.raises(ValueError):
        shard_of("p0", 0)


def test_split_by_shard_partitions_items(data):
    emb, _ = data
    parts = split_by_shard(emb, 3)
    assert sorted(i for p in parts for i in p.ids) == sorted(emb.ids)
    row = emb.index()
    for s, p in enumerate(parts):
        assert all(shard_of(i, 3) == s for i in p.ids[:50])
        np.testing.assert_array_equal(p.vectors, emb.vectors[[row[i] for i in p.ids]])


def _res(ids, scores):
    return np.array(ids, dtype=object).reshape(len(ids), -1), np.array(scores, dtype=np.float32).reshape(len(ids), -1)


def test_merge_topk_orders_by_score_and_breaks_ties_by_shard_then_rank():
    a = _res([["a1", "a2", "a3"]], [[5.0, 3.0, 3.0]])
    b = _res([["b1", "b2"]], [[4.0, 3.0]])
    ids, scores = merge_topk([a, b], 4)
    assert list(ids[0]) == ["a1", "b1", "a2", "a3"] and list(scores[0]) == [5, 4, 3, 3]
    ids, _ = merge_topk([b, a], 4)                                # tie order follows the shard list
    assert list(ids[0]) == ["a1", "b1", "b2", "a2"]


def test_merge_topk_k_above_what_shards_hold_pads_and_empty_shards_are_ignored():
    a = _res([["a1"], ["a2"]], [[1.0], [2.0]])
    b = _res([["b1", None], ["b2", "b3"]], [[3.0, -np.inf], [0.5, 0.1]])
    empty = (np.empty((2, 0), dtype=object), np.empty((2, 0), dtype=np.float32))
    ids, scores = merge_topk([empty, a, b, empty], 5)
    assert ids.shape == scores.shape == (2, 5)
    assert list(ids[0]) == ["b1", "a1", None, None, None] and np.isneginf(scores[0, 2:]).all()
    assert list(ids[1]) == ["a2", "b2", "b3", None, None]
    ids, scores = merge_topk([empty, empty], 3)
    assert ids.shape == (2, 3) and (ids == None).all() and np.isneginf(scores).all()  # noqa: E711
    assert merge_topk([], 3)[0].shape == (0, 3)
    with pytest.raises(ValueError, match="different numbers"):
        merge_topk([a, _res([["c"]], [[1.0]])], 2)


def test_sharded_flat_equals_unsharded_flat_exactly(data, indexes):
    emb, queries = data
    sharded = build_sharded(emb, 4, "flat", use_gpu=False)
    assert sorted(len(s) for s in sharded.shards) != [0, 0, 0, len(emb.ids)] and len(sharded) == len(emb.ids)
    q = queries[:10]   # < 20 queries: faiss scores each pair with the same kernel, sharded or not
    for got, want in zip(sharded.search(q, K), indexes["flat"].search(q, K)):
        np.testing.assert_array_equal(got, want)
    ids, scores = sharded.search(queries, K)       # batched (BLAS): the same items, scores to rounding
    want_ids, want_scores = indexes["flat"].search(queries, K)
    assert np.mean(ids == want_ids) > 0.999
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
    serial = ShardedIndex(sharded.shards, parallel=False).search(q, K)
    np.testing.assert_array_equal(serial[0], sharded.search(q, K)[0])


def test_sharded_with_more_shards_than_items_and_ivf_shards(data):
    emb, queries = data
    tiny = Embeddings(["x", "y", "z"], np.eye(3, dtype=np.float32))
    sharded = build_sharded(tiny, 8, "ivf", use_gpu=False)
    assert sum(len(s) == 0 for s in sharded.shards) >= 5
    ids, scores = sharded.search(np.array([1.0, 0.5, 0.0]), 5)
    assert list(ids[0]) == ["x", "y", "z", None, None] and np.isneginf(scores[0, 3:]).all()
    part = Embeddings(emb.ids[:8000], emb.vectors[:8000])
    ivf = build_sharded(part, 2, "ivf", use_gpu=False, nlist=32)
    ivf.set_nprobe(32)                                           # exhaustive: exact
    exact = build(part, "flat", use_gpu=False).search(queries[:5], 50)[0]
    assert np.mean(ivf.search(queries[:5], 50)[0] == exact) > 0.99


@pytest.mark.parametrize("kind, built", [("ivfpq", "ivfpq"), ("auto", "ivf")])
def test_training_builds_the_kind_the_settings_name_and_tunes_it(data, kind, built):
    from batch.train import _index

    emb, queries = data
    users = Embeddings([f"u{i}" for i in range(len(queries))], queries)
    idx, recall = _index(emb, users, lambda _: None, kind)
    assert idx.kind == built
    assert recall >= 0.95   # IVF-PQ with its float16 re-rank reaches it too


# -- a model bundle's index files: one, or one per shard ---------------------------------------------

from models.index import index_files, load_index, shard_file  # noqa: E402


def test_a_sharded_index_is_written_a_file_a_shard_and_each_worker_loads_its_own(data, tmp_path):
    emb, queries = data
    sharded = build_sharded(emb, 3, "flat", use_gpu=False)
    for name, raw in index_files(sharded).items():
        (tmp_path / name).write_bytes(raw)
    assert sorted(p.name for p in tmp_path.iterdir()) == [shard_file(i, 3) for i in range(3)]
    for i in range(3):
        mine = load_index(tmp_path, i, 3)
        assert set(mine.ids) == {x for x in emb.ids if shard_of(x, 3) == i}
    whole = load_index(tmp_path)   # one worker for the whole catalogue: every shard, merged in process
    assert isinstance(whole, ShardedIndex) and len(whole) == len(emb.ids) and whole.kind == "flat"
    for got, want in zip(whole.search(queries, K), sharded.search(queries, K)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="shard 1 of 2 but the version was trained with 3 shards"):
        load_index(tmp_path, 1, 2)


def test_an_unsharded_bundle_refuses_a_sharded_worker_by_name(data, tmp_path):
    emb, _ = data
    for name, raw in index_files(build(emb, "flat", use_gpu=False)).items():
        (tmp_path / name).write_bytes(raw)
    assert isinstance(load_index(tmp_path), RetrievalIndex)
    with pytest.raises(ValueError, match="RECSTREAM_RETRIEVAL_SHARDS alike"):
        load_index(tmp_path, 0, 2)


def test_the_recall_of_a_sharded_index_is_measured_against_exact_search_over_every_item(data):
    emb, queries = data
    sharded = build_sharded(emb, 3, "flat", use_gpu=False)
    assert recall_at_k(sharded, emb, queries, K) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs the Embeddings"):
        recall_at_k(sharded, emb.vectors, queries, K)
