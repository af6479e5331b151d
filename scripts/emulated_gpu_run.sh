#!/usr/bin/env bash
# On the GPU runner: executes every chapter as a reader on a Colab T4 and on a Colab A100 would
# see it, through the emulation of scripts/emulate/sitecustomize.py (the capability, name and
# memory of that GPU, and its memory as a cap). The executed notebooks go to a temporary folder;
# the record of each run (commit, versions, per chapter: finished or the cell that raised, and the
# lines printed for what was skipped) is written to $OUT/emulated-<gpu>.json, or to
# results/ here when OUT is unset.
#
#   bash scripts/emulated_gpu_run.sh [t4] [a100]
#
# Needs nbclient and ipykernel (installed from .whl/ when missing, as scripts/gpu_notebooks.sh does).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ! "$py" -c "import nbclient, ipykernel" 2>/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/scripts/emulate:$PWD${PYTHONPATH:+:$PYTHONPATH}
"$py" -c "import matplotlib.pyplot"
out=${OUT:-results}
mkdir -p "$out"
status=0
for gpu in "${@:-t4 a100}"; do
    for g in $gpu; do
        echo "== chapters on an emulated $g"
        executed=$(mktemp -d)
        FLASHATTN_EMULATE_GPU=$g FLASHATTN_EMULATE_STRICT=1 "$py" scripts/execute_notebooks.py \
            --out "$executed" --report "$out/emulated-$g.json" notebooks/*.ipynb || status=1
        rm -rf "$executed"
    done
done
exit $status
