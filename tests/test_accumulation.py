"""Gradient accumulation (``train.batch_per_gpu``): one optimiser step over micro-batches is the
step over the whole batch. In float64, with the same t and noise, two accumulated steps give the
same gradients, loss, gradient norm, weights, Adam moments and EMA as two big-batch steps (to
1e-12 relative: only the summation order differs); configs without the field keep their hashes."""

from __future__ import annotations

import pytest
import torch

from sdiff.training.config import apply_overrides, config_hash, get_run_preset, to_dict
from sdiff.training.step import build_state, micro_batches, train_step

BASE = apply_overrides(
    get_run_preset("digits"),
    ["model.width=32", "model.depth=1", "model.head_dim=16", "model.channels=[8]",
     "model.norm_groups=4", "train.batch_size=8", "train.label_dropout=0.0",
     "train.warmup_images=0", "train.deterministic=true"],
)  # fmt: skip


def _state(config):
    state = build_state(config, "cpu")
    state.model.double()
    state.ema.double()
    return state


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_accumulated_steps_equal_big_batch_steps_in_float64(micro):
    big, small = BASE, apply_overrides(BASE, [f"train.batch_per_gpu={micro}"])
    a, b = _state(big), _state(small)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.rand(8, 1, 32, 32, generator=gen, dtype=torch.float64) * 2 - 1
        y = torch.randint(0, 10, (8,), generator=gen)
        t = torch.rand(8, generator=gen, dtype=torch.float64)
        noise = torch.randn(8, 1, 32, 32, generator=gen, dtype=torch.float64)
        loss_a, norm_a = train_step(a, (x, y), big, t=t, noise=noise)
        loss_b, norm_b = train_step(b, (x, y), small, t=t, noise=noise)
        assert loss_a.dtype == torch.float64
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=0)
        torch.testing.assert_close(norm_b, norm_a, rtol=1e-12, atol=0)
        for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-10, atol=1e-14, msg=name)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-12, atol=1e-14)
        sa, sb = a.optimizer.state[pa], b.optimizer.state[pb]
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=1e-10, atol=1e-20)
    for ea, eb in zip(a.ema.parameters(), b.ema.parameters(), strict=True):
        torch.testing.assert_close(eb, ea, rtol=1e-12, atol=1e-14)
    assert a.step == b.step == 2


def test_unweighted_accumulation_would_be_caught():
    """The comparison above sees a wrong weighting: summing micro-batch means without their
    share gives gradients 4x too large (Adam alone would hide it on the first step)."""
    config = apply_overrides(BASE, ["train.batch_per_gpu=2"])
    state = _state(config)
    x = torch.rand(8, 1, 32, 32, dtype=torch.float64) * 2 - 1
    y = torch.arange(8) % 10
    t = torch.rand(8, dtype=torch.float64)
    noise = torch.randn(8, 1, 32, 32, dtype=torch.float64)
    train_step(state, (x, y), config, t=t, noise=noise)
    grads = [p.grad.clone() for p in state.model.parameters()]
    from sdiff.diffusion.process import diffusion_loss

    state.model.zero_grad()
    total = sum(
        diffusion_loss(state.model, x[i : i + 2], config.diffusion, y[i : i + 2],
                       schedule=state.schedule, t=t[i : i + 2], noise=noise[i : i + 2]).loss
        for i in range(0, 8, 2)
    )  # fmt: skip
    total.backward()  # at the updated weights: compare directions' scale only
    ratio = sum(p.grad.norm() for p in state.model.parameters()) / sum(g.norm() for g in grads)
    assert ratio > 3  # the unweighted sum is about 4x the step's gradient


def test_micro_batches_split_evenly_or_refuse():
    assert micro_batches(8, None) == [slice(0, 8)]
    assert micro_batches(8, 8) == [slice(0, 8)] == micro_batches(8, 16)
    assert micro_batches(8, 2) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    with pytest.raises(ValueError, match="batch_per_gpu 3 does not divide the per-process batch 8"):
        micro_batches(8, 3)
    with pytest.raises(ValueError, match="batch_per_gpu"):
        apply_overrides(BASE, ["train.batch_per_gpu=0"])


def test_a_config_without_accumulation_keeps_its_hash():
    """``batch_per_gpu`` at None is left out of the identity: the hash is the one of the dict
    without the field (as configs were hashed before it existed); set, it changes the hash."""
    import hashlib
    import json

    from sdiff.training.config import LATER_FIELDS

    tree = to_dict(BASE)
    assert tree["train"].pop("batch_per_gpu") is None
    for section, name in LATER_FIELDS:  # the fields added since, at their defaults
        tree[section].pop(name, None)
    before = hashlib.sha256(
        json.dumps(tree, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()[:12]
    assert config_hash(BASE) == before
    assert config_hash(apply_overrides(BASE, ["train.batch_per_gpu=4"])) != before
