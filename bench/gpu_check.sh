#!/usr/bin/env bash
# GPU check at real size (issue 28 item 8): Show-o2 1.5B, Harmon 0.5B and OpenUni-B, one bf16
# training step each with InfoTok off and csa, on one GPU, against the planner's prediction
# (pipeline/plan.py on the host CPU, about a minute per model); sized for an 8-minute slot on one
# H100/H200 (per model: one build, two planner runs, 2 x 9 steps). bench/gpu_check.py's
# docstring says what each figure means.
#
#   bash bench/gpu_check.sh [OUT_DIR] [gpu_check.py flags, e.g. --models harmon --steps 3]
#
# OUT_DIR: where results.json, results.md and log.txt go; default $OUT when set (the output
# folder of the session tool `run` on a lent GPU), else runs/gpu_check. On a lent GPU:
#   run: bash bench/gpu_check.sh "$OUT"
# Extra flags go to gpu_check.py (the test suite passes --smoke: CPU, tiny presets, seconds).
# GPU_CHECK_ARGS, when set, is split into more flags.
#
# Python: $PYTHON, else the project's .venv, else python3. Wheels under .wheels/ (e.g. diffusers,
# which a bare GPU image may lack) are installed into a temporary folder first, without network:
# fetch them where pip works with `pip download --no-deps --only-binary=:all: -d .wheels NAME==V`
# (matching the GPU machine's Python and platform) and carry .wheels along.
# Exit status: gpu_check.py's (non-zero when an entry failed; the others are still reported).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
out="${OUT:-runs/gpu_check}"
if [[ $# -gt 0 && "$1" != -* ]]; then
    out="$1"
    shift
fi
read -r -a extra <<<"${GPU_CHECK_ARGS:-}"

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi

shopt -s nullglob
wheels=(.wheels/*.whl)
if ((${#wheels[@]})); then
    site="$(mktemp -d)"
    trap 'rm -rf "$site"' EXIT
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" \
        "${wheels[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

mkdir -p "$out"
export PYTHONUNBUFFERED=1
"$python" - <<'EOF' 2>&1 | tee "$out/log.txt"
import torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"[gpu_check] torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {gpu}")
EOF
"$python" bench/gpu_check.py --out "$out" "${extra[@]}" "$@" 2>&1 | tee -a "$out/log.txt"
