"""The fused LayerNorm + adaLN modulate Triton kernel against a float64 reference, forward and
backward, its torch.library registration and torch.compile pass-through.

On CPU the kernel runs in the Triton interpreter (tests/conftest.py); on a GPU natively. The
acceptance rule of this project: the kernel's largest error against float64 is at most twice
PyTorch's own at the same dtype (``F.layer_norm`` and the modulation in that dtype, as the U-ViT
block computes it), where PyTorch's own error is floored at the error of rounding the exact
float64 result to that dtype.
"""

import pytest
import torch
import torch.nn.functional as F

from sdiff.kernels import norm_modulate as kernel
from sdiff.kernels.norm_modulate import norm_modulate, norm_modulate_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not kernel.supports(torch.zeros(1, 1, 8, device=DEVICE), *torch.zeros(2, 1, 8, device=DEVICE)),
    reason="needs CUDA or the Triton interpreter (TRITON_INTERPRET=1 before triton is imported)",
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-6  # the U-ViT blocks' LayerNorm eps
# (batch, tokens, width); the default blocks are 16 rows, 4 at widths 513-1024
SHAPES = [
    (2, 77, 96),  # width not a power of two, tokens not a multiple of the block
    (3, 64, 128),  # both even: the unmasked loads (EVEN_M, EVEN_D)
    (1, 33, 200),  # one past a multiple of 16 rows, width padded to 256
    (2, 256, 64),  # the U-ViT's 256 tokens
    (2, 18, 1000),  # a wide row padded to 1024, in blocks of 4 rows
]


def formula(x, shift, scale, eps=EPS):
    """LayerNorm without affine, then adaLN: written out, in the inputs' dtype (float64 here)."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)  # biased, as LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * (1 + scale[:, None]) + shift[:, None]


def torch_own(x, shift, scale, eps=EPS):
    """The U-ViT block's own expression at the inputs' dtype."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


def make(b, n, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=gen) * 2 + 0.5  # a mean and a spread for the norm to remove
    shift, scale = torch.randn(2, b, d, generator=gen) * 0.5
    g = torch.randn(b, n, d, generator=gen)
    return [t.to(DEVICE, dtype) for t in (x, shift, scale, g)]


def run(fn, x, shift, scale, g):
    """(y, dx, dshift, dscale) of fn with upstream gradient g."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, shift, scale)]
    y = fn(*leaves)
    y.backward(g)
    return [y.detach()] + [t.grad for t in leaves]


def max_err(x, ref):
    return (x.double() - ref).abs().max().item()


def test_reference_is_the_formula_and_the_model_expression():
    x, shift, scale, _ = (t.double() for t in make(2, 40, 48, torch.float32))
    torch.testing.assert_close(norm_modulate_ref(x, shift, scale), formula(x, shift, scale))
    torch.testing.assert_close(norm_modulate_ref(x, shift, scale), torch_own(x, shift, scale))
    small = x * 1e-2  # var ~ 4e-4: an eps of 1e-3 matters
    torch.testing.assert_close(
        norm_modulate_ref(small, shift, scale, eps=1e-3), formula(small, shift, scale, eps=1e-3)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_against_float64(dtype, shape):
    x, shift, scale, g = make(*shape, dtype)
    ref = run(formula, *(t.double() for t in (x, shift, scale, g)))
    ours = run(norm_modulate, x, shift, scale, g)
    theirs = run(torch_own, x, shift, scale, g)
    for name, o, t, r in zip(["y", "dx", "dshift", "dscale"], ours, theirs, ref, strict=True):
        assert o.dtype == dtype and o.shape == r.shape, name
        rounding = max_err(r.to(dtype), r)
        bound = 2 * max(max_err(t, r), rounding)
        err = max_err(o, r)
        assert err <= bound, (
            f"{name}: kernel error {err:.2e} > {bound:.2e} (torch {max_err(t, r):.2e})"
        )


@pytest.mark.parametrize("block_m", [1, 8, 64])
def test_launch_config_blocks_give_the_same_result(block_m):
    """Row blocks of any size (one row, several per example, more than the example has) and the
    default give the float64 result; the dshift and dscale sums over row blocks included."""
    x, shift, scale, g = make(2, 37, 96, torch.float32)
    y, mean, rstd = kernel._forward(x, shift, scale, 1e-3, launch_config={"BLOCK_M": block_m})
    dx, dshift, dscale = kernel._backward(
        g, x, shift, scale, mean, rstd, launch_config={"BLOCK_M": block_m}
    )
    ref = run(lambda *a: formula(*a, eps=1e-3), *(t.double() for t in (x, shift, scale, g)))
    for name, o, r in zip(
        ["y", "dx", "dshift", "dscale"], [y, dx, dshift, dscale], ref, strict=True
    ):
        torch.testing.assert_close(o.double(), r, atol=2e-5, rtol=1e-5, msg=name)
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean(-1))
    torch.testing.assert_close(rstd.double(), (xd.var(-1, correction=0) + 1e-3).rsqrt())


def test_model_views_and_non_contiguous_inputs():
    """shift and scale as the U-ViT block makes them (``unbind`` views of one (B, 6, D) tensor),
    x a transposed view, an expanded (stride 0) upstream gradient."""
    b, n, d = 2, 50, 80
    gen = torch.Generator().manual_seed(3)
    mod = torch.randn(b, 6, d, generator=gen).to(DEVICE)
    shift, scale = mod.unbind(1)[:2]
    x = torch.randn(b, d, n, generator=gen).to(DEVICE).transpose(1, 2)  # (B, N, D), stride 1 on N
    assert not (x.is_contiguous() or shift.is_contiguous())
    g = torch.randn(b, 1, d, generator=gen).to(DEVICE).expand(b, n, d)
    ref = run(formula, *(t.double() for t in (x, shift, scale, g)))
    ours = run(norm_modulate, x, shift, scale, g)
    for name, o, r in zip(["y", "dx", "dshift", "dscale"], ours, ref, strict=True):
        torch.testing.assert_close(o.double(), r, atol=2e-5, rtol=1e-5, msg=name)


def test_mixed_dtypes_promote_and_keep_each_gradient_dtype():
    x, _, _, g = make(2, 40, 64, torch.float32)
    _, shift, scale, _ = make(2, 40, 64, torch.bfloat16)
    y, dx, dshift, dscale = run(norm_modulate, x, shift, scale, g)
    assert (y.dtype, dx.dtype, dshift.dtype, dscale.dtype) == (
        torch.float32, torch.float32, torch.bfloat16, torch.bfloat16
    )  # fmt: skip
    ref = run(formula, *(t.double() for t in (x, shift, scale, g)))
    for name, o, r in zip(["y", "dx"], [y, dx], ref, strict=False):
        torch.testing.assert_close(o.double(), r, atol=2e-5, rtol=1e-5, msg=name)
    for name, o, r in zip(["dshift", "dscale"], [dshift, dscale], ref[2:], strict=True):
        assert max_err(o, r) <= max_err(r.to(torch.bfloat16), r), name  # only bf16 rounding


def test_unsupported_inputs_name_the_problem(monkeypatch):
    x, shift, scale, _ = make(2, 8, 16, torch.float32)
    with pytest.raises(ValueError, match=r"shift, scale \(B, D\); got x \(2, 8, 16\)"):
        norm_modulate(x, shift[:, :8], scale)
    with pytest.raises(ValueError, match="x \\(B, N, D\\)"):
        norm_modulate(x[0], shift, scale)
    with pytest.raises(ValueError, match="dtypes"):
        norm_modulate(x.double(), shift, scale)
    monkeypatch.setattr(kernel, "interpreting", lambda: False)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            norm_modulate(x, shift, scale)


def test_registered_ops_pass_opcheck():
    """Fake implementations, autograd registration and strides agree with the real ops, also
    for the model's strided views and a padded width."""
    x, shift, scale, g = make(2, 20, 24, torch.float32)
    mod = torch.randn(2, 6, 24, device=DEVICE)
    for sh, sc in [(shift, scale), mod.unbind(1)[:2]]:
        args = [t.detach().clone().requires_grad_(True) for t in (x, sh, sc)]
        torch.library.opcheck(torch.ops.sdiff.norm_modulate_fwd.default, (*args, EPS))
        _, mean, rstd = kernel.norm_modulate_fwd(x, sh, sc, EPS)
        torch.library.opcheck(torch.ops.sdiff.norm_modulate_bwd.default, (g, x, sh, sc, mean, rstd))


