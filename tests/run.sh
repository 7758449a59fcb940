#!/usr/bin/env bash
# The test suite, from a fresh machine: sets up .venv, then runs pytest (CPU only; the
# multi-rank tests start real processes over gloo). Extra arguments go to pytest:
#   bash tests/run.sh                 # the default suite (not the @slow tests)
#   bash tests/run.sh -m slow         # only the slow ones (long CLI runs of layouts/flows the
#                                     # default suite covers once; CI runs both)
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/setup_env.sh
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning,ignore::FutureWarning}"
# The default suite unless a marker expression is given: `bash tests/run.sh --durations=30`
# still leaves the slow tests out (only -m chooses).
marker=(-m "not slow")
for arg in "$@"; do
  if [ "$arg" = "-m" ] || [[ "$arg" == -m?* ]]; then
    marker=()
  fi
done
exec python -m pytest -q -p no:cacheprovider "${marker[@]}" "$@" tests
