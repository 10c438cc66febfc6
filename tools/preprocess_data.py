#!/usr/bin/env python
"""`python tools/preprocess_data.py ARGS` = the installed command `xlmr-preprocess ARGS` (xlmr_mp/cli/preprocess_data.py)."""
from xlmr_mp.cli.preprocess_data import main

if __name__ == "__main__":
    raise SystemExit(main())
