"""The GitHub Actions workflows: valid, and nothing in them but calls of the repository's scripts.

Every workflow in .github/workflows validates against the workflow schema
(check-jsonschema's copy of SchemaStore's, offline). Every `run:` step is one
line, `bash scripts/<name>.sh [arguments]`, of a script that exists, so that
what CI does is what anyone can run. The workflows that deploy the book or run
on the GPU call only scripts that CI exercises: those that test.yml runs
(scripts/test.sh, the README's test command, and the readers' environments),
the scripts these call, and the scripts that a test here runs. This module
runs scripts/gpu_notebooks.sh itself, on a one-chapter copy of the book on the
CPU.
"""

from __future__ import annotations

import ast
import os
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
# The workflow that is CI itself: what it runs is exercised by definition.
TESTS_WORKFLOW = "test.yml"

# bash scripts/<name>.sh, then arguments: plain words or one ${{ expression }} each
RUN_STEP = re.compile(r"bash scripts/([\w-]+\.sh)((?: (?:[\w.,=/:+-]+|\$\{\{ [\w.-]+ \}\}))*)")
# a script that calls or sources another: `bash scripts/x.sh`, `source scripts/x.sh`, `. scripts/x.sh`
CALL = re.compile(r"(?:\bbash|\bsource|^\s*\.|\s\.)\s+scripts/([\w-]+\.sh)\b")
# a test's string that names a script as a command or an argument of one
NAMED = re.compile(r"(?:^|[\s\"'/])scripts/([\w-]+\.sh)(?=$|[\s\"'])")


def load(path: Path) -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def run_steps(workflow: dict) -> list[tuple[str, str]]:
    """(job id, run command) of every `run:` step of a workflow."""
    return [(job_id, step["run"]) for job_id, job in (workflow.get("jobs") or {}).items()
            for step in job.get("steps", []) if "run" in step]


def run_problems(run: str, root: Path = ROOT) -> list[str]:
    """What is wrong with one `run:` command; empty when it is one call of an existing script."""
    match = RUN_STEP.fullmatch(run.strip())
    if "\n" in run.strip() or match is None:
        return [f"not one `bash scripts/<name>.sh [arguments]` call: {run.strip()!r}"]
    if not (root / "scripts" / match.group(1)).is_file():
        return [f"scripts/{match.group(1)} does not exist"]
    return []


def called_scripts(script: Path) -> set[str]:
    """The scripts that a shell script runs or sources, outside its comments."""
    lines = [line for line in script.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")]
    return {m.group(1) for line in lines for m in CALL.finditer(line)}


def scripts_run_by_tests(tests: Path) -> set[str]:
    """Scripts named in the string literals (not the docstrings) of the test modules."""
    named = set()
    for module in tests.rglob("*.py"):
        tree = ast.parse(module.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                named |= {m.group(1) for m in NAMED.finditer(node.value)}
    return named


def exercised_scripts(root: Path = ROOT) -> set[str]:
    """The scripts CI runs: those of test.yml's steps and of the tests, and what they call, transitively."""
    todo = {m.group(1) for _, run in run_steps(load(root / ".github" / "workflows" / TESTS_WORKFLOW))
            if (m := RUN_STEP.fullmatch(run.strip()))}
    todo |= scripts_run_by_tests(root / "tests")
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        path = root / "scripts" / name
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        todo |= called_scripts(path) - seen
    return seen


def schema_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True, text=True, timeout=120,
    )


def test_there_are_the_three_workflows():
    assert {p.name for p in WORKFLOWS} >= {"test.yml", "book.yml", "gpu-notebooks.yml"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_schema(path: Path):
    check = schema_check(path)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_run_step_calls_one_script(path: Path):
    steps = run_steps(load(path))
    assert steps, f"{path.name} runs no script"
    assert [(job, problem) for job, run in steps for problem in run_problems(run)] == []


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if p.name != TESTS_WORKFLOW], ids=lambda p: p.name)
def test_workflow_calls_only_exercised_scripts(path: Path):
    exercised = exercised_scripts()
    called = {m.group(1) for _, run in run_steps(load(path)) if (m := RUN_STEP.fullmatch(run.strip()))}
    assert called - exercised == set(), f"not run by CI or a test; CI runs {sorted(exercised)}"


