"""The fused GroupNorm + scale-shift + SiLU Triton kernel against a float64 reference, forward
and backward, its torch.library registration and torch.compile pass-through.

On CPU the kernel runs in the Triton interpreter (tests/conftest.py); on a GPU natively. The
acceptance rule of this project: the kernel's largest error against float64 is at most twice
PyTorch's own at the same dtype (``F.group_norm``, the modulation and ``F.silu`` in that dtype,
as the U-Net ResBlock computes it), where PyTorch's own error is floored at the error of
rounding the exact float64 result to that dtype.
"""

import pytest
import torch
import torch.nn.functional as F

from sdiff.kernels import groupnorm_silu as kernel
from sdiff.kernels.groupnorm_silu import groupnorm_silu, groupnorm_silu_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not kernel.supports(
        torch.zeros(1, 2, 2, 2, device=DEVICE),
        *torch.zeros(2, 2, device=DEVICE),
        *torch.zeros(2, 1, 2, device=DEVICE),
        1,
    ),
    reason="needs CUDA or the Triton interpreter (TRITON_INTERPRET=1 before triton is imported)",
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5  # nn.GroupNorm's default, as the ResBlocks use it
# (batch, channels, height, width, groups)
SHAPES = [
    (2, 12, 5, 7, 4),  # 3 channels per group (padded to 4), H x W = 35
    (1, 64, 16, 16, 32),  # the model's 32 groups; 2 channels x 256: the unmasked loads
    (1, 40, 9, 13, 8),  # 5 channels per group, H x W = 117 (odd)
    (3, 16, 8, 8, 2),  # 8 channels per group, a batch of 3
]


def formula(x, weight, bias, scale, shift, groups, eps=EPS):
    """GroupNorm, its affine, scale-shift and SiLU written out, in the inputs' dtype (float64)."""
    b, c, h, w = x.shape
    xg = x.reshape(b, groups, -1)  # (B, G, C/G x H x W)
    mean = xg.mean(-1, keepdim=True)
    var = (xg - mean).square().mean(-1, keepdim=True)  # biased, as GroupNorm
    xhat = ((xg - mean) / torch.sqrt(var + eps)).reshape(b, c, h, w)
    z = (xhat * weight[:, None, None] + bias[:, None, None]) * (1 + scale[:, :, None, None])
    z = z + shift[:, :, None, None]
    return z / (1 + torch.exp(-z))  # SiLU: z sigmoid(z)


def torch_own(x, weight, bias, scale, shift, groups, eps=EPS):
    """The ResBlock's own expression at the inputs' dtype."""
    h = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


def make(b, c, h, w, dtype, seed=0, offset=3.0):
    """x with a mean and a spread for the norm to remove, the affine and modulation, and an
    upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=gen) * 2 + offset
    weight, bias = 1 + 0.3 * torch.randn(2, c, generator=gen)
    scale, shift = torch.randn(2, b, c, generator=gen) * 0.5
    g = torch.randn(b, c, h, w, generator=gen)
    return [t.to(DEVICE, dtype) for t in (x, weight, bias, scale, shift, g)]


def run(fn, x, weight, bias, scale, shift, g, groups):
    """(y, dx, dweight, dbias, dscale, dshift) of fn with upstream gradient g."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias, scale, shift)]
    y = fn(*leaves, groups)
    y.backward(g)
    return [y.detach()] + [t.grad for t in leaves]


def max_err(x, ref):
    return (x.double() - ref).abs().max().item()


NAMES = ["y", "dx", "dweight", "dbias", "dscale", "dshift"]


