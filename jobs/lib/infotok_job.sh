# shellcheck shell=bash
# The launch logic shared by jobs/infotok_{showo2,harmon,openuni}.sh (sourced, not run).
#
# One attempt of a job = preflight -> `srun python -m pipeline.train` (one task per GPU) -> decide:
#   trainer exit 0   finished: the job ends COMPLETED and is never requeued;
#   trainer exit 75  stopped after a checkpoint: `scontrol requeue` this job; the next attempt
#                    resumes with resume=auto. At most INFOTOK_MAX_RESTARTS requeues per job;
#   trainer exit 74  a checkpoint could not be written (disk full): FAILED, never requeued (the
#                    next attempt would fill the same disk); `latest` names the last complete one;
#   trainer exit 69  a rank died or froze; the watchdog names it (see below);
#   anything else    a crash: the job ends FAILED (exit 69 and the rest are requeued only with
#                    INFOTOK_REQUEUE_ON_CRASH=1, within the same bound, so a deterministic crash
#                    cannot loop);
#   preflight fails  one line saying why; the job ends FAILED with exit 78, never requeued.
#
# Signals. The scripts ask for `--signal=B:USR1@900`: SLURM sends USR1 to this batch shell only
# (B:), 15 minutes before the time limit; `scancel --batch --signal=USR1 JOB` does the same by
# hand. The shell forwards INFOTOK_STOP_SIGNAL (USR2) to srun, which passes it on to every task;
# the trainer listens for it (checkpoint.stop_signals), every rank agrees at the next step
# boundary, saves, and exits 75. Why these signals:
#   - The tasks never see USR1: NCCL 2.12 grabbed SIGUSR1 in its proxy thread (NVIDIA/nccl#704),
#     and NCCL_PROXY_DUMP_SIGNAL can still bind it (or USR2: then this script refuses to start).
#   - Not TERM: srun answers TERM by SIGKILLing the tasks ("forcing job termination"), and SLURM
#     sends TERM (then KILL after KillWait) on scancel, preemption and the time limit anyway.
# A TERM reaching this shell therefore means SLURM is ending the job (a user's scancel, the limit,
# preemption): nothing is forwarded and nothing is requeued here; the last complete checkpoint
# stands, and a scheduler with PreemptMode=REQUEUE requeues preempted jobs itself.
#
# A dead or frozen rank. The trainer's watchdog (pipeline/watchdog.py) ends every rank that waits
# for it, within watchdog.step_timeout_s (default 60 s) of the stuck step, and the first rank to
# notice writes RUN_DIR/heartbeats/FAULT naming the rank and host. While srun runs, this shell
# polls that file; when it appears, it logs it, sends SIGCONT to the job's tasks (a stopped task
# then runs its own watchdog: it dumps its stacks and exits), and, if srun is still running
# INFOTOK_FAULT_GRACE seconds later (default 30), ends the step (srun answers TERM by killing the
# tasks). The crash policy below then applies.
#
# Settings (environment variables; sbatch exports the submitting shell's environment):
#   INFOTOK_RECIPE          recipe YAML (default: the script's recipe, e.g. configs/showo2_1.5b.yaml)
#   INFOTOK_RUN_DIR         run_dir=... (default: the recipe's run_dir)
#   INFOTOK_I2T, INFOTOK_T2I  comma-separated data_prep dirs, each DIR[:weight] -> data.i2t / data.t2i
#   INFOTOK_MODEL_PATH, INFOTOK_TOKENIZER_PATH, INFOTOK_VAE_PATH  -> model.path / tokenizer_path / vae_path
#   INFOTOK_RESUME          auto (default) | none | a checkpoint path, for the first attempt; requeued
#                           attempts use auto once the run dir holds a checkpoint
#   INFOTOK_OVERRIDES       extra key=value overrides (whitespace-separated); the script's own
#                           arguments (`sbatch jobs/infotok_showo2.sh optim.lr=1e-6`) come last and win
#   INFOTOK_MAX_RESTARTS    requeues allowed per job, counted by SLURM_RESTART_COUNT (default 20)
#   INFOTOK_REQUEUE_ON_CRASH  1: requeue after a crash too, within INFOTOK_MAX_RESTARTS (default 0)
#   INFOTOK_STOP_SIGNAL     signal forwarded to the trainer (default USR2)
#   INFOTOK_WORKDIR         directory the job runs in; relative paths resolve here (default: checkout)
#   INFOTOK_PYTHON          interpreter (default: the checkout's .venv/bin/python, else python3)
#   INFOTOK_MASTER_ADDR, INFOTOK_MASTER_PORT  rendezvous (default: first node; 20000 + job id % 12000)
#   INFOTOK_SRUN_ARGS       extra srun flags (e.g. "--cpu-bind=cores --mpi=pmix")
#   INFOTOK_STEP_GRACE      seconds srun lets the other tasks run once one has exited (default 300)
#   INFOTOK_FAULT_GRACE     seconds between a watchdog FAULT report and ending the step (default 30)
#   INFOTOK_GPU_MEMORY_GIB  memory per GPU the preflight plans for (default: the batch host's GPU)
#   INFOTOK_SKIP_PREFLIGHT  1: skip the preflight (debugging only)
#   INFOTOK_TRAIN_MODULE    module srun runs (default pipeline.train; for wrappers/profilers)
#   NCCL_*, TORCH_NCCL_*, OMP_NUM_THREADS: the defaults below apply only where unset.

