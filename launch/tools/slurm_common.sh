# Shared body of the training launchers (launch/xlmr_base.slurm, launch/xlmr_large.slurm,
# launch/scaling_study.slurm); sourced from the repository root inside the batch script.
#
# xlmr_slurm_train [--preset NAME | --config FILE.yaml] [key=value ...]   (CONFIG=preset:NAME works too)
#   1. checks it runs inside a SLURM allocation and names the job, restart count and nodes;
#   2. sources launch/nccl.env (NCCL settings in one place);
#   3. MASTER_ADDR = first node of the allocation, MASTER_PORT = 10000 + f(job id, restart);
#   4. validates the layout with launch/tools/check_layout.py on this node, before srun starts
#      anything (a bad layout exits 2 here), and records the resolved config, the code commit and
#      the command in RUN_DIR/launch/job-<id>-r<restart>/; then builds the job's rank 0 at the full
#      world size on this node's CPU (`python -m xlmr_mp.train --dry-run`, xlmr_mp/dry_run.py);
#   5. srun: one task per GPU (--ntasks-per-node of the allocation), rank/local rank/world size
#      read by the trainer from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS;
#   6. exit code 75 from the trainer (it caught SIGUSR1/SIGTERM and saved a checkpoint) ->
#      `scontrol requeue $SLURM_JOB_ID`: the job goes back to the queue and, when it starts again,
#      the trainer resumes from CKPT_DIR/latest. Not when SLURM already requeued the job itself
#      (`scontrol requeue`, preemption), nor when the job is no longer RUNNING: `scancel` (or the
#      hard time limit) ends it, with the checkpoint saved. Any other non-zero code fails the job.
# Precedence of options: preset YAML < the script's DEFAULTS array < key=value arguments of sbatch.
# Environment knobs: CONFIG (preset), PYTHON (interpreter), KILL_ON_BAD_EXIT (default 0: with 1, the first rank to exit 75 would get
# its peers killed mid-exit and the job could not tell a save-and-requeue from a crash),
# XLMR_MP_ROOT (repository, default the submit directory), XLMR_MP_DRY_RUN (1: stop after step 4, having
# validated the layout and written the resolved config, without starting srun), XLMR_MP_DRY_RUN_RANKS
# (the ranks step 4 builds, default 0: R,R,... or all), XLMR_GPU_TYPE (the memory plan's GPU).

xlmr_log() { echo "[launch $(date -u +%Y-%m-%dT%H:%M:%SZ)] $*"; }
xlmr_die() { echo "[launch] ERROR: $*" >&2; exit 2; }

# Port for the rendezvous: the same job id on every node, distinct across concurrent jobs, and a
# different one after a requeue (the previous incarnation's sockets may still be in TIME_WAIT).
# 10000-31999: below Linux's ephemeral range (32768-60999 by default), from which every outgoing TCP
# connection on the node (gloo's, NCCL's bootstrap, anybody's) takes its local port, so a rendezvous
# port there can be taken already (EADDRINUSE at the TCPStore; seen in CI with 42830).
xlmr_master_port() {
  local job="$1" restart="${2:-0}"
  echo $(( 10000 + (job * 10 + restart % 10) % 22000 ))
}

# One field of this job's record in slurmctld (`scontrol show job`), e.g. JobState or Restarts;
# empty when slurmctld cannot be asked.
xlmr_job_field() {
  scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | tr ' ' '\n' | awk -v k="$1=" 'index($0, k) == 1 { print substr($0, length(k) + 1); exit }' || true
}

