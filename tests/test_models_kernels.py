"""The model configs' ``kernels`` field: ``"triton"`` runs the blocks' modulated norms through the
fused kernels of ``sdiff.kernels`` (``norm_modulate`` in the U-ViT's transformer blocks,
``groupnorm_silu`` in every ResBlock), ``"torch"`` through PyTorch ops.

A tiny U-ViT and U-Net built both ways from one state dict give the same outputs and parameter
gradients (to fp32 rounding, judged against the torch model in float64), and the kernels are
really launched; in train mode the same dropout masks give the same outputs (the fused op ends
at the SiLU; dropout stays after it); compiled blocks have no graph break; the parameters are
the same; a bad value, and inputs the kernels cannot take, fail naming the field; the field
round-trips through saved configs and stays out of a default config's hash.

On CPU the kernels run in the Triton interpreter (tests/conftest.py), on a GPU natively. float32
throughout: the kernels take fp32, fp16 and bf16, not float64. Sizes are tiny for the
interpreter, with channels per group (3, 6) and a width (48) that are not powers of two and a
token count (36) that is not a multiple of the kernels' row block.
"""

import copy
import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from sdiff.data.datasets import DataConfig
from sdiff.kernels import groupnorm_silu as gn_kernel
from sdiff.kernels import norm_modulate as nm_kernel
from sdiff.models.blocks import ResBlock
from sdiff.models.presets import build_model
from sdiff.models.pretrained import model_config_from_dict, model_config_to_dict
from sdiff.models.unet import UNetConfig
from sdiff.models.uvit import TransformerBlock, UViTConfig
from sdiff.training.config import (
    RunConfig,
    apply_overrides,
    config_hash,
    from_dict,
    to_dict,
    to_json,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not nm_kernel.supports(
        torch.zeros(1, 1, 8, device=DEVICE), *torch.zeros(2, 1, 8, device=DEVICE)
    ),
    reason="needs CUDA or the Triton interpreter (TRITON_INTERPRET=1 before triton is imported)",
)

UNET = UNetConfig(
    resolution=16, channels=(12, 24), blocks_down=(1, 1), blocks_up=(1, 2),
    attention_resolutions=(8,), head_dim=8, dropout=0.3, dropout_resolutions=(16, 8),
    num_classes=3, norm_groups=4,
)  # fmt: skip
UVIT = UViTConfig(
    resolution=24, patch_size=2, channels=(12,), blocks_down=(1,), blocks_up=(1,),
    transformer_resolution=6, width=48, depth=2, head_dim=16, dropout=0.3,
    dropout_resolutions=(12, 6), num_classes=3, norm_groups=4,
)  # fmt: skip
CONFIGS = {"unet": UNET, "uvit": UVIT}


def run_config(model) -> RunConfig:
    return RunConfig(model=model, data=DataConfig(resolution=model.resolution, channels=3))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (no zero-initialised gates or output layers hiding a block)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def pair(config):
    """(torch model, triton model) with the same random weights."""
    ref = randomize_(build_model(config)).to(DEVICE)
    fused = build_model(replace(config, kernels="triton")).to(DEVICE)
    fused.load_state_dict(ref.state_dict())  # strict: the same names and shapes
    return ref, fused


def inputs(config, dtype=torch.float32, seed=1):
    """z, logsnr, labels and the loss weights g; the same values in every dtype."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(2, config.in_channels, config.resolution, config.resolution, generator=gen)
    g = torch.randn(z.shape, generator=gen)
    logsnr, labels = torch.tensor([-4.0, 3.0]), torch.tensor([0, 2])
    return z.to(DEVICE, dtype), logsnr.to(DEVICE, dtype), labels.to(DEVICE), g.to(DEVICE, dtype)


def forward_backward(model, config, dtype=torch.float32):
    """Output and parameter gradients of the random loss sum(y g)."""
    z, logsnr, labels, g = inputs(config, dtype)
    y = model(z, logsnr, labels)
    (y * g).sum().backward()
    return y.detach(), {name: p.grad for name, p in model.named_parameters()}


def rel_err(x, ref):
    """Largest error relative to the reference's largest magnitude."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def norm_err(x, ref):
    """Error norm relative to the reference's norm."""
    return ((x.double() - ref).norm() / ref.norm()).item()


