"""FlashAttention in plain PyTorch against the float64 reference: values, gradients, skipped tiles, memory.

Shapes are drawn at random: lengths 1..70 that the block sizes mostly do not
divide, i < j and i > j, causal or not, blocks longer than the sequence,
grouped-query and 3-D k/v, head dimensions of v that differ from those of k.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from flashattn import tiled_attention
from flashattn.tiled import tiled_backward, tiled_backward_two_pass, tiled_forward_fa1, tiled_forward_fa2
from reference import reference_attention, reference_keep

# float64 agrees with the float64 reference to rounding: ~1e-16 per operation
# over sums of at most 70 terms, far inside 1e-10.
FLOAT64_REL = 1e-10
# float32 has unit roundoff u = 2^-24 = 6e-8. A score is a d-term dot product
# and an output or gradient a sum of up to j terms; the worst-case bound of
# such sums grows like n u, so with d, j <= 70 and a few chained steps,
# 1e-5 (about 170 u) holds (errors seen are a few 1e-7).
FLOAT32_REL = 1e-5
# bfloat16 keeps 8 significant bits (u = 2^-9 = 2e-3). The reference starts
# from the same rounded q, k, v, do; what differs is the rounding of the
# results to bfloat16, and of o inside D = rowsum(dO * O): a few u, so 2^-6.
BFLOAT16_REL = 2**-6

BLOCKS = [3, 8, 16, 25, 64, 100]


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|, in float64.

    Where the reference is exactly zero (dq and dk when j = 1: a softmax over
    one key is constant), the absolute error, against the same bound.
    """
    ref = ref.double()
    error = (x.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    return error / scale if scale > 0 else error


def make_inputs(b, h, h_kv, i, j, d, d_v, kv_3d, dtype, seed, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    kv_shape = (b, j) if kv_3d else (b, h_kv, j)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)

    return randn(b, h, i, d), randn(*kv_shape, d), randn(*kv_shape, d_v), randn(b, h, i, d_v).detach()


@st.composite
def problems(draw):
    """A random problem: sizes, blocks, options and a seed."""
    kv_3d = draw(st.booleans())
    h_kv = 1 if kv_3d else draw(st.integers(1, 2))
    return dict(
        b=draw(st.integers(1, 2)),
        h=h_kv * draw(st.integers(1, 2)),
        h_kv=h_kv,
        i=draw(st.integers(1, 70)),
        j=draw(st.integers(1, 70)),
        d=draw(st.sampled_from([1, 4, 7, 16])),
        d_v=draw(st.sampled_from([3, 4, 16])),
        kv_3d=kv_3d,
        causal=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.3, -0.7])),
        block_q=draw(st.sampled_from(BLOCKS)),
        block_k=draw(st.sampled_from(BLOCKS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def split(problem):
    """(tensor sizes, tiled options, reference options) of a problem."""
    sizes = {key: problem[key] for key in ("b", "h", "h_kv", "i", "j", "d", "d_v", "kv_3d", "seed")}
    ref_opts = {key: problem[key] for key in ("causal", "scale")}
    return sizes, {**ref_opts, "block_q": problem["block_q"], "block_k": problem["block_k"]}, ref_opts


def reference_with_grads(q, k, v, do, *, causal):
    """The reference output and its gradients, on float64 copies of the (possibly rounded) inputs."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    o = reference_attention(q, k, v, causal=causal)
    return o, torch.autograd.grad(o, (q, k, v), do.double())


def reference_lse(q, k, *, causal, scale):
    """The log-sum-exp of each row of masked scores, in float64 from the definition."""
    k = k if k.dim() == 4 else k[:, None]
    k = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.double() @ k.transpose(-1, -2)) * scale
    keep = reference_keep(q.shape[2], k.shape[2], causal, None, tuple(q.shape[:2]))
    return torch.logsumexp(s.masked_fill(~keep, float("-inf")), dim=-1)


def case(i, j, causal, block_q, block_k, h=2, h_kv=2, kv_3d=False):
    """One problem written out, for the cases every run must see."""
    return dict(b=2, h=h, h_kv=h_kv, i=i, j=j, d=7, d_v=4, kv_3d=kv_3d, causal=causal, scale=None,
                block_q=block_q, block_k=block_k, seed=i * 100 + j)


CASES = [
    case(37, 53, True, 16, 8),  # i < j, no length a block multiple
    case(53, 37, True, 8, 16),  # i > j: the first 16 rows are empty
    case(20, 30, True, 64, 100),  # blocks longer than the sequence
    case(64, 64, True, 16, 16),  # lengths that are block multiples
    case(45, 29, False, 25, 3, h=4, h_kv=1),  # multi-query
    case(31, 45, True, 8, 8, h=2, h_kv=1, kv_3d=True),  # 3-D k, v
    {**case(29, 29, True, 8, 16), "scale": -0.7},  # a negative scale
]


def with_cases(test):
    for problem in CASES:
        test = example(problem)(test)
    return test


@with_cases
@given(problems())
def test_float64_matches_reference_with_gradients(problem):
    sizes, opts, ref_opts = split(problem)
    q, k, v, do = make_inputs(**sizes, dtype=torch.float64)
    o = tiled_attention(q, k, v, **opts)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_ref = reference_attention(q, k, v, **ref_opts)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), do)
    assert o.shape == o_ref.shape and o.dtype == torch.float64
    assert o_ref.abs().max() > 0  # the last query always sees every key
    assert rel_error(o, o_ref) < FLOAT64_REL
    for name, grad, grad_ref in zip("qkv", grads, grads_ref):
        assert grad.shape == grad_ref.shape, name
        assert rel_error(grad, grad_ref) < FLOAT64_REL, name


@with_cases
@given(problems())
def test_fa1_and_fa2_forwards_agree(problem):
    sizes, opts, ref_opts = split(problem)
    q, k, v, _ = make_inputs(**sizes, dtype=torch.float64, requires_grad=False)
    o1, lse1 = tiled_forward_fa1(q, k, v, **opts)
    o2, lse2 = tiled_forward_fa2(q, k, v, **opts)
    o_ref = reference_attention(q, k, v, **ref_opts)
    lse_ref = reference_lse(q, k, **ref_opts)
    assert rel_error(o1, o2) < FLOAT64_REL
    assert rel_error(o1, o_ref) < FLOAT64_REL and rel_error(o2, o_ref) < FLOAT64_REL
    # rows with no key have lse = -inf in all three; compare the others
    has_key = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse1), has_key) and torch.equal(torch.isfinite(lse2), has_key)
    torch.testing.assert_close(lse1[has_key], lse_ref[has_key], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse2[has_key], lse_ref[has_key], atol=1e-12, rtol=1e-12)


# (i, j, causal, h, h_kv, kv_3d, block_q, block_k): each length not a block multiple,
# causal with i < j and i > j (empty rows), blocks longer than the sequence, GQA, 3-D k/v.
GRADCHECK_CASES = [
    (5, 7, False, 2, 2, False, 2, 3),
    (5, 7, True, 2, 2, False, 2, 3),
    (7, 4, True, 2, 1, False, 3, 2),
    (6, 6, True, 4, 2, False, 4, 4),
    (4, 6, True, 2, 1, True, 16, 16),
    (3, 5, False, 1, 1, False, 1, 1),
]


@pytest.mark.parametrize("i, j, causal, h, h_kv, kv_3d, block_q, block_k", GRADCHECK_CASES)
def test_gradcheck(i, j, causal, h, h_kv, kv_3d, block_q, block_k):
    q, k, v, _ = make_inputs(1, h, h_kv, i, j, 3, 2, kv_3d, torch.float64, seed=i * 100 + j)
    opts = dict(causal=causal, block_q=block_q, block_k=block_k)
    assert torch.autograd.gradcheck(lambda q, k, v: tiled_attention(q, k, v, **opts), (q, k, v))


@pytest.mark.parametrize("forward", [tiled_forward_fa1, tiled_forward_fa2])
def test_rows_with_no_key_give_zeros_and_zero_gradients(forward):
    """Causal with i > j: the first i - j queries see no key (bottom-right rule)."""
    i, j = 23, 9
    q, k, v, do = make_inputs(2, 2, 2, i, j, 5, 4, False, torch.float64, seed=3)
    opts = dict(causal=True, block_q=4, block_k=4)
    o, lse = forward(q.detach(), k.detach(), v.detach(), **opts)
    assert (o[:, :, : i - j] == 0).all() and torch.isneginf(lse[:, :, : i - j]).all()
    assert (o[:, :, i - j :] != 0).all(dim=-1).all() and torch.isfinite(lse[:, :, i - j :]).all()

    o = tiled_attention(q, k, v, **opts)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    assert (o[:, :, : i - j] == 0).all()
    assert (dq[:, :, : i - j] == 0).all() and (dq[:, :, i - j :] != 0).any()
    assert all(torch.isfinite(t).all() for t in (o, dq, dk, dv))
    _, dk_ref, dv_ref = torch.autograd.grad(reference_attention(q, k, v, causal=True), (q, k, v), do)
    assert rel_error(dk, dk_ref) < FLOAT64_REL and rel_error(dv, dv_ref) < FLOAT64_REL


@pytest.mark.parametrize("causal", [False, True])
def test_float32_within_its_rounding(causal):
    q, k, v, do = make_inputs(2, 4, 2, 70, 61, 16, 16, False, torch.float32, seed=5)
    o = tiled_attention(q, k, v, causal=causal, block_q=16, block_k=25)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_ref, grads_ref = reference_with_grads(q, k, v, do, causal=causal)
    assert o.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert rel_error(o, o_ref) < FLOAT32_REL
    for grad, grad_ref in zip(grads, grads_ref):
        assert rel_error(grad, grad_ref) < FLOAT32_REL


def test_bfloat16_within_its_rounding():
    q, k, v, do = make_inputs(1, 2, 1, 40, 50, 16, 16, False, torch.bfloat16, seed=6)
    o = tiled_attention(q, k, v, causal=True, block_q=16, block_k=16)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_ref, grads_ref = reference_with_grads(q, k, v, do, causal=True)
    assert o.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    assert rel_error(o, o_ref) < BFLOAT16_REL
    for grad, grad_ref in zip(grads, grads_ref):
        assert rel_error(grad, grad_ref) < BFLOAT16_REL
    _, lse = tiled_forward_fa2(q.detach(), k.detach(), v.detach(), causal=True)
    assert lse.dtype == torch.float32  # the statistics stay in float32, as the kernels keep them


def test_non_contiguous_inputs():
    """q, k, v cut out of (b, i, h, d) layouts, as a model's projections give them."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 19, 4, 8, generator=gen, dtype=torch.float64).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 23, 2, 8, generator=gen, dtype=torch.float64).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 23, 2, 8, generator=gen, dtype=torch.float64).transpose(1, 2).requires_grad_()
    assert not q.is_contiguous()
    o = tiled_attention(q, k, v, causal=True, block_q=8, block_k=8)
    o_ref = reference_attention(q, k, v, causal=True)
    assert rel_error(o, o_ref) < FLOAT64_REL
    do = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    for grad, grad_ref in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(o_ref, (q, k, v), do)):
        assert rel_error(grad, grad_ref) < FLOAT64_REL


@with_cases
@given(problems())
def test_both_backward_orders_match_the_reference(problem):
    """Algorithm 2's order (dQ added up across key tiles) and the kernels' (a dK/dV pass, then a dQ pass)."""
    sizes, opts, ref_opts = split(problem)
    q, k, v, do = make_inputs(**sizes, dtype=torch.float64)
    grads_ref = torch.autograd.grad(reference_attention(q, k, v, **ref_opts), (q, k, v), do)
    q, k, v = q.detach(), k.detach(), v.detach()
    o, lse = tiled_forward_fa2(q, k, v, **opts)
    for backward in (tiled_backward, tiled_backward_two_pass):
        grads = backward(do, q, k, v, o, lse, **opts)
        for name, grad, grad_ref in zip("qkv", grads, grads_ref):
            assert grad.shape == grad_ref.shape, (backward.__name__, name)
            assert rel_error(grad, grad_ref) < FLOAT64_REL, (backward.__name__, name)


@pytest.mark.parametrize("backward", [tiled_backward, tiled_backward_two_pass])
def test_tiled_backward_takes_3d_kv(backward):
    q, k, v, do = make_inputs(1, 2, 1, 9, 11, 4, 3, True, torch.float64, seed=8, requires_grad=False)
    o, lse = tiled_forward_fa2(q, k, v, causal=True, block_q=4, block_k=4)
    dq, dk, dv = backward(do, q, k, v, o, lse, causal=True, block_q=4, block_k=4)
    assert dk.shape == k.shape and dv.shape == v.shape
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    grads_ref = torch.autograd.grad(reference_attention(qr, kr, vr, causal=True), (qr, kr, vr), do)
    for grad, grad_ref in zip((dq, dk, dv), grads_ref):
        assert rel_error(grad, grad_ref) < FLOAT64_REL


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, None])
def test_bad_block_sizes(bad):
    q, k, v, _ = make_inputs(1, 1, 1, 4, 4, 2, 2, False, torch.float64, seed=0)
    with pytest.raises(ValueError, match="block_q"):
        tiled_attention(q, k, v, block_q=bad)
    with pytest.raises(ValueError, match="block_k"):
        tiled_forward_fa1(q, k, v, block_k=bad)


