"""Runs the launch table's ``sm80`` rows on any GPU, forced, against float64: are the A100's tiles computed right?

No A100 is at hand, and an H100 or H200 would take its own rows. Here
``flashattn.triton.launch.forced_configs`` makes ``triton_attention`` launch
every kernel (forward, dK/dV, dQ) with one ``sm80`` row of the table, and
its output and gradients are compared with attention computed in float64
from the same inputs. Each case passes when the largest error of o, dq, dk
and dv is within twice that of PyTorch's own attention (SDPA in the same
dtype, on the same device) against the same float64 result, plus a floor of
one unit in the last place of the largest reference value (so that two
tiny errors are not compared as a ratio). In float32 both kernels keep full
precision and differ only in the order of their sums, whose rounding errors
grow like the square root of the sum's length: there a case also passes
within ``sqrt(K)`` units in the last place of the largest reference value,
K the longest sum (max(i, j, d)); a kernel that rounded to TF32 or to half
precision would be a thousand times further off. Whether the rows fit an
A100's shared memory is tests/test_compile_sm80.py's job.

Cases: head dimensions 64, 128 and 256 (each with its row) and 32 (served by
the row of 64); bfloat16 and float16 (and float32 with its own table);
causal and not; lengths that are no multiple of a tile, more keys than
queries and fewer (then, causal, the first ``i - j`` queries see no key: their
output and gradients must be zero); grouped-query attention.

    python benchmarks/check_sm80_rows.py --out results.json          # on a GPU
    python benchmarks/check_sm80_rows.py --cpu-smoke --out /tmp/s.json  # tiny sizes, Triton's interpreter

Writes a JSON file (commit, versions, device, one record per case) and
exits with status 1 when a case fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flashattn import triton_attention  # noqa: E402
from flashattn.triton.launch import float32_table, forced_configs, launch_table  # noqa: E402
from runinfo import run_info  # noqa: E402

OUTPUTS = ("o", "dq", "dk", "dv")


@dataclass(frozen=True)
class Case:
    """One comparison: q (b, h, i, d), k and v (b, h_kv, j, d), in ``dtype``, launched with the row of ``row``."""

    b: int
    h: int
    h_kv: int
    i: int
    j: int
    d: int
    causal: bool
    dtype: str

    @property
    def row(self) -> int:
        return max(64, self.d)


def cases(smoke: bool) -> list[Case]:
    """The cases of a GPU run, or a few tiny ones for the interpreter."""
    if smoke:
        shapes = [(1, 2, 1, 45, 70), (1, 2, 2, 70, 33)]  # GQA with i < j; i > j
        return [Case(*shape, d, causal, dtype) for shape in shapes for d in (32, 128) for causal in (False, True)
                for dtype in ("bfloat16", "float16")] + [Case(1, 2, 2, 40, 40, 256, True, "float32")]
    shapes = [
        (2, 8, 8, 1000, 1000),  # square, no length a multiple of a tile
        (2, 8, 2, 700, 1300),  # grouped-query, i < j
        (2, 4, 4, 1300, 700),  # i > j: causal, the first 600 queries see no key
        (1, 6, 3, 333, 2049),  # odd sizes, GQA
    ]
    out = [Case(*shape, d, causal, dtype) for d in (64, 128, 256) for shape in shapes for causal in (False, True)
           for dtype in ("bfloat16", "float16")]
    out += [Case(2, 4, 2, 517, 389, 32, causal, "bfloat16") for causal in (False, True)]
    out += [Case(*shape, d, causal, "float32") for d in (64, 128, 256) for shape in shapes[1:3]
            for causal in (False, True)]
    return out


def keep_mask(i: int, j: int, causal: bool, device: torch.device) -> Tensor:
    """(i, j) bool: query r sees key c, under the causal rule ``c <= r + (j - i)`` when ``causal``."""
    keep = torch.ones(i, j, dtype=torch.bool, device=device)
    return keep.tril(j - i) if causal else keep


def reference(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
    """Attention in float64 as the definition writes it; a query with no key gives zeros. Differentiable."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, dim=1), v.double().repeat_interleave(g, dim=1)
    keep = keep_mask(q.shape[2], k.shape[2], causal, q.device)
    has_key = keep.any(dim=-1, keepdim=True)
    s = (q.double() @ k.transpose(-2, -1)) * scale
    s = s.masked_fill(~keep, -math.inf).masked_fill(~has_key, 0.0)  # an empty row: finite scores, zeroed below
    return (s.softmax(dim=-1) * has_key) @ v


