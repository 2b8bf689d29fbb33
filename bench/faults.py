"""Fault figures: run tests/integration/test_faults.py and collect what each test prints.

Each fault test prints one line `FAULT-FIGURES <name> <json>` (time to fall back, time to recover,
events acknowledged vs archived, duplicates dropped, ...). This script runs the module with
`pytest -s`, gathers those lines and each test's outcome, and writes bench/results/faults.json.

    flock /tmp/recstream-heavy.lock .venv/bin/python bench/faults.py [extra pytest args]

About 5 minutes on the 2-core box. Needs the shared stack (`recstream services up`: the model tests
train with Spark and register in MLflow); Redis and Kafka faults start private instances.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402

OUT = REPO / "bench" / "results" / "faults.json"
TESTS = "tests/integration/test_faults.py"
LINE = re.compile(r"FAULT-FIGURES (\S+) (\{.*\})\s*$")
OUTCOME = re.compile(r"^(PASSED|FAILED|XFAIL|XPASS|ERROR|SKIPPED) (tests/\S+)")


def main(argv: list[str]) -> int:
    cmd = [sys.executable, "-m", "pytest", TESTS, "-s", "-rA", "-p", "no:cacheprovider", *argv]
    t = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall_s = time.monotonic() - t
    out = proc.stdout + proc.stderr
    figures: dict[str, dict] = {}
    for line in out.splitlines():
        if m := LINE.search(line):
            figures.setdefault(m.group(1), {}).update(json.loads(m.group(2)))
    outcomes = {}
    for line in out.splitlines():
        if m := OUTCOME.match(line):
            outcomes[m.group(2).split("::", 1)[1]] = m.group(1)
    summary = next((ln.strip("= ") for ln in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed)", ln)), "")
    harness.write_result(
        "faults", figures, out=OUT, command=f".venv/bin/python bench/faults.py {' '.join(argv)}".strip(),
        pytest={"command": " ".join(["python", "-m", "pytest", *cmd[3:]]), "exit_status": proc.returncode,
                "summary": summary, "outcomes": outcomes, "wall_s": round(wall_s, 1)})
    failures = out.find("= FAILURES =")
    print(out[failures:failures + 6000] if failures >= 0 else summary)
    print(summary)
    print(f"figures of {len(figures)} fault runs written to {OUT.relative_to(REPO)}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
