"""Selective and full activation checkpointing: plans, identical numbers, what a region keeps and
recomputes (counted by hand), and the plan chooser against a brute-force search."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from sdiff.bench.checkpoint_plan import choose_plan, compress_plan, region_costs
from sdiff.bench.memory import estimate_training_memory, memory_main, simulate_step
from sdiff.models.checkpointing import parse_plan
from sdiff.models.presets import build_model, get_preset

GiB = 2**30


# -- plans ---------------------------------------------------------------------------------------


def test_a_plan_sets_groups_then_regions_and_ranges():
    parsed = parse_plan(("blocks=selective", "block.1-2=full", "level.0=none"), 2, 4)
    assert parsed == {
        "blocks": "selective", "block.1": "full", "block.2": "full", "level.0": "none",
    }  # fmt: skip
    c = replace(get_preset("uvit-tiny-32"), checkpoint_transformer=True, checkpoint_levels=(0,))
    assert [c.checkpoint_policy("block", k) for k in range(2)] == ["full", "full"]
    c = replace(c, checkpoint_plan=("blocks=selective", "block.1=none"))
    assert [c.checkpoint_policy("block", k) for k in range(2)] == ["selective", "none"]
    assert c.checkpoint_policy("level", 0) == "full"  # checkpoint_levels, not overridden


@pytest.mark.parametrize(
    ("plan", "words"),
    [
        (("blocks=half",), "unknown policy 'half'"),
        (("block.7=full",), "indices are 0..1"),
        (("block.1-0=full",), "runs upwards"),
        (("levels.0=full",), "is not '<region>=<policy>'"),
        (("level=full",), "is not '<region>=<policy>'"),
        (("blocks=full", "blocks=none"), "sets blocks twice"),
    ],
)
def test_a_bad_plan_is_refused_naming_the_entry(plan, words):
    with pytest.raises(ValueError, match=r"model\.checkpoint_plan") as err:
        replace(get_preset("uvit-tiny-32"), checkpoint_plan=plan)
    assert words in str(err.value)


def test_a_unet_plan_has_no_blocks():
    with pytest.raises(ValueError, match="has no transformer"):
        replace(get_preset("unet-tiny-32"), checkpoint_plan=("blocks=full",))


def test_compress_plan_round_trips():
    policies = {f"block.{k}": p for k, p in enumerate("ffsssnnsf")} | {"level.0": "n"}
    long = {"f": "full", "s": "selective", "n": "none"}
    policies = {r: long[p] for r, p in policies.items()}
    plan = compress_plan(policies)
    assert plan[0] == "levels=none" and "blocks=selective" in plan and "block.0-1=full" in plan
    parsed = parse_plan(plan, 1, 9)
    for region, policy in policies.items():
        kind = region.split(".")[0]
        assert parsed.get(region, parsed[f"{kind}s"]) == policy


def test_config_files_before_plans_keep_their_hash():
    from sdiff.training.config import config_hash, get_run_preset, identity_dict, to_dict

    run = get_run_preset("digits")
    tree = to_dict(run)
    tree["model"].pop("checkpoint_plan")  # a config.json written before the field existed
    assert identity_dict(run) == identity_dict(tree)
    planned = replace(run, model=replace(run.model, checkpoint_plan=("levels=selective",)))
    assert config_hash(planned) != config_hash(run)


# -- the same numbers ----------------------------------------------------------------------------


def _grads(config, plan):
    torch.manual_seed(0)
    model = build_model(replace(config, checkpoint_plan=plan)).train()  # dropout on
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 3, config.resolution, config.resolution, generator=g)
    logsnr = torch.randn(3, generator=g)
    labels = torch.randint(0, config.num_classes, (3,), generator=g)
    torch.manual_seed(2)  # the dropout masks
    out = model(z, logsnr, labels)
    (out.square().mean()).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["uvit-tiny-32", "unet-tiny-32"])
def test_every_policy_gives_the_same_outputs_and_gradients(name):
    config = get_preset(name)
    blocks = ("blocks={}",) if config.transformer_blocks else ()
    ref_out, ref_grads = _grads(config, ())
    for policy in ("selective", "full"):
        plan = tuple(e.format(policy) for e in ("levels={}", *blocks))
        out, grads = _grads(config, plan)
        assert torch.equal(out, ref_out), policy
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=policy)


# -- what a selective region keeps, what full recomputes: by hand ----------------------------------


def test_a_selective_transformer_block_keeps_its_matmul_and_attention_outputs():
    # uvit-tiny-32: 8x8 = 64 tokens of width 64, 2 heads, MLP 256, bf16 autocast; the residual
    # stream entering a block is fp32 (proj_in's output plus the fp32 position table)
    b, n, w, heads = 8, 64, 64, 2
    r = estimate_training_memory("uvit-tiny-32", b, checkpoint=("blocks=selective",))
    kept = (
        b * n * w * 4  # the block's input (fp32), saved by the checkpoint
        + b * n * 3 * w * 2  # qkv = Linear (addmm) output, bf16
        + b * n * w * 2
        + b * heads * n * 4  # attention output (bf16) and log-sum-exp (fp32)
        + 16
        + 8  # the attention kernel's RNG seed and offset (uint64, unused without dropout)
        + b * n * w * 2  # proj output
        + b * n * 4 * w * 2  # MLP fc1 output
        + b * n * w * 2  # MLP fc2 output
    )
    assert r.activations_by_part["blocks.1"] == kept
    assert r.recomputed_flops == 0


def test_full_checkpointing_recomputes_each_blocks_forward():
    b, n, w = 8, 64, 64
    block_flops = 2 * b * n * (w * 3 * w + w * w + 2 * w * 4 * w)  # qkv, proj, MLP
    block_flops += 2 * 2 * b * n * n * w  # attention: q k^T and p v over all heads
    plain = estimate_training_memory("uvit-tiny-32", b)
    r = estimate_training_memory("uvit-tiny-32", b, checkpoint=("blocks=full",))
    assert r.recomputed_flops == 2 * block_flops
    one = estimate_training_memory("uvit-tiny-32", b, checkpoint=("block.0=full",))
    assert one.recomputed_flops == block_flops
    assert r.step_flops == plain.step_flops > 3 * 2 * block_flops


@pytest.mark.parametrize(("name", "plan"), [
    ("uvit-tiny-32", ("levels=selective", "blocks=selective")),
    ("unet-tiny-32", ("levels=selective",)),
    ("uvit-tiny-32", ("levels=full", "block.0=selective")),
])  # fmt: skip
def test_meta_estimate_of_a_plan_equals_the_count_on_cpu_tensors(name, plan):
    est = estimate_training_memory(name, 2, dtype="fp32", device="cpu", checkpoint=plan)
    torch.manual_seed(0)
    model = build_model(replace(get_preset(name), checkpoint_plan=plan)).train()
    real = simulate_step(model, 2, dtype="fp32", device="cpu")
    assert real.by_part == est.activations_by_part
    assert real.backward == est.backward


@pytest.mark.slow  # 30 s: two real steps in subprocesses
def test_selective_checkpointing_lowers_the_measured_rss_as_estimated():
    from test_memory import UVIT_RSS, check_against_rss

    plan = ("levels=selective", "blocks=selective")
    plain_m, plain_e = check_against_rss(UVIT_RSS, 16, checkpoint=False)
    sel_m, sel_e = check_against_rss(UVIT_RSS, 16, checkpoint=plan)
    assert sel_e.activations < plain_e.activations
    assert sel_m["forward_end"] < plain_m["forward_end"]


# -- the chooser -------------------------------------------------------------------------------


def test_the_chosen_plan_is_the_cheapest_that_fits():
    name, batch = "uvit-tiny-32", 16
    config = get_preset(name)
    plans = list(itertools.product(("none", "selective", "full"), repeat=3))

    def as_plan(p):
        return (f"level.0={p[0]}", f"block.0={p[1]}", f"block.1={p[2]}")

    reports = {p: estimate_training_memory(name, batch, checkpoint=as_plan(p)) for p in plans}
    peaks = sorted(r.peak for r in reports.values())
    for budget in (peaks[len(peaks) // 3], peaks[len(peaks) // 2], peaks[-1] + 1):
        choice = choose_plan(config, batch, budget)
        assert choice is not None and choice.report.peak <= budget
        best = min(r.recomputed_flops for r in reports.values() if r.peak <= budget)
        assert choice.recomputed_flops == best
    assert choose_plan(config, batch, peaks[0] - 1) is None
    costs = {c.name: c for c in region_costs(config, batch)}
    assert set(costs) == {"level.0", "block.0", "block.1"}
    assert costs["block.1"].kept["selective"] < costs["block.1"].kept["none"]
    assert costs["block.1"].kept["full"] < costs["block.1"].kept["selective"]


def test_bench_memory_takes_a_plan_and_chooses_one(capsys):
    assert memory_main(["--model", "uvit-tiny-32", "--batch", "4",
                        "--plan", "levels=full,blocks=selective"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "with the plan levels=full,blocks=selective of activation checkpointing" in out
    assert "recomputed in backward:" in out
    assert memory_main(["--model", "uvit-tiny-32", "--batch", "4", "--choose-plan",
                        "--budget-gib", "1"]) == 0  # fmt: skip
    assert "chosen plan for 1 GiB: " in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"block\.9"):
        memory_main(["--model", "uvit-tiny-32", "--batch", "4", "--plan", "block.9=full"])


@pytest.mark.slow  # 25 s of compilation
def test_a_compiled_model_with_selective_checkpointing_gives_the_same_gradients():
    config = replace(get_preset("uvit-tiny-32"), dropout=0.0)
    plan = ("levels=selective", "blocks=selective")
    torch.manual_seed(0)
    model = build_model(replace(config, checkpoint_plan=plan)).train()
    z, logsnr, labels = torch.randn(4, 3, 32, 32), torch.randn(4), torch.randint(0, 10, (4,))
    model(z, logsnr, labels).square().mean().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.compile(model, fullgraph=True)(z, logsnr, labels).square().mean().backward()
    for a, b in zip(eager, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
