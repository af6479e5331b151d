#!/usr/bin/env bash
# On the GPU runner: executes every chapter as a reader on a Colab T4 and on a Colab A100 would
# see it, through the emulation of scripts/emulate/sitecustomize.py (the capability, name and
# memory of that GPU, and its memory as a cap). The executed notebooks go to a temporary folder;
# the record of each run (commit, versions, per chapter: finished or the cell that raised, and the
# lines printed for what was skipped) is written to $OUT/emulated-<gpu>.json, or to
# benchmarks/results/ when OUT is unset.
#
#   bash scripts/emulated_gpu_run.sh [t4] [a100]
#
# The GPUs run one after the other, or side by side with PARALLEL=1 (the runner's GPU has the memory
# of both caps); CHAPTERS (notebook names, space-separated) runs only those chapters, and with UPDATE=1
# their results replace theirs in the committed record (execute_notebooks.py --update), the others stay.
#
# Needs nbclient and ipykernel (scripts/runner_env.sh installs them from .whl/ when missing).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/runner_env.sh
export PYTHONPATH=$PWD/scripts/emulate:$PWD${PYTHONPATH:+:$PYTHONPATH}
"$py" -c "import matplotlib.pyplot"
out=${OUT:-benchmarks/results}
mkdir -p "$out"
notebooks=()
if [ -n "${CHAPTERS:-}" ]; then
    for chapter in $CHAPTERS; do notebooks+=("notebooks/$chapter.ipynb"); done
else
    notebooks=(notebooks/*.ipynb)
fi
run() {  # run GPU: every chapter under that GPU's emulation
    local executed
    executed=$(mktemp -d)
    local update=()
    if [ -n "${UPDATE:-}" ]; then
        [ -e "$out/emulated-$1.json" ] || cp "benchmarks/results/emulated-$1.json" "$out/" || return 1
        update=(--update)
    fi
    echo "== chapters on an emulated $1"
    FLASHATTN_EMULATE_GPU=$1 FLASHATTN_EMULATE_STRICT=1 "$py" scripts/execute_notebooks.py "${update[@]}" \
        --out "$executed" --report "$out/emulated-$1.json" "${notebooks[@]}" >"$out/emulated-$1.log" 2>&1
    local rc=$?
    cat "$out/emulated-$1.log"
    rm -rf "$executed"
    return $rc
}
gpus=("$@")
[ ${#gpus[@]} -gt 0 ] || gpus=(t4 a100)
status=0
if [ "${PARALLEL:-0}" = 1 ]; then
    pids=()
    for g in "${gpus[@]}"; do run "$g" & pids+=($!); done
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
else
    for g in "${gpus[@]}"; do run "$g" || status=1; done
fi
exit $status
