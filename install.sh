#!/usr/bin/env bash
# Install logitfuse into ./.venv (CPU torch first: an unpinned torch would pull a multi-GB CUDA build).
# For a GPU machine, install a CUDA build of torch 2.13 into the venv first; this script then keeps it.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[serve,dev]"
