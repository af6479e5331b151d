"""Execute notebooks in place, top to bottom, as the book stores them.

    python3 scripts/execute_notebooks.py notebooks/04_online_softmax.ipynb [...]

Each notebook runs in a fresh kernel with notebooks/ as its working folder,
without per-cell timestamps (so a committed notebook changes only where its
outputs do), and the time it took is printed. A notebook with a cell that
raises is written with the error in its outputs, the others still run, and
the command exits with status 1.
"""

from __future__ import annotations

import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def execute(path: str) -> float:
    """Run the notebook at ``path`` and write it back with its outputs; return the seconds it took."""
    start = time.perf_counter()
    nb = nbformat.read(path, as_version=4)
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": "notebooks"}}).execute()
    finally:
        nbformat.write(nb, path)
    return time.perf_counter() - start


if __name__ == "__main__":
    failed = []
    for path in sys.argv[1:]:
        try:
            print(f"executed {path} in {execute(path):.0f} s", flush=True)
        except CellExecutionError as error:
            failed.append(path)
            print(f"FAILED {path}:\n{str(error)[-3000:]}", flush=True)
    sys.exit(1 if failed else 0)