def test_bad_shapes_are_reported_by_the_shared_checks():
    q = torch.zeros(1, 3, 4, 8)
    with pytest.raises(ValueError, match="multiple of the heads"):
        tiled_attention(q, torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8))
    with pytest.raises(ValueError, match="head dimension"):
        tiled_forward_fa2(q, torch.zeros(1, 3, 5, 7), torch.zeros(1, 3, 5, 7))


# --- skipped tiles: counted through the matrix products that actually run ---

def visible_tiles(i, j, block_q, block_k, causal):
    """(rows, cols) of every tile with a key that some query may attend, from the reference mask."""
    keep = reference_keep(i, j, causal, None, (1, 1))[0, 0]  # (i, j)
    return [
        (min(block_q, i - r0), min(block_k, j - c0))
        for r0 in range(0, i, block_q)
        for c0 in range(0, j, block_k)
        if keep[r0 : r0 + block_q, c0 : c0 + block_k].any()
    ]


@pytest.mark.parametrize(
    "i, j, block_q, block_k", [(64, 64, 16, 16), (40, 64, 8, 16), (50, 20, 16, 8), (33, 47, 10, 7)]
)
@pytest.mark.parametrize("causal", [False, True])
def test_hidden_tiles_are_not_computed(i, j, block_q, block_k, causal):
    """Every FLOP of the matrix products belongs to a tile with something visible; no hidden tile is computed."""
    b, h, d, d_v = 2, 2, 8, 5
    q, k, v, do = make_inputs(b, h, h, i, j, d, d_v, False, torch.float64, seed=9)
    tiles = visible_tiles(i, j, block_q, block_k, causal)
    per_entry = sum(rows * cols for rows, cols in tiles) * 2 * b * h  # 2 FLOPs per multiply-add
    opts = dict(causal=causal, block_q=block_q, block_k=block_k)
    for forward in (tiled_forward_fa1, tiled_forward_fa2):
        with FlopCounterMode(display=False) as counter:
            forward(q.detach(), k.detach(), v.detach(), **opts)
        assert counter.get_total_flops() == per_entry * (d + d_v)  # S = Q K^T and P V
    o = tiled_attention(q, k, v, **opts)
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(o, (q, k, v), do)
    assert counter.get_total_flops() == per_entry * (3 * d + 2 * d_v)  # S again, dV, dP, dQ, dK
    if causal:
        assert len(tiles) < len(visible_tiles(i, j, block_q, block_k, False))


