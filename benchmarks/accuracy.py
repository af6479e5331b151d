"""Error of an attention implementation in units of its output's last place (ulp), for the benchmarks.

The implementation under test runs on bf16 inputs. The reference computes the
same function from the same bf16 values, cast to float64, and is rounded to
the output's dtype (bf16): the best any bf16 kernel can return. The error of
one element is

    |got - ref_rounded| / spacing(max(|ref_rounded|, floor))

where ``spacing(x)`` is the distance from ``x`` to the next bf16 number
(``torch.nextafter``), so a kernel that returns the correctly rounded value
scores 0 and one that is off by one bf16 step scores 1. ``floor`` is the RMS of
the reference over the element's row (its last dimension), and at least 1/16
of the RMS over the whole tensor: a correct kernel's rounding error follows
the size of the row's terms, not the size of an element that cancels to
nearly zero (or to exactly zero, like dq of the first query under the causal
mask), whose own spacing would turn a harmless error into millions of "ulps". Reported per tensor (o, and dq, dk, dv for forward + backward): the
largest, the 99th percentile and the mean. A correct bf16 kernel scores a
99th percentile of 1 or 2, a mean of about 0.2 and a maximum of a few (up to
about 80 in dq of causal attention, in the first query rows, where dq nearly
cancels and the kernels' rounding of dS to bf16 shows); one whose scale is 5%
off scores a 99th percentile of 25 to 40, a mean of 6 to 13 and a maximum of
50 to 150 (more elements, larger maximum); 1% off, a 99th percentile of 5 to
8. The 99th percentile separates them: ``P99_LIMIT``.

    python benchmarks/accuracy.py                 # the self-test, on the CPU (about 10 s)
    python benchmarks/accuracy.py --device cuda   # the same with the GPU's kernels
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

OUTPUTS = ("o", "dq", "dk", "dv")
# a 5%-wrong scale gives a 99th percentile of about 30 ulp; a correct kernel 1 to 3 (the gradients of
# grouped-query attention, summed over the heads of a group, reach 3)
P99_LIMIT = 8.0


def ulp_error(got: Tensor, ref: Tensor) -> Tensor:
    """|got - ref| per element in ulps of ``got.dtype`` at ``ref``'s magnitude (see the module's docstring), float32.

    ``ref`` (any float dtype, usually float64) is rounded to ``got.dtype``
    first. Both must have the same shape, at least 1-D.
    """
    if got.shape != ref.shape:
        raise ValueError(f"shapes differ: got {tuple(got.shape)}, reference {tuple(ref.shape)}")
    dtype = got.dtype
    r = ref.detach().to(dtype)
    rf = r.float()
    square = rf.square()
    floor = torch.maximum(square.mean(dim=-1, keepdim=True).sqrt(), square.mean().sqrt() / 16)
    magnitude = torch.maximum(rf.abs(), floor).to(dtype)
    # an all-zero tensor: measure at the smallest normal number rather than divide by the spacing of 0
    magnitude = magnitude.clamp_min(torch.finfo(dtype).tiny)
    spacing = (torch.nextafter(magnitude, torch.full_like(magnitude, math.inf)) - magnitude).float()
    return (got.detach().float() - rf).abs() / spacing


def summarize(ulps: Tensor) -> dict[str, float]:
    """max, 99th percentile and mean of per-element errors in ulps (NaN propagates to every entry)."""
    x = ulps.flatten().float()
    if x.numel() == 0:
        return dict(max=0.0, p99=0.0, mean=0.0)
    if torch.isnan(x).any():
        return dict(max=math.nan, p99=math.nan, mean=math.nan)
    k = max(1, math.ceil(0.99 * x.numel()))
    return dict(max=round(x.max().item(), 3), p99=round(x.kthvalue(k).values.item(), 3),
                mean=round(x.mean().item(), 4))


def ulp_report(got: dict[str, Tensor | None], ref: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """``summarize(ulp_error(got[name], ref[name]))`` for each name that both hold."""
    return {name: summarize(ulp_error(got[name], ref[name])) for name in OUTPUTS
            if got.get(name) is not None and ref.get(name) is not None}


def run_with_grads(fn: Callable[[Tensor, Tensor, Tensor], Tensor], q: Tensor, k: Tensor, v: Tensor,
                   do: Tensor | None = None) -> dict[str, Tensor]:
    """``fn(q, k, v)`` on fresh leaves of the same values; with ``do``, also the gradients dq, dk, dv."""
    grad = do is not None
    qq, kk, vv = (t.detach().requires_grad_(grad) for t in (q, k, v))
    with torch.set_grad_enabled(grad):
        o = fn(qq, kk, vv)
        if grad:
            o.backward(do)
    out = dict(o=o.detach())
    if grad:
        out.update(dq=qq.grad, dk=kk.grad, dv=vv.grad)
    return out


Reference = Callable[[Tensor, Tensor, Tensor, slice, slice], Tensor]


def chunked_reference(fn64: Reference, q: Tensor, k: Tensor, v: Tensor, do: Tensor | None = None,
                      max_scores: int = 2**28) -> dict[str, Tensor]:
    """o (and, with ``do``, dq, dk, dv) of ``fn64`` in float64, from the values of ``q``, ``k``, ``v``.

    The problem is cut into parts of one batch element and a few key/value
    heads (with their query heads), each with at most ``max_scores`` scores
    (2 GiB of float64), so that the float64 scores fit in memory at any
    length. ``fn64(q, k, v, batch, heads)`` computes one part: ``q``, ``k``,
    ``v`` are its float64 leaves, ``batch`` and ``heads`` the slices of the
    batch and of the query heads it covers (for the masks and biases it must
    cut alike). ``q`` ``(b, h, i, d)``, ``k`` ``(b, h_kv, j, d)``, ``v`` ``(b, h_kv, j, d_v)``.
    """
    b, h, i, _ = q.shape
    h_kv, j = k.shape[1], k.shape[2]
    group = h // h_kv
    kv_heads = max(1, min(h_kv, max_scores // max(1, group * i * j)))
    grad = do is not None
    ref = dict(o=q.new_zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64))
    if grad:
        ref.update(dq=torch.zeros_like(q, dtype=torch.float64), dk=torch.zeros_like(k, dtype=torch.float64),
                   dv=torch.zeros_like(v, dtype=torch.float64))
    for n in range(b):
        batch = slice(n, n + 1)
        for h0 in range(0, h_kv, kv_heads):
            kv = slice(h0, min(h_kv, h0 + kv_heads))
            heads = slice(kv.start * group, kv.stop * group)
            q64, k64, v64 = (t.detach()[batch, s].double().requires_grad_(grad)
                             for t, s in ((q, heads), (k, kv), (v, kv)))
            with torch.set_grad_enabled(grad):
                o = fn64(q64, k64, v64, batch, heads)
                if grad:
                    o.backward(do[batch, heads].double())
            ref["o"][batch, heads] = o.detach()
            if grad:
                ref["dq"][batch, heads] = q64.grad
                ref["dk"][batch, kv] = k64.grad
                ref["dv"][batch, kv] = v64.grad
            del o, q64, k64, v64
    return ref


def plain_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale) v with the causal rule aligned bottom-right, as written: the float64 reference."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = q @ k.transpose(-1, -2) * scale
    if causal:
        i, j = s.shape[-2:]
        hidden = torch.arange(j, device=s.device)[None, :] > torch.arange(i, device=s.device)[:, None] + (j - i)
        s = s.masked_fill(hidden, -math.inf)
    return torch.softmax(s, dim=-1) @ v


def part(t: Tensor | None, batch: slice, heads: slice) -> Tensor | None:
    """The part of a mask or bias that broadcasts to (b, h, i, j) for one batch slice and head slice, 4-D."""
    if t is None:
        return None
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t[batch if t.shape[0] > 1 else slice(None), heads if t.shape[1] > 1 else slice(None)]


def over_limit(report: dict[str, dict[str, float]], limit: float = P99_LIMIT) -> list[str]:
    """The tensors whose 99th percentile exceeds ``limit`` ulps (or is NaN)."""
    return [name for name, s in report.items() if not s["p99"] <= limit]


def format_report(report: dict[str, dict[str, float]]) -> str:
    return "  ".join(f"{name} {s['max']:g}/{s['p99']:g}/{s['mean']:.2f}" for name, s in report.items())


# ----------------------------------------------------------------------------------------------
# self-test: on the CPU by default, on the GPU with --device cuda


def _flash_like(causal: bool, scale_factor: float = 1.0) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Attention computed as the GPU kernels do, in float32 with the probabilities rounded to bf16 for P V
    (and dS for dQ, dK), written out with its own backward: a correct bf16 kernel on the CPU."""

    class FlashLike(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            qf, kf, vf = q.float(), k.float(), v.float()
            scale = q.shape[-1] ** -0.5 * scale_factor
            s = qf @ kf.transpose(-1, -2) * scale
            if causal:
                i, j = s.shape[-2:]
                s = s.masked_fill(torch.ones(i, j, dtype=torch.bool).tril(j - i).logical_not(), -math.inf)
            m = s.amax(-1, keepdim=True)
            p_tilde = torch.exp(s - m)
            l = p_tilde.sum(-1, keepdim=True)
            o = ((p_tilde.to(q.dtype).float() @ vf) / l).to(q.dtype)
            ctx.save_for_backward(q, k, v, o, p_tilde / l)
            ctx.scale = scale
            return o

        @staticmethod
        def backward(ctx, do):
            q, k, v, o, p = ctx.saved_tensors
            dof = do.float()
            dv = p.to(q.dtype).float().transpose(-1, -2) @ dof
            dp = dof @ v.float().transpose(-1, -2)
            delta = (o.float() * dof).sum(-1, keepdim=True)
            ds = (p * (dp - delta)).to(q.dtype).float()
            dq = ds @ k.float() * ctx.scale
            dk = ds.transpose(-1, -2) @ q.float() * ctx.scale
            return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)

    return FlashLike.apply


