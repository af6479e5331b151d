#!/usr/bin/env bash
# The run that produces the stored outputs of the book, on the GPU runner:
# executes every notebook in notebooks/ in place, packs the executed notebooks
# into $OUT/notebooks.tar (when OUT is set), then checks them with nbval and
# with the stored-output lint. The packed notebooks are what gets committed.
#
# Needs torch, matplotlib, einops and pytest, plus nbclient, nbval and
# ipykernel: when these three are missing, they are installed from the wheels
# in .whl/ at the repository's root (a runner without network).
# Works on a CPU too, but the stored outputs of the book come from a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/runner_env.sh
# The kernels import flashattn from this checkout, installed or not.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Build matplotlib's font cache now, so that its message never lands in a stored output.
"$py" -c "import matplotlib.pyplot"
"$py" -c "import torch; print('executing on', torch.cuda.get_device_name() if torch.cuda.is_available() else 'the CPU (no GPU found)')"

status=0
"$py" scripts/execute_notebooks.py notebooks/*.ipynb || status=$?

# packed even when a chapter failed: its error is in its outputs, to be read
if [ -n "${OUT:-}" ]; then
    tar -cf "$OUT/notebooks.tar" notebooks/*.ipynb
    echo "packed the executed notebooks into \$OUT/notebooks.tar"
fi
[ "$status" -eq 0 ] || exit "$status"

"$py" -m pytest -p no:cacheprovider --nbval --nbval-current-env \
    --nbval-sanitize-with notebooks/nbval_sanitize.cfg notebooks
"$py" -m pytest -p no:cacheprovider tests/test_notebook_outputs.py
