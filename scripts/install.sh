#!/usr/bin/env bash
# Installs the package (editable) and everything the book and the tests need
# into the current Python environment. A torch that is already installed is
# kept (on Colab it must not be replaced); without one, torch 2.13.0 is
# installed, which on the project's CPU machines is the CPU build on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install --quiet torch==2.13.0
fi
"$py" -m pip install --quiet -r requirements.txt -e .
