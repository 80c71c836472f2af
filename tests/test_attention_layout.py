"""SelfAttention2d hands the attention kernels q, k, v (B, heads, HW, head_dim) with head_dim
innermost (unit stride).

The reference below is the layout-naive formula written out: the 1x1 qkv conv's output read as
(B, 3, heads, head_dim, HW) and transposed to (B, heads, HW, head_dim) views (last-dim stride
HW), attention as softmax(q k^T / sqrt(head_dim)) v in float64, back to (B, C, H, W), proj, plus
the residual. The module must compute the same function (values and gradients), keep its
parameter names and shapes (checkpoints stay loadable), and give SDPA inputs it can run its
fused CPU kernel on: with unit stride in head_dim; a transposed view sends CPU SDPA down its
math path.
"""

import math

import pytest
import torch
from torch import nn

import sdiff.models.blocks as blocks
from sdiff.models.blocks import SelfAttention2d

# (channels, head_dim, height, width): one head; several; a map that is not square; a token
# count (5 x 7 = 35) that is no multiple of any block size
SHAPES = [(32, 32, 4, 4), (64, 16, 8, 8), (48, 16, 6, 3), (32, 8, 5, 7)]


def reference(m: SelfAttention2d, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    heads = m.heads
    qkv = m.qkv(m.norm(x)).reshape(b, 3, heads, c // heads, h * w)
    q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, heads, HW, head_dim) views
    scores = q @ k.transpose(-1, -2) / math.sqrt(c // heads)  # (B, heads, HW, HW)
    out = scores.softmax(-1) @ v  # (B, heads, HW, head_dim)
    return x + m.proj(out.transpose(-1, -2).reshape(b, c, h, w))


def randomised(channels: int, head_dim: int, backend: str) -> SelfAttention2d:
    torch.manual_seed(0)
    m = SelfAttention2d(channels, head_dim, groups=8, backend=backend).double()
    with torch.no_grad():  # proj is zero-initialised: give it (and the norm) weights to check
        for p in m.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(max(p[0].numel(), 1)))
    return m


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize(("channels", "head_dim", "h", "w"), SHAPES)
def test_output_and_gradients_equal_the_transposed_formula(backend, channels, head_dim, h, w):
    m = randomised(channels, head_dim, backend)
    x = torch.randn(3, channels, h, w, dtype=torch.float64, requires_grad=True)
    got = m(x)
    want = reference(m, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert (got - x).abs().max() > 0.1  # the attention branch contributes
    g = torch.randn_like(got)
    params = [x, *m.parameters()]
    grads_got = torch.autograd.grad(got, params, g)
    grads_want = torch.autograd.grad(want, params, g)
    for a, b in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_state_dict_names_and_shapes_are_unchanged():
    m = SelfAttention2d(64, 16, groups=8)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "norm.weight": (64,),
        "norm.bias": (64,),
        "qkv.weight": (192, 64, 1, 1),
        "qkv.bias": (192,),
        "proj.weight": (64, 64, 1, 1),
        "proj.bias": (64,),
    }
    # a state dict saved from the module loads into a fresh one and gives the same output
    src = randomised(64, 16, "sdpa").float()
    dst = SelfAttention2d(64, 16, groups=8, backend="sdpa")
    dst.load_state_dict(src.state_dict())
    x = torch.randn(2, 64, 4, 4)
    torch.testing.assert_close(dst(x), src(x))


def test_attention_gets_contiguous_inputs_that_cpu_sdpa_runs_fused(monkeypatch):
    seen = []

    def spy(q, k, v, **kw):
        seen.append((q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    monkeypatch.setattr(blocks, "attention", spy)
    m = SelfAttention2d(64, 16, groups=8)
    m(torch.randn(2, 64, 8, 8))
    (q, k, v), = seen  # fmt: skip
    for t in (q, k, v):
        assert t.shape == (2, 4, 64, 16)
        assert t.stride(-1) == 1  # views of the token-major qkv product
    flash, math_path = 1, 0  # torch.nn.attention.SDPBackend.FLASH_ATTENTION, .MATH
    assert torch._fused_sdp_choice(q, k, v) == flash
    # the layout the module avoids: what CPU SDPA makes of the transposed views
    naive = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch._fused_sdp_choice(naive, k, v) == math_path


@pytest.mark.parametrize("name", ["unet-tiny-32"])
def test_a_unet_with_attention_is_unchanged_end_to_end(name):
    from sdiff.models.presets import build_model

    torch.manual_seed(0)
    model = build_model(name).double().eval()
    attn = [m for m in model.modules() if isinstance(m, SelfAttention2d)]
    assert attn
    with torch.no_grad():
        for a in attn:
            nn.init.normal_(a.proj.weight, std=0.05)
        for p in model.parameters():  # the zero-initialised output head too
            if not p.any():
                p.normal_(std=0.05)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    logsnr = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    label = torch.tensor([3, 7])
    got = model(x, logsnr, label)
    originals = [a.forward for a in attn]
    for a in attn:
        a.forward = lambda x, a=a: reference(a, x)
    want = model(x, logsnr, label)
    for a, f in zip(attn, originals, strict=True):
        a.forward = f
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert got.abs().max() > 0
