#!/usr/bin/env bash
# Installs everything the project and its tests need on a fresh CPU machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"
# torch first: the CPU wheel; letting pip choose would pull gigabytes of CUDA packages.
python -c "import torch" 2>/dev/null || $PIP torch==2.13.0
# System packages: OpenMPI (mpirun for MPI preprocessing), SLURM + munge (launcher tests).
need_apt=""
command -v mpirun >/dev/null || need_apt="$need_apt libopenmpi-dev openmpi-bin"
command -v slurmctld >/dev/null || need_apt="$need_apt slurm-wlm munge"
if [ -n "$need_apt" ] && [ "$(id -u)" = 0 ]; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need_apt >/dev/null
fi
$PIP -e ".[test,mpi,hf,tb]"
# Component-specific install steps (SLURM cluster, CUDA compile toolchain wheels, ...).
for f in .ci/install.d/*.sh; do
  [ -e "$f" ] && bash "$f"
done
exit 0
