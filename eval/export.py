"""Export a checkpoint to torch.export (.pt2) and/or ONNX.

Entry point; the code is genpan/eval/export.py (`--help` explains the options).
"""

import sys

try:
    from genpan.eval.export import main
except ModuleNotFoundError as missing:
    if missing.name != "genpan":
        raise
    sys.exit("error: genpan is not installed in this Python: run `bash jobs/env.sh` and use .venv/bin/python")

if __name__ == "__main__":
    sys.exit(main())
