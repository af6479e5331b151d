"""Plots a bench_triton.py JSON: TFLOP/s against sequence length, one panel per mode, head dimension and mask.

    python benchmarks/plot_triton.py flashattn/results/triton-h200.json
    # writes benchmarks/results/triton-h200.png; --out picks another path
    python benchmarks/plot_triton.py d64.json d128.json --out both.png   # runs split by --d, drawn together

``headline`` (the figure's title) is also what bench_triton.py prints at the
end: triton_attention's speed relative to SDPA's own choice of kernel
(``sdpa_default``, cuDNN's on the H200) and to PyTorch's FlashAttention-2
kernel (``sdpa_flash``). Importing this module does not import matplotlib.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STYLE = {
    "triton": dict(color="C3", marker="o", linewidth=2.2, label="triton_attention (this package)"),
    "triton_pointers": dict(color="C3", marker="o", linestyle=":", label="triton_attention, pointer kernels only"),
    "sdpa_default": dict(color="C4", marker="v", linestyle="--", label="PyTorch SDPA, its own choice"),
    "sdpa_flash": dict(color="C0", marker="s", label="PyTorch SDPA, FlashAttention-2 backend"),
    "sdpa_cudnn": dict(color="C2", marker="^", label="PyTorch SDPA, cuDNN backend"),
    "flex": dict(color="C1", marker="D", label="torch.compile(flex_attention)"),
}
MODE_NAMES = {"fwd": "forward", "fwd_bwd": "forward + backward"}
BASELINES = {"sdpa_default": "SDPA's own choice (sdpa_default{kernel})",
             "sdpa_flash": "PyTorch's FlashAttention-2 (sdpa_flash)"}


def backend_name(kernels: list[str]) -> str:
    """Which SDPA backend the kernel names belong to."""
    names = " ".join(kernels).lower()
    for word, name in (("cudnn", "cuDNN"), ("flash", "FlashAttention-2"), ("fmha", "memory-efficient"),
                       ("efficient", "memory-efficient"), ("softmax", "math")):
        if word in names:
            return name
    return "unknown"


def speed_ratios(rows: list[dict], mode: str, baseline: str) -> list[float]:
    """baseline time / triton time at every point of ``mode`` where both ran (the same FLOPs: speed ratio)."""
    ms = {(r["provider"], r["d"], r["causal"], r["n"]): r["ms"] for r in rows if r["mode"] == mode}
    return [ms[(baseline, *key[1:])] / t for key, t in ms.items()
            if key[0] == "triton" and (baseline, *key[1:]) in ms]


def headline(rows: list[dict]) -> str:
    """triton_attention's speed relative to sdpa_default and to sdpa_flash, per mode (one line per baseline)."""
    kernels = sorted({k for r in rows if r["provider"] == "sdpa_default" for k in r.get("kernels", [])})
    lines = []
    for baseline, name in BASELINES.items():
        parts = []
        for mode, mode_name in MODE_NAMES.items():
            ratios = speed_ratios(rows, mode, baseline)
            if ratios:
                parts.append(f"{mode_name} {min(ratios):.2f}-{max(ratios):.2f}x")
        if parts:
            label = name.format(kernel=f": {backend_name(kernels)}" if kernels else "")
            lines.append(f"triton_attention against {label}: " + ", ".join(parts) + " as fast")
    return "\n".join(lines) or "Attention throughput"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="bench_triton.py results (their rows are drawn together)")
    parser.add_argument("--out", help="PNG to write (default: the first JSON's path with .png)")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(Path(path).read_text()) for path in args.json]
    result = results[0]
    rows = [r for res in results for r in res["rows"]]
    sizes = result.get("sizes", result)  # older results kept the sizes at the top level
    panels = sorted({(r["d"], r["causal"]) for r in rows})
    modes = [m for m in MODE_NAMES if any(r["mode"] == m for r in rows)]

    fig, axes = plt.subplots(len(modes), len(panels), figsize=(max(12.0, 4.2 * len(panels)), 3.8 * len(modes)),
                             sharex=True, squeeze=False)
    for row_axes, mode in zip(axes, modes):
        for ax, (d, causal) in zip(row_axes, panels):
            for provider, style in STYLE.items():
                points = sorted((r["n"], r["tflops"]) for r in rows
                                if (r["provider"], r["mode"], r["d"], r["causal"]) == (provider, mode, d, causal))
                if points:
                    ax.plot(*zip(*points), **style)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{MODE_NAMES[mode]}, d = {d}, {'causal' if causal else 'no mask'}", fontsize=10)
            ax.set_xlabel("sequence length n (tokens)")
            ax.set_ylabel("TFLOP/s")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), frameon=False)
    commit = (result.get("git") or {}).get("commit")
    where = f"{result.get('device')}, driver {result['driver']}" if result.get("driver") else f"{result.get('device')}"
    fig.suptitle(f"{headline(rows)}\n{where}, torch {result.get('torch')}, bf16, {sizes['tokens']} tokens per batch, "
                 f"model width {sizes['width']}{f', commit {commit[:10]}' if commit else ''}; higher is better",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.93))
    out = Path(args.out) if args.out else Path(args.json[0]).with_suffix(".png")
    fig.savefig(out, dpi=120)
    print(headline(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
