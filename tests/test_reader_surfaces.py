"""What the chapters read from the package, so that they run on every reader's machine.

The chapters print kernel source, read launch tables and committed benchmark
results, and decide whether the Triton kernels run here, through public
functions only: these tests hold those functions to what the chapters rely on,
and hold the chapters to using them (no private module of PyTorch, no
underscore name of flashattn, nothing fetched from the network).
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from flashattn import book
from flashattn.book import committed_result, kernel_support
from flashattn.source import function_source, module_source
from flashattn.triton import hopper, launch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def code_cells(path: Path) -> list[str]:
    return ["".join(cell["source"]) for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == "code"]


# -- source as text --------------------------------------------------------------------------------


def test_function_source_is_the_function_as_written():
    text = function_source("flashattn.masks", "padding_mask")
    assert text.startswith("def padding_mask(")
    # exactly the lines of the module from the def to the function's end
    module = module_source("flashattn.masks")
    assert text in module
    tree = ast.parse(text)
    assert [node.name for node in tree.body] == ["padding_mask"]


def test_function_source_keeps_decorators_and_needs_no_import_of_the_module():
    # the kernel module imports triton; reading its source must not import it
    code = (
        "import sys\n"
        "from flashattn.source import function_source\n"
        "text = function_source('flashattn.triton.kernels', 'attn_fwd_kernel')\n"
        "assert text.startswith('@triton.jit\\ndef attn_fwd_kernel('), text[:40]\n"
        "assert 'flashattn.triton.kernels' not in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr


def test_function_source_names_what_the_module_defines_when_a_name_is_missing():
    with pytest.raises(ValueError, match=r"flashattn.masks defines no function or class 'no_such'.*padding_mask"):
        function_source("flashattn.masks", "no_such")
    with pytest.raises(ValueError, match="one of flashattn's modules"):
        module_source("os.path")


# -- launch tables ---------------------------------------------------------------------------------


def test_launch_tables_are_copies_of_what_pick_configs_uses():
    table = launch.launch_table()
    table.clear()  # a copy: the package's table is untouched
    table = launch.launch_table()
    assert ("sm80", 128, "any") in table and ("sm90", 128, "long") in table
    with mock.patch.object(torch.cuda, "get_device_capability", return_value=(9, 0)):
        assert launch.pick_configs(torch.device("cuda"), torch.bfloat16, 128, 4096, 4096) == table["sm90", 128, "long"]
        assert launch.pick_configs(torch.device("cuda"), torch.float32, 64, 100, 100) == launch.float32_table()[64]
    assert all(len(launches) == 3 for launches in hopper.hopper_table().values())


def test_forced_configs_bypass_the_table_and_are_undone_after():
    tiles = launch.KernelConfigs(*(launch.TileConfig(16, 32, 2, 1) for _ in range(3)))
    with mock.patch.object(torch.cuda, "get_device_capability", return_value=(9, 0)):
        with launch.forced_configs(tiles):
            assert launch.is_forced()
            assert launch.pick_configs(torch.device("cuda"), torch.bfloat16, 128, 4096, 4096) == tiles
            assert launch.pick_configs(torch.device("cpu"), torch.float32, 64, 8, 8, interpreted=True) == tiles
        assert not launch.is_forced()
        assert launch.pick_configs(torch.device("cuda"), torch.bfloat16, 128, 4096, 4096) != tiles
    with pytest.raises(TypeError, match="configs must be a KernelConfigs"):
        with launch.forced_configs((16, 16, 4, 1)):
            pass


def test_forced_configs_change_the_launch_and_not_the_result():
    # through the interpreter: 16 x 32 tiles on i = 45, j = 70 (ragged on both sides) give the same
    # attention as the interpreter's own 64 x 64 launch, and both match float64
    pytest.importorskip("triton")
    if torch.cuda.is_available() or not kernel_support("cpu").runs:
        pytest.skip("the interpreter runs these kernels on the CPU with triton 3.7 or newer")
    from flashattn import triton_attention

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for n in (45, 70, 70))
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=False)
    default = triton_attention(q, k, v)
    tiles = launch.KernelConfigs(*(launch.TileConfig(16, 32, 2, 1) for _ in range(3)))
    with launch.forced_configs(tiles):
        forced = triton_attention(q, k, v)
    # float32 tiles of 16 dimensions: errors near 1e-7
    torch.testing.assert_close(forced.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(default.double(), want, atol=1e-5, rtol=0)


# -- committed results -----------------------------------------------------------------------------


def test_every_result_a_chapter_reads_ships_with_the_package():
    read = set()
    for path in NOTEBOOKS:
        for source in code_cells(path):
            read |= set(re.findall(r"""["']([\w-]+\.json)["']""", source))
            read |= {f"tune-h200-{n}.json" for n in re.findall(r'"(\d+k(?:-\d+k)+)"', source)}
    assert read, "the chapters read no result: the pattern above is stale"
    for name in sorted(read):
        result = committed_result(name)
        assert isinstance(result, dict) and result, name


def test_committed_results_are_package_data(tmp_path):
    # a wheel built from the checkout carries them, so a reader on Colab has them without a clone
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    import zipfile

    (wheel,) = tmp_path.glob("flashattn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("flashattn/results/")}
    assert shipped == {p.name for p in (ROOT / "flashattn" / "results").glob("*.json")}


def test_a_missing_result_is_named_with_those_there():
    with pytest.raises(ValueError, match=r"no committed result 'nothing.json'; flashattn/results holds .*ring-h200"):
        committed_result("nothing.json")


# -- whether the kernels run -----------------------------------------------------------------------


def test_kernel_support_without_triton_says_what_to_install(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    missing = importlib.metadata.PackageNotFoundError("triton")
    with mock.patch("importlib.metadata.version", side_effect=missing):
        support = kernel_support("cpu")
    assert not support.runs and support.where == ""
    assert "found no triton" in support.reason and 'pip install "triton>=3.7"' in support.reason
    assert support.reason[0].isupper() and support.reason.endswith(".")  # a sentence of the skip line


@pytest.mark.parametrize(("version", "runs"), [("3.5.1", False), ("3.6.0", False), ("3.7.0", True), ("3.9.0", True)])
def test_kernel_support_on_the_cpu_follows_the_interpreter(version, runs, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with mock.patch("importlib.metadata.version", return_value=version):
        support = kernel_support("cpu")
    assert support.runs is runs
    assert support.where == ("interpreted" if runs else "")
    assert runs or f"triton {version}" in support.reason


@pytest.mark.parametrize(("capability", "version", "runs"), [
    ((7, 5), "3.6.0", False), ((8, 0), "3.3.0", False), ((8, 0), "3.4.0", True), ((9, 0), "3.9.0", True)])
def test_kernel_support_on_a_gpu_follows_capability_and_triton(capability, version, runs):
    with mock.patch("importlib.metadata.version", return_value=version), \
            mock.patch.object(torch.cuda, "get_device_capability", return_value=capability), \
            mock.patch.object(torch.cuda, "get_device_name", return_value="Tesla T4"):
        support = kernel_support("cuda")
    assert support.runs is runs
    assert support.where == ("compiled" if runs else "")
    if capability < (8, 0):
        assert "7.5" in support.reason and "Tesla T4" in support.reason
    elif not runs:
        assert f"triton {version}" in support.reason and "3.4" in support.reason


def test_skip_prints_one_line_only_when_the_kernels_do_not_run(capsys):
    assert book.KernelSupport(False, "", "Why, and what would run it.").skip("the probe") is True
    assert capsys.readouterr().out == "skipped: the probe. Why, and what would run it.\n"
    assert book.KernelSupport(True, "compiled", "").skip("the probe") is False
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(("gib", "batch"), [(15, 1), (40, 4), (80, 4)])
def test_chapter_sizes_follow_the_gpus_memory(gib, batch):
    with mock.patch.object(torch.cuda, "get_device_capability", return_value=(7, 5)), \
            mock.patch.object(torch.cuda, "get_device_name", return_value="GPU"), \
            mock.patch.object(torch.cuda, "mem_get_info", return_value=(gib * 2**30, gib * 2**30)), \
            mock.patch.object(torch.cuda, "current_device", return_value=0), \
            mock.patch.object(torch.cuda, "get_per_process_memory_fraction", return_value=1.0, create=True), \
            mock.patch.object(torch, "ones", return_value=torch.ones(2, 2, requires_grad=True)):
        cfg = book.setup(device="cuda")
    assert cfg.sizes.batch == batch
    assert cfg.dtype == torch.float16  # capability 7.5 has no bfloat16


# -- the chapters use public surfaces only ---------------------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapters_use_public_surfaces_and_no_network(path):
    private_flashattn = re.compile(r"\bflashattn(?:\.\w+)*\._(?!_)\w|\b(?:launch|hopper|ring|kernels)\._[A-Za-z]|"
                                   r"from flashattn[\w.]* import [^\n]*\b_[A-Za-z]")
    for source in code_cells(path):
        assert "raw.githubusercontent.com" not in source and "urllib" not in source
        # a private module of torch or triton (an aten operator's name, torch.ops.aten._x, is not one)
        match = re.search(r"\b(?:torch|triton)(?:\.(?!ops\b)\w+)*\._[a-z]\w*", source)
        assert match is None, f"{path.name} imports a private module: {match.group(0)!r}"
        match = private_flashattn.search(source)
        assert match is None, f"{path.name} uses a private name of flashattn: {match.group(0)!r}"


def test_use_rows_puts_a_tuning_proposal_into_the_table():
    key = ("sm80", 64, "any")
    before = launch.launch_table()[key]
    proposal = launch.KernelConfigs(*(launch.TileConfig(32, 32, 4, 2) for _ in range(3)))
    try:
        launch.use_rows({key: proposal})
        assert launch.launch_table()[key] == proposal
        with mock.patch.object(torch.cuda, "get_device_capability", return_value=(8, 0)):
            assert launch.pick_configs(torch.device("cuda"), torch.bfloat16, 64, 512, 512) == proposal
    finally:
        launch.use_rows({key: before})
    with pytest.raises(TypeError, match=r"the row \('sm80', 64, 'any'\) must be a KernelConfigs"):
        launch.use_rows({key: (32, 32, 4, 2)})
    assert launch.launch_table()[key] == before


def test_saved_bytes_counts_what_autograd_keeps_each_storage_once():
    from flashattn import FlashAttention, tiled_attention
    from flashattn.book import saved_bytes

    g = torch.Generator().manual_seed(3)
    b, h, n, d = 1, 2, 48, 16  # 48: no multiple of the tiles below
    q, k, v = (torch.randn(b, h, n, d, generator=g).requires_grad_() for _ in range(3))
    einsum = FlashAttention(flash=False)
    # the einsum path keeps Q, K, V and P (P saved twice, by the softmax and by P V: counted once)
    assert saved_bytes(lambda: einsum(q, k, v)) == 4 * b * h * (3 * n * d + n * n)
    assert saved_bytes(lambda: einsum(q, k, v), exclude=(q, k, v)) == 4 * b * h * n * n
    # the tiled path keeps Q, K, V, O and lse, however many tiles it ran
    tiled = saved_bytes(lambda: tiled_attention(q, k, v, block_q=32, block_k=32))
    assert tiled == 4 * b * h * (4 * n * d + n)
    # nothing is kept without autograd
    with torch.no_grad():
        assert saved_bytes(lambda: einsum(q, k, v)) == 0


def test_check_prints_its_line_and_fails_past_the_tolerance_or_on_nan(capsys):
    """Every chapter's checks go through ``check``: within the tolerance it prints, past it (or on NaN) it raises."""
    from flashattn.book import check, max_error

    want = torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.float64)
    got = (want + torch.tensor([[0.0, 3e-3], [-1e-3, 0.0]], dtype=torch.float64)).float()
    assert max_error(got, want) == pytest.approx(3e-3, rel=1e-5)
    check("o matches", got, want, atol=0.25)
    assert capsys.readouterr().out == "o matches: max |error| = 3.0e-03 (tolerance 0.25)\n"
    with pytest.raises(AssertionError, match=r"o matches: max \|error\| = 3.000e-03 exceeds the tolerance 0.001"):
        check("o matches", got, want, atol=1e-3)
    got[1, 0] = math.nan
    with pytest.raises(AssertionError, match="max \\|error\\| = nan exceeds the tolerance 0.25"):
        check("o matches", got, want, atol=0.25)
    with pytest.raises(ValueError, match=r"got has shape \(2, 1\) but want has shape \(2, 2\)"):
        check("o matches", got[:, :1], want, atol=0.25)
    assert max_error(torch.empty(0, 3), torch.empty(0, 3)) == 0.0


@pytest.mark.parametrize("record_name, device, emulation", [
    ("chapters-h100.json", "NVIDIA H100", None),
    ("emulated-t4.json", "Tesla T4 (emulated)", "t4"),
    ("emulated-a100.json", "NVIDIA A100-SXM4-40GB (emulated)", "a100"),
])
def test_the_recorded_gpu_runs_executed_every_chapter_without_an_error(record_name, device, emulation):
    """benchmarks/results/: the last runs of every chapter on the GPU runner, as itself and as a T4 and an A100.

    The running page's table of machines quotes these records.
    """
    record = json.loads((ROOT / "benchmarks" / "results" / record_name).read_text())
    assert record["device"].startswith(device) and record["git"]["commit"]
    assert record.get("emulation") == emulation
    chapters = {c["notebook"]: c for c in record["chapters"]}
    assert sorted(chapters) == sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert all(c["passed"] and c["code_cells"] > 0 for c in chapters.values())
    assert record["summary"] == f"{len(chapters)} passed, 0 failed"
    # chapter 13's Gluon kernel runs on Hopper only: elsewhere each of its kernel cells says why, in one line
    gluon = chapters["13_flashattention3.ipynb"]["skipped"]
    capability = {"t4": "7.5", "a100": "8.0", None: "9.0"}[emulation]
    if emulation is None:
        assert gluon == []
    else:
        assert gluon and all("need compute capability 9.x" in line and f"has {capability}" in line
                             for line in gluon)
    skipped = [line for name, c in chapters.items() if name != "13_flashattention3.ipynb" for line in c["skipped"]]
    if emulation == "t4":  # no Triton kernel on 7.5: chapter 10 says so in one line, and runs on
        assert any("compute capability 8.0 or newer" in line and "has 7.5" in line
                   for line in chapters["10_performance.ipynb"]["skipped"])
    else:  # a GPU that runs the Triton kernels skips none of them
        assert skipped == []


def test_an_updated_record_keeps_the_chapters_not_run_and_names_the_commit_of_each():
    spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "scripts" / "execute_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    chapter = lambda name, passed=True, **extra: {"notebook": name, "passed": passed, **extra}  # noqa: E731
    earlier = {"git": {"commit": "aaa"}, "device": "H100", "emulation": "t4",
               "chapters": [chapter("01.ipynb"), chapter("02.ipynb", False)]}
    run = {"git": {"commit": "bbb"}, "device": "H100", "emulation": "t4",
           "chapters": [chapter("02.ipynb", commit="bbb"), chapter("13.ipynb", commit="bbb")]}
    record = module.updated(earlier, run)
    assert record["chapters"] == [chapter("01.ipynb", commit="aaa"), chapter("02.ipynb", commit="bbb"),
                                  chapter("13.ipynb", commit="bbb")]
    assert record["git"] == {"commit": "bbb"} and record["summary"] == "3 passed, 0 failed"
    with pytest.raises(SystemExit, match="emulation is 't4', this run's 'a100'"):
        module.updated(earlier, dict(run, emulation="a100"))