EXIT_STOPPED=75         # trainer: stopped after a checkpoint, resume me (EX_TEMPFAIL)
EXIT_SAVE_FAILED=74     # trainer: a checkpoint could not be written (EX_IOERR); never requeued
EXIT_PREFLIGHT=78       # this job: configuration/preflight failure, do not requeue (EX_CONFIG)

_infotok_step_pid=""
_infotok_stop_signal=USR2
_infotok_stop_requested=0
_infotok_terminated=0
_infotok_requeued=0

infotok_log() { printf '[infotok-job %(%F %T)T] %s\n' -1 "$*"; }

# The warning signal: ask the running training step to checkpoint and stop.
_infotok_on_usr1() {
    _infotok_stop_requested=1
    if [[ -n "$_infotok_step_pid" ]] && kill -0 "$_infotok_step_pid" 2>/dev/null; then
        infotok_log "SIGUSR1: forwarding SIG$_infotok_stop_signal to the training step (srun pid $_infotok_step_pid) to checkpoint and stop"
        kill -s "$_infotok_stop_signal" "$_infotok_step_pid" 2>/dev/null || true
    else
        infotok_log "SIGUSR1 before training started: will requeue without training"
    fi
}

# SLURM is ending the job (scancel, time limit, preemption): remember it, forward nothing.
_infotok_on_term() {
    (( _infotok_requeued )) && return 0  # our own requeue is ending this attempt
    _infotok_terminated=1
    infotok_log "SIGTERM: SLURM is ending this job (cancel, time limit or preemption); not requeueing"
}

# YAML flow list of quoted strings from "a,b:0.5" (quoted so that DIR:weight stays one string).
_infotok_yaml_list() {
    local IFS=, item out=""
    for item in $1; do
        [[ -n "$item" ]] || continue
        out+="${out:+, }\"$item\""
    done
    printf '[%s]' "$out"
}

