"""The short-sequence Triton attention kernel against a float64 reference, forward and backward.

On CPU the kernel runs in the Triton interpreter (tests/conftest.py); on a GPU natively. The
acceptance rule is the flash kernel's (tests/test_kernels_attention.py): the largest error
against float64 is at most twice PyTorch's own at the same dtype (SDPA on the same inputs),
PyTorch's own error floored at that of rounding the exact float64 result to that dtype, and
here also at four fp32 ulps of the result's largest entry: P recomputed from the base-2
log-sum-exp (as in flash attention) carries a relative error of a few fp32 ulps (the exponent
s * scale * log2(e) - lse, up to about 10 in size, is rounded), and with one query (a dV row is
a single product P dO) nothing averages it out; at 1 query x 100 keys in fp32 the kernel's
error reaches about 5 such ulps, SDPA's 1 to 5. The floor matters for fp32 outputs only; a
wrong kernel is off by far more.
"""

import pytest
import torch
import torch.nn.functional as F

import sdiff.models.attention as ab
from sdiff.kernels import attention_short as kernel
from sdiff.kernels.attention import attention_ref, flash_attention
from sdiff.kernels.attention_short import MAX_KEYS, short_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not kernel.supports(*(torch.zeros(1, 1, 1, 16, device=DEVICE),) * 3),
    reason="needs CUDA or the Triton interpreter (TRITON_INTERPRET=1 before triton is imported)",
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (batch, heads, query length, key length, padded keys of example 0 or None)
SHAPES = [
    (2, 3, 17, 17, None),  # a key tile of 32 with 15 masked tail keys, batch x heads > 1
    (2, 1, 1, 100, None),  # one query
    (1, 2, 100, 300, 40),  # cross-attention, padded caption; 300 keys in a 512-key tile
    (1, 2, 130, 256, None),  # the U-ViT's 256 keys: the unmasked (EVEN_K) tile; 3 query blocks
]


def make(b, h, lq, lk, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for n in (lq, lk, lk))
    g = torch.randn(b, h, lq, d, generator=gen)
    return [x.to(DEVICE, dtype) for x in (q, k, v, g)]


def run(fn, q, k, v, g, mask):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves, mask)
    out.backward(g)
    return [out.detach()] + [x.grad for x in leaves]


def sdpa(q, k, v, mask):
    keep = None if mask is None else ~mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def max_err(x, ref):
    return (x.double() - ref).abs().max().item()


def fp32_floor(ref):
    """Four fp32 ulps of the largest entry of ``ref``: the error of fp32 arithmetic itself."""
    return 4 * torch.finfo(torch.float32).eps * ref.abs().max().item()


def padding(b, lk, pad):
    if pad is None:
        return None
    mask = torch.zeros(b, lk, dtype=torch.bool, device=DEVICE)
    mask[0, pad:] = True
    return mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize(
    "shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + ("-pad" if s[4] else "")
)
def test_forward_and_backward_against_float64(dtype, head_dim, shape):
    b, h, lq, lk, pad = shape
    q, k, v, g = make(b, h, lq, lk, head_dim, dtype)
    mask = padding(b, lk, pad)
    if not kernel.supports(q, k, v, mask):
        pytest.skip(f"{lk} keys at head dim {head_dim} in {dtype}: over the shared-memory budget")
    ref = run(attention_ref, *(x.double() for x in (q, k, v, g)), mask)
    ours = run(short_attention, q, k, v, g, mask)
    theirs = run(sdpa, q, k, v, g, mask)
    for name, o, t, r in zip(["out", "dq", "dk", "dv"], ours, theirs, ref, strict=True):
        assert o.dtype == dtype and o.shape == r.shape
        rounding = max(max_err(r.to(dtype), r), fp32_floor(r))
        bound = 2 * max(max_err(t, r), rounding)
        err = max_err(o, r)
        assert err <= bound, (
            f"{name}: kernel error {err:.2e} > {bound:.2e} (torch {max_err(t, r):.2e})"
        )


def test_all_padding_rows_give_zeros_and_no_nan():
    q, k, v, g = make(2, 2, 33, 20, 32, torch.float32)
    mask = torch.zeros(2, 20, dtype=torch.bool, device=DEVICE)
    mask[0, 13:] = True
    mask[1] = True  # example 1: an empty caption
    out, dq, dk, dv = run(short_attention, q, k, v, g, mask)
    assert all(torch.isfinite(x).all() for x in (out, dq, dk, dv))
    for x in (out, dq, dk, dv):
        assert torch.equal(x[1], torch.zeros_like(x[1]))
    ref = run(attention_ref, *(x.double() for x in (q, k, v, g)), mask)
    for o, r in zip((out, dq, dk, dv), ref, strict=True):
        torch.testing.assert_close(o.double(), r, atol=2e-5, rtol=1e-5)