def test_reference_is_the_formula_and_the_model_expression():
    """The reference is the written-out formula and the ResBlock's nn.GroupNorm expression."""
    *inputs, _ = (t.double() for t in make(2, 12, 5, 7, torch.float32))
    ref = groupnorm_silu_ref(*inputs, 4)
    torch.testing.assert_close(ref, formula(*inputs, 4))
    x, weight, bias, scale, shift = inputs
    norm = torch.nn.GroupNorm(4, 12).double()  # the ResBlock's norm2, with its eps
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
    model = F.silu(norm(x) * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
    torch.testing.assert_close(ref, model.detach())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-g{s[4]}")
def test_forward_and_backward_against_float64(dtype, shape):
    *dims, groups = shape
    inputs = make(*dims, dtype)
    ref = run(formula, *(t.double() for t in inputs), groups)
    ours = run(groupnorm_silu, *inputs, groups)
    theirs = run(torch_own, *inputs, groups)
    for name, o, t, r in zip(NAMES, ours, theirs, ref, strict=True):
        assert o.dtype == dtype and o.shape == r.shape, name
        rounding = max_err(r.to(dtype), r)
        bound = 2 * max(max_err(t, r), rounding)
        err = max_err(o, r)
        assert err <= bound, (
            f"{name}: kernel error {err:.2e} > {bound:.2e} (torch {max_err(t, r):.2e})"
        )


def test_large_mean_does_not_cancel():
    """Values around 1000 with unit spread: the shifted sums keep fp32 statistics exact enough
    for the same bound as PyTorch's own fp32 GroupNorm."""
    inputs = make(2, 8, 6, 10, torch.float32, offset=1000.0)
    ref = run(formula, *(t.double() for t in inputs), 2)
    ours = run(groupnorm_silu, *inputs, 2)
    theirs = run(torch_own, *inputs, 2)
    for name, o, t, r in zip(NAMES, ours, theirs, ref, strict=True):
        assert max_err(o, r) <= 2 * max(max_err(t, r), max_err(r.float(), r)), name


@pytest.mark.parametrize("block_hw", [16, 32])
@pytest.mark.parametrize("shape", [(2, 12, 7, 9), (2, 16, 8, 8)], ids=["masked", "even"])
def test_launch_config_blocks_give_the_same_result(block_hw, shape):
    """Smaller H x W blocks (several steps per sweep; masked tails, or with 4 channels per group
    and H x W = 64 the unmasked loop) agree with the default's single step."""
    x, weight, bias, scale, shift, g = make(*shape, torch.float32)
    ref = groupnorm_silu_ref(*(t.double() for t in (x, weight, bias, scale, shift)), 4)
    cfg = {"BLOCK_HW": block_hw, "num_warps": 2}
    y, mean, rstd = kernel._forward(x, weight, bias, scale, shift, 4, EPS, launch_config=cfg)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    grads = kernel._backward(g, x, weight, bias, scale, shift, mean, rstd, launch_config=cfg)
    expected = run(groupnorm_silu, x, weight, bias, scale, shift, g, 4)[1:]
    for name, o, e in zip(NAMES[1:], grads, expected, strict=True):
        torch.testing.assert_close(o, e, atol=2e-5, rtol=1e-5, msg=name)


def test_model_views_channels_last_and_non_contiguous_inputs():
    """scale and shift as the ResBlock's chunks of one (B, 2C) projection, x channels_last
    (kept in the output and dx) or a non-dense channel slice (copied)."""
    x, weight, bias, _, _, g = make(2, 16, 6, 5, torch.float32)
    mod = torch.randn(2, 32, device=DEVICE)
    scale, shift = mod.chunk(2, dim=1)  # (B, C) views with row stride 2C
    wide = torch.randn(2, 24, 6, 5, device=DEVICE)
    for xx in [x.to(memory_format=torch.channels_last), wide[:, 4:20]]:
        ref = run(formula, *(t.double() for t in (xx, weight, bias, scale, shift, g)), 4)
        ours = run(groupnorm_silu, xx, weight, bias, scale, shift, g, 4)
        for name, o, r in zip(NAMES, ours, ref, strict=True):
            torch.testing.assert_close(o.double(), r, atol=2e-5, rtol=1e-5, msg=name)
        cl = xx.is_contiguous(memory_format=torch.channels_last)
        assert ours[0].is_contiguous(memory_format=torch.channels_last) == cl
        assert ours[1].is_contiguous(memory_format=torch.channels_last) == cl


def test_mixed_dtypes_promote_and_keep_each_gradient_dtype():
    """bf16 activations with fp32 parameters: y in the promoted dtype of x, scale and shift
    (as the model's expression), each gradient in its input's dtype."""
    x, weight, bias, scale, shift, g = make(2, 8, 4, 6, torch.float32)
    xb = x.bfloat16()
    ours = run(groupnorm_silu, xb, weight, bias, scale, shift, g, 2)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in ours[2:])
    ref = run(formula, *(t.double() for t in (xb, weight, bias, scale, shift, g)), 2)
    for name, o, r in zip(NAMES, ours, ref, strict=True):
        rounding = max_err(r.bfloat16(), r) if name == "dx" else 0.0  # dx is rounded to bf16
        assert max_err(o, r) <= rounding + 1e-5, name  # and fp32 arithmetic otherwise
    yb = groupnorm_silu(
        xb, weight.bfloat16(), bias.bfloat16(), scale.bfloat16(), shift.bfloat16(), 2
    )
    assert yb.dtype == torch.bfloat16


def test_unsupported_inputs_name_the_problem(monkeypatch):
    x, weight, bias, scale, shift, _ = make(2, 12, 4, 4, torch.float32)
    with pytest.raises(ValueError, match=r"groups dividing C .* got x \(2, 12, 4, 4\).*groups 5"):
        groupnorm_silu(x, weight, bias, scale, shift, 5)
    with pytest.raises(ValueError, match=r"scale and shift \(B, C\)"):
        groupnorm_silu(x, weight, bias, scale[:, :6], shift, 4)
    with pytest.raises(ValueError, match="dtypes"):
        groupnorm_silu(x.double(), weight, bias, scale, shift, 4)
    monkeypatch.setattr(kernel, "interpreting", lambda: False)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            groupnorm_silu(x, weight, bias, scale, shift, 4)


