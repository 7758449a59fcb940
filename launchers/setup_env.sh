#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install the engine into it.
# Sourced by examples/quickstart.sh and tests/run.sh; prints what it does.
#
#   VENV=path      where the environment lives (default: .venv in the repository)
#   EXTRAS=dev,opt pip extras to install (default: dev,opt: the test tools and nvidia-modelopt)
#
# A torch that already imports (e.g. the CUDA build of an NGC container) is kept: the venv
# then sees the system site-packages and pip is never asked for torch. Otherwise the CPU
# wheel torch==2.13.0 is installed. Installation is skipped when setup.py, pyproject.toml and
# the constraints are unchanged.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$repo/.venv}"
EXTRAS="${EXTRAS:-dev,opt}"
PYTHON_BIN="${PYTHON_BIN:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON_BIN" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] torch found in $("$PYTHON_BIN" -c 'import torch; print(torch.__file__)'): keeping it (venv with system site-packages)"
    "$PYTHON_BIN" -m venv --system-site-packages "$VENV"
  else
    echo "[setup] creating $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
  fi
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

# On Python 3.11 (CI's) the exact package set CI ran is installed (constraints/py311.txt);
# elsewhere pyproject.toml's bounds and pins apply (megatron-core==0.16.1 on every Python).
constraints=()
if [ -f "$repo/constraints/py311.txt" ] && python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  constraints=(-c "$repo/constraints/py311.txt")
fi
stamp="$VENV/.engine-installed"
want="$(cat "$repo/setup.py" "$repo/pyproject.toml" "$repo/constraints/py311.txt" 2>/dev/null | sha256sum | cut -c1-16)-$EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  if ! python -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing torch==2.13.0 (CPU wheel on machines without CUDA torch)"
    pip install -q torch==2.13.0
  fi
  echo "[setup] installing the engine with extras [$EXTRAS]"
  pip install -q "${constraints[@]}" -e "${repo}[${EXTRAS}]"
  echo "$want" > "$stamp"
else
  echo "[setup] $VENV is up to date"
fi
