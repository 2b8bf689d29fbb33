"""The experiments file store: validated atomic writes with history, and readers that survive bad edits."""
from __future__ import annotations

import dataclasses
import os
import threading

import pytest

from recstream.experiments.definition import Changes, Experiment, ExperimentError, UnknownExperiment, Variant, dumps, loads
from recstream.experiments.store import HISTORY_KEEP, ExperimentStore

NOW = 1_000.0


def exp(eid: str = "e", layer: str = "L", start: float = 100, end: float = 2000, traffic: float = 0.5,
        variants: tuple[Variant, ...] = (Variant("a", 0.5), Variant("b", 0.5, Changes(ranker="x"))),
        description: str = "") -> Experiment:
    return Experiment(eid, description, layer, start, end, traffic, variants, variants[0].name)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "deep" / "er" / "experiments.toml"


def test_missing_file_is_an_empty_set_at_revision_zero(path):
    store = ExperimentStore(path)
    assert store.current.experiments == () and store.current.revision == 0 and store.error is None
    assert store.refresh() is False


def test_writes_round_trip_bump_the_revision_and_keep_history(path):
    store = ExperimentStore(path)
    assert store.put(exp("a"), now_s=NOW) is True
    assert store.put(exp("a", description="now described"), now_s=NOW) is False
    store.set_defaults(Changes(ranker="champion"))
    s = loads(path.read_text())
    assert s == store.current and s.revision == 3 and s.defaults == Changes(ranker="champion")
    assert s.get("a") == exp("a", description="now described")
    history = store.history_dir
    assert sorted(p.name for p in history.iterdir()) == ["r1.toml", "r2.toml"]
    assert loads((history / "r1.toml").read_text()).get("a").description == ""
    assert not (path.parent / (path.name + ".tmp")).exists()


def test_history_keeps_the_newest_only(path):
    store = ExperimentStore(path)
    for i in range(HISTORY_KEEP + 5):
        store.set_defaults(Changes(candidates=i + 1))
    names = {p.name for p in store.history_dir.iterdir()}
    assert len(names) == HISTORY_KEEP and f"r{HISTORY_KEEP + 4}.toml" in names and "r4.toml" not in names


@pytest.mark.parametrize("change", [
    lambda st: st.put(exp("b", traffic=0.6), now_s=NOW),                        # layer L cannot fit a and b
    lambda st: st.put(exp("c", layer="M"), now_s=NOW),                          # both change ranker across layers
    lambda st: st.put(exp("a", traffic=0.4), now_s=NOW),                        # running: traffic is frozen
    lambda st: st.delete("a", now_s=NOW),                                       # running: needs force
    lambda st: st.delete("ghost", now_s=NOW),
    lambda st: st.end("a", now_s=50),                                           # not started yet at 50
    lambda st: st.end("a", now_s=3000),                                         # already ended
    lambda st: st.update(lambda s: dataclasses.replace(s, experiments=s.experiments * 2)),   # duplicate id
])
def test_a_rejected_change_leaves_the_file_byte_identical(path, change):
    store = ExperimentStore(path)
    store.put(exp("a"), now_s=NOW)
    before = path.read_bytes()
    with pytest.raises(ExperimentError):
        change(store)
    assert path.read_bytes() == before and store.current.revision == 1
    assert sorted(os.listdir(path.parent)) == ["experiments.toml", "experiments.toml.lock"]


def test_unknown_experiment_is_reported_as_such(path):
    store = ExperimentStore(path)
    with pytest.raises(UnknownExperiment, match="unknown experiment 'ghost'"):
        store.end("ghost", NOW)


def test_two_stores_on_one_file_see_each_others_writes(path):
    one, two = ExperimentStore(path), ExperimentStore(path)
    one.put(exp("a"), now_s=NOW)
    two.put(exp("b", traffic=0.5, variants=(Variant("x", 1.0),)), now_s=NOW)   # re-read under the lock: a kept
    assert [e.id for e in two.current.experiments] == ["a", "b"] and two.current.revision == 2
    assert one.refresh() is True and one.current == two.current
    assert one.refresh() is False


def test_concurrent_writers_lose_no_update(path):
    def writer(k: int) -> None:
        store = ExperimentStore(path)
        for i in range(5):
            store.put(exp(f"w{k}-{i}", layer=f"L{k}-{i}", traffic=1.0, variants=(Variant("x", 1.0),)), now_s=NOW)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = loads(path.read_text())
    assert len(s.experiments) == 30 and s.revision == 30


def test_refresh_keeps_the_last_good_set_when_the_file_breaks(path, caplog):
    store = ExperimentStore(path)
    store.put(exp("a"), now_s=NOW)
    good = store.current
    path.write_text(dumps(good).replace("traffic = 0.5", "traffic = 5"))
    assert store.refresh() is False and store.current is good
    assert store.error is not None and "traffic" in store.error and "invalid" in caplog.text
    with pytest.raises(ExperimentError, match="file is invalid"):    # no write on top of a broken file
        store.set_defaults(Changes())
    path.write_text(dumps(good).replace('description = ""', 'description = "fixed"'))
    assert store.refresh() is True and store.error is None and store.current.get("a").description == "fixed"
    path.unlink()
    assert store.refresh() is True and store.current.experiments == ()


def test_running_experiment_may_change_description_and_end_only_unless_forced(path):
    store = ExperimentStore(path)
    store.put(exp("a", start=NOW + 100), now_s=NOW)
    store.put(exp("a", start=NOW - 100, traffic=0.4), now_s=NOW)           # not running yet: anything goes
    store.put(exp("a", start=NOW - 100, traffic=0.4, end=5000, description="longer"), now_s=NOW)
    for changed in (dict(traffic=0.3), dict(layer="M"), dict(start=NOW - 50), dict(variants=(Variant("a", 1.0),))):
        with pytest.raises(ExperimentError, match="is running: changing its"):
            store.put(exp("a", **{"start": NOW - 100, "traffic": 0.4, "end": 5000, **changed}), now_s=NOW)
    assert store.put(exp("a", traffic=0.3), force=True, now_s=NOW) is False
    assert store.current.get("a").traffic == 0.3
    store.delete("a", force=True, now_s=NOW)
    assert store.current.experiments == ()


def test_a_change_that_would_move_a_running_experiments_slice_is_refused(path):
    store = ExperimentStore(path)
    one = (Variant("x", 1.0),)
    store.put(exp("old", start=0, end=600, traffic=0.5, variants=one), now_s=0)
    store.put(exp("run", start=500, end=5000, traffic=0.5, variants=one), now_s=0)   # takes [0.5, 1)
    assert store.current.slices["run"] == (0.5, 1.0)
    with pytest.raises(ExperimentError, match="would move its slice"):
        store.delete("old", now_s=NOW)         # ended, but its removal would shift 'run' to [0, 0.5)
    store.delete("old", force=True, now_s=NOW)
    assert store.current.slices["run"] == (0.0, 0.5)


def test_end_sets_the_end_to_now(path):
    store = ExperimentStore(path)
    store.put(exp("a"), now_s=NOW)
    assert store.end("a", NOW).get("a").end_s == NOW
    assert store.current.active(NOW) == ()
