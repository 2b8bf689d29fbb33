"""The content model for new products (cold start): catalogue features -> ALS item embedding, by ridge regression.

A product with no interactions has no ALS embedding, so it cannot be retrieved as a similar item or
for a homepage. This model learns, on items that have both, a linear map from what the catalogue
says about a product to where ALS put it, and predicts an embedding for the rest.

Features (a sparse row per product, fixed layout from the training vocabulary):
- category: one-hot of each level of the path, keyed by the path down to that level
  ("Electronics", "Electronics/Phones"), so a leaf name shared by two parents stays two columns;
- brand: one-hot;
- price band: one-hot of log(1 + price) cut at the training prices' quantiles (price_bands bands);
- title: hashed bag of lower-case word tokens (no pure numbers, which are model numbers), title_dim
  columns, a signed feature hash (Weinberger et al., "Feature hashing for large scale multitask
  learning", ICML 2009) with blake2b, scaled to unit length per title.
Unseen categories and brands get no column: the prediction then rests on the other features, and a
product with none at all gets the mean embedding.

Ridge regression in closed form on embeddings centred on their mean: W = (X'X + D)^-1 X'Y, or the
equivalent D^-1 X'(X D^-1 X' + I)^-1 Y when there are fewer items than features. D is diagonal:
lam_category on the category columns, lam on the others. With lam large the model is a category
mean shrunk towards its parents and the overall mean, i.e. the usual cold-start baseline; smaller
lam lets brand, price and title move it. lam may be a grid: the value that gives the best mean
cosine on a fixed fifth of the training items (chosen by blake2b of the product id) is refitted on
all of them. On the generated shop, where brand and title carry no signal about taste, the grid
picks a large lam and the model matches the category mean; where they do, it beats it.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from models.artifacts import Embeddings
from schemas import Product

TOKEN = re.compile(r"[^\W_]+")
LAM_GRID = (1.0, 10.0, 100.0, 1000.0)  # default choices for lam (see the module docstring)
FORMAT = 1  # to_bytes layout version


def title_tokens(title: str) -> list[str]:
    return [t for t in TOKEN.findall(title.lower()) if not t.isdigit()]


def _hash(token: str, dim: int) -> tuple[int, float]:
    """Column and sign of a token: blake2b, stable across processes (never Python's hash())."""
    h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
    return (h >> 1) % dim, (1.0 if h & 1 else -1.0)


def _category_keys(path: Sequence[str]) -> list[str]:
    return ["/".join(path[:i + 1]) for i in range(len(path))]


def _log_price(price: float | None) -> float:
    return math.log1p(max(0.0, float(price))) if price is not None and math.isfinite(price) else math.nan


@dataclass
class Featurizer:
    """Product -> sparse feature row; the vocabulary is fixed when the model is fitted."""

    categories: dict[str, int]
    brands: dict[str, int]
    price_edges: list[float]   # inner cut points of log(1 + price); len(price_edges) + 1 bands
    title_dim: int

    @classmethod
    def fit(cls, products: Sequence[Product], title_dim: int = 256, price_bands: int = 8) -> Featurizer:
        cats = sorted({k for p in products for k in _category_keys(p.category_path or ())})
        brands = sorted({p.brand for p in products if p.brand})
        prices = np.array([_log_price(p.price) for p in products], dtype=np.float64)
        prices = prices[np.isfinite(prices)]
        qs = np.linspace(0, 1, price_bands + 1)[1:-1]
        edges = sorted(set(np.quantile(prices, qs).round(6).tolist())) if len(prices) else []
        return cls({c: i for i, c in enumerate(cats)}, {b: i for i, b in enumerate(brands)}, edges, title_dim)

    @property
    def dim(self) -> int:
        return len(self.categories) + len(self.brands) + len(self.price_edges) + 1 + self.title_dim

    def transform(self, products: Sequence[Product]) -> sp.csr_matrix:
        n_cat, n_brand, n_price = len(self.categories), len(self.brands), len(self.price_edges) + 1
        brand0, price0, title0 = n_cat, n_cat + n_brand, n_cat + n_brand + n_price
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for r, p in enumerate(products):
            feats: dict[int, float] = {}
            for key in _category_keys(p.category_path or ()):
                if key in self.categories:
                    feats[self.categories[key]] = 1.0
            if p.brand in self.brands:
                feats[brand0 + self.brands[p.brand]] = 1.0
            lp = _log_price(p.price)
            if math.isfinite(lp):
                feats[price0 + int(np.searchsorted(self.price_edges, lp, side="right"))] = 1.0
            title: dict[int, float] = {}
            for tok in title_tokens(p.title or ""):
                col, sign = _hash(tok, self.title_dim)
                title[col] = title.get(col, 0.0) + sign
            norm = math.sqrt(sum(v * v for v in title.values()))
            for col, v in title.items():
                if v:
                    feats[title0 + col] = v / norm
            rows += [r] * len(feats)
            cols += feats.keys()
            vals += feats.values()
        return sp.csr_matrix((np.array(vals, dtype=np.float64), (rows, cols)), shape=(len(products), self.dim))

    def to_dict(self) -> dict:
        return {"categories": self.categories, "brands": self.brands, "price_edges": self.price_edges,
                "title_dim": self.title_dim}


@dataclass
class ContentModel:
    featurizer: Featurizer
    weights: np.ndarray   # (features, rank) float32
    mean: np.ndarray      # (rank,) float32: the prediction for a product with no known feature
    lam: float            # the penalty on brand, price and title columns (chosen from the grid, if one was given)
    lam_category: float   # the penalty on category columns

    @classmethod
    def fit(cls, products: Iterable[Product], emb: Embeddings, *, lam: float | Sequence[float] = LAM_GRID,
            lam_category: float = 1.0, title_dim: int = 256, price_bands: int = 8) -> ContentModel:
        """Fit on the products that have an embedding in emb. lam: the ridge penalty on brand, price
        and title columns, or a grid to choose it from on a held-out fifth; lam_category: on categories."""
        grid = [float(lam)] if isinstance(lam, (int, float)) else [float(v) for v in lam]
        if not grid or min(grid) < 0 or lam_category < 0:
            raise ValueError(f"penalties must be >= 0 (and the grid not empty), got lam={lam}, lam_category={lam_category}")
        row_of = emb.index()
        latest = {p.product_id: p for p in products}  # catalogue upserts: the last one wins
        train = [p for p in latest.values() if p.product_id in row_of]
        if not train:
            raise ValueError("no product has an embedding: nothing to fit the content model on")
        y = emb.vectors[[row_of[p.product_id] for p in train]].astype(np.float64)
        chosen = grid[0]
        if len(grid) > 1:
            held = np.array([_held_out(p.product_id) for p in train])
            if 0 < held.sum() < len(train):
                fit_part = [p for p, h in zip(train, held) if not h]
                check_part = [p for p, h in zip(train, held) if h]
                scores = [mean_cosine(cls._fit(fit_part, y[~held], v, lam_category, title_dim, price_bands)
                                      .predict(check_part).vectors, y[held]) for v in grid]
                chosen = grid[int(np.argmax(scores))]
        return cls._fit(train, y, chosen, lam_category, title_dim, price_bands)

    @classmethod
    def _fit(cls, train: list[Product], y: np.ndarray, lam: float, lam_category: float, title_dim: int,
             price_bands: int) -> ContentModel:
        mean = y.mean(axis=0)
        featurizer = Featurizer.fit(train, title_dim=title_dim, price_bands=price_bands)
        penalty = np.full(featurizer.dim, lam)
        penalty[:len(featurizer.categories)] = lam_category
        weights = _ridge(featurizer.transform(train), y - mean, penalty)
        return cls(featurizer, weights.astype(np.float32), mean.astype(np.float32), lam, float(lam_category))

    @property
    def rank(self) -> int:
        return int(self.mean.shape[0])

    def predict(self, products: Sequence[Product]) -> Embeddings:
        """An embedding for every product (in the item-embedding space), ids in the same order."""
        products = list(products)
        x = self.featurizer.transform(products)
        vectors = np.asarray(x @ self.weights.astype(np.float64)) + self.mean
        return Embeddings([p.product_id for p in products], vectors.reshape(len(products), self.rank))

    def to_bytes(self) -> bytes:
        meta = {"format": FORMAT, "lam": self.lam, "lam_category": self.lam_category,
                "featurizer": self.featurizer.to_dict()}
        buf = io.BytesIO()
        np.savez(buf, weights=self.weights, mean=self.mean,
                 meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ContentModel:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            if meta.get("format") != FORMAT:
                raise ValueError(f"unknown content model format {meta.get('format')!r}")
            return cls(Featurizer(**meta["featurizer"]), z["weights"], z["mean"], float(meta["lam"]),
                       float(meta["lam_category"]))


def _ridge(x: sp.csr_matrix, y: np.ndarray, penalty: np.ndarray) -> np.ndarray:
    """argmin_W |XW - Y|^2 + sum_j penalty_j |W_j|^2, primal or dual, whichever system is smaller."""
    n, f = x.shape
    if f <= n or not np.all(penalty > 0):
        return _solve((x.T @ x).toarray() + np.diag(penalty), np.asarray(x.T @ y))
    xd = x @ sp.diags(1.0 / penalty)                      # X D^-1
    return np.asarray(xd.T @ _solve((xd @ x.T).toarray() + np.eye(n), y))


def _held_out(product_id: str) -> bool:
    """A fixed fifth of the items, the same in every process (blake2b, never hash())."""
    return hashlib.blake2b(product_id.encode(), digest_size=2).digest()[0] % 5 == 0


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:  # lam = 0 with collinear features (e.g. a brand that is its category)
        return np.linalg.lstsq(a, b, rcond=None)[0]


def _leaf(p: Product) -> str:
    return "/".join(p.category_path) if p.category_path else ""


def mean_cosine(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean cosine similarity of matching rows (a zero row counts as cosine 0)."""
    num = np.einsum("ij,ij->i", pred, true)
    den = np.linalg.norm(pred, axis=1) * np.linalg.norm(true, axis=1)
    return float(np.mean(np.divide(num, den, out=np.zeros_like(num), where=den > 0)))


def category_mean(train: Iterable[Product], emb: Embeddings, products: Sequence[Product]) -> Embeddings:
    """Baseline: each product gets the mean embedding of the training items in its leaf category
    (the overall mean where its category has none)."""
    row_of = emb.index()
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    known = [p for p in train if p.product_id in row_of]
    if not known:
        raise ValueError("no product has an embedding: no category means")
    for p in known:
        v = emb.vectors[row_of[p.product_id]].astype(np.float64)
        sums[_leaf(p)] = sums.get(_leaf(p), 0.0) + v
        counts[_leaf(p)] = counts.get(_leaf(p), 0) + 1
    overall = emb.vectors[[row_of[p.product_id] for p in known]].mean(axis=0)
    out = [sums[c] / counts[c] if (c := _leaf(p)) in sums else overall for p in products]
    return Embeddings([p.product_id for p in products], np.array(out).reshape(len(products), emb.rank))
