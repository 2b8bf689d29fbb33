# The two commands of the README: `make demo` (the main job) and `make test`.
# Both install what is missing first and start the local services (idempotent).
.PHONY: install up down demo test lint

install:
	bash scripts/install.sh

up: install
	.venv/bin/recstream services up

down:
	.venv/bin/recstream services down

demo: up
	.venv/bin/recstream demo

test: up
	.venv/bin/pytest

# ruff (pyproject [tool.ruff]) and mypy: strict on schemas/ and the core, elsewhere nothing beyond
# mypy-baseline.txt (scripts/mypy_gate.py). CI runs it after the tests.
lint: install
	.venv/bin/ruff check .
	.venv/bin/python scripts/mypy_gate.py
