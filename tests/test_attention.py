"""The attention entry point: every backend against a float64 reference, forward and backward."""

import math

import pytest
import torch

import sdiff
import sdiff.models.attention as ab
from sdiff.models.attention import attention, select_backend

GEN = torch.Generator().manual_seed(0)


def reference(q, k, v, pad=None):
    """softmax(q k^T / sqrt(d)) v in float64 with einsum; all-padding rows give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if pad is not None:
        s = s.masked_fill(pad[:, None, None, :], -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", p, v)


def inputs(b, h, lq, lk, d, dtype, requires_grad=False):
    qkv = [torch.randn(b, h, n, d, generator=GEN) for n in (lq, lk, lk)]
    return [x.to(dtype).requires_grad_(requires_grad) for x in qkv]


# (atol, rtol) per dtype against float64
TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (4e-3, 4e-3)}
SHAPES = [(2, 3, 17, 17, 32), (1, 2, 64, 64, 64), (2, 4, 10, 77, 16), (1, 1, 257, 31, 8)]


@pytest.mark.parametrize(
    "backend", ["auto", "sdpa", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "math"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_float64_reference(backend, dtype, shape):
    q, k, v = inputs(*shape, dtype)
    out = attention(q, k, v, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", ["sdpa", "sdpa-cudnn", "math"])
def test_cross_attention_with_padding(backend):
    b, h, lq, lk, d = 3, 2, 9, 13, 16
    q, k, v = inputs(b, h, lq, lk, d, torch.float32)
    pad = torch.zeros(b, lk, dtype=torch.bool)
    pad[0, 5:] = True  # a short caption
    pad[2, :] = True  # an empty caption: the null condition
    out = attention(q, k, v, backend=backend, key_padding_mask=pad)
    torch.testing.assert_close(out.double(), reference(q, k, v, pad), atol=2e-5, rtol=1e-4)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    # padded keys do not matter at all
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 5:] = 100.0
    v2[0, :, 5:] = -100.0
    out2 = attention(q, k2, v2, backend=backend, key_padding_mask=pad)
    torch.testing.assert_close(out2[0], out[0])


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("masked", [False, True])
def test_backward_matches_float64_reference(backend, masked):
    b, h, lq, lk, d = 2, 2, 11, 19, 16
    q, k, v = inputs(b, h, lq, lk, d, torch.float32, requires_grad=True)
    pad = None
    if masked:
        pad = torch.zeros(b, lk, dtype=torch.bool)
        pad[1, 7:] = True
    grad = torch.randn(b, h, lq, d, generator=GEN)
    attention(q, k, v, backend=backend, key_padding_mask=pad).backward(grad)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    reference(q64, k64, v64, pad).backward(grad.double())
    for got, want in [(q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)]:
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=1e-4)


def test_entry_point_is_exported_and_auto_resolves():
    assert sdiff.attention is attention
    q, k, v = inputs(1, 1, 4, 4, 8, torch.float32)
    assert select_backend(q, k, v) == "sdpa"
    assert select_backend(q, k, v, backend="math") == "math"


def test_xformers_errors(monkeypatch):
    q, k, v = inputs(1, 1, 4, 4, 8, torch.float32)
    monkeypatch.setattr(ab, "_xformers_available", lambda: False)
    with pytest.raises(ValueError, match="xformers is not installed"):
        attention(q, k, v, backend="xformers")
    monkeypatch.setattr(ab, "_xformers_available", lambda: True)
    with pytest.raises(ValueError, match="no kernels for device 'cpu'"):
        attention(q, k, v, backend="xformers")


def test_bad_input():
    q, k, v = inputs(2, 2, 4, 6, 8, torch.float32)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match=r"\(batch, heads, length, head_dim\)"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="disagree on batch, heads or head_dim"):
        attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="k and v lengths differ"):
        attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        attention(q, k, v, key_padding_mask=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        attention(q, k, v, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa", "sdpa-cudnn", "sdpa-flash", "xformers"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_backends_match_reference(backend, dtype):
    if backend == "xformers" and not ab._xformers_available():
        pytest.skip("xformers not installed")
    q, k, v = (x.cuda() for x in inputs(2, 4, 300, 77, 64, dtype))
    pad = torch.zeros(2, 77, dtype=torch.bool, device="cuda")
    pad[0, 40:] = True
    out = attention(q, k, v, backend=backend, key_padding_mask=pad)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), reference(q, k, v, pad), atol=atol, rtol=rtol)
