# Sourced by the scripts, from the repository's root: sets `py` to the Python
# that everything is installed into and run with, and exports it as PYTHON so
# that the scripts they call use the same one.
#
#   1. $PYTHON, when it is set;
#   2. otherwise python3, when it runs inside a virtual environment (or conda
#      environment) or is not marked externally managed (PEP 668): Colab,
#      pyenv, CI. Its installed packages, torch included, are kept;
#   3. otherwise (the system Python of Debian 12, Ubuntu 24.04 and others,
#      where pip refuses to install) the virtual environment .venv at the
#      repository's root, made on first use and reused after. It sees the
#      system's packages (--system-site-packages), so that a torch installed
#      system-wide is used rather than downloaded again.
#
# Making .venv needs no root: without Debian's python3-venv (no ensurepip) it
# is made without pip and uses the system's pip (python3-pip); when there is
# none, pip is fetched from PyPI into .venv.

_python_env_pick() {
    if [ -n "${PYTHON:-}" ]; then
        py=$PYTHON
        return
    fi
    if ! command -v python3 >/dev/null; then
        echo "no python3 found: install Python 3.10 or newer, or set PYTHON to one" >&2
        return 1
    fi
    # exit 0: pip may install into python3's environment
    if python3 - <<'EOF'
import os, sys, sysconfig
in_venv = sys.prefix != getattr(sys, "base_prefix", sys.prefix) or hasattr(sys, "real_prefix")
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if in_venv or not os.path.isfile(marker) else 1)
EOF
    then
        py=python3
        return
    fi
    py=$PWD/.venv/bin/python
    if [ -x "$py" ] && "$py" -c "" 2>/dev/null; then
        return
    fi
    echo "python3 ($(command -v python3)) is externally managed: making the virtual environment .venv" >&2
    rm -rf .venv
    if ! python3 -m venv --system-site-packages .venv >/dev/null 2>&1; then
        # no ensurepip (Debian's python3-venv is not installed)
        rm -rf .venv
        python3 -m venv --system-site-packages --without-pip .venv || return 1
    fi
    if ! "$py" -m pip --version >/dev/null 2>&1; then
        echo "no pip for .venv (neither python3-venv nor python3-pip is installed): fetching pip from PyPI" >&2
        "$py" - <<'EOF' || { rm -rf .venv; return 1; }
import hashlib, json, os, subprocess, sys, tempfile, urllib.parse, urllib.request

index = "https://pypi.org/pypi/pip/json"
release = json.load(urllib.request.urlopen(index, timeout=60))
wheel = next(f for f in release["urls"] if f["filename"].endswith("-py3-none-any.whl"))
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, wheel["filename"])
    urllib.request.urlretrieve(urllib.parse.urljoin(index, wheel["url"]), path)
    with open(path, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != wheel["digests"]["sha256"]:
            sys.exit(f"{wheel['filename']}: wrong sha256")
    # a wheel of pip runs from the file itself
    subprocess.check_call([sys.executable, os.path.join(path, "pip"), "install", "--quiet", path])
EOF
    fi
}

_python_env_pick || exit 1
export PYTHON=$py
