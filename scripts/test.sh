#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, then runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
bash scripts/install.sh
"$py" -m pytest tests
