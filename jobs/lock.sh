#!/usr/bin/env bash
# Refresh the dependency locks: bash jobs/lock.sh
#
# Builds .venv-latest (bash jobs/env.sh --latest: the newest releases pyproject.toml allows), then writes
#   jobs/locks/cuda.txt  those versions resolved against PyPI for Linux x86_64 with PyPI's CUDA torch,
#                        which adds the nvidia-* runtime and pins the triton torch was built with
#   jobs/locks/cpu.txt   what .venv-latest holds (torch as the CPU build), with cuda.txt's triton, so the
#                        kernels are tested (interpreted) with the release they compile with on a GPU
# Run the test suite on the new lock (bash jobs/test.sh) before committing it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash jobs/env.sh --latest
PY=.venv-latest/bin/python
mkdir -p jobs/locks
stamp="# $(date -u +%Y-%m-%d) from bash jobs/lock.sh with $($PY --version); install with bash jobs/env.sh"
frozen=$(mktemp); pins=$(mktemp); report=$(mktemp)
trap 'rm -f "$frozen" "$pins" "$report"' EXIT

# The environment as it is; the local version label (+cpu) is dropped so that the same line matches
# the file names of PyPI and of PyTorch's CPU index.
$PY -m pip freeze --all --exclude-editable | grep -v -e '^genpan' -e '^pip==' | sed 's/^\(torch==[^+]*\)+.*/\1/' > "$frozen"

# Every version fixed but triton's, resolved (not installed) against PyPI alone: no pip configuration
# file, no find-links or extra indexes from the environment. panopticapi-lite declares numpy<2, which
# is needless and which the lock overrides, so it is left out of the resolution (it installs with
# --no-deps from the lock in any case).
grep -v -e '^panopticapi-lite==' -e '^triton==' "$frozen" > "$pins"
env $(env | sed -n 's/^\(PIP_[A-Z_]*\)=.*/-u \1/p' | grep -v PIP_CERT) PIP_CONFIG_FILE=/dev/null $PY -m pip install -q \
  --dry-run --ignore-installed --report "$report" --index-url https://pypi.org/simple -r "$pins" >&2
{
  $PY -c 'import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print(item["metadata"]["name"] + "==" + item["metadata"]["version"])' "$report"
  grep '^panopticapi-lite==' "$frozen"
} | LC_ALL=C sort -f -u > "$pins"
{ echo "$stamp"; cat "$pins"; } > jobs/locks/cuda.txt

triton_pin=$(grep -i '^triton==' "$pins")
{ echo "$stamp"; sed "s/^triton==.*/$triton_pin/" "$frozen" | LC_ALL=C sort -f; } > jobs/locks/cpu.txt
echo "[lock] wrote jobs/locks/cpu.txt ($(grep -vc '^#' jobs/locks/cpu.txt) packages) and jobs/locks/cuda.txt ($(grep -vc '^#' jobs/locks/cuda.txt) packages)" >&2