def count_launches(monkeypatch) -> dict[str, int]:
    """Counts of the fused kernels' forward and backward launches."""
    calls = {}
    for name, kernel in (("norm_modulate", nm_kernel), ("groupnorm_silu", gn_kernel)):
        for step in ("forward", "backward"):
            calls[f"{name}.{step}"] = 0
            launch = getattr(kernel, f"_{step}")

            def counted(*args, _launch=launch, _key=f"{name}.{step}", **kwargs):
                calls[_key] += 1
                return _launch(*args, **kwargs)

            monkeypatch.setattr(kernel, f"_{step}", counted)
    return calls


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_triton_gives_the_torch_outputs_and_gradients(kind, monkeypatch):
    """Dropout off (eval mode). The output agrees with the torch model's to 1e-5 of its size;
    its error and every parameter gradient's against the torch model in float64 are at most
    twice the torch model's own in float32 (for the gradients its largest over the parameters:
    a whole network's gradients carry more fp32 rounding than 1e-5). And the fused kernels
    really ran: each ResBlock once, each transformer block twice, forward and backward."""
    config = CONFIGS[kind]
    ref, fused = pair(config)
    exact = copy.deepcopy(ref).double()
    y64, grads64 = forward_backward(exact.eval(), config, torch.float64)
    y_ref, grads_ref = forward_backward(ref.eval(), config)
    calls = count_launches(monkeypatch)
    y, grads = forward_backward(fused.eval(), config)
    res_blocks = sum(isinstance(m, ResBlock) for m in fused.modules())
    blocks = sum(isinstance(m, TransformerBlock) for m in fused.modules())
    assert calls == {
        "norm_modulate.forward": 2 * blocks, "norm_modulate.backward": 2 * blocks,
        "groupnorm_silu.forward": res_blocks, "groupnorm_silu.backward": res_blocks,
    }  # fmt: skip
    assert res_blocks > 0 and (blocks > 0) == (kind == "uvit")
    assert rel_err(y, y_ref) <= 1e-5
    assert norm_err(y, y64) <= 2 * norm_err(y_ref, y64)
    assert grads.keys() == grads_ref.keys() == grads64.keys()
    own = max(norm_err(grads_ref[name], grads64[name]) for name in grads64)
    for name, grad in grads.items():
        err = norm_err(grad, grads64[name])
        assert err <= 2 * own, f"{name}: {err:.2e} > twice torch's fp32 error {own:.2e}"


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_triton_applies_the_torch_dropout(kind):
    """Train mode, one seed: the same dropout masks give the torch model's output (dropout
    stays after the fused ResBlock norm, on the SiLU's output); another seed does not."""
    config = CONFIGS[kind]
    ref, fused = (model.train() for model in pair(config))
    outs = []
    for model, seed in ((ref, 0), (fused, 0), (fused, 1)):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(model(*inputs(config)[:3]))
    assert rel_err(outs[1], outs[0]) <= 1e-5
    assert rel_err(outs[2], outs[0]) > 1e-3  # the masks matter


@pytest.mark.parametrize("block", ["ResBlock", "TransformerBlock"])
def test_compile_fullgraph_passes_through_the_fused_blocks(block):
    """torch.compile(fullgraph=True) of a block with kernels="triton": no graph break (the
    kernels are torch.library ops), and eager's output."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    if block == "ResBlock":
        module = randomize_(ResBlock(8, 8, 4, groups=4, kernels="triton"))
        args = (torch.randn(2, 8, 3, 5), torch.randn(2, 4))
    else:
        module = randomize_(TransformerBlock(32, 16, 4.0, kernels="triton"))
        args = (torch.randn(2, 7, 32), torch.randn(2, 6, 32))
    module, args = module.to(DEVICE), [a.to(DEVICE) for a in args]
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), module(*args), rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_the_parameters_do_not_depend_on_kernels(kind):
    config = CONFIGS[kind]
    ref = build_model(config).state_dict()
    fused = build_model(replace(config, kernels="triton")).state_dict()
    assert list(fused) == list(ref)
    assert all(fused[k].shape == ref[k].shape for k in ref)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_a_bad_kernels_value_names_the_field(kind):
    choices = r"choose one of \['torch', 'triton'\]"
    with pytest.raises(ValueError, match=rf"model\.kernels 'cuda'; {choices}"):
        replace(CONFIGS[kind], kernels="cuda")
    with pytest.raises(ValueError, match=r"model\.kernels 'fused'"):
        apply_overrides(run_config(CONFIGS[kind]), ["model.kernels=fused"])


def test_inputs_the_kernels_cannot_take_name_the_field(monkeypatch):
    """float64 (the kernels take fp32, fp16, bf16), and a CPU without the interpreter."""
    block = ResBlock(8, 8, 4, groups=4, kernels="triton").to(DEVICE)
    x, emb = torch.randn(2, 8, 4, 4, device=DEVICE), torch.randn(2, 4, device=DEVICE)
    tblock = TransformerBlock(32, 16, 4.0, kernels="triton").to(DEVICE)
    h, mod = torch.randn(2, 5, 32, device=DEVICE), torch.randn(2, 6, 32, device=DEVICE)
    field, fix = r"^model\.kernels='triton': the fused", r"; use model\.kernels='torch'$"
    with pytest.raises(ValueError, match=rf"{field} groupnorm_silu .*torch\.float64.*{fix}"):
        block.double()(x.double(), emb.double())
    with pytest.raises(ValueError, match=rf"{field} norm_modulate .*torch\.float64.*{fix}"):
        tblock.double()(h.double(), mod.double())
    if DEVICE == "cpu":
        block.float()(x, emb)  # the interpreter runs it on the CPU
        monkeypatch.setattr(gn_kernel, "interpreting", lambda: False)
        with pytest.raises(ValueError, match=rf"{field} groupnorm_silu .* on cpu .*{fix}"):
            block(x, emb)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_the_field_round_trips_and_stays_out_of_a_default_hash(kind):
    config = replace(CONFIGS[kind], kernels="triton")
    assert model_config_from_dict(model_config_to_dict(config)) == config  # exports
    run = run_config(config)
    assert from_dict(RunConfig, json.loads(to_json(run))) == run  # run configs (config.json)
    default = run_config(CONFIGS[kind])
    tree = to_dict(default)
    assert tree["model"].pop("kernels") == "torch"
    # a config.json written before the field existed loads as "torch", with the hash it had
    assert from_dict(RunConfig, tree) == default
    assert config_hash(tree) == config_hash(default) != config_hash(run)