class _Block(torch.nn.Module):
    """A miniature of the U-ViT block's modulated norm: adaLN from a conditioning vector."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mod = torch.nn.Linear(width, 2 * width)
        self.out = torch.nn.Linear(width, width)

    def forward(self, h, c):
        shift, scale = self.mod(c).unflatten(1, (2, -1)).unbind(1)  # (B, W) each
        return self.out(norm_modulate(h, shift, scale))


def _count_kernel_calls(monkeypatch) -> dict[str, int]:
    """Counts of the registered ops' launches of the forward and backward kernels."""
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        launch = getattr(kernel, f"_{name}")

        def counted(*args, _launch=launch, _name=name, **kwargs):
            calls[_name] += 1
            return _launch(*args, **kwargs)

        monkeypatch.setattr(kernel, f"_{name}", counted)
    return calls


def _compiled_against_eager(monkeypatch, tol: float, **compile_kwargs) -> None:
    """The compiled block's output and parameter gradients equal eager's (within ``tol``), and
    its forward and backward each launch the kernel once."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = _Block(48).to(DEVICE)
    h, c = torch.randn(2, 37, 48, device=DEVICE), torch.randn(2, 48, device=DEVICE)
    out_eager = block(h, c)
    out_eager.square().mean().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    calls = _count_kernel_calls(monkeypatch)
    out_compiled = torch.compile(block, fullgraph=True, **compile_kwargs)(h, c)
    out_compiled.square().mean().backward()
    assert calls == {"forward": 1, "backward": 1}
    torch.testing.assert_close(out_compiled, out_eager, rtol=tol, atol=tol)
    for g, p in zip(grads, block.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=tol, atol=tol)


def test_compile_fullgraph_passes_through_the_op(monkeypatch):
    torch._dynamo.reset()
    block = _Block(48).to(DEVICE)
    h, c = torch.randn(2, 37, 48, device=DEVICE), torch.randn(2, 48, device=DEVICE)
    explanation = torch._dynamo.explain(block)(h, c)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    _compiled_against_eager(monkeypatch, 0.0, backend="aot_eager")


@pytest.mark.slow
def test_inductor_fullgraph_calls_the_op(monkeypatch):
    """Inductor (the default backend; a C++ build on CPU, slow) keeps the op as an opaque call
    and gives eager's output and gradients."""
    _compiled_against_eager(monkeypatch, 1e-5)
