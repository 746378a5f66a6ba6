#!/usr/bin/env bash
# Refresh the dependency locks: bash jobs/lock.sh
#
# Builds .venv-latest (bash jobs/env.sh --latest: the newest releases pyproject.toml allows), then writes
#   jobs/locks/cpu.txt   exactly what .venv-latest holds (torch as the CPU build)
#   jobs/locks/cuda.txt  the same versions resolved against PyPI for Linux x86_64 with PyPI's CUDA torch,
#                        which adds the nvidia-* runtime packages torch needs
# Run the test suite on the new lock (bash jobs/test.sh) before committing it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash jobs/env.sh --latest
PY=.venv-latest/bin/python
mkdir -p jobs/locks
stamp="# $(date -u +%Y-%m-%d) from bash jobs/lock.sh with $($PY --version); install with bash jobs/env.sh"

# The CPU lock: the environment as it is. The local version label (+cpu) is dropped so that the same
# line matches PyPI's and PyTorch's CPU index's file names.
{
  echo "$stamp"
  $PY -m pip freeze --all --exclude-editable | grep -v -e '^genpan' -e '^pip==' | sed 's/^\(torch==[^+]*\)+.*/\1/' | LC_ALL=C sort -f
} > jobs/locks/cpu.txt

# The CUDA lock: every CPU-lock version fixed, resolved (not installed) against PyPI alone.
# panopticapi-lite declares numpy<2, which is needless and which the lock overrides, so it is
# resolved apart (it installs with --no-deps from the lock in any case).
pins=$(mktemp); report=$(mktemp)
grep -v -e '^#' -e '^panopticapi-lite==' jobs/locks/cpu.txt > "$pins"
# Only PyPI: no pip configuration file, no find-links or extra indexes from the environment.
env $(env | sed -n 's/^\(PIP_[A-Z_]*\)=.*/-u \1/p' | grep -v PIP_CERT) PIP_CONFIG_FILE=/dev/null $PY -m pip install -q --dry-run --ignore-installed --report "$report" \
  --index-url https://pypi.org/simple -r "$pins" >&2
{
  echo "$stamp"
  $PY - "$report" <<'EOF'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    print(f"{meta['name']}=={meta['version']}")
EOF
  grep '^panopticapi-lite==' jobs/locks/cpu.txt
} | awk 'NR == 1 || !seen[tolower($0)]++' | { read -r head; echo "$head"; LC_ALL=C sort -f; } > jobs/locks/cuda.txt
rm -f "$pins" "$report"
echo "[lock] wrote jobs/locks/cpu.txt ($(grep -vc '^#' jobs/locks/cpu.txt) packages) and jobs/locks/cuda.txt ($(grep -vc '^#' jobs/locks/cuda.txt) packages)" >&2
