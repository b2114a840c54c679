"""`python -m moe_ep ...` is the `moe-ep` command (also usable as `torchrun -m moe_ep bench`)."""

import sys

from moe_ep.cli import main

if __name__ == "__main__":
    sys.exit(main())
