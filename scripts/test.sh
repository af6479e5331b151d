#!/usr/bin/env bash
# The test command: installs everything on a fresh machine (scripts/install.sh),
# then runs every check, each whether or not the one before passed:
#   1. the book build, with no warning allowed (scripts/build_book.sh);
#   2. the unit tests and the stored-output lint (pytest tests);
#   3. every notebook executed again on the CPU and compared with its stored
#      outputs (nbval);
#   4. the chapters that use Triton executed as two more kinds of reader run them
#      (scripts/reader_env.sh): without triton, and with a triton too old for
#      Triton's interpreter; each in a virtual environment of its own;
#   5. every page of the built site opened in headless Chromium. It needs
#      Debian's chromium and chromium-driver: as root they are installed with
#      apt-get when missing; otherwise the check is reported as not run.
# It ends with a summary and exits non-zero when a check failed or could not run.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh

if ! bash scripts/install.sh; then
    echo "the installation failed: no check was run" >&2
    exit 1
fi

summary=()
passed=0
failed=0
not_run=0
check() {  # check NAME COMMAND...: runs one check and records how it ended
    local name=$1
    shift
    echo "== $name"
    if "$@"; then
        summary+=("ok       $name")
        passed=$((passed + 1))
    else
        summary+=("FAILED   $name")
        failed=$((failed + 1))
    fi
}

check "book build (scripts/build_book.sh)" bash scripts/build_book.sh --no-install

check "unit tests and stored-output lint (pytest tests)" "$py" -m pytest tests

# matplotlib builds its font cache on first import and says so on stderr: do it
# here, not inside a notebook whose outputs are compared.
"$py" -c "import matplotlib.pyplot"
check "notebooks against their stored outputs (pytest --nbval notebooks)" \
    "$py" -m pytest -p no:cacheprovider --nbval --nbval-current-env \
    --nbval-sanitize-with notebooks/nbval_sanitize.cfg notebooks

for reader in no-triton old-triton; do
    check "the Triton chapters in a reader's environment: $reader (scripts/reader_env.sh $reader)" \
        bash scripts/reader_env.sh "$reader"
done

# The browser check drives /usr/bin/chromium through /usr/bin/chromedriver.
browser="the built site in headless Chromium (tests/browser/check_site.py)"
has_chromium() { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }
if ! has_chromium && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "== installing Debian's chromium and chromium-driver for the browser check"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq chromium chromium-driver >/dev/null
fi
if ! has_chromium; then
    summary+=("NOT RUN  $browser: it needs Debian's chromium and chromium-driver;"
        "         install them as root and run this again: sudo apt-get install chromium chromium-driver")
    not_run=$((not_run + 1))
elif [ ! -f _build/html/index.html ]; then
    summary+=("NOT RUN  $browser: the book build made no site")
    not_run=$((not_run + 1))
else
    check "$browser" "$py" tests/browser/check_site.py _build/html
fi

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
if [ "$not_run" -eq 0 ]; then
    echo "checks: $passed passed, $failed failed"
else
    echo "checks: $passed passed, $failed failed, $not_run not run"
fi
[ "$failed" -eq 0 ] && [ "$not_run" -eq 0 ]
