import math

import faiss
import numpy as np
import pytest

from batch import index as index_mod
from batch.artifacts import Embeddings
from batch.index import RetrievalIndex, build, choose_nlist, choose_nprobe, exact_search, recall_at_k, tune_nprobe

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
