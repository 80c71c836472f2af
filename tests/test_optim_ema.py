"""Adam and the EMA of the training step (sdiff.training.step): one foreach call per operation
over all parameters, with the numbers of the per-parameter loop they replace, bit for bit (so
exact resume and the runs already recorded are unchanged), and close to float64 references of
the formulas written out by hand."""

import copy
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sdiff.data.datasets import DataConfig
from sdiff.models.uvit import UViTConfig
from sdiff.training.config import RunConfig, TrainConfig
from sdiff.training.step import build_state, prepare_batch, train_step, update_ema

EPS32 = torch.finfo(torch.float32).eps

MODEL = UViTConfig(
    resolution=16, in_channels=1, patch_size=2, channels=(8,), blocks_down=(1,), blocks_up=(1,),
    transformer_resolution=4, width=32, depth=1, head_dim=16, num_classes=10, norm_groups=4,
)  # fmt: skip
CONFIG = RunConfig(
    model=MODEL,
    data=DataConfig(name="mnist", resolution=16, channels=1, random_flip=True),
    train=TrainConfig(
        total_images=32, batch_size=4, lr=1e-3, warmup_images=8, ema_decay=0.9,
        weight_decay=0.01, deterministic=True, label_dropout=0.3,
    ),
)  # fmt: skip


def _net(n: int) -> nn.Module:
    """``n`` linear layers (2n parameters) and a buffer: what the EMA and Adam see."""
    torch.manual_seed(n)
    net = nn.Sequential(*(nn.Linear(5, 5) for _ in range(n)))
    net.register_buffer("count", torch.arange(3.0))
    return net


def _ema_state(model: nn.Module, step: int = 0) -> SimpleNamespace:
    ema = copy.deepcopy(model).requires_grad_(False)
    return SimpleNamespace(model=model, ema=ema, step=step)


