#!/usr/bin/env bash
# Start CoRGI Chat: create or update .venv when needed, load the model, serve the web UI.
# Usage: ./launch_chatbot.sh [--config FILE] [--model ID_OR_PATH] [--host H] [--port N]
# Default: http://127.0.0.1:7860 with configs/default.yaml (the tiny random-weight model).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv"

PYTHON=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  echo "launch_chatbot: creating $venv ..." >&2
  "$PYTHON" -m venv "$venv"
fi
# Reinstall only when requirements.txt changed since the last successful install (its own
# stamp: run_tests.sh hashes the test requirements too).
stamp="$venv/.requirements-app.sha"
want=$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "launch_chatbot: installing requirements.txt (first run or it changed) ..." >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$venv/bin/python" -m pip install -q -r "$here/requirements.txt"
  echo "$want" > "$stamp"
fi

# No cd: relative --config / --model paths stay relative to where the user is.
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/python" -m chatbot "$@"
