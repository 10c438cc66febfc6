#!/usr/bin/env python
"""`python tools/study.py ARGS` = the installed command `xlmr-study ARGS` (xlmr_mp/cli/study.py)."""
from xlmr_mp.cli.study import main

if __name__ == "__main__":
    raise SystemExit(main())
