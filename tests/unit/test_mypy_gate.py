"""The mypy gate's comparison of mypy output with the baseline (pure: sample output lines, no mypy run)."""
import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "scripts" / "mypy_gate.py"
_spec = importlib.util.spec_from_file_location("mypy_gate", _PATH)
assert _spec is not None and _spec.loader is not None
gate = importlib.util.module_from_spec(_spec)
sys.modules["mypy_gate"] = gate   # registered before it runs: its dataclasses look their module up
_spec.loader.exec_module(gate)
Error = gate.Error

ANY_RETURN = 'Returning Any from function declared to return "int"'


@pytest.mark.parametrize("line, expected", [
    ('streams/lag.py:48: error: Returning Any from function declared to return "int"  [no-any-return]',
     Error("streams/lag.py", "no-any-return", ANY_RETURN)),
    ('streams/lag.py:48:12: error: Returning Any from function declared to return "int"  [no-any-return]',
     Error("streams/lag.py", "no-any-return", ANY_RETURN)),            # column numbers
    ('streams/lag.py: error: Returning Any from function declared to return "int"  [no-any-return]',
     Error("streams/lag.py", "no-any-return", ANY_RETURN)),            # the baseline's shape
    ("./cli\\main.py:3: error: invalid syntax  [syntax]", Error("cli/main.py", "syntax", "invalid syntax")),
    ("agents/x.py:1: error: Some message without a code", Error("agents/x.py", "", "Some message without a code")),
    ('batch/a.py:7: error: Argument 1 to "f" has incompatible type "list[int]"; expected "str"  [arg-type]',
     Error("batch/a.py", "arg-type", 'Argument 1 to "f" has incompatible type "list[int]"; expected "str"')),
    ("schemas/arrow.py:30: note: Following member(s) of \"Record\" have conflicts:", None),
    ("Found 3 errors in 2 files (checked 87 source files)", None),
    ("Success: no issues found in 87 source files", None),
    ("", None),
])
def test_parse_line_drops_line_numbers_and_skips_non_errors(line, expected):
    assert gate.parse_line(line) == expected


def lines(*specs):
    """mypy output lines from (path, line, code, message) tuples."""
    return [f"{p}:{n}: error: {m}  [{c}]" for p, n, c, m in specs]


def errors(output):
    return [e for e, _ in gate.parse(output)]


BASE = lines(("streams/a.py", 10, "type-arg", 'Missing type arguments for generic type "dict"'),
             ("streams/a.py", 20, "type-arg", 'Missing type arguments for generic type "dict"'),
             ("cli/b.py", 5, "no-any-return", ANY_RETURN))


@pytest.mark.parametrize("current, new, fixed", [
    (BASE, [], 0),                                                      # same errors
    (lines(("streams/a.py", 11, "type-arg", 'Missing type arguments for generic type "dict"'),
           ("streams/a.py", 99, "type-arg", 'Missing type arguments for generic type "dict"'),
           ("cli/b.py", 1, "no-any-return", ANY_RETURN)), [], 0),       # lines moved: still known
    (BASE[:1] + BASE[2:], [], 1),                                       # one copy of a repeated error fixed
    ([], [], 3),                                                        # all fixed
    (BASE + lines(("streams/a.py", 30, "type-arg", 'Missing type arguments for generic type "dict"')),
     ["streams/a.py:30: error: Missing type arguments for generic type \"dict\"  [type-arg]"], 0),  # a third copy
    (BASE + lines(("cli/c.py", 5, "no-any-return", ANY_RETURN)),
     ["cli/c.py:5: error: " + ANY_RETURN + "  [no-any-return]"], 0),   # the same error in another file
    (BASE[:2] + lines(("cli/b.py", 5, "return-value", ANY_RETURN)),
     ["cli/b.py:5: error: " + ANY_RETURN + "  [return-value]"], 1),    # another code: new, and the old one fixed
    (BASE[:2] + lines(("cli/b.py", 5, "no-any-return", 'Returning Any from function declared to return "str"')),
     ['cli/b.py:5: error: Returning Any from function declared to return "str"  [no-any-return]'], 1),  # message
])
def test_compare_is_a_multiset_over_file_code_and_message(current, new, fixed):
    verdict = gate.compare(gate.parse(current), errors(BASE))
    assert (verdict.new, verdict.fixed, verdict.strict) == (new, fixed, [])
    assert verdict.ok == (not new)


def test_a_repeated_error_reports_its_last_copies_as_new():
    out = lines(*((("agents/w.py", n, "misc", "Cannot infer type of lambda")) for n in (3, 4, 5)))
    verdict = gate.compare(gate.parse(out), errors(out[:1]))
    assert verdict.new == out[1:]


@pytest.mark.parametrize("path", ["schemas/base.py", "recstream/ranking.py", "recstream/experiments/stats.py"])
def test_errors_in_the_strict_packages_fail_even_when_in_the_baseline(path):
    out = lines((path, 3, "type-arg", 'Missing type arguments for generic type "list"'))
    verdict = gate.compare(gate.parse(out), errors(out))
    assert verdict.strict == out and verdict.new == [] and not verdict.ok


@pytest.mark.parametrize("path, strict", [("schemas/x.py", True), ("recstream/x.py", True),
                                          ("recstreams/x.py", False), ("streams/recstream/x.py", False),
                                          ("cli/x.py", False)])
def test_is_strict_takes_whole_package_names(path, strict):
    assert gate.is_strict(path) == strict


def test_baseline_text_is_sorted_keeps_copies_leaves_out_strict_and_reads_back():
    out = lines(("streams/z.py", 9, "misc", "b"), ("recstream/a.py", 1, "misc", "x"), ("cli/a.py", 3, "misc", "a"),
                ("streams/z.py", 2, "misc", "b"))
    text = gate.baseline_text(gate.parse(out))
    assert text == "cli/a.py: error: a  [misc]\nstreams/z.py: error: b  [misc]\nstreams/z.py: error: b  [misc]\n"
    assert sorted(errors(text.splitlines())) == sorted(e for e in errors(out) if not gate.is_strict(e.path))
    assert gate.compare(gate.parse(out[:1] + out[2:]), errors(text.splitlines())).ok


def test_main_from_saved_output_fails_on_new_errors_and_update_rewrites_the_baseline(tmp_path, capsys):
    output, baseline = tmp_path / "mypy.txt", tmp_path / "baseline.txt"
    output.write_text("\n".join(BASE + ["Found 3 errors in 2 files (checked 2 source files)"]) + "\n")
    argv = ["--mypy-output", str(output), "--baseline", str(baseline)]
    assert gate.main(argv) == 1                             # no baseline yet: every error is new
    assert "3 new error(s)" in capsys.readouterr().out
    assert gate.main([*argv, "--update"]) == 0
    assert baseline.read_text() == gate.baseline_text(gate.parse(BASE))
    assert gate.main(argv) == 0
    output.write_text("\n".join(BASE[1:]) + "\n")           # one fixed
    assert gate.main(argv) == 0
    assert "1 baseline entry fixed" in capsys.readouterr().out
