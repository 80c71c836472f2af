"""torch.compile paths: no graph breaks with any CPU-runnable attention backend, compiled equals
eager, and the environment switch turns compilation off."""

from dataclasses import replace

import pytest
import torch

from sdiff.eval.sample import generate
from sdiff.eval.spec import EvalSpec
from sdiff.models.compile import compile_enabled, maybe_compile
from sdiff.models.flops import example_inputs
from sdiff.models.presets import build_model, get_preset

BACKENDS = ["sdpa", "math", "triton"]  # triton runs in the interpreter on CPU (conftest.py)


def tiny(backend: str):
    cfg = replace(get_preset("uvit-tiny-32"), attention_backend=backend, dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # leave the zero-initialised outputs: they would hide differences
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    z, _lam, cond = example_inputs(cfg, 2, device="cpu")
    z = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    return cfg, model, (z, torch.tensor([-3.0, 2.0]), cond)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_uvit_has_no_graph_breaks(backend):
    torch._dynamo.reset()
    _, model, inputs = tiny(backend)
    explanation = torch._dynamo.explain(model)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_equals_eager_forward_and_backward(backend):
    torch._dynamo.reset()
    _, model, inputs = tiny(backend)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out_eager, out_compiled = model(*inputs), compiled(*inputs)
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-6)
    out_eager.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out_compiled.square().mean().backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_environment_switch(monkeypatch):
    model = torch.nn.Linear(2, 2)
    assert maybe_compile(model, enabled=False) is model
    monkeypatch.setenv("SDIFF_COMPILE", "0")
    assert not compile_enabled() and maybe_compile(model) is model
    monkeypatch.setenv("SDIFF_COMPILE", "1")
    assert compile_enabled() and maybe_compile(model) is not model


@pytest.mark.slow
def test_sampler_with_compiled_denoiser_matches_eager():
    """Inductor on CPU (slow): the sampler step with a compiled denoiser gives the same images."""
    torch._dynamo.reset()
    from sdiff.data.datasets import DataConfig
    from sdiff.training.config import RunConfig

    cfg, model, _ = tiny("sdpa")
    run = RunConfig(model=cfg, data=DataConfig(name="photos", resolution=32, channels=3))
    eager, _ = generate(model, run, EvalSpec(n=4, steps=4))
    compiled, _ = generate(model, run, EvalSpec(n=4, steps=4, compile=True))
    assert (eager.int() - compiled.int()).abs().max() <= 1  # uint8 images, rounding at most
