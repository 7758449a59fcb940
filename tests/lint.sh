#!/usr/bin/env bash
# The guardrails .ci/run runs before the tests: ruff (lint and format), mypy on engine/,
# models/ and parallel/, vulture (dead code). Settings live in pyproject.toml. Sets up .venv
# like tests/run.sh. Fix a format finding with `ruff format .`, lint with `ruff check --fix .`.
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/setup_env.sh
status=0
run() {
  echo "[lint] $*"
  "$@" || status=1
}
run ruff check .
run ruff format --check .
run mypy
run vulture
exit "$status"
