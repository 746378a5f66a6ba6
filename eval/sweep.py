"""Grid-search the post-processing parameters on a validation set, scored with PQ.

Entry point; the code is genpan/eval/sweep.py (`--help` explains the options).
"""

import sys

try:
    from genpan.eval.sweep import main
except ModuleNotFoundError as missing:
    if missing.name != "genpan":
        raise
    sys.exit("error: genpan is not installed in this Python: run `bash jobs/env.sh` and use .venv/bin/python")

if __name__ == "__main__":
    sys.exit(main())
