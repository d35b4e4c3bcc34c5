#!/usr/bin/env bash
# Runs scripts/make_shape_models.py in its own venv (gguf, numpy, safetensors from PyPI), made
# on first use at ${RETUNE_HOME:-$HOME/.cache/retune}/tools-venv.
#
# Usage: scripts/make_shape_models.sh ARGS...   (see the usage at the top of the .py; e.g.
#   scripts/make_shape_models.sh --shape llama3-8b --format gguf --quant q4_0 --out 8b.gguf)
set -euo pipefail
VENV=${RETUNE_HOME:-$HOME/.cache/retune}/tools-venv
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import gguf, numpy, safetensors' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q gguf numpy safetensors
fi
exec "$VENV/bin/python" "$(dirname "$0")/make_shape_models.py" "$@"
