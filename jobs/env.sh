#!/usr/bin/env bash
# The project's virtual environment, from the committed lock.
#
#   bash jobs/env.sh            # .venv with the exact versions of jobs/locks/cpu.txt (cuda.txt where nvidia-smi answers)
#   bash jobs/env.sh --latest   # .venv-latest with the newest releases pyproject.toml's ranges allow (no lock)
#   bash jobs/lock.sh           # refresh both locks from a --latest environment
#
# Needs only Python 3.11+ on PATH. .venv is rebuilt when pyproject.toml, this script or the lock changed.
# torch is installed first, on its own: on machines without an NVIDIA GPU it is the CPU build (a local wheel
# when pip's find-links has one, else PyTorch's CPU index), since PyPI's Linux torch is a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TORCH_VERSION=2.13.0
MODE=locked
VENV=.venv
case "${1:-}" in
  "") ;;
  --latest) MODE=latest; VENV=.venv-latest ;;
  -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "error: unknown option '$1' (use --latest, or nothing for the locked environment)" >&2; exit 2 ;;
esac

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "error: genpan needs Python 3.11 or newer on PATH (or set PYTHON=...)" >&2; exit 2; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then FLAVOUR=cuda; else FLAVOUR=cpu; fi
LOCK=jobs/locks/$FLAVOUR.txt
[ "$MODE" = latest ] || [ -f "$LOCK" ] || { echo "error: $LOCK is missing: run bash jobs/lock.sh" >&2; exit 2; }

want=$(cat pyproject.toml jobs/env.sh "$([ "$MODE" = locked ] && echo "$LOCK" || echo /dev/null)" | sha256sum | cut -c1-16)
if [ "$MODE" = locked ] && [ -x $VENV/bin/python ] && [ "$(cat $VENV/.genpan-installed 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "[env] setting up $VENV ($MODE, $FLAVOUR) with $($PY --version) (first run takes a few minutes)" >&2
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip >&2

install_torch() {  # $1: the version to install
  if $VENV/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$1')" 2>/dev/null; then return; fi
  if [ "$FLAVOUR" = cuda ]; then $PIP install -q "torch==$1" >&2; return; fi
  local probe; probe=$(mktemp -d)
  if $PIP download -q --no-deps --no-index "torch==$1" -d "$probe" >/dev/null 2>&1; then
    $PIP install -q "torch==$1" >&2
  else
    $PIP install -q "torch==$1" --index-url https://download.pytorch.org/whl/cpu >&2
  fi
  rm -rf "$probe"
}

if [ "$MODE" = locked ]; then
  install_torch "$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' "$LOCK")"
  # Every package at its locked version, nothing resolved: the lock is the whole environment.
  $PIP install -q --no-deps -r "$LOCK" >&2
  $PIP install -q --no-deps -e . >&2
else
  # Everything at its newest release but torch, which stays at TORCH_VERSION: an unpinned torch from PyPI
  # is the CUDA build, and torch's own updates are taken deliberately (bump TORCH_VERSION, then lock).
  install_torch "$TORCH_VERSION"
  keep_torch=$(mktemp); echo "torch==$TORCH_VERSION" > "$keep_torch"
  $PIP install -q --upgrade --upgrade-strategy eager -c "$keep_torch" -e ".[dev]" >&2
  rm -f "$keep_torch"
  # The PQ reference all papers use; its numpy<2 pin is needless, so no deps.
  $PIP install -q --upgrade --no-deps panopticapi-lite >&2
fi
echo "$want" > $VENV/.genpan-installed
echo "[env] ready: $VENV, $($VENV/bin/python -c 'import torch; print("torch", torch.__version__)')" >&2