def _perturb(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
        model.count.add_(1)


def _decay(t: TrainConfig, step: int) -> float:
    return min(t.ema_decay, (1 + step) / (10 + step)) if t.ema_warmup else t.ema_decay


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_the_formula_in_float64(warmup):
    t = TrainConfig(ema_decay=0.999, ema_warmup=warmup)
    state = _ema_state(_net(3))
    ref = [e.detach().double() for e in state.ema.parameters()]
    # a rounding error bound per element: each update rounds (p - e), its product with the
    # weight and the sum, each within EPS32 / 2 of the operands' scale; older errors decay by d
    bound = [torch.zeros_like(r) for r in ref]
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for step in range(40):
        _perturb(state.model, gen)
        state.step = step
        update_ema(state, t)
        d = _decay(t, step)
        model = [p.detach().double() for p in state.model.parameters()]
        bound = [
            d * b + 2 * EPS32 * (r.abs() + p.abs())
            for b, r, p in zip(bound, ref, model, strict=True)
        ]
        ref = [d * e + (1 - d) * p for e, p in zip(ref, model, strict=True)]
        for e, r, b in zip(state.ema.parameters(), ref, bound, strict=True):
            err = (e.double() - r).abs()
            assert (err <= b).all(), (step, (err / b).max().item())
            worst = max(worst, (err / b).max().item())
    assert worst > 0.01  # the bound is not vacuous: fp32 rounding shows against it
    assert torch.equal(state.ema.count, state.model.count)  # buffers: copied


@pytest.mark.parametrize("step", [0, 3, 500])  # lerp weight 0.9 (>= 0.5), 0.69, 0.1
def test_ema_rounds_as_the_per_tensor_lerp(step):
    t = TrainConfig(ema_decay=0.9)
    state = _ema_state(_net(4), step)
    _perturb(state.model, torch.Generator().manual_seed(step))
    expected = [e.clone() for e in state.ema.parameters()]
    for e, p in zip(expected, state.model.parameters(), strict=True):
        e.lerp_(p.detach(), 1 - _decay(t, step))
    update_ema(state, t)
    for got, want in zip(state.ema.parameters(), expected, strict=True):
        assert torch.equal(got, want)


class _Ops(TorchDispatchMode):
    """Counts the aten operations dispatched inside it."""

    def __enter__(self):
        self.ops = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # not counted: reads of a CPU scalar (Adam's per-parameter step counter, read on the
        # host for the bias corrections), which run no kernel
        if func is not torch.ops.aten._local_scalar_dense.default:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _ema_ops(n: int) -> list[str]:
    state = _ema_state(_net(n))
    _perturb(state.model, torch.Generator().manual_seed(0))
    with _Ops() as ops:
        update_ema(state, TrainConfig())
    return ops.ops


def _adam_ops(n: int) -> list[str]:
    net = _net(n)
    state = build_state(replace(CONFIG, train=replace(CONFIG.train, seed=n)), "cpu")
    opt = type(state.optimizer)(net.parameters(), **state.optimizer.defaults)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # the first step creates the state
    with _Ops() as ops:
        opt.step()
    return ops.ops


@pytest.mark.parametrize("ops", [_ema_ops, _adam_ops], ids=["ema", "adam"])
def test_one_call_per_operation_whatever_the_parameter_count(ops):
    few, many = ops(2), ops(20)  # 4 and 40 parameters
    assert few == many and len(few) < 20, few
    assert few.count("aten._foreach_lerp_.Scalar") == 1  # EMA; Adam's first moment


def _adam64(params, grads_per_step, lr, betas, eps, weight_decay):
    """Adam (Kingma & Ba, arXiv 1412.6980, algorithm 1) with L2 weight decay, in float64."""
    b1, b2 = betas
    x = [p.detach().double() for p in params]
    m = [torch.zeros_like(v) for v in x]
    v = [torch.zeros_like(v) for v in x]
    for k, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            g = g.double() + weight_decay * x[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**k), v[i] / (1 - b2**k)
            x[i] = x[i] - lr * m_hat / (v_hat.sqrt() + eps)
    return x


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_is_the_per_parameter_loop_bit_for_bit_and_adam_in_float64(weight_decay):
    cfg = replace(CONFIG, train=replace(CONFIG.train, weight_decay=weight_decay))
    state = build_state(cfg, "cpu")
    assert state.optimizer.defaults["foreach"] is True
    params = list(state.model.parameters())
    start = [p.detach().clone() for p in params]
    loop_params = [p.detach().clone().requires_grad_() for p in params]
    loop = torch.optim.Adam(loop_params, **(state.optimizer.defaults | {"foreach": False}))
    gen = torch.Generator().manual_seed(1)
    grads_per_step = [
        [torch.randn(p.shape, generator=gen) * 1e-2 for p in params] for _ in range(5)
    ]
    for grads in grads_per_step:
        for p, q, g in zip(params, loop_params, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        state.optimizer.step()
        loop.step()
    for p, q in zip(params, loop_params, strict=True):
        assert torch.equal(p, q)
    d = state.optimizer.defaults
    ref = _adam64(start, grads_per_step, d["lr"], d["betas"], d["eps"], weight_decay)
    for p, r in zip(params, ref, strict=True):
        # Adam moves each weight by about lr per step: the fp32 error is ulps of the weight
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-6, atol=1e-8)


def test_train_steps_are_those_of_the_per_parameter_loops():
    """Whole steps (warm-up lr, loss, clip, Adam, EMA) against the same steps with a
    single-tensor Adam and a per-tensor lerp EMA: identical weights, EMA and Adam moments."""
    gen = torch.Generator().manual_seed(2)
    images = [torch.rand(4, 1, 16, 16, generator=gen) * 2 - 1 for _ in range(3)]
    batches = [(x, torch.randint(0, 10, (4,), generator=gen)) for x in images]

    def per_tensor_ema(state, t):
        decay = _decay(t, state.step)
        with torch.no_grad():
            for e, p in zip(state.ema.parameters(), state.model.parameters(), strict=True):
                e.lerp_(p.detach(), 1 - decay)

    states = []
    for looped in (False, True):
        state = build_state(CONFIG, "cpu")
        if looped:
            defaults = state.optimizer.defaults | {"foreach": False}
            state.optimizer = torch.optim.Adam(state.model.parameters(), **defaults)
        for x, y in batches:
            if looped:
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr("sdiff.training.step.update_ema", per_tensor_ema)
                    train_step(state, prepare_batch(state, x, y, CONFIG), CONFIG)
            else:
                train_step(state, prepare_batch(state, x, y, CONFIG), CONFIG)
        states.append(state)
    fast, looped = states
    for module in ("model", "ema"):
        got, want = getattr(fast, module).state_dict(), getattr(looped, module).state_dict()
        for a, b in zip(got.values(), want.values(), strict=True):
            assert torch.equal(a, b)
    for a, b in zip(fast.optimizer.state.values(), looped.optimizer.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
