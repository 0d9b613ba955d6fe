# The README's two commands. Both work on a fresh machine with Python 3.10+ and pip.
.PHONY: quickstart test lint

quickstart:
	bash scripts/install.sh
	.venv/bin/alignloop quickstart

test:
	bash scripts/install.sh dev
	.venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check alignloop tests
