"""The paper's Table 4 ablation on the embedded data.

Entry point; the code is genpan/jobs/ablation.py (`--help` explains the options).
"""

import sys

try:
    from genpan.jobs.ablation import main
except ModuleNotFoundError as missing:
    if missing.name != "genpan":
        raise
    sys.exit("error: genpan is not installed in this Python: run `bash jobs/env.sh` and use .venv/bin/python")

if __name__ == "__main__":
    sys.exit(main())
