#!/usr/bin/env bash
# The test command: a virtual environment with the requirements, then ruff and pytest (what CI runs).
# Usage: bash scripts/test.sh [pytest args]    (VENV=path picks the environment; default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-dev.txt
"$VENV/bin/python" -m ruff check .
"$VENV/bin/python" -m pytest -q "$@"
