#!/usr/bin/env bash
# A real SLURM cluster on one machine: one slurmctld and two slurmd "nodes" (n1, n2).
#
#   bash launch/slurm_cluster.sh start [STATE_DIR]   # install (apt, as root) + start; prints the env line
#   bash launch/slurm_cluster.sh status [STATE_DIR]
#   bash launch/slurm_cluster.sh stop [STATE_DIR]
#   eval "$(bash launch/slurm_cluster.sh env [STATE_DIR])"   # then: sbatch launch/xlmr_base.slurm ...
#
# For the launcher tests and for users who want to try launch/*.slurm before their cluster.
# Uses Debian's slurm-wlm and munge; cgroup-free (proctrack/linuxproc, task/none), so it runs in
# containers. Every file it writes (slurm.conf, state, spool, logs, pids) lives in STATE_DIR
# (default /tmp/xlmr_mp_slurm, or $XLMR_SLURM_DIR); clients find the cluster through
# SLURM_CONF=STATE_DIR/slurm.conf. Node names n1, n2 are added to /etc/hosts when missing.
# Both nodes are this one machine with one hostname, so Open MPI would treat ranks of n1 and n2 as
# neighbours and use its shared-memory transport between them (it crashes): the env line also sets
# OMPI_MCA_btl=self,tcp. Each node gets its own TmpFS (PMIx directories would collide otherwise).
# Sizes: XLMR_SLURM_CPUS (CPUs per node, default 4; may exceed the real cores),
# XLMR_SLURM_CTLD_PORT (default 16817), XLMR_SLURM_NODE_PORT (first node's port, default 17001),
# XLMR_SLURM_FIRST_JOB_ID (default 1; tests pick another so concurrent clusters' jobs, and the
# rendezvous ports derived from their ids, do not collide).
set -euo pipefail

cmd="${1:-status}"
DIR="$(realpath -m "${2:-${XLMR_SLURM_DIR:-/tmp/xlmr_mp_slurm}}")"
CPUS="${XLMR_SLURM_CPUS:-4}"
CTLD_PORT="${XLMR_SLURM_CTLD_PORT:-16817}"
NODES=(n1 n2)
NODE_PORT="${XLMR_SLURM_NODE_PORT:-17001}"
NODE_PORTS=("$NODE_PORT" "$((NODE_PORT + 1))")
FIRST_JOB_ID="${XLMR_SLURM_FIRST_JOB_ID:-1}"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }
log() { echo "[slurm_cluster] $*" >&2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "slurm-wlm/munge are not installed and this is not root; run as root, or install them: apt-get install slurm-wlm munge"
  command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and apt-get is missing; install SLURM and munge with your package manager"
  log "installing slurm-wlm munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq slurm-wlm munge >/dev/null; } \
    || die "apt-get install slurm-wlm munge failed"
}

