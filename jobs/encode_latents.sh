#!/bin/bash
# Encode the latent cache of a recipe's datasets on SLURM, before training: every image goes once
# through the recipe's frozen VAE into DATASET/latents/<family>/ (`python -m data_prep encode`, see
# pipeline/encode.py), then `python -m data_prep verify DATASET` checks each encoded dataset.
#
#   sbatch jobs/encode_latents.sh RECIPE [--dataset DIR ...] [--batch-size N] [--overwrite]
#       [key=value ...]
#   INFOTOK_I2T=/data/i2t INFOTOK_T2I=/data/t2i INFOTOK_MODEL_PATH=/ckpt/showo2 \
#       sbatch jobs/encode_latents.sh configs/showo2_1.5b.yaml --batch-size 32
#   sbatch -p PART -A ACCOUNT --nodes=2 jobs/encode_latents.sh configs/harmon_1.5b.yaml
#
# RECIPE is the training recipe (or INFOTOK_RECIPE when the first argument is an option or a
# key=value). The other arguments go to `python -m data_prep encode`; without --dataset it encodes
# the recipe's datasets of the tasks whose images the family's VAE encodes. The training scripts'
# settings apply the same way (INFOTOK_I2T, INFOTOK_T2I, INFOTOK_MODEL_PATH, INFOTOK_VAE_PATH,
# INFOTOK_OVERRIDES, INFOTOK_PYTHON, INFOTOK_WORKDIR, INFOTOK_SRUN_ARGS, INFOTOK_MAX_RESTARTS,
# INFOTOK_REQUEUE_ON_CRASH, ...: see jobs/lib/infotok_job.sh), so that the cache is made with the
# VAE, dtype and preprocessing the training job of the same settings loads; it uses the cache only
# when they match.
#
# Size: 1 node x 8 GPUs, one srun task per GPU. Encoding is one VAE forward per image, a small
# part of a training step, and a 1-node job starts sooner than a 2-node one. Rank r of W encodes
# shards r, r+W, ... and any W writes the same bytes, so --nodes=N (or --ntasks-per-node=N with
# --gres=gpu:N) changes only the speed. The bytes do depend on --batch-size (and, on CPU, on
# --cpus-per-task: torch's threads): keep them when resubmitting an unfinished encode.
#
# Preemption and the time limit: finished shards are kept (each sidecar is written whole, then its
# receipt), and every attempt or resubmission encodes only the rest. --requeue lets SLURM requeue
# the job after a preemption (PreemptMode=REQUEUE) or a node failure; 5 minutes before the time
# limit SLURM sends USR1 to this shell (B:), which ends the encode step and requeues the job
# itself, at most INFOTOK_MAX_RESTARTS (20) times. A failed encode step (a crash, or an input it
# refuses, such as a cache of another VAE without --overwrite) is not requeued unless
# INFOTOK_REQUEUE_ON_CRASH=1.
#
# Exit codes: 0 encoded and verified (or requeued); 78 bad recipe, argument or dataset, found on
# the batch host before any task starts (one `preflight: FAILED:` line; never requeued); 1 verify
# found problems (listed above it); else srun's (rank 0 prints the encode's error line; with
# several ranks srun may report another rank's code, e.g. 143 for the ranks it ended).
#
# Settings of this script only: INFOTOK_ENCODE_MODULE, the module srun runs (default
# pipeline.encode; for wrappers/profilers); INFOTOK_VERIFY=0 skips the verify (it re-reads every
# shard and sidecar of the encoded datasets on the batch host, with all its CPUs).
#SBATCH --job-name=infotok-encode
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=8
#SBATCH --mem-per-cpu=8G
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# SLURM runs a spooled copy of this file, so locate the checkout from the path that was submitted
# (scontrol's Command=), else INFOTOK_ROOT, else the submit directory.
infotok_root="${INFOTOK_ROOT:-}"
if [[ -z "$infotok_root" ]]; then
    submitted="$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null \
        | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')"
    [[ -f "${submitted:-}" ]] || submitted="${BASH_SOURCE[0]}"
    infotok_root="$(cd "$(dirname "$submitted")/.." && pwd)"
    [[ -f "$infotok_root/jobs/lib/infotok_job.sh" ]] || infotok_root="${SLURM_SUBMIT_DIR:-.}"
fi
# shellcheck source=SCRIPTDIR/lib/infotok_job.sh
source "$infotok_root/jobs/lib/infotok_job.sh"

_encode_stop_requested=0

# The warning signal (time limit near): end the encode step, then requeue (see encode_main).
_encode_on_usr1() {
    _encode_stop_requested=1
    if [[ -n "$_infotok_step_pid" ]] && kill -0 "$_infotok_step_pid" 2>/dev/null; then
        infotok_log "SIGUSR1: ending the encode step (srun pid $_infotok_step_pid) to requeue;" \
            "its finished shards are kept"
        kill -TERM "$_infotok_step_pid" 2>/dev/null || true
    else
        infotok_log "SIGUSR1 outside the encode step: requeueing instead of starting it, if it" \
            "has not started yet"
    fi
}

