"""Compare the fused Triton loss kernels with the PyTorch reference on this machine's GPU.

Entry point; the code is genpan/kernels/selfcheck.py (`--help` explains the options).
"""

import sys

try:
    from genpan.kernels.selfcheck import main
except ModuleNotFoundError as missing:
    if missing.name != "genpan":
        raise
    sys.exit("error: genpan is not installed in this Python: run `bash jobs/env.sh` and use .venv/bin/python")

if __name__ == "__main__":
    sys.exit(main())
