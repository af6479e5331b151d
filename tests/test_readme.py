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
