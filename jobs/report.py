"""Write a run report: PQ, PQ by size, depth metrics, loss curves, overlays.

Entry point; the code is genpan/jobs/report.py (`--help` explains the options).
"""

import sys

try:
    from genpan.jobs.report import main
except ModuleNotFoundError as missing:
    if missing.name != "genpan":
        raise
    sys.exit("error: genpan is not installed in this Python: run `bash jobs/env.sh` and use .venv/bin/python")

if __name__ == "__main__":
    sys.exit(main())
