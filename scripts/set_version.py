"""Writes the release named by pyproject.toml's version everywhere a reader meets it.

    python3 scripts/set_version.py           # rewrites every place that disagrees
    python3 scripts/set_version.py --check   # lists them and exits 1; writes nothing

The version lives in one place, the `version` of pyproject.toml; its release is
the git tag `v<version>`. This script makes the others name that tag:

- every notebook's Open-in-Colab badge (in its first markdown cell) opens the
  notebook at the tag, and its first code cell installs the package at the tag
  when it is missing (without the triton extra: on Colab, torch pins its own
  triton);
- _config.yml's `repository.branch`, from which the book's launch buttons build
  the same Colab address (`launch_buttons.colab_url` stays Colab's own address);
- the README's install line and the setup cell shown on book/running.md;
- CITATION.cff's `version`.

It checks, without writing it, that CHANGELOG.md has a section for the version.
A notebook is edited on those two lines only: it is read with json and written
back as Jupyter writes it (indent 1, a trailing newline), and one that would
not come back byte for byte is left alone and reported.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]


class Problem(Exception):
    """A place that cannot be brought to the version: its line is missing or unreadable."""


def project_version(root: Path = ROOT) -> str:
    """The `version` of pyproject.toml's [project] table."""
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    project = re.search(r"^\[project\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    found = project and re.search(r'^version\s*=\s*"([^"]+)"\s*$', project.group(1), re.M)
    if not found:
        raise Problem("pyproject.toml: no version in [project]")
    return found.group(1)


def tag(version: str) -> str:
    return f"v{version}"


def site(root: Path = ROOT) -> dict:
    """The repository's address and the book's Colab settings, from _config.yml."""
    config = yaml.safe_load((root / "_config.yml").read_text(encoding="utf-8"))
    return {
        "url": config["repository"]["url"].rstrip("/"),
        "path_to_book": config["repository"].get("path_to_book") or ".",
        "colab_url": config["launch_buttons"]["colab_url"].rstrip("/"),
    }


def install_line(url: str, version: str) -> str:
    """The notebooks' install command: the package at the release's tag, without extras."""
    return f'%pip install --quiet "flashattn @ git+{url}@{tag(version)}"'


def colab_url(settings: dict, notebook: str, version: str) -> str:
    """The Colab address of notebooks/<notebook> at the release, as the launch buttons build it."""
    path = (Path(settings["path_to_book"]) / "notebooks" / notebook).as_posix()
    github = settings["url"].removeprefix("https://github.com/")
    return f"{settings['colab_url']}/github/{github}/blob/{tag(version)}/{path}"


# Each edit takes a file's text and returns the text that names the version.


def edit_config(text: str, version: str, settings: dict) -> str:
    lines = text.splitlines(keepends=True)
    section = None
    for n, line in enumerate(lines):
        if re.match(r"[^\s#]", line):
            section = line.split(":")[0]
        elif section == "repository" and (m := re.match(r"(\s+branch:\s*)([^\s#]+)(.*)", line, re.S)):
            lines[n] = f"{m.group(1)}{tag(version)}{m.group(3)}"
            return "".join(lines)
    raise Problem("_config.yml: no repository.branch")


def edit_readme(text: str, version: str, settings: dict) -> str:
    pattern = re.compile(r'(pip install "flashattn(?:\[[\w,]+\])? @ git\+' + re.escape(settings["url"]) + r')(?:@[^"\s]*)?"')
    new, count = pattern.subn(lambda m: f'{m.group(1)}@{tag(version)}"', text)
    if count == 0:
        raise Problem(f'README.md: no line `pip install "flashattn @ git+{settings["url"]}..."`')
    return new


def _edit_install_lines(lines: list[str], version: str, settings: dict) -> int:
    count = 0
    for n, line in enumerate(lines):
        if m := re.match(r"(\s*)%pip install\b.*\bflashattn\b.*?(\n?)$", line, re.S):
            lines[n] = m.group(1) + install_line(settings["url"], version) + m.group(2)
            count += 1
    return count


def edit_running_page(text: str, version: str, settings: dict) -> str:
    lines = text.splitlines(keepends=True)
    if _edit_install_lines(lines, version, settings) == 0:
        raise Problem("book/running.md: the setup cell it shows has no `%pip install` line")
    return "".join(lines)


def edit_citation(text: str, version: str, settings: dict) -> str:
    new, count = re.subn(r"^version:.*$", f'version: "{version}"', text, flags=re.M)
    if count != 1:
        raise Problem("CITATION.cff: no top-level `version:`")
    return new


def _dump_notebook(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def _cell_lines(cell: dict) -> list[str]:
    source = cell["source"]
    return list(source) if isinstance(source, list) else source.splitlines(keepends=True)


def _set_cell_lines(cell: dict, lines: list[str]) -> None:
    cell["source"] = lines if isinstance(cell["source"], list) else "".join(lines)


def edit_notebook(text: str, version: str, settings: dict, name: str) -> str:
    where = f"notebooks/{name}"
    nb = json.loads(text)
    if _dump_notebook(nb) != text:
        raise Problem(f"{where}: not in Jupyter's own JSON layout (indent 1), so it would be rewritten whole; not edited")
    cells = nb["cells"]
    markdown = next((c for c in cells if c["cell_type"] == "markdown"), None)
    code = next((c for c in cells if c["cell_type"] == "code"), None)
    if markdown is None or code is None:
        raise Problem(f"{where}: no markdown cell or no code cell")

    lines = _cell_lines(markdown)
    badge = [n for n, line in enumerate(lines) if "colab-badge.svg" in line]
    if not badge:
        raise Problem(f"{where}: no Open-in-Colab badge in the first markdown cell")
    url = colab_url(settings, name, version)
    for n in badge:
        lines[n] = re.sub(r"\]\(https://colab\.research\.google\.com/github/[^)\s]*\)", f"]({url})", lines[n])
    _set_cell_lines(markdown, lines)

    lines = _cell_lines(code)
    if _edit_install_lines(lines, version, settings) == 0:
        raise Problem(f"{where}: no `%pip install ... flashattn` line in the first code cell")
    _set_cell_lines(code, lines)
    return _dump_notebook(nb)


def places(root: Path = ROOT) -> list[tuple[Path, Callable[[str, str, dict], str]]]:
    """Every file that names the release, with the edit that makes it name the version."""
    found = [
        (root / "_config.yml", edit_config),
        (root / "README.md", edit_readme),
        (root / "book" / "running.md", edit_running_page),
        (root / "CITATION.cff", edit_citation),
    ]
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        found.append((path, lambda text, version, settings, name=path.name: edit_notebook(text, version, settings, name)))
    return found


def changes(text: str, new: str) -> list[str]:
    """The lines of ``text`` that ``new`` replaces, shortened, for the report."""
    old_lines, new_lines = text.splitlines(), new.splitlines()
    if len(old_lines) != len(new_lines):
        return ["(line count changes)"]
    shown = []
    for a, b in zip(old_lines, new_lines):
        if a != b:
            same = next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            start = max(0, same - 40)
            a, b = ((("..." if start else "") + s[start:].strip())[:100] for s in (a, b))
            shown.append(f"{a}  ->  {b}")
    return shown


def run(check: bool, root: Path = ROOT) -> int:
    """Rewrites (or, with ``check``, only lists) every place that disagrees; returns the exit status."""
    try:
        version = project_version(root)
        settings = site(root)
    except Problem as problem:
        print(problem, file=sys.stderr)
        return 1
    disagreeing, problems = [], []
    for path, edit in places(root):
        where = path.relative_to(root).as_posix()
        if not path.exists():
            problems.append(f"{where}: missing")
            continue
        text = path.read_text(encoding="utf-8")
        try:
            new = edit(text, version, settings)
        except Problem as problem:
            problems.append(str(problem))
            continue
        if new == text:
            continue
        disagreeing.append(where)
        print(f"{where}: {'names another release' if check else 'rewritten'}")
        for line in changes(text, new):
            print(f"    {line}")
        if not check:
            path.write_text(new, encoding="utf-8")

    changelog = root / "CHANGELOG.md"
    if not (changelog.exists() and re.search(rf"^## \[?{re.escape(version)}\]?(\s|$)", changelog.read_text(encoding="utf-8"), re.M)):
        problems.append(f"CHANGELOG.md: no section `## {version}` (write it by hand)")

    for problem in problems:
        print(problem, file=sys.stderr)
    if check and disagreeing:
        print(f"{len(disagreeing)} place(s) do not name {tag(version)}: run `python3 scripts/set_version.py`", file=sys.stderr)
        return 1
    if problems:
        return 1
    print(f"every place names {tag(version)} (pyproject.toml's version {version})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="list the places that disagree and exit 1; write nothing")
    return run(parser.parse_args().check)


if __name__ == "__main__":
    sys.exit(main())
