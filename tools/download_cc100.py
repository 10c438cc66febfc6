#!/usr/bin/env python
"""`python tools/download_cc100.py ARGS` = the installed command `xlmr-download-cc100 ARGS` (xlmr_mp/cli/download_cc100.py)."""
from xlmr_mp.cli.download_cc100 import main

if __name__ == "__main__":
    raise SystemExit(main())
