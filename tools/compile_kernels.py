#!/usr/bin/env python
"""`python tools/compile_kernels.py ARGS` = the installed command `xlmr-compile-kernels ARGS` (xlmr_mp/cli/compile_kernels.py)."""
from xlmr_mp.cli.compile_kernels import main

if __name__ == "__main__":
    raise SystemExit(main())