# --- memory: measured, and linear in the sequence length ---

class PeakMemory(TorchDispatchMode):
    """Bytes of tensor storage allocated inside the mode and still alive (``live``), and their maximum (``peak``).

    Every operator's outputs are seen; a storage that none of its inputs
    holds is new, and is counted until it is freed.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: dict[int, weakref.finalize] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        held = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in held and key not in self._alive:
                    self._alive[key] = weakref.finalize(storage, self._free, key, storage.nbytes())
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        del self._alive[key]


def peak_bytes(attention, n, d=16):
    """Peak bytes allocated by the forward, and by forward and backward together, for i = j = n."""
    q, k, v, do = make_inputs(1, 1, 1, n, n, d, d, False, torch.float64, seed=n)
    with PeakMemory() as memory:
        o = attention(q, k, v)
        forward_peak = memory.peak
        torch.autograd.grad(o, (q, k, v), do)
    return forward_peak, memory.peak


def test_peak_memory_grows_linearly():
    """Doubling n adds twice as many bytes each time (an affine function of n), never an (i, j) matrix."""
    lengths = [64, 128, 256, 512]

    def tiled_fn(q, k, v):
        return tiled_attention(q, k, v, causal=True, block_q=32, block_k=32)

    def standard_fn(q, k, v):
        return reference_attention(q, k, v, causal=True)

    tiled = [peak_bytes(tiled_fn, n) for n in lengths]
    standard = [peak_bytes(standard_fn, n) for n in lengths]
    for phase in (0, 1):  # forward, then forward and backward
        steps = [tiled[m + 1][phase] - tiled[m][phase] for m in range(len(lengths) - 1)]
        for small, large in zip(steps, steps[1:]):
            assert abs(large - 2 * small) <= 0.02 * large, steps
        # at n = 512 the whole computation needs less than one (i, j) matrix of float64
        assert tiled[-1][phase] < 512 * 512 * 8
        # the measurement can tell: the reference, which holds (i, j) matrices, grows 4x per doubling
        assert standard[-1][phase] > 3.5 * standard[-2][phase]


def test_saved_for_backward_is_linear():
    """What the forward keeps for backward: q, k, v, o and lse, nothing of size (i, j)."""

    def saved_bytes(attention, i, j):
        q, k, v, _ = make_inputs(2, 4, 2, i, j, 16, 8, False, torch.float64, seed=0)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attention(q, k, v)
        return total

    def tiled(q, k, v):
        return tiled_attention(q, k, v, causal=True, block_q=16, block_k=16)

    for i, j in [(60, 70), (120, 140), (240, 280)]:
        # q (b, h, i, d), k (b, h_kv, j, d), v (b, h_kv, j, d_v), o (b, h, i, d_v), lse (b, h, i)
        elements = 2 * 4 * i * 16 + 2 * 2 * j * (16 + 8) + 2 * 4 * i * 8 + 2 * 4 * i
        assert saved_bytes(tiled, i, j) == 8 * elements
    assert saved_bytes(reference_attention, 240, 280) > 3.5 * saved_bytes(reference_attention, 120, 140)


def test_every_entry_point_is_not_causal_unless_asked():
    """The default of ``causal`` is False everywhere: each function called without it equals non-causal attention."""
    q, k, v, do = make_inputs(1, 2, 1, 20, 20, 8, 8, False, torch.float64, seed=21)
    want = reference_attention(q, k, v)
    dq, dk, dv = torch.autograd.grad(want, (q, k, v), do)
    o, lse = tiled_forward_fa2(q, k, v, block_q=8, block_k=8)
    torch.testing.assert_close(o, want)
    torch.testing.assert_close(tiled_forward_fa1(q, k, v, block_q=8, block_k=8)[0], want)
    torch.testing.assert_close(tiled_attention(q, k, v, block_q=8, block_k=8), want)
    for backward in (tiled_backward, tiled_backward_two_pass):
        got = backward(do, q, k, v, o, lse, block_q=8, block_k=8)
        for g, w in zip(got, (dq, dk, dv)):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("name", ["tiled_forward_fa2", "tiled_forward_fa1", "tiled_backward", "tiled_backward_two_pass"])
def test_a_q_that_is_not_a_tensor_is_named(name):
    """The checks run before anything reads q's dtype or k's shape."""
    import flashattn.tiled as tiled

    k = torch.randn(1, 2, 4, 8)
    args = ([[1.0]], k, k) if name.startswith("tiled_forward") else (k, [[1.0]], k, k, k, k[..., 0])
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        getattr(tiled, name)(*args)
