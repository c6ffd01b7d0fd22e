#!/usr/bin/env bash
# The main job: set up, then execute the notebooks with their full default parameters, in place
# (outputs, figures in images/, results in outputs/), and refresh README's results table.
# Usage: bash scripts/run_series.sh [NN ...]   e.g. "03 07" runs only those; default: all, in order.
# Extra papermill arguments go in PAPERMILL_ARGS, e.g. PAPERMILL_ARGS="-p DEVICE cuda".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-dev.txt
# Offline machines of this project: unpack the real CIFAR-10 copy beside the checkout, if there is one.
if [ ! -f data/cifar-10-batches-py/test_batch ] && [ -f ../shared/data/cifar10-jpeg-pack.npz ]; then
  "$VENV/bin/python" ../shared/tools/cifar10_unpack.py data
fi
numbers=("$@")
[ ${#numbers[@]} -gt 0 ] || numbers=(01 02 03 04 05 06 07)
for n in "${numbers[@]}"; do
  for nb in notebooks/"$n"_*.ipynb; do
    echo "=== $nb"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m papermill "$nb" "$nb" --cwd notebooks -k python3 ${PAPERMILL_ARGS:-}
  done
done
"$VENV/bin/python" scripts/update_readme.py
