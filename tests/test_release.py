"""The release that readers get agrees with pyproject.toml's version, everywhere.

pyproject.toml's `version` is the one place that names the release; its tag is
`v<version>`. Every notebook's Open-in-Colab badge and install line, the book's
launch buttons (_config.yml), the README's install line, the setup cell shown on
the running page and CITATION.cff name that tag or version, as
scripts/set_version.py writes them; this checks that they do, and that the
script edits a notebook on those two lines and nowhere else.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "set_version.py"
# What a copy of the repository needs for the script: the places it writes and what it reads.
PLACES = ["pyproject.toml", "_config.yml", "README.md", "CITATION.cff", "CHANGELOG.md", "book/running.md"]


def set_version(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "scripts" / "set_version.py"), *args],
                          cwd=root, capture_output=True, text=True, timeout=120)


def project_version() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    return re.search(r'^version = "(.+)"$', text, re.M).group(1)


def test_every_place_names_pyprojects_version():
    run = set_version(ROOT, "--check")
    assert run.returncode == 0, run.stdout + run.stderr


def test_package_reports_pyprojects_version():
    import flashattn

    assert flashattn.__version__ == project_version(), (
        "flashattn's installed metadata is of another version: install it again (bash scripts/install.sh), "
        "and remove a flashattn.egg-info left in the repository's root by `pip install .`, which shadows it"
    )


def test_changelog_opens_with_this_version():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    first = re.search(r"^## \[?([^\]\s]+)", changelog, re.M)
    assert first and first.group(1) == project_version()


def test_citation_is_valid_cff():
    run = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.citation-file-format",
         str(ROOT / "CITATION.cff")],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr


# The script itself, on a copy of the repository.


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The repository's places and two of its notebooks, in a temporary folder."""
    for name in PLACES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts")
    (tmp_path / "notebooks").mkdir()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb"))[:2]:
        shutil.copy(path, tmp_path / "notebooks")
    return tmp_path


def bump(root: Path, version: str) -> None:
    path = root / "pyproject.toml"
    path.write_text(re.sub(r'^version = ".+"$', f'version = "{version}"', path.read_text(), flags=re.M))
    changelog = root / "CHANGELOG.md"
    changelog.write_text(changelog.read_text().replace("# Changelog\n", f"# Changelog\n\n## {version}\n", 1))


def differing_lines(before: str, after: str) -> list[tuple[str, str]]:
    assert len(before.splitlines()) == len(after.splitlines())
    return [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]


def test_bumped_version_is_written_to_every_place(repo: Path):
    before = {p: p.read_text(encoding="utf-8") for p in repo.rglob("*") if p.is_file() and p.suffix != ".py"}
    bump(repo, "9.8.7")
    check = set_version(repo, "--check")
    assert check.returncode == 1
    for name in ["_config.yml", "README.md", "CITATION.cff", "book/running.md", *(
            f"notebooks/{p.name}" for p in (repo / "notebooks").glob("*.ipynb"))]:
        assert f"{name}: names another release" in check.stdout

    written = set_version(repo)
    assert written.returncode == 0, written.stdout + written.stderr
    assert set_version(repo, "--check").returncode == 0

    for path in (repo / "notebooks").glob("*.ipynb"):
        # two lines of the file change, the rest stays byte for byte
        changed = differing_lines(before[path], path.read_text(encoding="utf-8"))
        assert len(changed) == 2, changed
        assert f"/blob/v9.8.7/notebooks/{path.name})" in changed[0][1]
        assert '%pip install --quiet \\"flashattn @ git+https://github.com/flashattn/flashattn@v9.8.7\\"' in changed[1][1]
    assert "branch: v9.8.7" in (repo / "_config.yml").read_text()
    assert '@v9.8.7"' in (repo / "README.md").read_text()
    assert 'version: "9.8.7"' in (repo / "CITATION.cff").read_text()


def test_check_names_a_missing_changelog_section(repo: Path):
    path = repo / "pyproject.toml"
    path.write_text(re.sub(r'^version = ".+"$', 'version = "9.9.9"', path.read_text(), flags=re.M))
    run = set_version(repo)
    assert run.returncode == 1
    assert "CHANGELOG.md: no section `## 9.9.9`" in run.stderr


def test_notebook_in_another_layout_is_left_alone(repo: Path):
    path = next((repo / "notebooks").glob("*.ipynb"))
    path.write_text(json.dumps(json.loads(path.read_text()), indent=2) + "\n")
    text = path.read_text()
    bump(repo, "9.8.7")
    run = set_version(repo)
    assert run.returncode == 1
    assert f"notebooks/{path.name}: not in Jupyter's own JSON layout" in run.stderr
    assert path.read_text() == text


def test_notebook_without_install_line_is_reported(repo: Path):
    path = next((repo / "notebooks").glob("*.ipynb"))
    nb = json.loads(path.read_text())
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    code["source"] = [line for line in code["source"] if "%pip" not in line]
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    run = set_version(repo, "--check")
    assert run.returncode == 1
    assert f"notebooks/{path.name}: no `%pip install ... flashattn` line in the first code cell" in run.stderr
