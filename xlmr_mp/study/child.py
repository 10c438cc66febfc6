"""`python -m xlmr_mp.study.child PARENT_PID CMD...`: exec CMD so that it dies with PARENT_PID.

The study runner starts every trainer and evaluator through this, so a SIGKILL of the runner
leaves no cell training on into its run directory (the kernel's parent-death signal survives exec).
"""
import os
import signal
import sys

from xlmr_mp.distributed import exit_with_parent


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: python -m xlmr_mp.study.child PARENT_PID CMD [ARGS...]")
    exit_with_parent(signal.SIGKILL, expected_parent=int(sys.argv[1]))
    os.execvp(sys.argv[2], sys.argv[2:])


if __name__ == "__main__":
    main()
