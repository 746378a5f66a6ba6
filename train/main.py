"""Train the panoptic model: one process, or many under torchrun.

Entry point; the code is genpan/train/main.py (`--help` explains the options).
"""

import sys

try:
    from genpan.train.main import main
except ModuleNotFoundError as missing:
    if missing.name != "genpan":
        raise
    sys.exit("error: genpan is not installed in this Python: run `bash jobs/env.sh` and use .venv/bin/python")

if __name__ == "__main__":
    sys.exit(main())