xlmr_slurm_train() {
  local config="${CONFIG:-}" user=() a
  while [ $# -gt 0 ]; do
    case "$1" in
      --config) [ $# -ge 2 ] || xlmr_die "--config needs a path"; config="$2"; shift 2 ;;
      --config=*) config="${1#--config=}"; shift ;;
      --preset) [ $# -ge 2 ] || xlmr_die "--preset needs a name"; config="preset:$2"; shift 2 ;;
      --preset=*) config="preset:${1#--preset=}"; shift ;;
      *=*) user+=("$1"); shift ;;
      *) xlmr_die "unexpected argument '$1': give options as key.sub=value (e.g. train.micro_batch=8), --preset NAME or --config FILE.yaml" ;;
    esac
  done
  [ -n "${SLURM_JOB_ID:-}" ] || xlmr_die "not inside a SLURM job: submit with sbatch (or use launch/local.sh on one machine)"
  [ -n "$config" ] || xlmr_die "no preset: pass --preset NAME (tiny, base, large, xl, xxl, mmbert_like) or --config FILE.yaml, or set CONFIG"
  local overrides=("${DEFAULTS[@]}" "${user[@]}")
  local restart="${SLURM_RESTART_COUNT:-0}"
  local py="${PYTHON:-python}"
  local nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
  local ntasks="${SLURM_NTASKS:?SLURM_NTASKS is not set: give sbatch --ntasks-per-node (one task per GPU)}"
  local tpn="${SLURM_NTASKS_PER_NODE:-$(( ntasks / nodes ))}"

  xlmr_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) restart ${restart}: ${nodes} nodes [${SLURM_JOB_NODELIST}] x ${tpn} tasks = ${ntasks} processes; submitted from ${SLURM_SUBMIT_DIR:-?}"
  # shellcheck disable=SC1091
  source launch/nccl.env
  export MASTER_ADDR MASTER_PORT
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  [ -n "$MASTER_ADDR" ] || xlmr_die "could not read the first host of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
  MASTER_PORT="$(xlmr_master_port "$SLURM_JOB_ID" "$restart")"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  xlmr_log "rendezvous ${MASTER_ADDR}:${MASTER_PORT}; preset ${config}; overrides: ${overrides[*]}"

  local layout
  layout="$("$py" launch/tools/check_layout.py --config "$config" --world-size "$ntasks" \
            --tasks-per-node "$tpn" --record "job-${SLURM_JOB_ID}-r${restart}" "${overrides[@]}")" \
    || xlmr_die "layout check failed (message above); nothing was started. Fix the options and resubmit."
  echo "$layout" | grep '^#'
  local RUN_DIR CKPT_DIR TP PP DP ACCUM
  eval "$(echo "$layout" | grep -v '^#')"
  xlmr_log "run dir ${RUN_DIR}; checkpoints ${CKPT_DIR}$( [ -f "$CKPT_DIR/latest" ] && echo "; resuming from $(cat "$CKPT_DIR/latest")")"
  # the job's rank 0 built at the job's world size on this node's CPU (fake process groups, model on
  # the meta device, its first samples, its memory plan; xlmr_mp/dry_run.py): one JSON line + summary
  local dry_ranks="${XLMR_MP_DRY_RUN_RANKS:-0}"
  "$py" -m xlmr_mp.train --config "$config" --dry-run --world-size "$ntasks" --tasks-per-node "$tpn" \
      --ranks "$dry_ranks" "${overrides[@]}" \
    || xlmr_die "dry run of rank(s) ${dry_ranks} at world size ${ntasks} failed (message above); nothing was started."
  if [ "${XLMR_MP_DRY_RUN:-0}" = 1 ]; then
    xlmr_log "dry run (XLMR_MP_DRY_RUN=1): the layout is valid; resolved config in ${RUN_DIR}/launch/job-${SLURM_JOB_ID}-r${restart}/config.yaml; srun not started"
    return 0
  fi

  # The batch shell itself may get SIGTERM (scontrol requeue, preemption, time limit) or SIGUSR1
  # (scancel --full): log it and keep waiting, the training step is what saves the checkpoint.
  trap 'xlmr_log "batch shell got SIGTERM; waiting for the training processes to save"' TERM
  trap 'xlmr_log "batch shell got SIGUSR1; waiting for the training processes to save"' USR1

  local cpt=()
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && cpt=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  srun --kill-on-bad-exit="${KILL_ON_BAD_EXIT:-0}" --ntasks="$ntasks" --ntasks-per-node="$tpn" "${cpt[@]}" \
       --export=ALL "$py" -u -m xlmr_mp.train --config "$config" "${overrides[@]}" &
  local pid=$! rc
  while :; do
    wait "$pid"; rc=$?
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" 2>/dev/null; a=$?
      [ "$a" != 127 ] && rc=$a
      break
    fi
  done

  case "$rc" in
    0) xlmr_log "training finished (exit 0)"; return 0 ;;
    75)
      # Who sent the signal decides what comes next. SLURM counts a requeue it made itself
      # (`scontrol requeue`, preemption) in Restarts at once; a job that is no longer RUNNING was
      # cancelled (`scancel`) or reached its hard time limit, and must not come back by itself.
      local state restarts
      state="$(xlmr_job_field JobState)"
      restarts="$(xlmr_job_field Restarts)"
      if [ -n "$restarts" ] && [ "$restarts" -gt "$restart" ]; then
        xlmr_log "training saved a checkpoint on a signal (exit 75); job ${SLURM_JOB_ID} was already requeued by SLURM (restart ${restarts})"
        return 0
      fi
      if [ -n "$state" ] && [ "$state" != RUNNING ]; then
        xlmr_log "training saved a checkpoint on a signal (exit 75); job ${SLURM_JOB_ID} is ${state} (cancelled, or at its hard time limit): not requeueing"
        xlmr_log "to continue, submit the same command again: training resumes from ${CKPT_DIR}/latest"
        exit 75
      fi
      xlmr_log "training saved a checkpoint on a signal (exit 75): requeueing job ${SLURM_JOB_ID}"
      local out
      if out="$(scontrol requeue "$SLURM_JOB_ID" 2>&1)"; then
        sleep 60 & wait $!   # slurm ends this incarnation now
        return 0
      fi
      if echo "$out" | grep -qi "pending"; then   # `scontrol requeue` / preemption already did it
        xlmr_log "job ${SLURM_JOB_ID} was already requeued by SLURM"
        return 0
      fi
      xlmr_log "scontrol requeue: $out"
      xlmr_log "scontrol requeue failed (job submitted with --no-requeue, or requeue disabled on this cluster);"
      xlmr_log "resubmit the same command: training continues from ${CKPT_DIR}/latest"
      exit 75 ;;
    *) xlmr_log "training failed (exit ${rc}); see the messages above"; exit "$rc" ;;
  esac
}
