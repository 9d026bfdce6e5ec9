# Sourced by demo.sh and test.sh: make a ready Python environment on a fresh machine.
#   - uses $POCL_VENV, else an active virtualenv, else creates ./.venv
#   - installs torch==2.13.0 first only when no torch is importable (a user's own CUDA torch
#     is kept), then this package with pip
set -euo pipefail
POCL_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${POCL_VENV:-${VIRTUAL_ENV:-$POCL_ROOT/.venv}}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[pocl_ds] creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[pocl_ds] installing torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi
EXTRAS=${POCL_EXTRAS:-}
STAMP="$VENV/.pocl_ds_installed${EXTRAS:+_$EXTRAS}"
if [ ! -f "$STAMP" ] || [ "$POCL_ROOT/setup.cfg" -nt "$STAMP" ]; then
  echo "[pocl_ds] installing pocl_ds${EXTRAS:+[$EXTRAS]} and its dependencies"
  "$PY" -m pip install -q -e "$POCL_ROOT${EXTRAS:+[$EXTRAS]}"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# DeepSpeed JIT-compiles its CPU communication op once; keep the build between runs.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/pocl_ds/torch_extensions}
# The real instruction data, when this checkout sits beside a shared/ folder.
if [ -z "${POCL_DATA_DIR:-}" ] && [ -d "$POCL_ROOT/../shared/data" ]; then
  export POCL_DATA_DIR="$POCL_ROOT/../shared/data"
fi
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
cd "$POCL_ROOT"
