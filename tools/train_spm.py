#!/usr/bin/env python
"""`python tools/train_spm.py ARGS` = the installed command `xlmr-train-spm ARGS` (xlmr_mp/cli/train_spm.py)."""
from xlmr_mp.cli.train_spm import main

if __name__ == "__main__":
    raise SystemExit(main())