# the backward computes P for every key of the tile, then zeroes the padded ones (tl.where, as
# the flash kernel): 2^s of a key of 100s overflows to inf there before it is dropped
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")
def test_padded_keys_do_not_matter():
    q, k, v, g = make(1, 2, 24, 40, 32, torch.float32)
    mask = torch.zeros(1, 40, dtype=torch.bool, device=DEVICE)
    mask[0, 25:] = True
    out, dq, dk, dv = run(short_attention, q, k, v, g, mask)
    k2, v2 = k.clone(), v.clone()
    k2[..., 25:, :], v2[..., 25:, :] = 100.0, -100.0
    out2, dq2, dk2, dv2 = run(short_attention, q, k2, v2, g, mask)
    for ours, theirs in [(out2, out), (dq2, dq), (dk2[..., :25, :], dk[..., :25, :]),
                         (dv2[..., :25, :], dv[..., :25, :])]:  # fmt: skip
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    assert not dk2[..., 25:, :].any() and not dv2[..., 25:, :].any()


def test_matches_the_flash_kernel():
    """The same maths as ``flash_attention`` (one-shot softmax instead of the online one, one
    backward sweep instead of two): equal to within fp32 rounding, forward and backward."""
    q, k, v, g = make(2, 2, 70, 150, 64, torch.float32)
    mask = padding(2, 150, 90)
    for o, f in zip(run(short_attention, q, k, v, g, mask), run(flash_attention, q, k, v, g, mask),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(o, f, atol=2e-6, rtol=1e-5)


def test_backward_is_deterministic():
    q, k, v, g = make(1, 2, 150, 150, 32, torch.float32)
    first, second = run(short_attention, q, k, v, g, None), run(short_attention, q, k, v, g, None)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_compile_fullgraph_passes_through_the_op():
    torch._dynamo.reset()
    q, k, v, g = make(1, 2, 20, 30, 32, torch.float32)
    mask = padding(1, 30, 21)

    def block(q, k, v, mask):
        return short_attention(q * 2, k, v, mask).square().sum(-1)  # (B, H, Lq)

    explanation = torch._dynamo.explain(block)(q, k, v, mask)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    eager = run(block, q, k, v, g[..., 0], mask)
    ours = run(compiled, q, k, v, g[..., 0], mask)
    for o, e in zip(ours, eager, strict=True):
        torch.testing.assert_close(o, e, atol=0, rtol=0)


def test_max_keys_keeps_the_key_tile_within_its_budget():
    """512 keys, fewer where one (keys, head dim) tile of K would pass KV_TILE_BYTES."""
    for dtype, want in [
        (torch.bfloat16, [512, 512, 512, 256]),
        (torch.float32, [512, 512, 256, 128]),
    ]:
        got = [kernel.max_keys(d, dtype) for d in (16, 32, 64, 128)]
        assert got == want
        for d, n in zip((16, 32, 64, 128), got, strict=True):
            assert n * d * dtype.itemsize <= kernel.KV_TILE_BYTES


def test_too_many_keys_and_unsupported_inputs_are_rejected():
    q = torch.zeros(1, 1, 4, 32, device=DEVICE)
    long = torch.zeros(1, 1, MAX_KEYS + 1, 32, device=DEVICE)
    full = torch.zeros(1, 1, MAX_KEYS, 32, device=DEVICE, dtype=torch.float16)
    assert kernel.supports(q.half(), full, full) and not kernel.supports(q, long, long)
    with pytest.raises(ValueError, match=f"at most {MAX_KEYS} keys at head dim 32 .*; got 513"):
        short_attention(q, long, long)
    wide = torch.zeros(1, 1, 300, 128, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="at most 256 keys at head dim 128"):
        short_attention(wide[:, :, :4], wide, wide)
    odd = torch.zeros(1, 1, 8, 24, device=DEVICE)  # head dim 24 is not supported
    with pytest.raises(ValueError, match="head dim 24"):
        short_attention(odd, odd, odd)


def test_launch_configs(monkeypatch):
    """The CUDA table by kernel and head dim; BLOCK_M shrinks so that the score tile holds at
    most MAX_TILE elements; the interpreter's own config."""
    monkeypatch.setattr(kernel, "interpreting", lambda: False)
    table = kernel.LAUNCH_CONFIGS
    assert kernel._launch_config(32, "fwd", 256) == table["fwd"][64]
    assert kernel._launch_config(128, "bwd", 128) == table["bwd"][128]
    for d in (16, 128):
        for kind in ("fwd", "bwd"):
            for block_n in (16, 64, 256, 512):
                cfg = kernel._launch_config(d, kind, block_n)
                assert 16 <= cfg["BLOCK_M"] and cfg["BLOCK_M"] * block_n <= kernel.MAX_TILE
    assert [kernel._block_n(n) for n in (1, 16, 17, 100, 256, 300, 512)] == [
        16, 16, 32, 128, 256, 512, 512
    ]  # fmt: skip
    monkeypatch.setattr(kernel, "interpreting", lambda: True)
    assert kernel._launch_config(128, "bwd", 256) == kernel.INTERPRETER_CONFIG


def test_backend_triton_short_matches_sdpa():
    """backend="triton-short" through the library's entry point, forward and backward."""
    q, k, v, g = make(2, 2, 40, 33, 32, torch.float32)
    mask = padding(2, 33, 20)
    assert ab.select_backend(q, k, v, mask, backend="triton-short") == "triton-short"

    def entry(backend):
        return lambda q, k, v, m: ab.attention(q, k, v, backend=backend, key_padding_mask=m)

    ours = run(entry("triton-short"), q, k, v, g, mask)
    for o, s in zip(ours, run(entry("sdpa"), q, k, v, g, mask), strict=True):
        torch.testing.assert_close(o, s, atol=2e-5, rtol=1e-4)
    long = torch.zeros(1, 1, MAX_KEYS + 1, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"'triton-short' does not support .* 513 keys"):
        ab.select_backend(q[:1, :1], long, long, backend="triton-short")


def test_bench_times_triton_short_where_it_takes_the_length(tmp_path):
    """``sdiff bench attention`` times ``triton-short`` at lengths up to ``max_keys`` only."""
    import csv

    from sdiff.bench import bench_attention as bench

    out = tmp_path / "a.csv"
    args = ["--device", "cpu", "--dtype", "float32", "--head-dims", "32", "--lengths", "48",
            "600", "--tokens", "96", "--width", "32", "--backends", "triton-short",
            "--modes", "fwd+bwd", "--csv", str(out)]  # fmt: skip
    assert bench.main(args) == 0
    rows = list(csv.DictReader(open(out)))
    assert [(r["backend"], r["seq_len"], r["status"]) for r in rows] == [
        ("triton-short", "48", "ok")
    ]


def test_auto_dispatches_to_triton_short_where_it_runs(monkeypatch, tmp_path):
    """``auto`` picks ``triton-short`` where a table measured it fastest, passes it over where
    the keys are more than it takes, and falls back to SDPA (with a warning) if it fails."""
    import json

    ms = {"triton-short": 0.1, "sdpa-cudnn": 0.2}
    entry = {"device": "GPU X", "capability": "9.0", "dtype": "bfloat16", "head_dim": 128,
             "mask": False, "mode": "fwd", "ms": ms}  # fmt: skip
    table = tmp_path / "dispatch.json"
    entries = [{**entry, "seq_bucket": 256}, {**entry, "seq_bucket": 512}]
    table.write_text(json.dumps({"format": 1, "entries": entries}))
    monkeypatch.setenv("SDIFF_ATTN_DISPATCH", str(table))
    monkeypatch.setattr(ab, "_device_identity", lambda device: ("GPU X", "9.0"))
    monkeypatch.setattr(ab, "_TRITON_FAILED", [])
    ab.clear_dispatch_cache()
    try:
        q, k, v, _ = make(1, 1, 200, 200, 128, torch.bfloat16)
        long = torch.zeros(1, 1, 300, 128, device=DEVICE, dtype=torch.bfloat16)
        assert ab.select_backend(q, k, v) == "triton-short"
        assert ab.select_backend(long, long, long) == "sdpa-cudnn"  # 300 keys: over max_keys
        torch.testing.assert_close(ab.attention(q, k, v), short_attention(q, k, v), atol=0, rtol=0)

        def broken(*args):
            raise RuntimeError("no kernel image")

        monkeypatch.setitem(ab._IMPLEMENTATIONS, "triton-short", broken)
        with pytest.warns(UserWarning, match="triton-short attention kernel failed"):
            out = ab.attention(q, k, v)
        torch.testing.assert_close(out, ab.attention(q, k, v, backend="sdpa"), atol=0, rtol=0)
        assert ab.select_backend(q, k, v) == "sdpa-cudnn"
    finally:
        monkeypatch.undo()
        ab.clear_dispatch_cache()
