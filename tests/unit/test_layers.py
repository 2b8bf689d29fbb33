"""The import contract (docs/architecture.md): every package imports only from its own layer or below.

    schemas -> recstream (the pure core) -> edges: streams, models, batch -> agents -> serving -> cli

Within the edges, batch (Spark jobs, publishing) may use streams (the store, topics, producer) and
models (what training writes and serving reads), never the reverse; agents take their model code
from models, so a serving process never imports the training code in batch. The core and the schemas import
no I/O library: they are tested without a broker, a
Redis, a Spark or an HTTP server. Every import counts: at the top of a module, inside a function (a
lazy import is still a dependency) and under `if TYPE_CHECKING:`. tests/ and bench/ may import anything.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = [("schemas",), ("recstream",), ("streams", "models", "batch"), ("agents",), ("serving",), ("cli",)]
LEVEL = {pkg: i for i, pkgs in enumerate(LAYERS) for pkg in pkgs}
WITHIN = {("batch", "streams"), ("batch", "models")}   # (importer, imported) allowed inside one layer
NEVER = {("agents", "batch"), ("serving", "batch")}    # below in the order, but training code: not at serve time
IO_LIBRARIES = {"redis", "aiokafka", "faust", "mode", "pyspark", "starlette", "uvicorn", "mlflow", "prometheus_client",
                "httpx", "confluent_kafka", "faiss", "xgboost"}
PURE = {"schemas", "recstream"}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file, wherever it is."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def violations(root: Path) -> list[str]:
    out = []
    for pkg, level in LEVEL.items():
        for path in sorted((root / pkg).rglob("*.py")):
            for line, module in imports(path):
                top = module.split(".")[0]
                where = f"{path.relative_to(root)}:{line} imports {module}"
                if (pkg, top) in NEVER:
                    out.append(f"{where}: {pkg} serves, {top} trains (serve-time model code is in models)")
                if top in LEVEL and top != pkg:
                    if LEVEL[top] > level:
                        out.append(f"{where}: {top} is above {pkg}")
                    elif LEVEL[top] == level and (pkg, top) not in WITHIN:
                        out.append(f"{where}: {pkg} may not import {top} (same layer)")
                if pkg in PURE and top in IO_LIBRARIES:
                    out.append(f"{where}: {pkg} is the pure core, {top} is I/O")
    return out


def test_every_package_imports_only_its_own_layer_or_below():
    assert violations(ROOT) == []


def test_every_top_level_package_has_a_layer():
    """A new package must be placed in LAYERS (and in docs/architecture.md), or the contract misses it."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - {"tests", "bench", "examples"} == set(LEVEL)


@pytest.mark.parametrize("importer, imported, ok", [
    ("agents", "serving", False),    # up a layer
    ("streams", "agents", False),
    ("recstream", "streams", False),
    ("streams", "batch", False),     # the one-way edge inside a layer
    ("batch", "streams", True),
    ("serving", "agents", True),     # down a layer
    ("cli", "batch", True),
    ("agents", "models", True),
    ("agents", "batch", False),      # training code, never at serve time
    ("models", "batch", False),
])
def test_the_checker_sees_a_crossing(tmp_path, importer, imported, ok):
    """The checker itself: a planted import is reported exactly when it crosses the order."""
    for pkg in LEVEL:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / importer / "m.py").write_text(f"def f():\n    from {imported}.x import y\n")
    found = violations(tmp_path)
    assert (found == []) == ok, found


def test_the_core_stays_pure(tmp_path):
    for pkg in LEVEL:
        (tmp_path / pkg).mkdir()
    (tmp_path / "recstream" / "m.py").write_text("import redis.asyncio\n")
    assert violations(tmp_path) == ["recstream/m.py:1 imports redis.asyncio: recstream is the pure core, redis is I/O"]


def test_stdlib_names_are_never_layers():
    assert not set(LEVEL) & set(sys.stdlib_module_names)


LONG = 60   # lines of a function's body, its docstring not counted


def long_functions(root: Path) -> list[str]:
    """Product functions over LONG lines whose docstring does not say "Why this long:"."""
    out = []
    for pkg in LEVEL:
        for path in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                doc = ast.get_docstring(node) or ""
                first = node.body[0]
                skip = first.end_lineno - first.lineno + 1 if doc and isinstance(first, ast.Expr) else 0
                if node.end_lineno - node.lineno + 1 - skip > LONG and "Why this long:" not in doc:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name}")
    return out


def test_no_long_function_without_a_reason():
    """A request path reads as named stages; a function over LONG lines says why in its docstring."""
    assert long_functions(ROOT) == []


def test_the_length_check_counts_the_body_and_reads_the_reason(tmp_path):
    for pkg in LEVEL:
        (tmp_path / pkg).mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(LONG + 1))
    (tmp_path / "agents" / "m.py").write_text(
        f'def long():\n    """doc"""\n{body}\n\ndef explained():\n    """Why this long: a table."""\n{body}\n'
        f'def short():\n    """{"x" * 10}\n' + "\n" * 80 + f'    """\n{body[: body.index("x3")]}')
    assert long_functions(tmp_path) == ["agents/m.py:1 long"]