def _self_test(device: str) -> dict:
    """Checks of ulp_error, the chunked reference and the separation of correct and wrong kernels; their numbers."""
    import torch.nn.functional as F

    torch.set_default_device(device)
    failures, reports = [], {}

    def expect(ok: bool, what: str) -> None:
        print(("ok    " if ok else "FAIL  ") + what)
        if not ok:
            failures.append(what)

    # ulp_error itself
    x = torch.tensor([1.0, -3.0, 0.5, 1e-30, 0.0, 2.0**-10], dtype=torch.float64)
    xb = x.to(torch.bfloat16)
    up = torch.nextafter(xb, torch.full_like(xb, math.inf))
    expect(ulp_error(xb, x).max().item() == 0, "the correctly rounded value scores 0 ulp")
    e = ulp_error(up, x)
    expect(e[0].item() == 1 and e[1].item() == 1, f"one bf16 step up scores 1 ulp at 1 and -3: {e[:2].tolist()}")
    expect(bool(torch.isfinite(e).all()), f"elements near 0 score finite ulps (the floor): {e.tolist()}")
    zeros = torch.zeros(3, 4, dtype=torch.bfloat16)
    expect(ulp_error(zeros, zeros.double()).max().item() == 0, "an all-zero tensor against zero scores 0")
    s = summarize(torch.arange(1000.0))
    expect(s == dict(max=999.0, p99=989.0, mean=499.5), f"summarize: {s}")

    # the chunked float64 reference against the unchunked one (several batch elements and GQA heads)
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(2, 4, 33, 16, dtype=torch.bfloat16) for _ in range(4))
    kg, vg = k[:, :2].contiguous(), v[:, :2].contiguous()

    def fn64(q, k, v, batch, heads):
        return plain_attention(q, k, v, causal=True)

    whole = chunked_reference(fn64, q, kg, vg, do)
    parts = chunked_reference(fn64, q, kg, vg, do, max_scores=2 * 33 * 33)
    expect(all(torch.allclose(whole[n], parts[n], rtol=1e-12, atol=1e-12) for n in OUTPUTS),
           "the chunked reference equals the whole one (GQA, causal)")
    sdpa64 = run_with_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                            *(t.double() for t in (q, kg, vg)), do.double())
    expect(all(torch.allclose(whole[n], sdpa64[n], rtol=1e-10, atol=1e-10) for n in OUTPUTS),
           "plain_attention in float64 equals SDPA in float64, with gradients")

    # correct bf16 attention against a wrong scale: o, dq, dk, dv
    b, h, n, d = 2, 4, 512, 64
    q, k, v, do = (torch.randn(b, h, n, d, dtype=torch.bfloat16) for _ in range(4))
    print(f"\nulp error (max/p99/mean) of bf16 attention, b={b} h={h} n={n} d={d}, against float64 rounded to bf16:")
    for causal in (False, True):
        ref = chunked_reference(lambda q, k, v, batch, heads: plain_attention(q, k, v, causal=causal),
                                q, k, v, do, max_scores=h * n * n // 2)
        cases = {
            "sdpa (default kernel)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            "flash-like (bf16 P, dS)": _flash_like(causal),
            "sdpa, scale x 1.05": lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=1.05 * d**-0.5),
            "flash-like, scale x 1.05": _flash_like(causal, 1.05),
        }
        for name, fn in cases.items():
            report = ulp_report(run_with_grads(fn, q, k, v, do), ref)
            reports[f"causal={causal} {name}"] = report
            print(f"  causal={causal!s:5s} {name:26s} {format_report(report)}")
            if "1.05" in name:
                expect(all(s["p99"] >= 10 and s["max"] >= 50 for s in report.values()),
                       f"causal={causal} {name}: p99 >= 10 and max >= 50 ulp in o, dq, dk, dv")
                expect(len(over_limit(report)) == 4, f"causal={causal} {name}: flagged (p99 > {P99_LIMIT})")
            else:
                expect(all(s["p99"] <= 2 and s["mean"] <= 0.5 for s in report.values()),
                       f"causal={causal} {name}: p99 <= 2 and mean <= 0.5 ulp in o, dq, dk, dv")
                expect(not over_limit(report), f"causal={causal} {name}: not flagged")

    # the module's path as bench_module.py checks it: FlashAttention with a key padding mask, an ALiBi bias, GQA
    from flashattn import FlashAttention, alibi_bias, padding_mask

    keep = padding_mask(torch.tensor([n, n // 2 + 7]), n)
    bias = alibi_bias(h, n, n).to(torch.bfloat16)
    kg, vg = k[:, :1].contiguous(), v[:, :1].contiguous()
    for name, module, kwargs, kv in (
        ("key padding", FlashAttention(), dict(mask=keep), (k, v)),
        ("alibi bias", FlashAttention(), dict(attn_bias=bias), (k, v)),
        ("gqa causal", FlashAttention(causal=True), {}, (kg, vg)),
    ):
        def fn64(q, k, v, batch, heads, module=module, kwargs=kwargs):
            parts = {key: part(t, batch, heads) for key, t in kwargs.items()}
            return module.einsum_attn(q, k, v, **{key: (t.double() if t.is_floating_point() else t)
                                                  for key, t in parts.items()})
        ref = chunked_reference(fn64, q, *kv, do, max_scores=n * n)
        for label, fn in (("module", lambda q, k, v, module=module, kwargs=kwargs: module(q, k, v, **kwargs)),
                          ("module, scale x 1.05", lambda q, k, v, kwargs=kwargs, c=module.causal:
                           FlashAttention(causal=c, scale=1.05 * d**-0.5)(q, k, v, **kwargs))):
            report = ulp_report(run_with_grads(fn, q, *kv, do), ref)
            reports[f"{name} {label}"] = report
            print(f"  {name:12s} {label:22s} {format_report(report)}")
            bad = "1.05" in label
            expect(len(over_limit(report)) == 4 if bad else not over_limit(report),
                   f"{name} {label}: {'flagged' if bad else 'not flagged'} (p99 limit {P99_LIMIT} ulp)")

    print()
    return dict(ran_on=str(device), b=b, h=h, n=n, d=d, reports=reports, failures=failures)


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Self-test of the ulp error measure (" + __doc__.splitlines()[0] + ")")
    parser.add_argument("--device", default="cpu", help="where to run it: cpu (default) or cuda")
    parser.add_argument("--out", help="where to write its numbers as JSON")
    args = parser.parse_args()
    result = _self_test(args.device)
    if args.out:
        from runinfo import run_info

        with open(args.out, "w") as f:
            json.dump(dict(**run_info(), **result), f, indent=1)
    if result["failures"]:
        raise SystemExit(f"{len(result['failures'])} self-test check(s) failed: {result['failures']}")
    print("accuracy self-test passed")


if __name__ == "__main__":
    main()
