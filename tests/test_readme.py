"""The README's example runs as written, and its masked call equals the reference."""

import re
from pathlib import Path

import torch

from reference import reference_attention


def test_readme_example_runs():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    code = re.search(r"```python\n(.*?)```", readme.read_text(), re.S).group(1)
    scope: dict = {}
    exec(code, scope)
    q, k, v, mask, plain = (scope[n] for n in ("q", "k", "v", "mask", "plain"))
    assert scope["out"].shape == (2, 8, 128, 64)
    torch.testing.assert_close(
        plain(q, k, v, mask=mask).double(), reference_attention(q, k, v, mask=mask), atol=2e-5, rtol=2e-5
    )


def test_readme_decoding_and_ring_example_runs():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    code = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)[1]
    scope: dict = {}
    exec(code, scope)
    q, k, v, lens, out = (scope[n] for n in ("q_new", "k_cache", "v_cache", "cache_lens", "out"))
    assert out.shape == (2, 8, 4, 64) and torch.isfinite(out).all()
    for n, length in enumerate(lens.tolist()):  # each sequence against its valid keys, causal at the end
        want = reference_attention(q[n : n + 1], k[n : n + 1, :, :length], v[n : n + 1, :, :length], causal=True)
        torch.testing.assert_close(out[n : n + 1].double(), want, atol=2e-5, rtol=2e-5)
    x = scope["x"]  # one process: the shard is the whole sequence
    torch.testing.assert_close(scope["out_shard"].double(), reference_attention(x, x, x, causal=True), atol=2e-5, rtol=2e-5)
