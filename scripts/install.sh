#!/usr/bin/env bash
# Installs the package (editable) and everything the book and the tests need
# into the Python that scripts/python_env.sh picks: $PYTHON, else python3's own
# environment, else (an externally managed system Python) the virtual
# environment .venv at the repository's root.
#
# A torch that is already installed (2.6 or newer) is kept, never replaced: it
# is pinned while the rest is installed, so a requirement that would need
# another torch makes pip fail rather than swap it (on Colab it must not be
# replaced). Without one, torch 2.13.0 is installed, which on the project's
# CPU machines is the CPU build on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh

torch_state=$("$py" - 2>/dev/null <<'EOF'
import os, re, sys
try:
    import torch
except ImportError:
    print("missing")
    sys.exit()
major, minor = (int(n) for n in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
ours = os.path.realpath(torch.__file__).startswith(os.path.realpath(sys.prefix) + os.sep)
if (major, minor) >= (2, 6):
    print("keep", torch.__version__)
elif sys.prefix != sys.base_prefix and not ours:
    # an old torch of the system, seen from a virtual environment: one in the environment shadows it
    print("missing")
else:
    print("old", torch.__version__)
EOF
) || { echo "$py cannot import its torch:" >&2; "$py" -c "import torch"; exit 1; }
case $torch_state in
    missing)
        "$py" -m pip install --quiet torch==2.13.0
        torch_state="keep $("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null)" ;;
    old\ *)
        echo "flashattn needs torch 2.6 or newer, and $py has torch ${torch_state#old }:" \
            "upgrade it ($py -m pip install torch==2.13.0) or set PYTHON to another Python" >&2
        exit 1 ;;
esac

pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
echo "torch==${torch_state#keep }" >"$pin"
"$py" -m pip install --quiet -c "$pin" -r requirements.txt -e .

# Without a CUDA GPU the tests run the Triton kernels in Triton's interpreter,
# which needs triton 3.7 or newer (the kernels compiled for a GPU need 3.4).
if [ "$(uname -s)" = Linux ] && ! "$py" - 2>/dev/null <<'EOF'
import re, sys
import torch, triton
version = tuple(int(n) for n in re.match(r"(\d+)\.(\d+)", triton.__version__).groups())
sys.exit(0 if torch.cuda.is_available() or version >= (3, 7) else 1)
EOF
then
    "$py" -m pip install --quiet -c "$pin" "triton>=3.7" || echo "warning: the Triton" \
        "tests on the CPU need triton 3.7 or newer, which the installed torch does not allow" >&2
fi
