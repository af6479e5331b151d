#!/usr/bin/env bash
# The book command: installs what the book needs (scripts/install.sh), then
# builds the site into _build/html from the notebooks' stored outputs (nothing
# is executed). Runs `jupyter-book build . -W -n --keep-going`: any warning, a
# broken reference included, fails the build. --all rebuilds every page, so
# that no warning hides in a page cached by an earlier build.
#
# --no-install skips the installation (scripts/test.sh has done it).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
if [ "${1:-}" != --no-install ]; then
    bash scripts/install.sh
fi
# jupyter-book of the same Python that install.sh installed into
"$py" -c 'import sys; from jupyter_book.cli.main import main; sys.exit(main())' \
    build . --all -W -n --keep-going
