"""Datasets: the embedded generated shop and importers for public formats."""
from __future__ import annotations

import time
from pathlib import Path

from recstream.data.importers import FORMATS, DataError, Dataset, RowError, import_events
from recstream.data.shop import ShopConfig, generate

__all__ = ["FORMATS", "DataError", "Dataset", "RowError", "ShopConfig", "generate", "load_dataset", "shop_dataset"]


def shop_dataset(cfg: ShopConfig | None = None) -> Dataset:
    """The generated shop, its last event a minute before now (so real-time windows see it live)."""
    cfg = cfg or ShopConfig(end_s=float(int(time.time()) // 60 * 60 - 60))
    shop = generate(cfg)
    return Dataset("shop", shop.events, shop.products)


def load_dataset(name: str, path: Path | None = None, *, on_error: str = "skip", limit: int | None = None) -> Dataset:
    if name == "shop":
        data = shop_dataset()
    else:
        if path is None:
            raise ValueError(f"--path is needed for dataset {name}")
        data = import_events(name, path, on_error=on_error)
    if limit is not None:
        data.events = data.events[:limit]
    return data
