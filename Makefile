# The two commands of the README: `make demo` runs the whole job, `make test` runs every test.
.PHONY: env demo test lint schemas

env:
	@bash scripts/dev-env.sh

demo:
	@bash scripts/dev-env.sh runtime
	.venv/bin/tessera demo

test: env
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -n 2 -q

lint: env
	.venv/bin/ruff check .

schemas: env
	.venv/bin/python -m tessera.specs.schemas docs/schemas
