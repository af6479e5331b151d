#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, builds the book with
# no warning allowed, then runs the unit tests and the stored-output lint,
# executes every notebook again on the CPU and compares it with its stored
# outputs (nbval), and opens every page of the built site in headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}

# Installs the package and everything the book and the tests need, then builds
# the site into _build/html.
bash scripts/build_book.sh

# Debian's Chromium and its driver, for the browser check.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "the browser check needs Debian's chromium and chromium-driver: install them" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi

"$py" -m pytest tests

# matplotlib builds its font cache on first import and says so on stderr: do it
# here, not inside a notebook whose outputs are compared.
"$py" -c "import matplotlib.pyplot"
"$py" -m pytest -p no:cacheprovider --nbval --nbval-current-env \
    --nbval-sanitize-with notebooks/nbval_sanitize.cfg notebooks

"$py" tests/browser/check_site.py _build/html
