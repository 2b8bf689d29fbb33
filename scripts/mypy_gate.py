"""The mypy gate: no error in the strict packages, and no error elsewhere that the committed baseline lacks.

Runs mypy with the pyproject configuration and compares its errors with mypy-baseline.txt (repository
root) by (file, error code, message), line numbers left out so that edits above an error do not move it,
and as a multiset: a second copy of a known error is a new error. Prints every new error in full and how
many baseline entries are fixed; `--update` rewrites the baseline from this run (fix, then update, so the
baseline only shrinks). Exit status: 0 pass, 1 new errors (or any in the strict packages), 2 mypy failed.

    python scripts/mypy_gate.py [--update] [--mypy-output FILE]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "mypy-baseline.txt"
STRICT = ("schemas/", "recstream/")   # the packages strict in pyproject: no baseline, zero errors
# Output flags that pin the line format the parser reads, whatever a user's config says.
MYPY_FLAGS = ("--no-pretty", "--no-error-summary", "--show-error-codes", "--hide-error-code-links",
              "--hide-error-end", "--hide-column-numbers", "--no-color-output")

# `path:line[:col]: error: message  [code]`; the baseline keeps the same shape without line and column.
_LINE = re.compile(r"^(?P<path>[^:\n]+?):(?:\d+:)?(?:\d+:)?\s*error:\s*"
                   r"(?P<message>.*?)(?:\s+\[(?P<code>[a-z0-9-]+)\])?\s*$")


@dataclass(frozen=True, order=True)
class Error:
    """One mypy error as the gate compares it: no line numbers."""
    path: str
    code: str
    message: str

    def baseline_line(self) -> str:
        return f"{self.path}: error: {self.message}" + (f"  [{self.code}]" if self.code else "")


def parse_line(line: str) -> Error | None:
    """The error on one line of mypy output, or None (notes, summaries, blank lines)."""
    m = _LINE.match(line.rstrip("\n"))
    if m is None:
        return None
    return Error(m["path"].replace("\\", "/").removeprefix("./"), m["code"] or "", m["message"])


def parse(lines: Iterable[str]) -> list[tuple[Error, str]]:
    """Every error line as (the error, the line as mypy printed it)."""
    out = []
    for line in lines:
        e = parse_line(line)
        if e is not None:
            out.append((e, line.rstrip("\n")))
    return out


def is_strict(path: str) -> bool:
    return path.startswith(STRICT)


@dataclass(frozen=True)
class Verdict:
    strict: list[str]      # errors in the strict packages, as printed (always failures)
    new: list[str]         # errors elsewhere beyond the baseline's count of them, as printed
    fixed: int             # baseline entries no longer reported

    @property
    def ok(self) -> bool:
        return not self.strict and not self.new


def compare(current: Sequence[tuple[Error, str]], baseline: Iterable[Error]) -> Verdict:
    """The gate's verdict on this run's errors against the baseline (a multiset of errors)."""
    strict = [line for e, line in current if is_strict(e.path)]
    rest = [(e, line) for e, line in current if not is_strict(e.path)]
    known = Counter(baseline)
    now = Counter(e for e, _ in rest)
    excess = now - known
    new = []
    for e, line in rest:   # which copy of a repeated error is the new one is unknowable: report the last ones
        left = now[e]
        now[e] -= 1
        if left <= excess[e]:
            new.append(line)
    fixed = sum((known - Counter(e for e, _ in rest)).values())
    return Verdict(strict, new, fixed)


def baseline_text(current: Iterable[tuple[Error, str]]) -> str:
    """The baseline file for this run: the errors outside the strict packages, sorted, one a line."""
    lines = sorted(e.baseline_line() for e, _ in current if not is_strict(e.path))
    return "".join(line + "\n" for line in lines)


def read_baseline(path: Path) -> list[Error]:
    if not path.exists():
        return []
    return [e for e, _ in parse(path.read_text(encoding="utf-8").splitlines())]


def run_mypy() -> tuple[list[str], int]:
    proc = subprocess.run([sys.executable, "-m", "mypy", *MYPY_FLAGS], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.splitlines(), proc.returncode


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", action="store_true", help="rewrite the baseline from this run")
    ap.add_argument("--mypy-output", type=Path, help="read mypy's output from this file instead of running it")
    ap.add_argument("--baseline", type=Path, default=BASELINE, help="default: mypy-baseline.txt at the root")
    args = ap.parse_args(argv)
    rc = 0
    if args.mypy_output is not None:
        lines = args.mypy_output.read_text(encoding="utf-8").splitlines()
    else:
        lines, rc = run_mypy()
        if rc not in (0, 1):   # 2: a crash, a bad config or a blocking (syntax) error: nothing to compare
            print("\n".join(lines), file=sys.stderr)
            print(f"mypy failed (exit {rc})", file=sys.stderr)
            return 2
    current = parse(lines)
    if args.mypy_output is None and rc == 1 and not current:   # failed, yet no error line to compare
        print("\n".join(lines), file=sys.stderr)
        print("mypy exited 1 with no error line the gate can read", file=sys.stderr)
        return 2
    verdict = compare(current, read_baseline(args.baseline))
    if verdict.strict:
        print(f"{len(verdict.strict)} error(s) in {', '.join(STRICT)} (strict: no baseline):")
        print("\n".join(verdict.strict))
    if verdict.new:
        print(f"{len(verdict.new)} new error(s) not in {args.baseline.name}:")
        print("\n".join(verdict.new))
    print(f"mypy gate: {len(current)} error(s), {len(verdict.strict)} strict, {len(verdict.new)} new, "
          f"{verdict.fixed} baseline entr{'y' if verdict.fixed == 1 else 'ies'} fixed")
    if args.update:
        args.baseline.write_text(baseline_text(current), encoding="utf-8")
        print(f"wrote {args.baseline.name}: {sum(1 for e, _ in current if not is_strict(e.path))} entries")
        return 1 if verdict.strict else 0
    if verdict.fixed and verdict.ok:
        print(f"run with --update to drop the fixed entries from {args.baseline.name}")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
