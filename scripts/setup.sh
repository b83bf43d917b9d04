#!/usr/bin/env bash
# Set up a fresh machine for napari-esam, idempotently:
#  - Debian packages for headless Qt (Xvfb + two xcb libraries), when run as root with apt;
#  - a virtual environment in .venv;
#  - torch==2.13.0 FIRST (the CPU wheel; any other torch requirement pulls CUDA packages);
#  - the project, editable, with its test extras (napari, PySide6-Essentials, pytest-qt, ...)
#    and its docs extras (mkdocs, mkdocs-material, mkdocstrings).
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if ! command -v Xvfb >/dev/null 2>&1 || ! ldconfig -p | grep -q libxcb-icccm.so.4 \
      || ! ldconfig -p | grep -q libxcb-keysyms.so.1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xvfb libxcb-icccm4 libxcb-keysyms1 >/dev/null
  fi
fi
PY="${PYTHON:-}"
if [ -z "$PY" ]; then PY=$(command -v python3.11 || command -v python3); fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[testing,docs]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, napari_esam; print('napari-esam ready, torch', torch.__version__)"
