#!/usr/bin/env bash
# Install Topaz 0.3.20 (a benchmark peer, GPL: never a dependency of napari-pupick) in its own venv, on the
# same CPU torch as ours, without letting pip replace torch.
#   bash benchmarks/topaz/setup_topaz.sh          # venv at benchmarks/.topaz-venv (or $TOPAZ_VENV)
# Then run Topaz through our launcher, which works around torchvision's compiled ops on a CPU-only torch:
#   $TOPAZ_VENV/bin/python benchmarks/topaz/topaz_shim.py --help
# Idempotent: a second run reuses the venv.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV=${TOPAZ_VENV:-"$(cd "$HERE/.." && pwd)/.topaz-venv"}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q)
"$VENV/bin/python" -m pip install -q --upgrade pip
# 1. torch first, pinned; everything after it goes in with --no-deps or under the same pin.
echo "torch==2.13.0" > "$VENV/constraints.txt"
"${PIP[@]}" torch==2.13.0
# 2. Topaz itself without its declared dependencies (they would pull another torch), then its runtime
#    dependencies by hand. torchvision is installed with --no-deps too: its wheel pins a torch build.
"${PIP[@]}" --no-deps topaz-em==0.3.20
"${PIP[@]}" --no-deps torchvision==0.28.0
"${PIP[@]}" -c "$VENV/constraints.txt" tqdm h5py numpy pandas psutil scikit-learn scipy pillow future mrcfile
# 3. Check: the shim imports topaz and prints its version.
"$VENV/bin/python" "$HERE/topaz_shim.py" --version
"$VENV/bin/python" -c "import torch; v = torch.__version__; assert v.startswith('2.13.0'), v; print('torch', v)"
echo "== Topaz ready: $VENV/bin/python $HERE/topaz_shim.py <command> ..."
