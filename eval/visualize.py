"""Pictures of predictions: the photo with the segmentation over it, a legend, GT and depth beside it.

Entry point; the code is genpan/eval/visualize.py (`--help` explains the options).
"""

import sys

try:
    from genpan.eval.visualize import main
except ModuleNotFoundError as missing:
    if missing.name != "genpan":
        raise
    sys.exit("error: genpan is not installed in this Python: run `bash jobs/env.sh` and use .venv/bin/python")

if __name__ == "__main__":
    sys.exit(main())
