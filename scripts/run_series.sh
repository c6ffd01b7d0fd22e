#!/usr/bin/env bash
# The main job: set up, then execute the notebooks with their full default parameters, in place (outputs, figures in
# images/, results in outputs/; each executed notebook gets a banner saying how it was run and keeps no papermill
# cell), and refresh README's results table.
# Usage: bash scripts/run_series.sh [NN ...]   e.g. "03 07" runs only those; default: all, in order.
#        QUICK=1 bash scripts/run_series.sh   every notebook with QUICK = True: the executed copies go to a scratch
#                                              folder, what they write to the sandbox outputs/quick/ and images/quick/
#                                              (never committed; the committed notebooks and results are not touched).
# Changed parameters go in EXECUTE_ARGS, e.g. EXECUTE_ARGS="-p EPOCHS 5" (the banner lists them);
# QUICK=1 passes PAPERMILL_ARGS to papermill the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in -h|--help) sed -n '2,10p' "$0" | cut -c3-; exit 0 ;; esac
for n in "$@"; do  # each argument names one notebook: 01 ... 07
  compgen -G "notebooks/${n}_*.ipynb" > /dev/null || { echo "no notebook numbered '$n' (use 01 ... 07)"; exit 2; }
done
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-dev.txt
# Offline machines of this project: unpack the real CIFAR-10 copy beside the checkout, if there is one.
if [ ! -f data/cifar-10-batches-py/test_batch ] && [ -f ../shared/data/cifar10-jpeg-pack.npz ]; then
  "$VENV/bin/python" ../shared/tools/cifar10_unpack.py data
fi
numbers=("$@")
[ ${#numbers[@]} -gt 0 ] || numbers=(01 02 03 04 05 06 07)
if [ "${QUICK:-0}" = 1 ]; then
  scratch=$(mktemp -d)
  echo "QUICK run into $scratch (a few minutes per notebook on a CPU; the numbers mean nothing)"
  for n in "${numbers[@]}"; do
    for nb in notebooks/"$n"_*.ipynb; do
      echo "=== $nb"
      # shellcheck disable=SC2086
      "$VENV/bin/python" -m papermill "$nb" "$scratch/$(basename "$nb")" --cwd notebooks -k python3 -p QUICK True \
        ${PAPERMILL_ARGS:-}
    done
  done
  echo "done: executed notebooks in $scratch; what they wrote in outputs/quick/ and images/quick/"
  exit 0
fi
needs_gpu=$(printf '%s\n' "${numbers[@]}" | grep -c -v -E '^0[127]$' || true)
if [ "$needs_gpu" -gt 0 ] && ! "$VENV/bin/python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "No CUDA GPU here. The full series trains for hours on a GPU and would take weeks on this CPU"
  echo "(the course's CPU reference run of ResNet18 took 16 to 21 minutes an epoch of 45,000 images on a 2-core"
  echo " Intel Xeon: README, 'Measured runs')."
  echo "Notebooks 01, 02 and 07 (which explains a trained run) need no GPU. Check everything quickly instead:"
  echo "QUICK=1 bash scripts/run_series.sh"
  [ "${FORCE_CPU:-0}" = 1 ] || { echo "(FORCE_CPU=1 runs it anyway)"; exit 1; }
fi
for n in "${numbers[@]}"; do
  for nb in notebooks/"$n"_*.ipynb; do
    echo "=== $nb"
    # shellcheck disable=SC2086
    "$VENV/bin/python" scripts/execute_notebook.py "$nb" ${EXECUTE_ARGS:-}  # in place, with a banner, no papermill cell
  done
done
"$VENV/bin/python" scripts/update_readme.py
