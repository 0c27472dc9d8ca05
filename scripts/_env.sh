# Sourced by scripts/demo.sh and scripts/test.sh: make ./.venv with everything paracompile needs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=".venv/.paracompile-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "==> installing dependencies into .venv (first run only)"
    python -m pip install -q --upgrade pip
    # The CPU build of torch; an unpinned `torch` would download a multi-GB CUDA build.
    python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
    python -m pip install -q -e ".[${PARACOMPILE_EXTRAS:-test,bench,ptx}]"
    touch "$stamp"
fi
