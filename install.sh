#!/usr/bin/env bash
# Set up napari-pupick on a fresh Debian machine (root, no GPU, no screen) and run one job.
#   bash install.sh demo   install, then run the whole pick loop headless on the built-in sample data
#   bash install.sh test   install, then run the test suite (what CI runs)
#   bash install.sh        install only
# Idempotent: a second run reuses the venv and the system packages.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${PUPICK_VENV:-.venv}
PY=${PYTHON:-python3}

# 1. System libraries Qt's xcb platform and Xvfb need (skipped when present or when not root).
QT_APT="xvfb xauth libgl1 libegl1 libglx-mesa0 libgl1-mesa-dri libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0
 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xfixes0 libxcb-cursor0
 libfontconfig1 libdbus-1-3"
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  missing=$(for p in $QT_APT; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    echo "== apt-get install:" $missing
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi

# 2. The venv: CPU torch first (a pinned wheel), then the package with its test extras under that pin.
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[testing]"

case "${1:-}" in
  demo)
    shift
    exec "$VENV/bin/pupick" demo "$@" ;;
  test)
    shift
    exec "$VENV/bin/python" -m pytest "$@" ;;
  "") echo "== installed: activate with 'source $VENV/bin/activate', then 'napari' or 'pupick --help'" ;;
  *) echo "unknown job '$1' (use demo or test)" >&2; exit 2 ;;
esac
