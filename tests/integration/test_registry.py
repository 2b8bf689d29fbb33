import uuid

from models.registry import CHALLENGER, CHAMPION, Registry


def bundle(tmp_path, tag):
    folder = tmp_path / tag
    folder.mkdir()
    (folder / "ranker.json").write_text(tag)
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
