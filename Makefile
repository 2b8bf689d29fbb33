# The two commands of the README: `make demo` (the main job) and `make test`.
# Both install what is missing first and start the local services (idempotent).
.PHONY: install up down demo test

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