def test_registered_ops_pass_opcheck():
    """Fake implementations, autograd registration and strides agree with the real ops, also
    for channels_last x and the model's strided scale and shift."""
    x, weight, bias, scale, shift, g = make(1, 6, 3, 5, torch.float32)
    mod = torch.randn(1, 12, device=DEVICE, requires_grad=True)
    scale, shift = (t.detach().clone().requires_grad_(True) for t in (scale, shift))
    cases = [(x, scale, shift), (x.to(memory_format=torch.channels_last), *mod.chunk(2, dim=1))]
    for xx, sc, sh in cases:
        args = [t.detach().clone().requires_grad_(True) for t in (weight, bias)]
        xx = xx.detach().clone().requires_grad_(True)
        fwd_args = (xx, *args, sc, sh, 2, EPS)
        torch.library.opcheck(torch.ops.sdiff.groupnorm_silu_fwd.default, fwd_args)
        sc, sh = sc.detach(), sh.detach()
        _, mean, rstd = kernel.groupnorm_silu_fwd(xx.detach(), weight, bias, sc, sh, 2, EPS)
        bwd_args = (g, xx.detach(), weight, bias, sc, sh, mean, rstd)
        torch.library.opcheck(torch.ops.sdiff.groupnorm_silu_bwd.default, bwd_args)


class _ResBlockTail(torch.nn.Module):
    """A miniature of the ResBlock's modulated norm: scale-shift from an embedding, then a conv."""

    def __init__(self, channels: int, emb_dim: int, fused: bool = True) -> None:
        super().__init__()
        self.fused = fused
        self.norm = torch.nn.GroupNorm(4, channels)
        self.emb = torch.nn.Linear(emb_dim, 2 * channels)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h, emb):
        scale, shift = self.emb(emb).chunk(2, dim=1)  # (B, C) each
        n = self.norm
        if self.fused:
            h = groupnorm_silu(h, n.weight, n.bias, scale, shift, n.num_groups, n.eps)
        else:  # the ResBlock's own expression
            h = F.silu(n(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
        return self.conv(h)


def test_compile_fullgraph_passes_through_the_op():
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = _ResBlockTail(12, 8).to(DEVICE)
    h, emb = torch.randn(2, 12, 5, 7, device=DEVICE), torch.randn(2, 8, device=DEVICE)
    explanation = torch._dynamo.explain(block)(h, emb)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out_eager, out_compiled = block(h, emb), compiled(h, emb)
    torch.testing.assert_close(out_compiled, out_eager, rtol=0, atol=0)
    out_eager.square().mean().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    out_compiled.square().mean().backward()
    for g, p in zip(grads, block.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_block_trains_the_same_with_the_kernel_and_with_torch():
    """8 Adam steps of the miniature block from one seed, fused and unfused: the losses agree
    at every step (and the norm's affine, fed only through the kernel's dweight and dbias,
    moves)."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(8, 2, 12, 5, 7, generator=gen).to(DEVICE) * 2 + 1
    emb = torch.randn(8, 2, 8, generator=gen).to(DEVICE)
    target = torch.randn(2, 12, 5, 7, generator=gen).to(DEVICE)
    curves = {}
    for fused in (False, True):
        torch.manual_seed(0)
        block = _ResBlockTail(12, 8, fused=fused).to(DEVICE)
        opt = torch.optim.Adam(block.parameters(), lr=1e-2)
        curve = []
        for step in range(8):
            loss = (block(h[step], emb[step]) - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves[fused] = curve
        assert not torch.equal(block.norm.weight, torch.ones_like(block.norm.weight))
    torch.testing.assert_close(
        torch.tensor(curves[True]), torch.tensor(curves[False]), rtol=1e-4, atol=1e-6
    )
    assert len(set(curves[False])) == 8  # the block did train (every step's loss differs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape", [(4, 256, 32, 32, 32), (2, 128, 64, 64, 32), (2, 96, 33, 33, 32)], ids=str
)
def test_cuda_large_feature_maps(dtype, shape):
    """The U-Nets' feature maps: several tiles per sweep, natively compiled."""
    *dims, groups = shape
    inputs = make(*dims, dtype)
    ref = run(formula, *(t.double() for t in inputs), groups)
    ours = run(groupnorm_silu, *inputs, groups)
    theirs = run(torch_own, *inputs, groups)
    for name, o, t, r in zip(NAMES, ours, theirs, ref, strict=True):
        assert max_err(o, r) <= 2 * max(max_err(t, r), max_err(r.to(dtype), r)), name
