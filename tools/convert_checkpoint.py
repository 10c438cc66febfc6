#!/usr/bin/env python
"""`python tools/convert_checkpoint.py ARGS` = the installed command `xlmr-convert ARGS` (xlmr_mp/cli/convert_checkpoint.py)."""
from xlmr_mp.cli.convert_checkpoint import main

if __name__ == "__main__":
    raise SystemExit(main())
