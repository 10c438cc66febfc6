#!/usr/bin/env python
"""`python tools/merge_datasets.py ARGS` = the installed command `xlmr-merge ARGS` (xlmr_mp/cli/merge_datasets.py)."""
from xlmr_mp.cli.merge_datasets import main

if __name__ == "__main__":
    raise SystemExit(main())
