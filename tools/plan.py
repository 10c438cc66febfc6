#!/usr/bin/env python
"""`python tools/plan.py ARGS` = the installed command `xlmr-plan ARGS` (xlmr_mp/cli/plan.py)."""
from xlmr_mp.cli.plan import main

if __name__ == "__main__":
    raise SystemExit(main())
