#!/usr/bin/env bash
# The main job end to end on the embedded synthetic dataset (creates .venv first if needed).
# Extra arguments go to jobs/demo.py (see --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash jobs/env.sh
exec .venv/bin/python jobs/demo.py "$@"
