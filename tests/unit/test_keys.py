"""The key layout's hash tags and the split of a batch's writes by tag (pure)."""
import pytest

from recstream.features import Incoming, Limits, keys, plan
from recstream.features.plan import RedisOps, split_by_tag
from recstream.features.session import FeatureConfig
from tests.factories import bind, event

CFG = FeatureConfig(session_idle_timeout_s=1800, session_recent_max=5, covisit_window=2)
LIMITS = Limits(session_ttl_s=1800, user_features_ttl_s=86400, window_days=7, trending_half_life_s=3600,
                cooccurrence_max=10)
T = 1_764_000_000.0


@pytest.mark.parametrize("key, tag", [
    ("user_session:{u1}", "u1"),
    ("ns:user_session:{u1}", "u1"),
    ("homecache:{u1}:a=b:10:mobile:home", "u1"),
    ("plain", "plain"),                 # no tag: the whole key
    ("a{}b{c}", "a{}b{c}"),             # an empty first tag: the whole key (Redis's rule)
    ("a{b", "a{b"),                     # no closing brace
    ("popcat:{g}:Kids {toys}:1", "g"),  # only the first tag counts
])
def test_hash_tag_follows_the_cluster_spec(key, tag):
    assert keys.hash_tag(key) == tag


def test_one_users_keys_share_a_tag_and_so_do_one_items_and_the_global_ones():
    user = [keys.user_session("u1"), keys.user_features("u1"), keys.homecache("u1", "-", 10, "web", "home"),
            keys.embedding("user", "7", "u1"), keys.user_offline("7", "u1"), keys.guard("u1")]
    item = [keys.item_features("p9"), keys.neighbours("covis", "p9"), keys.neighbours("cobuy", "p9"),
            keys.embedding("item", "7", "p9"), keys.item_offline("7", "p9"), keys.guard("p9")]
    glob = [keys.popularity("view", 1), keys.category_popularity("Audio", 1), keys.trend(0), keys.trend(0, "Audio"),
            keys.OOS, keys.brand("Nova"), keys.MODEL_CURRENT, keys.applied_prefix("grp", "recs.clickstream") + "3",
            keys.guard(keys.GLOBAL)]
    assert {keys.hash_tag(k) for k in user} == {"u1"}
    assert {keys.hash_tag(k) for k in item} == {"p9"}
    assert {keys.hash_tag(k) for k in glob} == {keys.GLOBAL}
    assert len(set(user + item + glob)) == len(user + item + glob)


ev = bind(event, "i", "user", "kind", "pid", t0=T, session="s", category="Audio")


def test_split_by_tag_partitions_the_writes_and_every_group_carries_the_offsets():
    batch = [Incoming(ev(0, "u1", "view", "p1"), 0, 10), Incoming(ev(1, "u1", "view", "p2"), 0, 11),
             Incoming(ev(2, "u2", "purchase", "p1"), 1, 5), Incoming(ev(3, "u2", "purchase", "p3"), 1, 6)]
    ops = plan(batch, {}, {}, {}, CFG, LIMITS).ops
    groups = split_by_tag(ops)
    assert set(groups) == {"u1", "u2", "p1", "p2", "p3", keys.GLOBAL}
    for tag, g in groups.items():
        assert g.offsets == {0: (10, 11), 1: (5, 6)}
        written = [*(k for k, _ in g.incr), *g.expire_at, *g.trim, *g.set, *g.hset]
        assert written and {keys.hash_tag(k) for k in written} == {tag}
    merged = RedisOps()
    for g in groups.values():
        for k, d in g.incr.items():
            merged.incr[k] += d
        merged.expire_at.update(g.expire_at), merged.trim.update(g.trim)
        merged.set.update(g.set), merged.hset.update(g.hset)
    assert (dict(merged.incr), merged.expire_at, merged.trim, merged.set, merged.hset) == \
        (dict(ops.incr), ops.expire_at, ops.trim, ops.set, ops.hset)
    assert groups["p1"].incr[(keys.neighbours("covis", "p1"), "p2")] == 1   # u1 viewed p1 then p2
    assert set(groups["u1"].set) == {keys.user_session("u1"), keys.user_state("u1")}


def test_split_of_nothing_is_nothing():
    assert split_by_tag(RedisOps()) == {}


def test_a_published_keys_version_is_read_back_from_its_name():
    import fnmatch

    named = [keys.embedding("user", "7", "u1"), keys.embedding("item", "7", "p:9"), keys.user_offline("7", "u1"),
             keys.item_offline("7", "p9")]
    assert [keys.published_version(k) for k in named] == ["7"] * 4
    assert all(any(fnmatch.fnmatchcase(k, p) for p in keys.published("7")) for k in named)
    assert not any(fnmatch.fnmatchcase(k, p) for k in named for p in keys.published("8"))
    assert keys.published_version(keys.MODEL_CURRENT) is None and keys.published_version(keys.user_state("u1")) is None
