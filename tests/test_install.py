"""The set-up: which Python scripts/python_env.sh picks, and the declared versions."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def picked_python(cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Sources scripts/python_env.sh in ``cwd`` and prints the Python it picked."""
    return subprocess.run(
        ["bash", "-c", 'source scripts/python_env.sh && echo "$py"'],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def base_env(path: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    env["PATH"] = path
    return env


def test_python_variable_wins():
    run = picked_python(ROOT, {**base_env(os.environ["PATH"]), "PYTHON": "/opt/some/python"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "/opt/some/python"


def test_python3_of_this_environment_is_used_as_it_is(tmp_path):
    # the tests run under the Python that python_env.sh picked: one pip may install into
    # (a wrapper, not a symlink: a virtual environment is found from the path of its python)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    run = picked_python(ROOT, base_env(f"{bin_dir}:/usr/bin:/bin"))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "python3"


def externally_managed_python3() -> str | None:
    """/usr/bin/python3 when it is marked externally managed (Debian 12, Ubuntu 24.04)."""
    python3 = shutil.which("python3", path="/usr/bin:/bin")
    if python3 is None:
        return None
    check = "import os, sysconfig; print(os.path.isfile(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))"
    out = subprocess.run([python3, "-I", "-c", check], capture_output=True, text=True).stdout
    return python3 if out.strip() == "True" else None


@pytest.mark.skipif(externally_managed_python3() is None, reason="no externally managed /usr/bin/python3 here")
def test_externally_managed_python3_gets_a_virtual_environment(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "python_env.sh", tmp_path / "scripts")
    env = base_env("/usr/bin:/bin")
    made = picked_python(tmp_path, env)
    assert made.returncode == 0, made.stderr
    venv_python = tmp_path / ".venv" / "bin" / "python"
    assert made.stdout.strip() == str(venv_python)
    assert "making the virtual environment .venv" in made.stderr
    assert "include-system-site-packages = true" in (tmp_path / ".venv" / "pyvenv.cfg").read_text()
    assert subprocess.run([venv_python, "-m", "pip", "--version"], capture_output=True).returncode == 0
    reused = picked_python(tmp_path, env)
    assert reused.stdout.strip() == str(venv_python)
    assert reused.stderr == ""


def lower_bound(requirements: list[str], name: str) -> str:
    (req,) = [Requirement(r) for r in requirements if Requirement(r).name == name]
    (bound,) = [s.version for s in req.specifier if s.operator == ">="]
    return bound


def test_declared_versions_agree():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    requirements = [line for line in lines if line.strip() and not line.startswith("#")]
    # compiling the flash path with fullgraph=True needs torch 2.6
    assert lower_bound(project["dependencies"], "torch") == lower_bound(requirements, "torch") == "2.6"
    # numpy: without it torch warns on import
    assert any(Requirement(r).name == "numpy" for r in project["dependencies"])
    assert lower_bound(project["optional-dependencies"]["triton"], "triton") == lower_bound(requirements, "triton")
    # the torch that install.sh installs where there is none satisfies the bound, and the README names it
    fallback = re.search(r"torch==([\d.]+)", (ROOT / "scripts" / "install.sh").read_text()).group(1)
    assert Requirement(f"torch>={lower_bound(requirements, 'torch')}").specifier.contains(fallback)
    assert f"torch=={fallback}" in (ROOT / "README.md").read_text()
