#!/usr/bin/env bash
# Executes the chapters that use Triton as one kind of reader would, on the CPU, in a virtual
# environment of that reader's packages, and fails when a cell raises:
#
#   bash scripts/reader_env.sh no-triton    # torch without triton: macOS, a CPU-only install
#   bash scripts/reader_env.sh old-triton   # triton 3.6: compiles the kernels, too old for the interpreter
#
# A chapter there must finish, printing one line for each part it skips (what, why, and what would
# run it). The environment is made on first use under $READER_ENV_ROOT (default .reader-envs/ at the
# repository's root) and reused after; the executed notebooks go to a temporary folder, never over
# the chapters' stored outputs. CHAPTERS (space-separated notebook names) overrides the chapters.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh

reader=${1:-}
case $reader in
    no-triton) extra=() ;;
    old-triton) extra=("triton==3.6.0") ;;
    *) echo "usage: bash scripts/reader_env.sh no-triton|old-triton" >&2; exit 2 ;;
esac
chapters=${CHAPTERS:-"08_the_module 09_triton_kernel 10_performance 11_decoding 12_ring_attention 13_flashattention3"}

root=${READER_ENV_ROOT:-$PWD/.reader-envs}
venv=$root/$reader
torch_version=$("$py" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import flashattn, nbclient, ipykernel" 2>/dev/null; then
    echo "== making the $reader environment in $venv (torch $torch_version${extra:+, ${extra[*]}})"
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet "torch==$torch_version" einops numpy "matplotlib>=3.7" \
        nbclient nbformat ipykernel "${extra[@]}"
    "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null \
        || "$venv/bin/python" -m pip install --quiet --no-deps -e .
fi
"$venv/bin/python" - "$reader" <<'PY'
import importlib.util, sys
import torch
triton = importlib.util.find_spec("triton")
if sys.argv[1] == "no-triton":
    assert triton is None, "the no-triton environment has triton"
else:
    import triton
    assert tuple(int(n) for n in triton.__version__.split(".")[:2]) < (3, 7), triton.__version__
print(f"{sys.argv[1]}: torch {torch.__version__}, triton {'absent' if triton is None else __import__('triton').__version__}")
PY

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
paths=()
for chapter in $chapters; do
    paths+=("notebooks/$chapter.ipynb")
done
"$venv/bin/python" -c "import matplotlib.pyplot"  # the font cache, once, outside the chapters
"$venv/bin/python" scripts/execute_notebooks.py --out "$out" --report "${READER_REPORT:-$out/report.json}" "${paths[@]}"
