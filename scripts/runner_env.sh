# Sourced by the GPU runner's scripts, from the repository's root: sets `py` (the Python to run,
# $PYTHON or python3) and makes nbclient, nbval and ipykernel importable, installing them from
# the wheels in .whl/ when they are missing (a runner without network).
py=${PYTHON:-python3}
if ! "$py" -c "import nbclient, nbval, ipykernel" 2>/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
