"""What every benchmark shares: the machine's facts, percentiles and truncated figures, process
facts and supervision, and writing bench/results/NAME.json with name, date, machine, command and
figures. One copy here; the benchmarks import it (`from bench import harness`)."""
from __future__ import annotations

import datetime
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from cli.processes import Processes, free_port, settings_env  # noqa: F401  (the benches' names for them)

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the machine and the run ---------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    """The facts every result records: host, cores this process may use, CPU model, architecture, Python."""
    model = "unknown"
    try:
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), model)
    except OSError:
        pass
    return {"hostname": platform.node(), "nproc": len(os.sched_getaffinity(0)), "cpu_model": model,
            "arch": platform.machine(), "python": platform.python_version()}


def now_iso() -> str:
    """The run's date: UTC, to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def command_line(*prefix: str) -> str:
    """How this run was started: `prefix` (e.g. "flock", "/tmp/recstream-heavy.lock") then the
    interpreter, relative to the checkout, and the arguments."""
    return shlex.join([*prefix, os.path.relpath(sys.executable, ROOT), *sys.argv])


# -- figures --------------------------------------------------------------------------------------------

def down(x: float | None, nd: int = 2) -> float | None:
    """Truncate toward zero to `nd` decimals: a figure is never rounded up."""
    if x is None or not math.isfinite(x):
        return x
    f = 10 ** nd
    return math.floor(x * f) / f if x >= 0 else math.ceil(x * f) / f


def pct(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 1]: the smallest value with at least q of the values at or
    below it; NaN for no values."""
    v = np.sort(np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64))
    if len(v) == 0:
        return float("nan")
    return float(v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))])


def pct_ms(seconds: list[float], q: float) -> float | None:
    """`pct` of durations in seconds, as milliseconds truncated to 0.01; None for no values."""
    return down(pct(seconds, q) * 1000, 2) if len(seconds) else None


def p50_p99(values) -> dict[str, Any]:
    return {"n": len(values), "p50": down(pct(values, 0.50)), "p99": down(pct(values, 0.99))}


# -- processes -------------------------------------------------------------------------------------------

def coordinate_search(run: Callable[[dict[str, Any]], dict[str, Any]], best: dict[str, Any],
                      stages: Sequence[Sequence[dict[str, Any]]], primary: str) -> dict[str, Any]:
    """Tuning, one stage at a time: each change of a stage applied to the best configuration so far
    (`run(config)` scores one: a dict with "config" and the `primary` metric); returns the best."""
    for stage in stages:
        start = best["config"]
        for change in stage:
            r = run({**start, **change})
            if r[primary] > best[primary]:
                best = r
    return best


def rss_mb(pid: int) -> float:
    """VmRSS of a process in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_s(pid: int, gone: float | None = None) -> float:
    """User + system CPU seconds a process has used; `gone` when it has ended (OSError if None)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        if gone is None:
            raise
        return gone
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_process(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python argv...` from the checkout, its output appended to `log_path`."""
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env if env is not None else dict(os.environ),
                                stdout=out, stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
    """`sig` (SIGINT for uvicorn: a graceful shutdown), then SIGKILL after `timeout_s`; the exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def check_alive(proc: subprocess.Popen, log_path: Path, name: str | None = None) -> None:
    if proc.poll() is not None:
        tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        raise RuntimeError(f"{name or log_path.name} exited with {proc.returncode}:\n{tail}")


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Procs:
    """The `recstream` subprocesses a benchmark starts, by name, each with `env` (plus its own) and a
    log in `logdir`; stop_all() stops every one (SIGINT for the API, SIGTERM otherwise, then SIGKILL).
    The integration tests' supervisor, with every setting as a variable, is `Processes`."""

    def __init__(self, env: dict[str, str], logdir: Path):
        self.env, self.logdir = env, logdir
        self.procs: dict[str, subprocess.Popen] = {}
        if threading.current_thread() is threading.main_thread():
            # a benchmark stopped by SIGTERM (kill, timeout) unwinds as on Ctrl-C, so the `finally` that calls
            # stop_all() runs: killed plainly, it left its workers running, still in its consumer groups
            signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """`recstream argv...` with the benchmark's environment, plus `env` (RECSTREAM_* of this process)."""
        log_path = self.logdir / f"{name}.log"
        p = start_process(["-m", "cli.main", *argv], log_path, {**self.env, **(env or {})})
        self.procs[name] = p
        log(f"started {name} (pid {p.pid}, log {log_path})")
        return p

    def check(self) -> None:
        for name, p in self.procs.items():
            check_alive(p, self.logdir / f"{name}.log", name)

    def stop(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is not None:
            stop_process(p, signal.SIGINT if name == "api" else signal.SIGTERM)

    def stop_all(self) -> None:
        for name in list(self.procs)[::-1]:
            self.stop(name)

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.items()}


# -- results ---------------------------------------------------------------------------------------------

def result(name: str, figures: Any, *, command: str | None = None, date: str | None = None,
           machine_facts: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A result record: name, date (now), machine (plus `machine_facts`), command (this run's),
    what else the benchmark keeps (`extra`), and its figures."""
    return {"name": name, "date": date or now_iso(), "machine": {**machine(), **(machine_facts or {})},
            "command": command or command_line(), **extra, "figures": figures}


def _default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    if hasattr(x, "__float__"):
        return float(x)
    return str(x)


def write_json(path: Path, data: Any) -> Path:
    """`data` as indented JSON (numpy values, paths and non-string keys allowed), ending in a newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, default=_default, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
                                  | orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    return path


def write_result(name: str, figures: Any, *, out: Path | None = None, **fields: Any) -> dict[str, Any]:
    """`result(name, figures, **fields)` written to `out` (default bench/results/NAME.json); returned."""
    record = result(name, figures, **fields)
    write_json(out or RESULTS_DIR / f"{name}.json", record)
    return record
