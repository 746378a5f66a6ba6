"""Write the embedded synthetic dataset in the COCO panoptic format.

Entry point; the code is genpan/prep/synthetic.py (`--help` explains the options).
"""

import sys

try:
    from genpan.prep.synthetic import main
except ModuleNotFoundError as missing:
    if missing.name != "genpan":
        raise
    sys.exit("error: genpan is not installed in this Python: run `bash jobs/env.sh` and use .venv/bin/python")

if __name__ == "__main__":
    sys.exit(main())