def pytorch_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
    """SDPA in the inputs' dtype, with the same causal rule; the queries that see no key get zeros."""
    g = q.shape[1] // k.shape[1]
    i, j = q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    empty = max(0, i - j) if causal else 0  # SDPA gives NaN for a row that sees nothing: leave them out
    mask = keep_mask(i, j, causal, q.device)[empty:] if causal else None
    o = F.scaled_dot_product_attention(q[:, :, empty:], k, v, attn_mask=mask, scale=scale)
    return torch.cat([o.new_zeros(*o.shape[:2], empty, o.shape[3]), o], dim=2)


def forward_backward(fn, q: Tensor, k: Tensor, v: Tensor, do: Tensor, causal: bool, scale: float) -> dict:
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v, causal, scale)
    o.backward(do.to(o.dtype))
    return dict(o=o.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def run_case(case: Case, device: torch.device, seed: int) -> dict:
    """Errors of triton_attention with the case's table row forced, and of SDPA, against float64."""
    dtype = getattr(torch, case.dtype)
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)  # noqa: E731
    q, do = draw(case.b, case.h, case.i, case.d), draw(case.b, case.h, case.i, case.d)
    k, v = draw(case.b, case.h_kv, case.j, case.d), draw(case.b, case.h_kv, case.j, case.d)
    scale = case.d**-0.5
    configs = float32_table()[case.row] if dtype == torch.float32 else launch_table()[("sm80", case.row, "any")]

    def kernels(q, k, v, causal, scale):
        with forced_configs(configs):
            return triton_attention(q, k, v, causal=causal, scale=scale)

    want = forward_backward(reference, q, k, v, do, case.causal, scale)
    got = forward_backward(kernels, q, k, v, do, case.causal, scale)
    sdpa = forward_backward(pytorch_attention, q, k, v, do, case.causal, scale)
    record = dict(asdict(case), row=case.row, launch=dict(fwd=asdict(configs.fwd), dkdv=asdict(configs.dkdv),
                                                           dq=asdict(configs.dq)))
    passed = True
    eps = torch.finfo(dtype).eps
    for name in OUTPUTS:
        ref = want[name]
        error = (got[name].double() - ref).abs().max().item()
        sdpa_error = (sdpa[name].double() - ref).abs().max().item()
        floor = eps * ref.abs().max().item()
        limit = 2 * sdpa_error + floor
        if dtype == torch.float32:  # summation order: sqrt(K) units in the last place
            limit = max(limit, math.sqrt(max(case.i, case.j, case.d)) * floor)
        ok = error <= limit  # NaN fails
        passed &= ok
        record[name] = dict(error=error, sdpa_error=sdpa_error, floor=floor, limit=limit, passed=ok)
    if case.causal and case.i > case.j:
        empty = case.i - case.j
        zeros = bool((got["o"][:, :, :empty] == 0).all() and (got["dq"][:, :, :empty] == 0).all())
        record["empty_rows_zero"] = zeros
        passed &= zeros
    record["passed"] = passed
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny sizes on the CPU through Triton's interpreter (triton 3.7 or newer)")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    if options.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' first use
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            parser.error("no GPU here: pass --cpu-smoke to run the tiny cases in Triton's interpreter")
        device = torch.device("cuda")
    records = []
    all_cases = list(cases(options.cpu_smoke))
    info = run_info(cases=len(all_cases))
    options.out.parent.mkdir(parents=True, exist_ok=True)
    for n, case in enumerate(all_cases):
        record = run_case(case, device, options.seed + n)
        records.append(record)
        worst = max(record[name]["error"] / record[name]["limit"] for name in OUTPUTS)
        print(f"{'ok  ' if record['passed'] else 'FAIL'} {case}  worst error / limit = {worst:.2f}", flush=True)
        # written after every case, so that a run cut short keeps the cases it checked
        failed = sum(not r["passed"] for r in records)
        result = dict(info, complete=len(records) == len(all_cases), failed=failed, cases=records)
        options.out.write_text(json.dumps(result, indent=1) + "\n")
    failed = sum(not r["passed"] for r in records)
    print(f"{len(records) - failed} of {len(records)} cases passed; results in {options.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