# encode_main [RECIPE] [encode arguments...]: one attempt; returns the job's exit code.
encode_main() {
    local recipe="${INFOTOK_RECIPE:-}"
    if [[ $# -gt 0 && "$1" != -* && "$1" != *=* ]]; then recipe="$1"; shift; fi
    local workdir="${INFOTOK_WORKDIR:-$infotok_root}" py restarts="${SLURM_RESTART_COUNT:-0}"
    py="$(infotok_python "$infotok_root")"
    trap _encode_on_usr1 USR1
    trap _infotok_on_term TERM

    _infotok_sync_task_count
    infotok_log "job ${SLURM_JOB_ID:-?} (encode) attempt $((restarts + 1))" \
        "(SLURM_RESTART_COUNT=$restarts) on ${SLURM_JOB_NODELIST:-$(hostname)}:" \
        "${SLURM_NNODES:-1} node(s) x ${SLURM_NTASKS_PER_NODE:-?} task(s); recipe $recipe;" \
        "workdir $workdir"
    cd "$workdir" || return "$EXIT_PREFLIGHT"
    if [[ -z "$recipe" || ! -f "$recipe" ]]; then
        echo "preflight: FAILED: recipe '$recipe' does not exist in $workdir (usage: sbatch" \
            "jobs/encode_latents.sh RECIPE [encode arguments], or set INFOTOK_RECIPE)"
        infotok_log "preflight failed: not encoding, not requeueing (exit $EXIT_PREFLIGHT)"
        return "$EXIT_PREFLIGHT"
    fi
    # The encode's options, then the site's overrides, then those of the script's arguments
    # (dotted key=value; the last one of a key wins).
    local -a args=(--config "$recipe") user_overrides=()
    local arg
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z_][A-Za-z0-9_.]*= ]]; then
            user_overrides+=("$arg")
        else
            args+=("$arg")
        fi
    done
    infotok_site_overrides args
    args+=("${user_overrides[@]}")
    infotok_python_env "$infotok_root"

    # On the batch host, before any task starts: the recipe and the datasets (for verify too).
    local -a datasets
    local listing
    if ! listing="$("$py" -m pipeline.encode --check "${args[@]}")"; then
        infotok_log "preflight failed: not encoding, not requeueing (exit $EXIT_PREFLIGHT)"
        return "$EXIT_PREFLIGHT"
    fi
    mapfile -t datasets <<< "$listing"
    echo "preflight: ok: $recipe: ${#datasets[@]} dataset(s): ${datasets[*]}"

    if (( _infotok_terminated )); then return "$EXIT_STOPPED"; fi
    if (( _encode_stop_requested )); then
        _infotok_requeue "warning signal before encoding" && return 0
        return "$EXIT_STOPPED"
    fi

    infotok_rendezvous_env
    # --kill-on-bad-exit=1: a failed rank ends the step at once (the others would wait for it in
    # a collective); nothing is lost, a sidecar is whole or absent.
    local -a srun_args=(--kill-on-bad-exit=1)
    infotok_srun_args srun_args
    local -a cmd=(srun "${srun_args[@]}" "$py" -m "${INFOTOK_ENCODE_MODULE:-pipeline.encode}"
                  "${args[@]}")
    infotok_log "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT; running: ${cmd[*]}"
    # In the background, so that this shell runs the USR1/TERM traps while the step runs.
    "${cmd[@]}" &
    _infotok_step_pid=$!
    if (( _encode_stop_requested )); then kill -TERM "$_infotok_step_pid" 2>/dev/null || true; fi
    _infotok_watch_step ""
    local rc=0
    wait "$_infotok_step_pid" || rc=$?
    _infotok_step_pid=""

    if (( rc != 0 )); then
        if (( _infotok_terminated )); then
            infotok_log "encode ended (exit $rc) while SLURM ends the job: not requeueing here"
            return "$rc"
        fi
        if (( _encode_stop_requested )); then
            _infotok_requeue "warning signal during the encode" && return 0
            return "$EXIT_STOPPED"
        fi
        infotok_log "encode FAILED (exit $rc); its finished shards are kept"
        if [[ "${INFOTOK_REQUEUE_ON_CRASH:-0}" == 1 ]]; then
            _infotok_requeue "crash, INFOTOK_REQUEUE_ON_CRASH=1" && return 0
        else
            infotok_log "not requeueing; resubmit to encode the rest"
        fi
        return "$rc"
    fi
    infotok_log "encode finished (exit 0)"
    if [[ "${INFOTOK_VERIFY:-1}" == 0 ]]; then
        infotok_log "INFOTOK_VERIFY=0: not verifying"
        return 0
    fi
    local dataset
    for dataset in "${datasets[@]}"; do
        infotok_log "verifying $dataset"
        if ! "$py" -m data_prep verify "$dataset"; then
            infotok_log "verify FAILED for $dataset (problems above)"
            return 1
        fi
    done
    infotok_log "encoded and verified ${#datasets[@]} dataset(s)"
}

encode_main "$@"
