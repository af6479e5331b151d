"""Plots a bench_triton.py JSON: TFLOP/s against sequence length, one panel per mode, head dimension and mask.

    python benchmarks/plot_triton.py benchmarks/results/triton-h200.json
    # writes benchmarks/results/triton-h200.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "triton": dict(color="C3", marker="o", linewidth=2.2, label="triton_attention (this package)"),
    "sdpa_flash": dict(color="C0", marker="s", label="PyTorch SDPA, FlashAttention-2 backend"),
    "sdpa_cudnn": dict(color="C2", marker="^", label="PyTorch SDPA, cuDNN backend"),
    "flex": dict(color="C1", marker="D", label="torch.compile(flex_attention)"),
}
MODE_NAMES = {"fwd": "forward", "fwd_bwd": "forward + backward"}


def headline(rows: list[dict]) -> str:
    """What the figure shows: the range of triton_attention's speed relative to sdpa_flash, per mode."""
    parts = []
    for mode, name in MODE_NAMES.items():
        ms = {(r["provider"], r["d"], r["causal"], r["n"]): r["ms"] for r in rows if r["mode"] == mode}
        ratios = [ms[("sdpa_flash", *key[1:])] / t for key, t in ms.items()
                  if key[0] == "triton" and ("sdpa_flash", *key[1:]) in ms]
        if ratios:
            parts.append(f"{name} {min(ratios):.2f}-{max(ratios):.2f}x")
    if not parts:
        return "Attention throughput"
    return "triton_attention against PyTorch's FlashAttention-2 kernel: " + ", ".join(parts) + " as fast"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="a bench_triton.py result")
    parser.add_argument("--out", help="PNG to write (default: the JSON's path with .png)")
    args = parser.parse_args()
    result = json.loads(Path(args.json).read_text())
    rows = result["rows"]
    panels = sorted({(r["d"], r["causal"]) for r in rows})
    modes = [m for m in MODE_NAMES if any(r["mode"] == m for r in rows)]

    fig, axes = plt.subplots(len(modes), len(panels), figsize=(4.2 * len(panels), 3.8 * len(modes)),
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
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(f"{headline(rows)}\n{result['device']}, bf16, {result['tokens']} tokens per batch, "
                 f"model width {result['width']}; higher is better")
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    out = Path(args.out) if args.out else Path(args.json).with_suffix(".png")
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
