"""The stored outputs of the book's notebooks, and the cells every chapter shares.

The notebooks in notebooks/ are committed with the outputs of one run from top
to bottom on the GPU runner (scripts/gpu_notebooks.sh); the book shows them as
stored, and nbval compares fresh runs against them. So a stored output must
hold no error, no warning, nothing on stderr and no absolute path, and a
checked output (one not tagged nbval-ignore-output) must not name a device.
Every chapter opens with the Open-in-Colab badge and the same setup cell, both
pointing at the repository named once in _config.yml.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IGNORE_OUTPUT = "nbval-ignore-output"

WARNING = re.compile(r"\w*Warning\b|\bWARNING\b")
ABSOLUTE_PATH = re.compile(
    r"(?<![\w.~/-])/(?:home|root|tmp|usr|opt|var|etc|work|mnt|srv|content|Users|private)/"
    r"|\b[A-Za-z]:\\|file://"
)
DEVICE = re.compile(r"device='(?:cuda|mps|xpu)")

COLAB_BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"
SETUP_CELL = """\
# The same first cell in every chapter: install flashattn where it is missing
# (as on Colab, whose torch is kept), then pick device, dtype and sizes, and seed.
try:
    import flashattn
except ImportError:
    %pip install --quiet "flashattn @ git+{repository}@{ref}"
    import flashattn
from flashattn.book import setup

cfg = setup()
print(cfg)"""


def _text(value: str | list[str]) -> str:
    return value if isinstance(value, str) else "".join(value)


def output_text(output: dict) -> str:
    """Everything readable in one output: streams, text and JSON data, and errors."""
    if output["output_type"] == "stream":
        return _text(output["text"])
    if output["output_type"] == "error":
        return "\n".join([output.get("ename", ""), output.get("evalue", ""), *output.get("traceback", [])])
    data = output.get("data", {})
    return "\n".join(
        _text(value) if isinstance(value, (str, list)) else json.dumps(value)
        for mime, value in data.items()
        if mime.startswith("text/") or mime.endswith("json")
    )


def output_problems(nb: dict) -> list[str]:
    """What is wrong with the stored outputs of a notebook (a JSON dict); empty when nothing."""
    problems = []
    kernel = nb.get("metadata", {}).get("kernelspec", {}).get("name")
    if kernel != "python3":
        problems.append(f"kernelspec {kernel!r}, not 'python3'")
    if ABSOLUTE_PATH.search(json.dumps(nb.get("metadata", {}))):
        problems.append("an absolute path in the notebook's metadata")

    counts = []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        where = f"cell {index}"
        counts.append(cell.get("execution_count"))
        checked = IGNORE_OUTPUT not in cell.get("metadata", {}).get("tags", [])
        if ABSOLUTE_PATH.search(json.dumps(cell.get("metadata", {}))):
            problems.append(f"{where}: an absolute path in the cell's metadata")
        for output in cell.get("outputs", []):
            text = output_text(output)
            if output["output_type"] == "error":
                problems.append(f"{where}: an error, {output.get('ename')}: {output.get('evalue')}")
            if output["output_type"] == "stream" and output["name"] == "stderr":
                problems.append(f"{where}: output on stderr: {text[:80]!r}")
            if match := WARNING.search(text):
                problems.append(f"{where}: a warning: {match.group()}")
            if match := ABSOLUTE_PATH.search(text):
                problems.append(f"{where}: an absolute path: {match.group()!r}")
            if checked and (match := DEVICE.search(text)):
                problems.append(f"{where}: a checked output names a device: {match.group()!r}")
    if counts != list(range(1, len(counts) + 1)):
        problems.append(f"not executed once from top to bottom: execution counts {counts}")
    return problems


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _repository() -> dict:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    return {**config["repository"], "colab_url": config["launch_buttons"]["colab_url"]}


def colab_url(notebook: Path) -> str:
    """The Colab address of a notebook, as the book's launch button builds it from _config.yml."""
    repo = _repository()
    path = (Path(repo.get("path_to_book") or ".") / notebook.relative_to(ROOT)).as_posix()
    github = repo["url"].removeprefix("https://github.com/")
    return f"{repo['colab_url']}/github/{github}/blob/{repo['branch']}/{path}"


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebook in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_outputs_are_clean(path: Path):
    assert output_problems(_read(path)) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_opens_with_the_colab_badge(path: Path):
    first = _read(path)["cells"][0]
    assert first["cell_type"] == "markdown"
    assert COLAB_BADGE.format(url=colab_url(path)) in _text(first["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_is_the_setup_cell(path: Path):
    cell = next(c for c in _read(path)["cells"] if c["cell_type"] == "code")
    assert _text(cell["source"]) == SETUP_CELL.format(repository=_repository()["url"], ref=_repository()["branch"])
    # Its output names the device, so nbval must not compare it.
    assert IGNORE_OUTPUT in cell["metadata"].get("tags", [])


def test_running_page_shows_the_setup_cell():
    page = (ROOT / "book" / "running.md").read_text(encoding="utf-8")
    assert SETUP_CELL.format(repository=_repository()["url"], ref=_repository()["branch"]) in page


# The checker itself, on notebooks made to fail it.


def _notebook(*outputs: dict, tags: tuple[str, ...] = (), counts: tuple[int | None, ...] = (1,)) -> dict:
    cells = [
        {"cell_type": "code", "execution_count": count, "metadata": {"tags": list(tags)},
         "source": "x", "outputs": list(outputs) if n == 0 else []}
        for n, count in enumerate(counts)
    ]
    return {"metadata": {"kernelspec": {"name": "python3"}}, "cells": cells}


def _stdout(text: str) -> dict:
    return {"output_type": "stream", "name": "stdout", "text": text}


def _plain(text: str) -> dict:
    return {"output_type": "execute_result", "execution_count": 1, "metadata": {}, "data": {"text/plain": text}}


@pytest.mark.parametrize(
    ("notebook", "expected"),
    [
        (_notebook({"output_type": "error", "ename": "AssertionError", "evalue": "", "traceback": []}), "an error"),
        (_notebook({"output_type": "stream", "name": "stderr", "text": "oops\n"}), "stderr"),
        (_notebook(_stdout("/x.py:3: UserWarning: careful\n")), "a warning"),
        (_notebook(_plain("FutureWarning('soon')")), "a warning"),
        (_notebook(_stdout("saved to /home/me/figure.png\n")), "an absolute path"),
        (_notebook(_plain("'C:\\\\Users\\\\me'")), "an absolute path"),
        (_notebook(_stdout("tensor(True, device='cuda:0')\n")), "names a device"),
        (_notebook(_stdout("ok\n"), counts=(1, None)), "not executed once"),
        (_notebook(_stdout("ok\n"), counts=(2, 1)), "not executed once"),
    ],
    ids=["error", "stderr", "warning", "warning-repr", "posix-path", "windows-path", "device", "unexecuted",
         "out-of-order"],
)
def test_checker_flags(notebook: dict, expected: str):
    problems = output_problems(notebook)
    assert any(expected in problem for problem in problems), problems


def test_checker_passes_clean_outputs():
    clean = _notebook(_stdout("max |error| < 1e-05: True\n"), _plain("(2, 4, 6, 16)"), counts=(1, 2))
    assert output_problems(clean) == []
    # A device may be named where nbval does not compare the output.
    ignored = _notebook(_stdout("tensor(1., device='cuda:0')\n"), tags=(IGNORE_OUTPUT,))
    assert output_problems(ignored) == []