ensure_hosts() {
  local h
  for h in "${NODES[@]}" "$(hostname -s)"; do
    if ! getent hosts "$h" >/dev/null; then
      [ -w /etc/hosts ] || die "node name $h does not resolve and /etc/hosts is not writable; add '127.0.0.1 $h' to /etc/hosts"
      echo "127.0.0.1 $h" >> /etc/hosts
      log "added '127.0.0.1 $h' to /etc/hosts"
    fi
  done
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/log" "$DIR/spool" "$DIR/run" "$DIR/tmp/n1" "$DIR/tmp/n2"
  local ctl i
  ctl="$(hostname -s)"
  {
    echo "# Written by launch/slurm_cluster.sh: a local test cluster (controller + 2 slurmd on one machine)."
    echo "ClusterName=xlmrlocal"
    echo "SlurmctldHost=${ctl}(127.0.0.1)"
    echo "SlurmctldPort=${CTLD_PORT}"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    # job credentials live 20 s (default 120): a requeued job may start again once its old
    # credential has expired, so preempted jobs come back after ~20 s instead of ~2 min
    echo "AuthInfo=cred_expire=${XLMR_SLURM_CRED_EXPIRE:-20}"
    echo "CredType=cred/munge"
    echo "MpiDefault=none"
    echo "TmpFS=$DIR/tmp/%n"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "SchedulerType=sched/backfill"
    echo "SchedulerParameters=sched_interval=5"
    echo "SlurmdParameters=config_overrides"
    echo "ReturnToService=2"
    echo "JobRequeue=1"
    echo "FirstJobId=${FIRST_JOB_ID}"
    echo "KillWait=60"
    echo "MinJobAge=600"
    echo "InactiveLimit=0"
    echo "Waittime=0"
    echo "MessageTimeout=30"
    echo "SlurmctldTimeout=60"
    echo "SlurmdTimeout=120"
    echo "StateSaveLocation=$DIR/state"
    echo "SlurmdSpoolDir=$DIR/spool/%n"
    echo "SlurmctldPidFile=$DIR/run/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/run/slurmd.%n.pid"
    echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$DIR/log/slurmd.%n.log"
    echo "SlurmctldDebug=info"
    echo "SlurmdDebug=info"
    for i in "${!NODES[@]}"; do
      echo "NodeName=${NODES[$i]} NodeAddr=127.0.0.1 NodeHostname=${NODES[$i]} Port=${NODE_PORTS[$i]} CPUs=${CPUS} State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  } > "$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
  rm -f "$DIR/cgroup.conf"  # no cgroup.conf: proctrack/linuxproc + task/none need no cgroups
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0
  fi
  mkdir -p /run/munge
  chown munge:munge /run/munge 2>/dev/null || true
  chmod 755 /run/munge
  [ -s /etc/munge/munge.key ] || { mungekey --create --force >/dev/null 2>&1 || \
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 600 /etc/munge/munge.key
  if id munge >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    runuser -u munge -- /usr/sbin/munged --force || die "munged failed to start (see /var/log/munge/munged.log)"
  else
    /usr/sbin/munged --force || die "munged failed to start (see /var/log/munge/munged.log)"
  fi
  local t
  for t in $(seq 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "munged does not answer (see /var/log/munge/munged.log)"
}

wait_idle() {
  local t out
  for t in $(seq 120); do
    out="$(sinfo -h -N -o '%N %t' 2>/dev/null || true)"
    if [ "$(echo "$out" | grep -cE ' (idle|mix|alloc)$')" -ge "${#NODES[@]}" ]; then
      log "cluster up: $(echo "$out" | tr '\n' ' ')"
      return 0
    fi
    # nodes that were left down/drained by an earlier run are resumed
    if echo "$out" | grep -qE ' (down|drain|drng)\*?$'; then
      scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume >/dev/null 2>&1 || true
    fi
    sleep 1
  done
  tail -n 20 "$DIR/log/slurmctld.log" >&2 || true
  die "nodes did not become idle within 120 s (sinfo: $out); logs in $DIR/log"
}

start() {
  install_packages
  ensure_hosts
  write_conf
  start_munge
  if ! pid_alive "$DIR/run/slurmctld.pid"; then
    # -i: ignore state the previous run could not save cleanly; jobs of an old run are dropped
    slurmctld -f "$CONF" -i || die "slurmctld failed to start; see $DIR/log/slurmctld.log"
  fi
  local n
  for n in "${NODES[@]}"; do
    if ! pid_alive "$DIR/run/slurmd.$n.pid"; then
      mkdir -p "$DIR/spool/$n"
      slurmd -f "$CONF" -N "$n" || die "slurmd -N $n failed to start; see $DIR/log/slurmd.$n.log"
    fi
  done
  wait_idle
  echo "export SLURM_CONF=$CONF OMPI_MCA_btl=self,tcp"
}

stop() {
  local f pid t left
  # cancel this cluster's jobs first, so their processes end under slurmstepd's control
  if pid_alive "$DIR/run/slurmctld.pid"; then
    scancel --full --quiet --user="$(id -un)" >/dev/null 2>&1 || true
    for t in $(seq 30); do
      [ -z "$(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  for f in "$DIR"/run/slurmd.*.pid "$DIR/run/slurmctld.pid"; do
    [ -f "$f" ] || continue
    pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for t in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
  # step daemons of this cluster (found by the SLURM_CONF in their environment) outlive a killed
  # slurmd and ignore SIGTERM while they retry to reach it: SIGTERM, then SIGKILL
  _stepds() {
    for pid in $(pgrep -x slurmstepd 2>/dev/null || true); do
      if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$CONF"; then echo "$pid"; fi
    done
    return 0   # (set -e: a last non-matching pid must not end the script)
  }
  left="$(_stepds)"
  [ -n "$left" ] && kill $left 2>/dev/null || true
  for t in $(seq 10); do left="$(_stepds)"; [ -z "$left" ] && break; sleep 0.3; done
  [ -n "$left" ] && kill -9 $left 2>/dev/null || true
  log "stopped (state kept in $DIR; munged left running for other users)"
}

status() {
  local up=0 n
  pid_alive "$DIR/run/slurmctld.pid" && echo "slurmctld: running (pid $(cat "$DIR/run/slurmctld.pid"))" || { echo "slurmctld: stopped"; up=1; }
  for n in "${NODES[@]}"; do
    pid_alive "$DIR/run/slurmd.$n.pid" && echo "slurmd $n: running (pid $(cat "$DIR/run/slurmd.$n.pid"))" || { echo "slurmd $n: stopped"; up=1; }
  done
  [ $up = 0 ] && sinfo -N 2>/dev/null || true
  return $up
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF OMPI_MCA_btl=self,tcp" ;;
  *) die "unknown command '$cmd'; use start | stop | status | env [STATE_DIR]" ;;
esac
