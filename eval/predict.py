"""Run a trained model on images, a COCO split or shards and write COCO panoptic predictions.

Entry point; the code is genpan/eval/predict.py (`--help` explains the options).
"""

import sys

try:
    from genpan.eval.predict import main
except ModuleNotFoundError as missing:
    if missing.name != "genpan":
        raise
    sys.exit("error: genpan is not installed in this Python: run `bash jobs/env.sh` and use .venv/bin/python")

if __name__ == "__main__":
    sys.exit(main())
