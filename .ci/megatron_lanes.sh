#!/usr/bin/env bash
# The fast lane (pytest -m "not slow and not slurm") on the LOWEST megatron-core that setup.py's
# range allows (MEGATRON_CORE, e.g. >=0.16,<0.20 -> 0.16.0), in a virtualenv over the system
# site-packages with only megatron-core pinned (torch and the rest are not downloaded again; the
# checkout is the editable install). The main environment holds the newest megatron-core that
# installs on this Python (pip's choice: 0.16.1 on 3.11), and `.ci/run` runs the whole suite there.
# The megatron-core calls we make and how 0.16 and 0.19 differ: docs/megatron_core_compat.md.
#   bash .ci/megatron_lanes.sh                 # the fast lane on the lowest version
#   bash .ci/megatron_lanes.sh tests/parallel/test_tp.py   # other pytest arguments instead of the whole fast lane
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
LOW="$(python - <<'EOF'
import ast, re
tree = ast.parse(open("setup.py").read())
spec = next(n.value.value for n in tree.body if isinstance(n, ast.Assign)
            and any(getattr(t, "id", "") == "MEGATRON_CORE" for t in n.targets))
m = re.search(r">=\s*([0-9][0-9.]*)", spec)
if not m:
    raise SystemExit(f"setup.py MEGATRON_CORE={spec!r} has no lower bound")
parts = m.group(1).split(".")
print(".".join((parts + ["0", "0"])[:3]))
EOF
)"
NEWEST="$(python -c "import importlib.metadata as md; print(md.version('megatron-core'))")"
echo "[megatron_lanes] range $(grep -o 'megatron-core[^"]*' setup.py | head -1): main environment $NEWEST (newest installable), lane $LOW (lowest)"
python -m venv --system-site-packages "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --ignore-installed "megatron-core==$LOW"
got="$("$WORK/venv/bin/python" -W ignore -c "import importlib.metadata as md, megatron.core, os; print(md.version('megatron-core'), os.path.dirname(megatron.core.__file__))")"
case "$got" in
  "$LOW $WORK/venv/"*) echo "[megatron_lanes] megatron-core $got" ;;
  *) echo "[megatron_lanes] the virtualenv imports megatron-core $got, not $LOW from $WORK/venv" >&2; exit 1 ;;
esac
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-m "not slow and not slurm" tests)
cd "$REPO"
"$WORK/venv/bin/python" -m pytest -q -ra -p no:cacheprovider "${args[@]}"
