#!/usr/bin/env bash
# SLURM + munge for the launcher tests (tests/tools/test_slurm.py starts a local cluster with
# launch/slurm_cluster.sh). .ci/install.sh already apt-installs slurm-wlm and munge when missing;
# this hook makes sure the pieces the local cluster needs are there, and never fails the install
# (without SLURM the launcher tests skip with the reason).
set -u
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=""
  for c in slurmctld slurmd sbatch munged; do command -v "$c" >/dev/null || missing=1; done
  if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 || \
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1; } || \
      echo "install.d/slurm.sh: could not install slurm-wlm munge; SLURM launcher tests will be skipped" >&2
  fi
  # munge needs a key; the Debian package creates one, an image built without it may not have it
  if command -v munged >/dev/null && [ ! -s /etc/munge/munge.key ]; then
    mungekey --create >/dev/null 2>&1 || true
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  fi
fi
exit 0
