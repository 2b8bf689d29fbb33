"""What the batch layer produces, as plain data: the contract between the Spark job, the ranker,
the retrieval index, the registry and serving. Saved as one folder (numpy + Parquet + JSON)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

Neighbours = dict[str, list[tuple[str, float]]]  # item -> [(neighbour, score)], best first


@dataclass
class Embeddings:
    ids: list[str]          # row i is the embedding of ids[i]
    vectors: np.ndarray     # float32, shape (len(ids), rank)

    def __post_init__(self) -> None:
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.ids):
            raise ValueError(f"{len(self.ids)} ids but vectors of shape {self.vectors.shape}")

    @property
    def rank(self) -> int:
        return int(self.vectors.shape[1])

    def index(self) -> dict[str, int]:
        return {x: i for i, x in enumerate(self.ids)}


@dataclass
class Window:
    start_s: float
    end_s: float
    events: int = 0             # after de-duplication by event_id
    duplicates: int = 0
    users: int = 0
    items: int = 0
    purchases: int = 0


@dataclass
class BatchOutputs:
    window: Window
    user_embeddings: Embeddings
    item_embeddings: Embeddings
    knn: Neighbours                            # item kNN over every event type, cosine (the "knn" source)
    cobuy: Neighbours                          # "frequently bought together", cosine over purchases
    category_affinity: dict[str, dict[str, float]]   # user -> category -> weight, L2-normalised
    item_popularity: dict[str, float]          # item -> weighted events over the whole window
    user_median_price: dict[str, float]        # user -> median unit price of purchases (absent: none)
    item_category: dict[str, str] = field(default_factory=dict)  # item -> leaf category, where known
    metrics: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)     # what was odd about the data, for the report

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, emb in (("users", self.user_embeddings), ("items", self.item_embeddings)):
            np.save(folder / f"{name}.npy", emb.vectors)
            (folder / f"{name}.ids.json").write_text(json.dumps(emb.ids))
        # the ranking agent's window popularity, by row of items.npy (it loads no aggregates.json)
        np.save(folder / "items.popularity.npy",
                np.array([self.item_popularity.get(x, 0.0) for x in self.item_embeddings.ids], np.float64))
        for name in ("knn", "cobuy"):
            rows = [(a, b, s) for a, ns in getattr(self, name).items() for b, s in ns]
            pq.write_table(pa.table({"item": [r[0] for r in rows], "neighbour": [r[1] for r in rows],
                                     "score": [float(r[2]) for r in rows]}), folder / f"{name}.parquet")
        meta = {"window": asdict(self.window), "category_affinity": self.category_affinity,
                "item_popularity": self.item_popularity, "user_median_price": self.user_median_price,
                "item_category": self.item_category, "metrics": self.metrics, "warnings": self.warnings}
        (folder / "aggregates.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: Path) -> BatchOutputs:
        emb = {}
        for name in ("users", "items"):
            emb[name] = Embeddings(json.loads((folder / f"{name}.ids.json").read_text()), np.load(folder / f"{name}.npy"))
        neighbours = {name: load_neighbours(folder, name) for name in ("knn", "cobuy")}
        meta = json.loads((folder / "aggregates.json").read_text())
        return cls(Window(**meta["window"]), emb["users"], emb["items"], neighbours["knn"], neighbours["cobuy"],
                   meta["category_affinity"], meta["item_popularity"], meta["user_median_price"],
                   meta["item_category"], meta["metrics"], meta["warnings"])


def neighbour_columns(folder: Path, name: str) -> tuple[list[str], list[str], list[float]]:
    """One neighbour table of a saved BatchOutputs folder ('knn' or 'cobuy') as its columns (item,
    neighbour, score), rows grouped by item, each item's best first."""
    t = pq.read_table(folder / f"{name}.parquet").to_pydict()
    return t["item"], t["neighbour"], t["score"]


def load_neighbours(folder: Path, name: str) -> Neighbours:
    """One neighbour table of a saved BatchOutputs folder, lists best first."""
    n: Neighbours = {}
    for a, b, s in zip(*neighbour_columns(folder, name)):
        n.setdefault(a, []).append((b, s))
    return n
