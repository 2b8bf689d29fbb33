from collections import Counter, defaultdict

from recstream.data.shop import COMPLEMENTS, ShopConfig, generate

CFG = ShopConfig(users=150, products=600, seed=3)


def test_same_seed_same_shop_other_seed_other_shop():
    a, b, c = generate(CFG), generate(CFG), generate(ShopConfig(users=150, products=600, seed=4))
    assert a.events == b.events and a.products == b.products
    assert a.events != c.events


def test_events_are_valid_time_ordered_and_end_at_the_anchor():
    shop = generate(CFG)
    times = [e.timestamp for e in shop.events]
    assert times == sorted(times) and max(times) <= CFG.end_s and min(times) >= CFG.end_s - CFG.days * 86_400
    assert len({e.event_id for e in shop.events}) == len(shop.events)
    products = {p.product_id for p in shop.products}
    assert all(e.product_id in products for e in shop.events)


def test_funnel_views_exceed_carts_exceed_purchases():
    kinds = Counter(e.event_type for e in generate(CFG).events)
    assert kinds["view"] > kinds["click"] > kinds["add_to_cart"] > 0 and kinds["purchase"] > 0
    assert kinds["add_to_cart"] < kinds["view"] / 5


def test_tastes_last_most_views_fall_in_a_users_favourite_categories():
    shop = generate(CFG)
    top_of = {p.product_id: p.category_path[0] for p in shop.products}
    share = []
    for user, taste in shop.user_taste.items():
        views = [top_of[e.product_id] for e in shop.events if e.user_id == user and e.event_type == "view"]
        favourites = sorted(taste, key=taste.get, reverse=True)[:2]
        if len(views) >= 10:
            share.append(sum(v in favourites for v in views) / len(views))
    assert sum(share) / len(share) > 0.6  # random choice among 8 tops would give 0.25


def test_complements_are_bought_together():
    shop = generate(CFG)
    leaf = {p.product_id: p.category for p in shop.products}
    orders = defaultdict(set)
    for e in shop.events:
        if e.event_type == "purchase":
            orders[e.session_id].add(leaf[e.product_id])
    with_partner = [o for o in orders.values() if any(COMPLEMENTS.get(x) in o for x in o)]
    assert len(with_partner) >= 0.2 * len(orders)
