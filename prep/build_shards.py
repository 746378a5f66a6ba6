"""Build WebDataset shards and their parquet manifest for one dataset split (with Ray).

Entry point; the code is genpan/prep/build_shards.py (`--help` explains the options).
"""

import sys

try:
    from genpan.prep.build_shards import main
except ModuleNotFoundError as missing:
    if missing.name != "genpan":
        raise
    sys.exit("error: genpan is not installed in this Python: run `bash jobs/env.sh` and use .venv/bin/python")

if __name__ == "__main__":
    sys.exit(main())
