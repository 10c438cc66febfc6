#!/usr/bin/env python
"""`python tools/evaluate.py ARGS` = the installed command `xlmr-evaluate ARGS` (xlmr_mp/cli/evaluate.py)."""
from xlmr_mp.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
