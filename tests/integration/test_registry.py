import json
import uuid

from models.registry import CHALLENGER, CHAMPION, Registry


def bundle(tmp_path, tag, features=None):
    folder = tmp_path / tag
    folder.mkdir()
    (folder / "ranker.json").write_text(tag)
    if features is not None:
        (folder / "features.json").write_text(json.dumps(features))
    return folder


def test_versions_aliases_and_promotion(stack, tmp_path):
    reg = Registry(stack.mlflow_tracking_uri, f"recstream-test-{uuid.uuid4().hex[:8]}")
    first = reg.register(bundle(tmp_path, "v1"), {"ndcg_at_8": 0.30}, {"rank": 16}, "ndcg_at_8", 0.02)
    assert first.alias == CHAMPION and first.decision.reason == "no champion yet"
    worse = reg.register(bundle(tmp_path, "v2"), {"ndcg_at_8": 0.20}, {"rank": 16}, "ndcg_at_8", 0.02)
    assert worse.alias == CHALLENGER and reg.champion_version() == first.version  # kept and reported
    better = reg.register(bundle(tmp_path, "v3"), {"ndcg_at_8": 0.31}, {"rank": 16}, "ndcg_at_8", 0.02)
    assert better.alias == CHAMPION and reg.champion_version() == better.version
    assert reg.champion_metrics() == {"ndcg_at_8": 0.31}
    got = reg.download(CHAMPION, tmp_path / "dl")
    assert (got / "ranker.json").read_text() == "v3"
    assert (reg.download(worse.version, tmp_path / "dl2") / "ranker.json").read_text() == "v2"


def test_a_champion_of_older_code_is_replaced_not_kept(stack, tmp_path):
    """The agents refuse a version trained on other ranker features than their code builds: a champion of
    older code must not win against the version this code trained, or serving would be left with nothing
    it can load (seen: the serving benchmark's set-up published such a champion and every answer fell back)."""
    reg = Registry(stack.mlflow_tracking_uri, f"recstream-test-{uuid.uuid4().hex[:8]}")
    old = reg.register(bundle(tmp_path, "old", ["a", "b"]), {"ndcg_at_8": 0.40}, {}, "ndcg_at_8", 0.02)
    same = reg.register(bundle(tmp_path, "same", ["a", "b"]), {"ndcg_at_8": 0.20}, {}, "ndcg_at_8", 0.02)
    assert same.alias == CHALLENGER and reg.champion_version() == old.version
    new = reg.register(bundle(tmp_path, "new", ["a", "b", "c"]), {"ndcg_at_8": 0.20}, {}, "ndcg_at_8", 0.02)
    assert new.alias == CHAMPION and "other ranker features" in new.decision.reason
    assert reg.champion_version() == new.version
    later = reg.register(bundle(tmp_path, "later", ["a", "b", "c"]), {"ndcg_at_8": 0.10}, {}, "ndcg_at_8", 0.02)
    assert later.alias == CHALLENGER   # the same features again: the metric decides
