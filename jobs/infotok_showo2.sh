#!/bin/bash
# InfoTok fine-tuning of Show-o2 on SLURM: 2 nodes x 8 GPUs (the paper's setup), one srun task per
# GPU, DeepSpeed ZeRO-2. Checkpoints and requeues itself ahead of the time limit; each new attempt
# resumes from the newest checkpoint of the run dir.
#
#   sbatch jobs/infotok_showo2.sh [key=value ...]
#   sbatch -p PART -A ACCOUNT --nodes=4 --time=48:00:00 jobs/infotok_showo2.sh optim.lr=5e-7
#   INFOTOK_I2T=/data/i2t INFOTOK_T2I=/data/t2i INFOTOK_MODEL_PATH=/ckpt/showo2 \
#       sbatch jobs/infotok_showo2.sh
#
# GPUs per node: change --gres=gpu:N and --ntasks-per-node=N together. Every setting, its
# environment variable and the exit codes are documented in jobs/lib/infotok_job.sh.
#SBATCH --job-name=infotok-showo2
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=8
#SBATCH --mem-per-cpu=8G
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# SLURM runs a spooled copy of this file, so locate the checkout from the path that was submitted
# (scontrol's Command=), else INFOTOK_ROOT, else the submit directory.
infotok_root="${INFOTOK_ROOT:-}"
if [[ -z "$infotok_root" ]]; then
    submitted="$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')"
    [[ -f "${submitted:-}" ]] || submitted="${BASH_SOURCE[0]}"
    infotok_root="$(cd "$(dirname "$submitted")/.." && pwd)"
    [[ -f "$infotok_root/jobs/lib/infotok_job.sh" ]] || infotok_root="${SLURM_SUBMIT_DIR:-.}"
fi
# shellcheck source=SCRIPTDIR/lib/infotok_job.sh
source "$infotok_root/jobs/lib/infotok_job.sh"
infotok_job_main showo2 configs/showo2_1.5b.yaml "$@"