def test_ci_runs_the_readme_test_command():
    runs = [run.strip() for _, run in run_steps(load(ROOT / ".github" / "workflows" / TESTS_WORKFLOW))]
    assert "bash scripts/test.sh" in runs
    assert "bash scripts/test.sh" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_gpu_workflow_runs_on_the_gpu_runner_and_keeps_its_output():
    workflow = load(ROOT / ".github" / "workflows" / "gpu-notebooks.yml")
    (job,) = workflow["jobs"].values()
    assert job["runs-on"] == ["self-hosted", "gpu"]
    (step,) = [s for s in job["steps"] if s.get("run", "").strip() == "bash scripts/gpu_notebooks.sh"]
    out = step["env"]["OUT"]
    uploads = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert uploads and out in uploads[0]["with"]["path"]


# The checks themselves, on workflows made to fail them.


def test_checks_catch_a_broken_workflow(tmp_path: Path):
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "name: broken\n"
        "on: push\n"
        "jobs:\n"
        "  build:\n"
        "    runs_on: ubuntu-24.04\n"  # the key is runs-on
        "    steps:\n"
        "      - run: |\n"
        "          pip install .\n"
        "          pytest\n"
        "      - run: bash scripts/test.sh && echo done\n"
        "      - run: bash scripts/nowhere.sh\n"
        "      - run: python3 -m pytest tests\n"
    )
    assert schema_check(broken).returncode != 0
    problems = [run_problems(run) for _, run in run_steps(load(broken))]
    assert all(problems), problems
    assert problems[2] == ["scripts/nowhere.sh does not exist"]


def test_exercised_scripts_follow_calls(tmp_path: Path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / TESTS_WORKFLOW).write_text(
        "on: push\njobs:\n  t:\n    runs-on: x\n    steps:\n      - run: bash scripts/a.sh\n")
    (tmp_path / "scripts" / "a.sh").write_text("source scripts/env.sh\n# bash scripts/c.sh\nbash scripts/b.sh --x\n")
    for name in ["b.sh", "c.sh", "d.sh", "env.sh", "e.sh"]:
        (tmp_path / "scripts" / name).write_text("true\n")
    (tmp_path / "tests" / "test_x.py").write_text(
        '"""Runs nothing of scripts/e.sh."""\nimport subprocess\nsubprocess.run(["bash", "scripts/d.sh"])\n')
    assert exercised_scripts(tmp_path) == {"a.sh", "b.sh", "env.sh", "d.sh"}


# The GPU runner's run, end to end, on a copy of the book cut to the first cells of chapter 01.


def test_gpu_notebooks_script_executes_checks_and_packs(tmp_path: Path):
    for name in ["scripts/gpu_notebooks.sh", "scripts/runner_env.sh", "scripts/execute_notebooks.py", "notebooks/nbval_sanitize.cfg",
                 "tests/test_notebook_outputs.py", "book/running.md", "_config.yml", "pyproject.toml"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    chapter = ROOT / "notebooks" / "01_attention.ipynb"
    nb = json.loads(chapter.read_text(encoding="utf-8"))
    setup = next(n for n, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code")
    checked = {"cell_type": "code", "execution_count": None, "id": "sum-check", "metadata": {}, "outputs": [],
               "source": ["print(sum(range(4)))"]}
    # the badge and the setup cell as the chapter has them, and one cell whose output nbval compares
    nb["cells"] = nb["cells"][: setup + 1] + [checked]
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    (tmp_path / "notebooks" / chapter.name).write_text(json.dumps(nb, indent=1) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()

    run = subprocess.run(["bash", "scripts/gpu_notebooks.sh"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OUT": str(out), "PYTHON": sys.executable})
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    with tarfile.open(out / "notebooks.tar") as tar:
        packed = json.load(tar.extractfile(f"notebooks/{chapter.name}"))
    assert packed["cells"][-1]["outputs"][0]["text"] == ["6\n"]
