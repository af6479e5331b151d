"""Execute notebooks top to bottom, as the book stores them, and say how each ended.

    python3 scripts/execute_notebooks.py notebooks/04_online_softmax.ipynb [...]
    python3 scripts/execute_notebooks.py --out DIR --report run.json notebooks/*.ipynb

Each notebook runs in a fresh kernel with notebooks/ as its working folder,
without per-cell timestamps (so a committed notebook changes only where its
outputs do), and the time it took is printed. By default the executed
notebook is written back in place (the GPU runner's run, which makes the
stored outputs); with ``--out`` it is written into DIR instead, leaving the
chapter as it was (the runs of the readers' environments). ``--report``
writes a JSON record: the commit, the versions, and per chapter whether it
finished, the cell that raised, and the lines it printed for what it skipped.
A notebook with a cell that raises is written with the error in its outputs,
the others still run, and the command exits with status 1.

With ``--update``, the record at ``--report`` is brought up to date rather
than replaced: the chapters of this run replace theirs, the others stay as
they were. Every chapter names the commit it was executed at, so a record
that mixes runs says so; the device and emulation must be the record's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def execute(path: str, out: str | None) -> tuple[float, nbformat.NotebookNode]:
    """Run the notebook at ``path``; write it to ``out`` (a folder) or back in place; return seconds and notebook."""
    start = time.perf_counter()
    nb = nbformat.read(path, as_version=4)
    target = Path(out) / Path(path).name if out else Path(path)
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(Path(path).parent)}}).execute()
    finally:
        nbformat.write(nb, target)
    return time.perf_counter() - start, nb


def printed_lines(nb: nbformat.NotebookNode, prefix: str) -> list[str]:
    """The lines of the notebook's stream outputs that start with ``prefix``."""
    return [line for cell in nb.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
            if output.get("output_type") == "stream" for line in output.get("text", "").splitlines()
            if line.startswith(prefix)]


def failed_cell(nb: nbformat.NotebookNode) -> dict | None:
    """The index and error of the first code cell whose outputs hold an error, or None."""
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if output.get("output_type") == "error":
                return {"cell": index, "error": f"{output.get('ename')}: {output.get('evalue', '')}"[:500]}
    return None


def environment() -> dict:
    """The commit, machine and versions of this run (benchmarks/runinfo.py's record), and the GPU emulated, if any."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from runinfo import run_info

    return {**run_info(), "emulation": os.environ.get("FLASHATTN_EMULATE_GPU") or None}


def updated(earlier: dict, run: dict) -> dict:
    """The record ``earlier`` with the chapters of ``run`` in place of its own; run's commit and versions on top."""
    for key in ("device", "emulation"):
        if earlier.get(key) != run.get(key):
            raise SystemExit(f"--update: the record's {key} is {earlier.get(key)!r}, this run's {run.get(key)!r}; "
                             "a record holds the runs of one machine")
    ran = {c["notebook"] for c in run["chapters"]}
    kept = [dict(c, commit=c.get("commit", earlier["git"]["commit"])) for c in earlier["chapters"]
            if c["notebook"] not in ran]
    chapters = sorted(kept + run["chapters"], key=lambda c: c["notebook"])
    failed = sum(not c["passed"] for c in chapters)
    return {**run, "chapters": chapters, "summary": f"{len(chapters) - failed} passed, {failed} failed"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+")
    parser.add_argument("--out", help="write the executed notebooks into this folder, not in place")
    parser.add_argument("--report", help="write a JSON record of the run here")
    parser.add_argument("--update", action="store_true",
                        help="with --report: replace only this run's chapters in the record there")
    args = parser.parse_args()
    if args.update and not (args.report and Path(args.report).exists()):
        parser.error("--update needs --report naming an existing record")
    earlier = json.loads(Path(args.report).read_text()) if args.update else None
    chapters, failed = [], []
    info = environment() if args.report else {}
    for path in args.notebooks:
        record = {"notebook": Path(path).name, **({"commit": info["git"]["commit"]} if info else {})}
        try:
            seconds, nb = execute(path, args.out)
            print(f"executed {path} in {seconds:.0f} s", flush=True)
            record.update(passed=True, seconds=round(seconds, 1))
        except CellExecutionError as error:
            failed.append(path)
            print(f"FAILED {path}:\n{str(error)[-3000:]}", flush=True)
            nb = nbformat.read(Path(args.out) / Path(path).name if args.out else path, as_version=4)
            record.update(passed=False, failure=failed_cell(nb))
        record["code_cells"] = sum(cell.cell_type == "code" for cell in nb.cells)
        record["skipped"] = printed_lines(nb, "skipped: ")
        for line in record["skipped"]:
            print(f"  {line}")
        chapters.append(record)
        if args.report:  # after every chapter, so that a run cut short still leaves its record
            report = {**info, "chapters": chapters,
                      "summary": f"{len(chapters) - len(failed)} passed, {len(failed)} failed"}
            if earlier is not None:
                report = updated(earlier, report)
            Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    print(f"notebooks: {len(chapters) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
