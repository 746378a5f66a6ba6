#!/usr/bin/env bash
# Create the project's virtual environment (.venv) when it is missing or pyproject.toml changed.
# Needs only Python 3.11+ on PATH. On machines without an NVIDIA GPU torch is the pinned CPU build
# (an unpinned `torch` would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TORCH_VERSION=2.13.0
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "error: genpan needs Python 3.11 or newer on PATH (or set PYTHON=...)" >&2; exit 2; }

want=$(cat pyproject.toml jobs/env.sh | sha256sum | cut -c1-16)
if [ -x .venv/bin/python ] && [ "$(cat .venv/.genpan-installed 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "[env] setting up .venv with $($PY --version) (first run takes a few minutes)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >&2
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install -q "torch==$TORCH_VERSION" >&2
  else
    # A CPU wheel on local disk (pip's find-links) if there is one, else PyTorch's CPU index.
    probe=$(mktemp -d)
    if $PIP download -q --no-deps --no-index "torch==$TORCH_VERSION" -d "$probe" >/dev/null 2>&1; then
      rm -rf "$probe"
      $PIP install -q "torch==$TORCH_VERSION" >&2
    else
      rm -rf "$probe"
      $PIP install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu >&2
    fi
  fi
fi
$PIP install -q -e ".[dev]" >&2
# The PQ reference all papers use; its numpy<2 pin is needless, so no deps.
$PIP install -q --no-deps panopticapi-lite >&2
echo "$want" > .venv/.genpan-installed
echo "[env] ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')" >&2
