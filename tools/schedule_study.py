#!/usr/bin/env python
"""`python tools/schedule_study.py ARGS` = the installed command `xlmr-schedule-study ARGS` (xlmr_mp/cli/schedule_study.py)."""
from xlmr_mp.cli.schedule_study import main

if __name__ == "__main__":
    raise SystemExit(main())
