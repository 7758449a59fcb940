#!/usr/bin/env bash
# The test suite, from a fresh machine: sets up .venv, then runs pytest (CPU only; the
# multi-rank tests start real processes over gloo). Extra arguments go to pytest:
#   bash tests/run.sh                 # the default suite (not the @slow tests)
#   bash tests/run.sh -m slow         # only the slow ones
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/setup_env.sh
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning,ignore::FutureWarning}"
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
fi
exec python -m pytest -q -p no:cacheprovider "$@" tests
