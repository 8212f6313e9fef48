# Source me: creates or reuses the project's virtual environment (.venv) and installs
# requirements.txt into it. torch is installed first and alone so that nothing later can pull
# a different (CUDA) build; deepspeed then builds against it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${INFOTOK_VENV:-$ROOT/.venv}"
STAMP="$VENV/.requirements.sha256"
want="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
if [[ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]]; then
    echo "[env] installing requirements into $VENV" >&2
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "$(grep -E '^torch==' "$ROOT/requirements.txt")"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/requirements.txt"
    echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/infotok/torch_extensions}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
cd "$ROOT"
