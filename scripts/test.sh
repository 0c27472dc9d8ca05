#!/usr/bin/env bash
# Run the test suite (lint, then pytest). Installs what it needs into ./.venv on first use.
source "$(dirname "$0")/_env.sh"
echo "==> ruff"
ruff check paracompile tests benchmarks examples
echo "==> pytest"
python -m pytest -q "$@"
