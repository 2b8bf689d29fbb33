from pathlib import Path

import pytest

from recstream.settings import Settings, SettingsError, describe, load


def test_defaults_without_environment():
    s = load({})
    assert s == Settings() and s.kafka_port == 9092 and s.redis_port == 6379 and s.mlflow_port == 5000
    assert s.topic("clickstream") == "recs.clickstream"


def test_reads_prefixed_variables_with_types():
    s = load({"RECSTREAM_CLICKSTREAM_PARTITIONS": "32", "RECSTREAM_HOME_DIR": "/tmp/x",
              "RECSTREAM_TOPIC_PREFIX": "shop1", "OTHER": "ignored"})
    assert s.clickstream_partitions == 32 and s.home_dir == Path("/tmp/x") and s.topic("a") == "shop1.a"


@pytest.mark.parametrize("env, message", [
    ({"RECSTREAM_CLIKSTREAM_PARTITIONS": "3"}, "unknown setting RECSTREAM_CLIKSTREAM_PARTITIONS"),
    ({"RECSTREAM_CLICKSTREAM_PARTITIONS": "many"}, "RECSTREAM_CLICKSTREAM_PARTITIONS='many'"),
    ({"RECSTREAM_CLICKSTREAM_PARTITIONS": "0"}, "must be at least 1"),
    ({"RECSTREAM_RETRIEVAL_SHARDS": "0"}, "RECSTREAM_RETRIEVAL_SHARDS must be at least 1"),
    ({"RECSTREAM_RETRIEVAL_SHARDS": "4", "RECSTREAM_RETRIEVAL_SHARD": "4"}, "it must be 0 to 3"),
    ({"RECSTREAM_RETRIEVAL_SHARD": "1"}, "RECSTREAM_RETRIEVAL_SHARD is 1; with RECSTREAM_RETRIEVAL_SHARDS=1"),
    ({"RECSTREAM_RANKER_NEGATIVES": "-5"}, "RECSTREAM_RANKER_NEGATIVES is -5; it must be 0"),
    ({"RECSTREAM_SERVING_NICE": "20"}, "RECSTREAM_SERVING_NICE is 20; it must be 0 to 19"),
    ({"RECSTREAM_SERVING_NICE": "-1"}, "RECSTREAM_SERVING_NICE is -1"),
    ({"RECSTREAM_BACKGROUND_NICE": "20"}, "RECSTREAM_BACKGROUND_NICE is 20; it must be 0 to 19"),
    ({"RECSTREAM_ERASURE_CPU_SHARE": "0"}, "RECSTREAM_ERASURE_CPU_SHARE is 0.0; it must be over 0"),
    ({"RECSTREAM_ERASURE_CPU_SHARE": "1.5"}, "RECSTREAM_ERASURE_CPU_SHARE is 1.5"),
    ({"RECSTREAM_FEATURE_BATCH_WITHIN_MS": "0"}, "RECSTREAM_FEATURE_BATCH_WITHIN_MS is 0 and"),
    ({"RECSTREAM_FEATURE_BATCH_WITHIN_MAX_MS": "10"}, "RECSTREAM_FEATURE_BATCH_WITHIN_MAX_MS 10; the first must"),
])
def test_bad_settings_are_refused_by_name(env, message):
    with pytest.raises(SettingsError, match=message):
        load(env)


def test_every_setting_is_documented_with_a_unit():
    rows = describe()
    assert len(rows) == len(Settings.__dataclass_fields__)
    for var, _, doc in rows:
        assert var.startswith("RECSTREAM_") and "(" in doc and doc.endswith(")"), var


def test_the_index_kind_is_checked_against_the_kinds_batch_index_builds():
    from models.index import KINDS
    from recstream.settings import INDEX_KINDS, SettingsError, load

    assert KINDS == INDEX_KINDS
    assert load({"RECSTREAM_INDEX_KIND": "ivfpq"}).index_kind == "ivfpq"
    with pytest.raises(SettingsError, match="INDEX_KIND is 'pq'"):
        load({"RECSTREAM_INDEX_KIND": "pq"})


def test_each_retrieval_shard_has_its_own_consumer_group_and_lag_watches_every_one():
    one, four = load({}), load({"RECSTREAM_RETRIEVAL_SHARDS": "4", "RECSTREAM_RETRIEVAL_SHARD": "2"})
    assert one.retrieval_agents() == ["retrieval"]
    assert four.retrieval_agents() == [f"retrieval-{i}-of-4" for i in range(4)]
    groups = [g for g, topic in four.consumer_groups() if topic == four.topic("rec.requests")]
    assert groups == [f"{four.app_id}-retrieval-{i}-of-4" for i in range(4)]


def test_a_pinned_task_ordering_is_checked_when_settings_load():
    assert load({"RECSTREAM_TASK_ORDERINGS": "cart=rules"}).ordering_pins == {"cart": "rules"}
    with pytest.raises(SettingsError, match="TASK_ORDERINGS"):
        load({"RECSTREAM_TASK_ORDERINGS": "cart=magic"})


def test_the_workers_that_take_events_in_keep_the_normal_priority():
    s = load({"RECSTREAM_SERVING_NICE": "7", "RECSTREAM_BACKGROUND_NICE": "3"})
    assert {w: s.niceness(w) for w in ("features", "retrieval", "ranking", "archive", "attribution", "api")} == \
        {"features": 0, "retrieval": 7, "ranking": 7, "archive": 3, "attribution": 3, "api": 0}
