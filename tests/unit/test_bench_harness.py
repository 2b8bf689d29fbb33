"""The benchmarks' shared harness (bench/harness.py): percentiles, truncation, the result record, and
its process supervisor."""
from __future__ import annotations

import json

import pytest

from bench import harness


@pytest.mark.parametrize("values, q, expected", [
    ([], 0.5, None), ([3.0], 0.99, 3.0), ([1, 2, 3, 4], 0.5, 2.0), ([1, 2, 3, 4], 0.51, 3.0),
    (list(range(1, 101)), 0.99, 99.0), (list(range(1, 101)), 1.0, 100.0), ([5, 1, 4], 0.0, 1.0),
])
def test_pct_is_nearest_rank(values, q, expected):
    got = harness.pct(values, q)
    assert (got != got) if expected is None else got == expected


@pytest.mark.parametrize("x, nd, expected", [(1.239, 2, 1.23), (-1.239, 2, -1.23), (0.19, 1, 0.1), (None, 2, None)])
def test_down_never_rounds_up(x, nd, expected):
    assert harness.down(x, nd) == expected


def test_pct_ms_and_p50_p99():
    assert harness.pct_ms([0.001, 0.002, 0.0031], 0.99) == 3.1 and harness.pct_ms([], 0.5) is None
    assert harness.p50_p99([1.0, 2.0, 3.0]) == {"n": 3, "p50": 2.0, "p99": 3.0}


def test_write_result_records_name_date_machine_command_and_figures(tmp_path):
    out = tmp_path / "x.json"
    record = harness.write_result("x", {"a": 1.5}, out=out, parameters={"n": 3})
    data = json.loads(out.read_text())
    assert data == record and set(data) == {"name", "date", "machine", "command", "parameters", "figures"}
    assert data["name"] == "x" and data["figures"] == {"a": 1.5} and data["machine"]["nproc"] >= 1
    assert {"hostname", "cpu_model", "python"} <= set(data["machine"])


def test_procs_start_check_and_stop(tmp_path):
    procs = harness.Procs({}, tmp_path)
    p = procs.start("settings", ["settings"])   # `recstream settings` prints and exits 0
    assert p.wait(timeout=60) == 0
    with pytest.raises(RuntimeError, match="settings exited with 0"):
        procs.check()
    assert "RECSTREAM_" in (tmp_path / "settings.log").read_text()
    procs.stop_all()
    assert procs.pids() == {}
    slow = harness.start_process(["-c", "import time; time.sleep(60)"], tmp_path / "slow.log")
    assert harness.stop_process(slow, timeout_s=10) != 0   # ended by SIGTERM


def test_coordinate_search_applies_each_stage_to_the_best_so_far():
    truth = {(1, "a"): 0.1, (2, "a"): 0.3, (3, "a"): 0.2, (2, "b"): 0.4, (2, "c"): 0.35}
    runs = []

    def run(config):
        runs.append(config)
        return {"config": config, "m": truth[(config["x"], config["y"])]}

    best = harness.coordinate_search(run, run({"x": 1, "y": "a"}), [[{"x": 2}, {"x": 3}], [{"y": "b"}, {"y": "c"}]], "m")
    assert best == {"config": {"x": 2, "y": "b"}, "m": 0.4}
    # the second stage starts from x=2, the first stage's best, not from where the search began
    assert runs[3:] == [{"x": 2, "y": "b"}, {"x": 2, "y": "c"}]


def test_a_load_runs_timeline_windows_by_scheduled_start():
    from bench.serving import Load

    load = Load(rate=10, seconds=3, latencies_ms=[10.0, 20.0, 90.0, 30.0], starts_s=[0.1, 1.5, 1.2, 2.9],
                fell_back=[False, False, True, False])
    assert load.window(1.0, 2.0) == {"from_s": 1.0, "to_s": 2.0, "requests": 2, "p99_ms": 90.0,
                                     "fallback_share": 0.5}
    assert load.window(5.0, 6.0)["requests"] == 0 and load.window(5.0, 6.0)["p99_ms"] is None
    assert load.fallback == 1   # the run's count, from the same per-request flags
