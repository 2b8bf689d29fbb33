"""The embedded demo dataset: a generated shop with lasting tastes, sessions and co-purchases.

Seeded and reproducible: the same config gives the same catalogue and the same events (ids,
products, order and offsets in time); only `end_s` anchors them to a moment.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas import Event, Product

TOP_CATEGORIES = {
    "Electronics": ["Phones", "Headphones", "Laptops", "Cameras", "Chargers"],
    "Home & Kitchen": ["Cookware", "Coffee Makers", "Bedding", "Lamps", "Storage"],
    "Fashion": ["Sneakers", "Jackets", "Dresses", "Watches", "Bags"],
    "Sports": ["Running", "Yoga", "Cycling", "Camping", "Fitness Trackers"],
    "Beauty": ["Skincare", "Fragrance", "Haircare", "Makeup", "Shaving"],
    "Books": ["Fiction", "Cookbooks", "Travel", "Science", "Children's Books"],
    "Toys": ["Building Sets", "Board Games", "Dolls", "Puzzles", "Outdoor Toys"],
    "Grocery": ["Coffee", "Tea", "Snacks", "Pasta", "Olive Oil"],
}
# Each leaf's natural companion (phone -> charger, coffee maker -> coffee, ...): the co-purchase structure.
COMPLEMENTS = {
    "Phones": "Chargers", "Laptops": "Bags", "Cameras": "Bags", "Headphones": "Chargers",
    "Coffee Makers": "Coffee", "Cookware": "Olive Oil", "Pasta": "Olive Oil", "Running": "Fitness Trackers",
    "Cycling": "Fitness Trackers", "Yoga": "Skincare", "Dresses": "Bags", "Sneakers": "Running",
    "Board Games": "Snacks", "Cookbooks": "Cookware", "Travel": "Bags", "Tea": "Snacks",
}
MEDIAN_PRICE = {"Electronics": 180.0, "Home & Kitchen": 45.0, "Fashion": 70.0, "Sports": 55.0,
                "Beauty": 25.0, "Books": 15.0, "Toys": 30.0, "Grocery": 8.0}
ADJECTIVES = ["Classic", "Pro", "Lite", "Max", "Eco", "Smart", "Urban", "Vintage", "Ultra", "Mini", "Prime", "Air"]
BRANDS = ["Nova", "Lumo", "Kira", "Zento", "Orbis", "Vela", "Arko", "Miro", "Tessa", "Quill", "Brio", "Halden",
          "Sorel", "Piko", "Ferro", "Aston", "Juno", "Calla", "Denza", "Elba", "Fjord", "Gala", "Hexa", "Iris"]
DEVICES = ("mobile", "mobile", "desktop", "app", "tablet")


@dataclass(frozen=True)
class ShopConfig:
    users: int = 400
    products: int = 1500
    brands_per_top: int = 6
    sessions_per_user: float = 6.0  # mean (Poisson + 1)
    days: int = 7
    seed: int = 7
    end_s: float = 1_764_000_000.0  # the last event's time (Unix s)


@dataclass(frozen=True)
class Shop:
    products: list[Product]
    events: list[Event]
    user_taste: dict[str, dict[str, float]]  # user -> top category -> share: ground truth for evaluation


def generate(cfg: ShopConfig = ShopConfig()) -> Shop:
    rng = np.random.default_rng(cfg.seed)
    products, leaf_items, popularity, complements = _catalogue(cfg, rng)
    by_id = {p.product_id: p for p in products}
    tops = list(TOP_CATEGORIES)
    start_s = cfg.end_s - cfg.days * 86_400
    raw: list[tuple[float, dict[str, Any]]] = []
    tastes: dict[str, dict[str, float]] = {}
    for u in range(cfg.users):
        user = f"u{u:05d}"
        taste = rng.dirichlet(np.full(len(tops), 0.25))
        tastes[user] = {t: float(w) for t, w in zip(tops, taste) if w > 0.01}
        price_level = float(rng.lognormal(0.0, 0.35))
        device = DEVICES[rng.integers(len(DEVICES))]
        for s in range(int(rng.poisson(cfg.sessions_per_user)) + 1):
            t = float(rng.uniform(start_s, cfg.end_s - 3600))
            session = f"{user}-s{s}"
            top = tops[rng.choice(len(tops), p=taste)]
            leaf = TOP_CATEGORIES[top][rng.integers(5)]
            cart: list[str] = []
            last: str | None = None
            for _ in range(int(rng.geometric(1 / 7))):
                roll = rng.random()
                if roll < 0.15:
                    leaf = TOP_CATEGORIES[top][rng.integers(5)]
                if roll > 0.92 and last and complements[last]:
                    pid = complements[last][rng.integers(len(complements[last]))]
                else:
                    items = leaf_items[leaf]
                    pid = items[rng.choice(len(items), p=popularity[leaf])]
                p = by_id[pid]
                t += float(rng.exponential(35.0)) + 2
                page = "product"
                if rng.random() < 0.3:
                    raw.append((t, _ev(user, session, p, "click", device, "category")))
                    t += 1.0
                raw.append((t, _ev(user, session, p, "view", device, page)))
                last = pid
                # cheaper-than-usual items for this shopper are carted more often
                affinity = min(2.0, price_level * MEDIAN_PRICE[p.category_path[0]] / max(p.price, 1.0))
                if p.in_stock and rng.random() < 0.09 * affinity:
                    t += float(rng.exponential(20.0)) + 1
                    raw.append((t, _ev(user, session, p, "add_to_cart", device, "product")))
                    cart.append(pid)
            order = [pid for pid in cart if rng.random() < 0.55]
            for pid in list(order):  # frequently bought together
                if complements[pid] and rng.random() < 0.45:
                    order.append(complements[pid][rng.integers(len(complements[pid]))])
            for pid in dict.fromkeys(order):
                t += float(rng.exponential(10.0)) + 1
                raw.append((t, _ev(user, session, by_id[pid], "purchase", device, "checkout")))
    raw.sort(key=lambda x: x[0])
    events = [Event(event_id=f"shop{cfg.seed}-{int(cfg.end_s)}-{i:07d}", timestamp=round(t, 3), **fields)
              for i, (t, fields) in enumerate(raw)]
    return Shop(products, events, tastes)


def _ev(user: str, session: str, p: Product, kind: str, device: str, page: str) -> dict[str, Any]:
    priced = kind in ("add_to_cart", "purchase")
    return dict(user_id=user, session_id=session, product_id=p.product_id, event_type=kind, device=device,
                page=page, price=p.price if priced else None, category=p.category)


def _singular(name: str) -> str:
    if name.endswith(("sses", "ches")):
        return name[:-2]
    return name[:-1] if name.endswith("s") else name


def _catalogue(cfg: ShopConfig, rng: np.random.Generator
               ) -> tuple[list[Product], dict[str, list[str]], dict[str, np.ndarray], dict[str, list[str]]]:
    tops = list(TOP_CATEGORIES)
    brands = {top: [BRANDS[(t * 3 + b) % len(BRANDS)] for b in range(cfg.brands_per_top)] for t, top in enumerate(tops)}
    leaves = [(top, leaf) for top in tops for leaf in TOP_CATEGORIES[top]]
    products: list[Product] = []
    leaf_items: dict[str, list[str]] = {leaf: [] for _, leaf in leaves}
    weights: dict[str, list[float]] = {leaf: [] for _, leaf in leaves}
    for i in range(cfg.products):
        top, leaf = leaves[i % len(leaves)]
        brand = brands[top][rng.integers(len(brands[top]))]
        pid = f"p{i:05d}"
        products.append(Product(
            product_id=pid,
            title=f"{brand} {ADJECTIVES[rng.integers(len(ADJECTIVES))]} {_singular(leaf)} {100 + i}",
            category_path=(top, leaf), brand=brand,
            price=round(float(rng.lognormal(np.log(MEDIAN_PRICE[top]), 0.5)), 2),
            in_stock=bool(rng.random() > 0.06),
            rating=round(float(np.clip(rng.normal(4.1, 0.5), 1.0, 5.0)), 1),
            seller_rating=round(float(np.clip(rng.normal(4.3, 0.4), 1.0, 5.0)), 1),
            created_at=cfg.end_s - float(rng.uniform(0, 365)) * 86_400,
        ))
        leaf_items[leaf].append(pid)
        weights[leaf].append(float(rng.pareto(1.2)) + 0.05)  # a few hits per leaf, a long tail
    popularity = {leaf: np.asarray(w) / sum(w) for leaf, w in weights.items()}
    complements: dict[str, list[str]] = {}
    for leaf, items in leaf_items.items():
        partner = COMPLEMENTS.get(leaf)
        for pid in items:
            if partner:
                pool = leaf_items[partner]
                complements[pid] = [pool[j] for j in rng.choice(len(pool), size=min(2, len(pool)), replace=False)]
            else:
                complements[pid] = []
    return products, leaf_items, popularity, complements