# A job requeued onto another task count (e.g. `scontrol update JobId=J NumTasks=8 ...` while it
# is pending) keeps the first attempt's SLURM_NTASKS, but SLURM_TASKS_PER_NODE describes this
# allocation ("8(x2)", "2,1"). srun, the preflight and the trainer's world size all follow
# SLURM_NTASKS, so it is set from the allocation; the trainer then resumes on the new number of
# ranks with the run's global batch (see README, "Elastic resume").
_infotok_sync_task_count() {
    local spec="${SLURM_TASKS_PER_NODE:-}" total=0 part count times
    [[ -n "$spec" ]] || return 0
    local -a parts
    IFS=, read -r -a parts <<< "$spec"
    for part in "${parts[@]}"; do
        count="${part%%(*}"
        times=1
        if [[ "$part" == *"(x"* ]]; then times="${part#*(x}"; times="${times%)}"; fi
        total=$(( total + count * times ))
    done
    if [[ "${SLURM_NTASKS:-}" != "$total" ]]; then
        infotok_log "this attempt's allocation has $total task(s) ($spec per node)," \
            "not SLURM_NTASKS=${SLURM_NTASKS:-unset}: running $total"
        export SLURM_NTASKS="$total" SLURM_NPROCS="$total"
        if (( ${#parts[@]} == 1 )); then
            export SLURM_NTASKS_PER_NODE="${parts[0]%%(*}"
        else
            unset SLURM_NTASKS_PER_NODE
        fi
    fi
}

# Until the training step (srun, $_infotok_step_pid) ends. Polls the watchdog's FAULT file (arg 1,
# may be empty): once it appears, shows it, resumes stopped tasks so that they dump their stacks
# and exit, and ends the step if it still runs INFOTOK_FAULT_GRACE seconds later. Sleeps in the
# background so that the USR1/TERM traps run at once.
_infotok_watch_step() {
    local fault="$1" grace="${INFOTOK_FAULT_GRACE:-30}" seen_at="" ended=0
    while kill -0 "$_infotok_step_pid" 2>/dev/null; do
        if [[ -z "$seen_at" && -n "$fault" && -s "$fault" ]]; then
            seen_at=$SECONDS
            infotok_log "the watchdog reports a failed rank:"
            sed 's/^/    /' "$fault"
            infotok_log "resuming any stopped task (SIGCONT) so that it dumps its stacks;" \
                "ending the step in ${grace} s if it still runs"
            scancel --signal=CONT "$SLURM_JOB_ID" 2>/dev/null || true
        elif [[ -n "$seen_at" ]] && (( !ended && SECONDS - seen_at >= grace )); then
            ended=1
            infotok_log "the step still runs ${grace} s after the watchdog's report: ending it"
            kill -TERM "$_infotok_step_pid" 2>/dev/null || true
        fi
        sleep 1 &
        wait $! 2>/dev/null || true
    done
}

# Requeue this job unless it has used up its restarts; returns 0 when requeued.
_infotok_requeue() {
    local why="$1" restarts="${SLURM_RESTART_COUNT:-0}" max="${INFOTOK_MAX_RESTARTS:-20}"
    if (( restarts >= max )); then
        infotok_log "NOT requeueing ($why): job already restarted $restarts times (INFOTOK_MAX_RESTARTS=$max); resubmit to continue from the last checkpoint"
        return 1
    fi
    infotok_log "requeueing job $SLURM_JOB_ID ($why; restart $((restarts + 1)) of at most $max)"
    _infotok_requeued=1
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        _infotok_requeued=0
        infotok_log "scontrol requeue failed (submitted with --no-requeue, or JobRequeue=0 here?); resubmit to continue"
        return 1
    fi
    return 0
}

# ------------------------------------------------------------------------------------------------
# Building blocks of the job scripts (infotok_job_main below, jobs/encode_latents.sh).

# infotok_python ROOT: the interpreter the job runs: INFOTOK_PYTHON, else ROOT/.venv/bin/python,
# else python3.
infotok_python() {
    if [[ -n "${INFOTOK_PYTHON:-}" ]]; then
        printf '%s\n' "$INFOTOK_PYTHON"
    elif [[ -x "$1/.venv/bin/python" ]]; then
        printf '%s\n' "$1/.venv/bin/python"
    else
        printf '%s\n' python3
    fi
}

# infotok_site_overrides ARRAY: appends to the array named ARRAY the recipe overrides of the site's
# environment, least specific first: INFOTOK_RUN_DIR, INFOTOK_I2T, INFOTOK_T2I,
# INFOTOK_MODEL_PATH, INFOTOK_TOKENIZER_PATH, INFOTOK_VAE_PATH, then INFOTOK_OVERRIDES.
infotok_site_overrides() {
    local -n _infotok_into="$1"
    if [[ -n "${INFOTOK_RUN_DIR:-}" ]]; then _infotok_into+=("run_dir=$INFOTOK_RUN_DIR"); fi
    if [[ -n "${INFOTOK_I2T:-}" ]]; then
        _infotok_into+=("data.i2t=$(_infotok_yaml_list "$INFOTOK_I2T")")
    fi
    if [[ -n "${INFOTOK_T2I:-}" ]]; then
        _infotok_into+=("data.t2i=$(_infotok_yaml_list "$INFOTOK_T2I")")
    fi
    if [[ -n "${INFOTOK_MODEL_PATH:-}" ]]; then
        _infotok_into+=("model.path=$INFOTOK_MODEL_PATH")
    fi
    if [[ -n "${INFOTOK_TOKENIZER_PATH:-}" ]]; then
        _infotok_into+=("model.tokenizer_path=$INFOTOK_TOKENIZER_PATH")
    fi
    if [[ -n "${INFOTOK_VAE_PATH:-}" ]]; then
        _infotok_into+=("model.vae_path=$INFOTOK_VAE_PATH")
    fi
    if [[ -n "${INFOTOK_OVERRIDES:-}" ]]; then
        local -a _infotok_extra
        read -r -a _infotok_extra <<< "$INFOTOK_OVERRIDES"
        _infotok_into+=("${_infotok_extra[@]}")
    fi
}

# infotok_python_env ROOT: the package imports from any workdir; nothing is downloaded at run
# time; unbuffered output.
infotok_python_env() {
    export PYTHONPATH="$1${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
    export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
    export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/infotok/torch_extensions}"
}

# infotok_rendezvous_env: ranks, rendezvous and NCCL defaults of the step's tasks.
infotok_rendezvous_env() {
    # Ranks come from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS; a RANK or WORLD_SIZE exported from
    # the submitting shell would override them in Python, so drop them.
    unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE
    # Rendezvous: rank 0 runs on the first node. The port is a pure function of the job id, so all
    # tasks and every requeued attempt agree, and it stays below the Linux ephemeral range (32768+)
    # where an outgoing connection could already hold it.
    local -a hosts
    mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" \
        2>/dev/null || hostname)
    local jobnum="${SLURM_JOB_ID:-0}"
    jobnum="${jobnum//[^0-9]/}"
    export MASTER_ADDR="${INFOTOK_MASTER_ADDR:-${hosts[0]}}"
    export MASTER_PORT="${INFOTOK_MASTER_PORT:-$(( 20000 + ${jobnum:-0} % 12000 ))}"
    # NCCL / torch.distributed defaults; whatever the site or the user set wins. NCCL_SOCKET_IFNAME,
    # NCCL_IB_HCA and friends are fabric-specific: set them in the site environment.
    # Async error handling: a failed collective aborts, no silent hang.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"  # patient with busy InfiniBand fabrics
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
}

# infotok_srun_args ARRAY: appends to the array named ARRAY the srun flags every step takes: this
# allocation's task count and CPUs per task (srun >= 22.05 does not inherit sbatch's
# --cpus-per-task), then INFOTOK_SRUN_ARGS.
infotok_srun_args() {
    local -n _infotok_args="$1"
    if [[ -n "${SLURM_NTASKS:-}" ]]; then _infotok_args+=("--ntasks=$SLURM_NTASKS"); fi
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        _infotok_args+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
    fi
    if [[ -n "${INFOTOK_SRUN_ARGS:-}" ]]; then
        local -a _infotok_site
        read -r -a _infotok_site <<< "$INFOTOK_SRUN_ARGS"
        _infotok_args+=("${_infotok_site[@]}")
    fi
}

# infotok_job_main FAMILY DEFAULT_RECIPE [key=value ...]: one attempt; returns the job's exit code.
infotok_job_main() {
    local family="$1" default_recipe="$2"
    shift 2
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    local workdir="${INFOTOK_WORKDIR:-$root}"
    local recipe="${INFOTOK_RECIPE:-$default_recipe}"
    local py
    py="$(infotok_python "$root")"
    local restarts="${SLURM_RESTART_COUNT:-0}"
    _infotok_stop_signal="${INFOTOK_STOP_SIGNAL:-USR2}"
    _infotok_stop_signal="${_infotok_stop_signal#SIG}"

    trap _infotok_on_usr1 USR1
    trap _infotok_on_term TERM

    _infotok_sync_task_count
    infotok_log "job ${SLURM_JOB_ID:-?} ($family) attempt $((restarts + 1)) (SLURM_RESTART_COUNT=$restarts) on ${SLURM_JOB_NODELIST:-$(hostname)}: ${SLURM_NNODES:-1} node(s) x ${SLURM_NTASKS_PER_NODE:-?} task(s); recipe $recipe; workdir $workdir"

    cd "$workdir" || return "$EXIT_PREFLIGHT"
    if [[ ! -f "$recipe" ]]; then
        echo "preflight: FAILED: recipe $recipe does not exist in $workdir (set INFOTOK_RECIPE; recipes live in configs/)"
        infotok_log "preflight failed: not training, not requeueing (exit $EXIT_PREFLIGHT)"
        return "$EXIT_PREFLIGHT"
    fi
    local stop_signum
    if ! stop_signum="$(kill -l "$_infotok_stop_signal" 2>/dev/null)"; then
        echo "preflight: FAILED: INFOTOK_STOP_SIGNAL=$_infotok_stop_signal is not a signal name"
        return "$EXIT_PREFLIGHT"
    fi
    if [[ "${NCCL_PROXY_DUMP_SIGNAL:-}" == "$stop_signum" ]]; then
        echo "preflight: FAILED: NCCL_PROXY_DUMP_SIGNAL=$stop_signum would swallow the stop signal SIG$_infotok_stop_signal; unset it or change INFOTOK_STOP_SIGNAL"
        return "$EXIT_PREFLIGHT"
    fi

    # Overrides, least specific first (the trainer applies them in order, the last one wins):
    # the stop signals, the site's environment, INFOTOK_OVERRIDES, then the script's arguments.
    local -a overrides=("checkpoint.stop_signals=[SIG$_infotok_stop_signal, SIGTERM]")
    infotok_site_overrides overrides
    overrides+=("$@")
    infotok_python_env "$root"

    # Preflight on the batch host before any GPU work: one line and no requeue on failure.
    local envfile run_dir=""
    envfile="$(mktemp "${TMPDIR:-/tmp}/infotok-preflight.XXXXXX")"
    if [[ "${INFOTOK_SKIP_PREFLIGHT:-0}" != 1 ]]; then
        if ! "$py" -m pipeline.preflight --config "$recipe" --family "$family" --env-out "$envfile" \
                -- "${overrides[@]}"; then
            rm -f "$envfile"
            infotok_log "preflight failed: not training, not requeueing (exit $EXIT_PREFLIGHT)"
            return "$EXIT_PREFLIGHT"
        fi
        run_dir="$(sed -n 's/^run_dir=//p' "$envfile")"
    fi
    rm -f "$envfile"

    # The first attempt honours INFOTOK_RESUME; a requeued one continues from the run dir's own
    # newest checkpoint once there is one, not from the original path again.
    local resume="${INFOTOK_RESUME:-auto}"
    if (( restarts > 0 )) && [[ "$resume" != auto && "$resume" != none ]] \
            && [[ -z "$run_dir" || -f "$run_dir/checkpoints/latest" ]]; then
        resume=auto
    fi

    if (( _infotok_terminated )); then return "$EXIT_STOPPED"; fi
    if (( _infotok_stop_requested )); then
        _infotok_requeue "warning signal before training started" && return 0
        return "$EXIT_STOPPED"
    fi

    infotok_rendezvous_env

    # --kill-on-bad-exit=0: exit 75 is non-zero too, and the first rank done with its save must not
    # kill the others mid-save; --wait bounds how long a crashed rank can leave the others hanging.
    local -a srun_args=(--kill-on-bad-exit=0 "--wait=${INFOTOK_STEP_GRACE:-300}")
    infotok_srun_args srun_args
    # A FAULT report of an earlier attempt is not about this one.
    if [[ -n "$run_dir" ]]; then rm -f "$run_dir/heartbeats/FAULT"; fi
    local -a cmd=(srun "${srun_args[@]}" "$py" -m "${INFOTOK_TRAIN_MODULE:-pipeline.train}"
                  --config "$recipe" "resume=$resume" "${overrides[@]}")
    infotok_log "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT; running: ${cmd[*]}"

    # srun runs in the background so that this shell takes signals while it waits (bash runs a
    # trap only after a foreground child has exited).
    "${cmd[@]}" &
    _infotok_step_pid=$!
    # A warning signal that came while srun was starting had nothing to forward to yet.
    if (( _infotok_stop_requested )); then kill -s "$_infotok_stop_signal" "$_infotok_step_pid" 2>/dev/null || true; fi
    _infotok_watch_step "${run_dir:+$run_dir/heartbeats/FAULT}"
    local rc=0
    wait "$_infotok_step_pid" || rc=$?
    _infotok_step_pid=""

    if (( rc == 0 )); then
        infotok_log "training finished (exit 0): not requeueing"
        return 0
    fi
    if (( _infotok_terminated )); then
        infotok_log "training ended (exit $rc) while SLURM ends the job: not requeueing"
        return "$rc"
    fi
    if (( rc == EXIT_SAVE_FAILED )); then
        infotok_log "a checkpoint could not be written (exit $EXIT_SAVE_FAILED, see the checkpoint" \
            "line above): not requeueing into the same full disk; free space and resubmit to" \
            "resume from the last complete checkpoint"
        return "$rc"
    fi
    if (( rc == EXIT_STOPPED )); then
        infotok_log "trainer saved a checkpoint and stopped (exit 75)"
        _infotok_requeue "stopped after a checkpoint" && return 0
        return "$EXIT_STOPPED"
    fi
    if (( _infotok_stop_requested && rc == 128 + stop_signum )); then
        # The stop signal ended a rank before the trainer had installed its handler (start-up):
        # nothing was trained since the last complete checkpoint, which is still the one to resume.
        infotok_log "the stop signal ended the trainer during start-up (exit $rc): the last checkpoint stands"
        _infotok_requeue "stopped during start-up" && return 0
        return "$EXIT_STOPPED"
    fi
    infotok_log "training FAILED (exit $rc)"
    if [[ "${INFOTOK_REQUEUE_ON_CRASH:-0}" == 1 ]]; then
        _infotok_requeue "crash, INFOTOK_REQUEUE_ON_CRASH=1" && return 0
    else
        infotok_log "not requeueing a crash (INFOTOK_REQUEUE_ON_CRASH=1 would, within INFOTOK_MAX_RESTARTS); resubmit to resume from the last checkpoint"
    fi
    return "$rc"
}
