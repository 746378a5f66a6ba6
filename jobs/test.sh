#!/usr/bin/env bash
# The test suite (creates .venv first if needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash jobs/env.sh
exec .venv/bin/python -m pytest -q "$@"
