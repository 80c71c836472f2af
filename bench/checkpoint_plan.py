"""Which regions to checkpoint, and how, to fit a memory budget at the least recomputed FLOPs.

    sdiff bench memory --model uvit-l-512 --batch 32 --choose-plan --budget-gib 80
    sdiff bench memory --model uvit-l-512 --batch 32 --plan levels=full,blocks=selective
    sdiff bench memory --policies-report reports/bench          # the committed table

Regions and policies are ``sdiff.models.checkpointing``'s: each conv level (``level.<i>``) and
each transformer block (``block.<k>``) runs with ``none``, ``selective`` (matmul, convolution and
attention outputs kept, the rest recomputed) or ``full`` (only the inputs kept, the whole forward
recomputed) checkpointing.

What a region costs under each policy is measured, not modelled: three simulated steps of
``sdiff.bench.memory`` (every region ``none``, every region ``selective``, every region
``full``) give the bytes each region keeps at the end of the forward (the estimator's
activations by part), and the FLOP counter gives each region's forward FLOPs at the batch (what
``full`` recomputes) and the step's recomputed FLOPs (backward FLOPs minus those of the plain
step). Regions of one kind with the same shapes cost the same, so the search runs over how many
transformer blocks take each policy and over every combination of the conv levels' policies: it
predicts the end-of-forward total of each candidate by adding its regions' bytes and keeps the
one with the fewest recomputed FLOPs within the budget (on a tie, the fewest ``selective``
regions, whose norms and activations are recomputed uncounted; then the fewest bytes). The
prediction is
then checked by simulating that plan's whole step (``estimate_training_memory``: forward,
backward with its recomputation, the optimizer step): if its peak (often the backward's) is
over the budget, the search repeats with the predicted budget lowered by the excess, until the
simulated peak fits (or nothing fits: ``None``).

The step's FLOPs are the counted forward and backward of the plain step (matrix products,
convolutions and the flash-attention kernels; norms and elementwise ops uncounted, as in MFU):
the denominator of "recomputed % of the step".
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass, replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdiff.bench.memory import (
    MemoryReport,
    _meta_model,
    _simulate,
    estimate_training_memory,
    resolve_config,
    with_checkpointing,
)
from sdiff.models.checkpointing import POLICIES
from sdiff.models.flops import example_inputs
from sdiff.models.presets import ModelConfig

__all__ = [
    "PlanChoice",
    "RegionCost",
    "choose_plan",
    "compress_plan",
    "region_costs",
]

_PART = re.compile(r"^(down|up)\.(\d+) |^blocks\.(\d+)$")
_MODULE = re.compile(r"^[^.]+\.(?:(?:down|up)\.(\d+)\.\d+|blocks\.(\d+))$")


@dataclass(frozen=True)
class RegionCost:
    """One region at one batch: the bytes it keeps at the end of the forward under each policy
    and the FLOPs backward recomputes for it (its forward's under ``full``)."""

    name: str  # "level.<i>" or "block.<k>"
    kept: dict[str, int]  # policy -> bytes
    recomputed: dict[str, int]  # policy -> FLOPs


def _region_of_part(part: str) -> str | None:
    m = _PART.match(part)
    if m is None:
        return None
    return f"level.{m.group(2)}" if m.group(2) is not None else f"block.{m.group(3)}"


def _uniform(config: ModelConfig, policy: str) -> ModelConfig:
    plan = [f"levels={policy}"] + ([f"blocks={policy}"] if config.transformer_blocks else [])
    return replace(with_checkpointing(config, False), checkpoint_plan=tuple(plan))


@functools.lru_cache(maxsize=16)
def _region_forward_flops(config: ModelConfig, batch: int) -> dict[str, int]:
    """Counted forward FLOPs of each region's checkpointed modules at ``batch``."""
    model = _meta_model(with_checkpointing(config, False))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*example_inputs(config, batch, device="meta"))
    out: dict[str, int] = {}
    for name, ops in counter.get_flop_counts().items():
        m = _MODULE.match(name)
        if m is not None:
            region = f"level.{m.group(1)}" if m.group(1) is not None else f"block.{m.group(2)}"
            out[region] = out.get(region, 0) + sum(ops.values())
    return out


def region_costs(
    config: ModelConfig, batch: int, *, dtype: str = "bf16", device: str = "cuda"
) -> list[RegionCost]:
    """Every region's kept bytes and recomputed FLOPs under each policy (module docstring)."""
    steps = {p: _simulate(_uniform(config, p), batch, dtype, device) for p in POLICIES}
    flops = _region_forward_flops(with_checkpointing(config, False), batch)
    extra_selective = steps["selective"].backward_flops - steps["none"].backward_flops
    total_forward = sum(flops.values()) or 1
    kept: dict[str, dict[str, int]] = {}
    for policy, step in steps.items():
        for part, nbytes in step.by_part.items():
            region = _region_of_part(part)
            if region is not None:
                kept.setdefault(region, dict.fromkeys(POLICIES, 0))[policy] += nbytes
    costs = []
    for region in sorted(kept, key=lambda r: (r[0], int(r.split(".")[1]))):
        f = flops.get(region, 0)
        # what selective recomputes (nothing counted, where every matmul is kept) shared out
        # by forward FLOPs
        recomputed = {"none": 0, "selective": extra_selective * f // total_forward, "full": f}
        costs.append(RegionCost(region, kept[region], recomputed))
    return costs


def compress_plan(policies: dict[str, str]) -> tuple[str, ...]:
    """The shortest plan entries for {region: policy}: a group entry for the most common
    policy of the levels / blocks, then runs (``block.0-11=full``) for the rest."""
    entries: list[str] = []
    for kind in ("level", "block"):
        items = sorted(
            ((int(r.split(".")[1]), p) for r, p in policies.items() if r.startswith(kind)),
        )
        if not items:
            continue
        common = max(POLICIES, key=lambda p: (sum(q == p for _, q in items), p == "none"))
        entries.append(f"{kind}s={common}")
        for policy, run in itertools.groupby(items, key=lambda ip: ip[1]):
            if policy == common:
                continue
            idx = [i for i, _ in run]
            # groupby splits runs by policy only; split again where indices jump
            start = prev = idx[0]
            for i in [*idx[1:], None]:
                if i is not None and i == prev + 1:
                    prev = i
                    continue
                span = f"{start}" if start == prev else f"{start}-{prev}"
                entries.append(f"{kind}.{span}={policy}")
                if i is not None:
                    start = prev = i
    return tuple(entries)


@dataclass(frozen=True)
class PlanChoice:
    plan: tuple[str, ...]
    report: MemoryReport  # the simulated step of the plan
    recomputed_flops: int
    step_flops: int
    simulations: int  # whole steps simulated to check predictions


def _candidates(costs: list[RegionCost]):
    """(policies, predicted kept bytes, recomputed FLOPs) of every candidate: each conv level
    on its own, the transformer blocks by how many take each policy (first ``full``, then
    ``selective``, then ``none``)."""
    levels = [c for c in costs if c.name.startswith("level.")]
    blocks = [c for c in costs if c.name.startswith("block.")]
    n = len(blocks)
    for level_policies in itertools.product(POLICIES, repeat=len(levels)):
        lv_bytes = sum(c.kept[p] for c, p in zip(levels, level_policies, strict=True))
        lv_flops = sum(c.recomputed[p] for c, p in zip(levels, level_policies, strict=True))
        for full in range(n + 1):
            for selective in range(n - full + 1):
                chosen = ["full"] * full + ["selective"] * selective
                chosen += ["none"] * (n - full - selective)
                b_bytes = sum(c.kept[p] for c, p in zip(blocks, chosen, strict=True))
                b_flops = sum(c.recomputed[p] for c, p in zip(blocks, chosen, strict=True))
                policies = {c.name: p for c, p in zip(levels, level_policies, strict=True)}
                policies |= {c.name: p for c, p in zip(blocks, chosen, strict=True)}
                yield policies, lv_bytes + b_bytes, lv_flops + b_flops


def choose_plan(
    config: ModelConfig | str,
    batch: int,
    budget_bytes: int,
    *,
    dtype: str = "bf16",
    device: str = "cuda",
    max_simulations: int = 6,
) -> PlanChoice | None:
    """The plan with the fewest recomputed FLOPs whose simulated peak is within
    ``budget_bytes`` (module docstring); None when even checkpointing everything fully does not
    fit."""
    _, config = resolve_config(config)
    base = with_checkpointing(config, False)
    costs = region_costs(base, batch, dtype=dtype, device=device)
    plain = estimate_training_memory(base, batch, dtype=dtype, device=device)
    kept_plain = sum(c.kept["none"] for c in costs)
    fixed = plain.total - kept_plain  # state, weight copies and everything outside the regions
    # fewest recomputed FLOPs; then fewest selective regions (their norms and activations are
    # recomputed too, uncounted); then fewest bytes
    candidates = sorted(
        _candidates(costs),
        key=lambda c: (c[2], sum(p == "selective" for p in c[0].values()), c[1]),
    )
    target = budget_bytes
    for simulation in range(1, max_simulations + 1):
        pick = next((c for c in candidates if fixed + c[1] <= target), None)
        if pick is None:
            return None
        plan = compress_plan(pick[0])
        report = estimate_training_memory(base, batch, dtype=dtype, device=device, checkpoint=plan)
        if report.peak <= budget_bytes:
            return PlanChoice(plan, report, report.recomputed_flops, report.step_flops, simulation)
        target -= report.peak - budget_bytes
    return None


# --------------------------------------------------------------------------------------------
# The committed table

REPORT_CASES = (("uvit-l-512", 32), ("uvit-l-512", 64), ("unet-512", 32))
GiB = 2**30


def _standard_plans(config: ModelConfig) -> list[tuple[str, bool | tuple[str, ...]]]:
    plans: list[tuple[str, bool | tuple[str, ...]]] = [
        ("none", False),
        ("selective everywhere", _uniform(config, "selective").checkpoint_plan),
        ("full everywhere", True),
    ]
    if config.transformer_blocks:
        plans.insert(2, ("levels full, blocks selective", ("levels=full", "blocks=selective")))
    return plans


def policies_rows(budget_gib: float = 80.0, cases=REPORT_CASES) -> list[dict]:
    """One row per (model, batch, policy): the standard policies and the plans chosen for
    ``budget_gib`` and for 95% of it (room for the caching allocator's reserve above the
    allocated peak, ~3% on the H200, and kernel workspaces the estimate cannot see)."""
    rows = []
    for name, batch in cases:
        _, config = resolve_config(name)
        entries = [(label, plan, None) for label, plan in _standard_plans(config)]
        for budget in (budget_gib, round(0.95 * budget_gib, 2)):
            choice = choose_plan(config, batch, int(budget * GiB))
            if choice is not None:
                entries.append((f"chosen for {budget:g} GiB", choice.plan, choice))
        for label, plan, chosen in entries:
            r = (
                chosen.report
                if chosen is not None
                else estimate_training_memory(config, batch, checkpoint=plan)
            )
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "policy": label,
                    "plan": r.checkpoint_label,
                    "peak_gib": round(r.peak / GiB, 2),
                    "peak_phase": r.peak_phase,
                    "forward_end_gib": round(r.total / GiB, 2),
                    "backward_gib": round(r.backward_step / GiB, 2),
                    "activations_gib": round(r.activations / GiB, 2),
                    "recomputed_tflop": round(r.recomputed_flops / 1e12, 2),
                    "recomputed_pct": round(100 * r.recomputed_share, 2),
                    "step_tflop": round(r.step_flops / 1e12, 1),
                    f"fits_{budget_gib:g}_gib": r.peak <= budget_gib * GiB,
                }
            )
    return rows


def write_policies_report(out: str, budget_gib: float = 80.0) -> str:
    """Write ``out``/checkpointing.md and .csv (the committed table); returns the markdown."""
    import time
    from pathlib import Path

    import pandas as pd

    from sdiff.util.files import ensure_folder
    from sdiff.util.provenance import git_sha

    sha = git_sha()
    origin = f"commit {sha}" if sha else "an unknown commit"
    rows = policies_rows(budget_gib)
    frame = pd.DataFrame(rows)
    folder = ensure_folder(Path(out))
    frame.to_csv(folder / "checkpointing.csv", index=False)
    shown = frame[
        ["model", "batch", "policy", "peak_gib", "peak_phase", "recomputed_tflop",
         "recomputed_pct", f"fits_{budget_gib:g}_gib"]
    ]  # fmt: skip
    chosen = frame[frame.policy.str.startswith("chosen")]
    plans = "\n".join(
        f"- {m} batch {b}, {policy.removeprefix('chosen for ')}: `{plan}`"
        for m, b, policy, plan in zip(
            chosen.model, chosen.batch, chosen.policy, chosen.plan, strict=True
        )
    )
    text = f"""# Activation checkpointing: peak memory and recomputed FLOPs per policy

`sdiff bench memory --policies-report {out}` ({origin}, {time.strftime("%F")}, torch
{torch.__version__}; estimated on the meta device: no GPU involved)

One steady-state training step (bf16 autocast, CUDA kernels, fp32 master weights, Adam and EMA)
of each model at its batch, simulated by the memory estimator (within 0.2% of an H200's
measured peak for the plain and fully checkpointed U-ViT L, reports/gpu/); the FLOPs are
counted by PyTorch's FLOP counter over the same simulated step (matrix products, convolutions
and flash attention; norms and elementwise ops not counted). "recomputed" is what backward
recomputes for the checkpointed regions, as a share of the plain step's FLOPs.

Policies (sdiff.models.checkpointing): `selective` keeps each region's matmul, convolution and
attention outputs and recomputes norms, modulation, activations and casts; `full` keeps only
the region's inputs and reruns its forward. The chosen plan is the one with the fewest
recomputed FLOPs whose simulated peak fits the budget (bench/checkpoint_plan.py), for
{budget_gib:g} GiB and for 95% of it (the caching allocator reserved ~3% above the allocated
peak on the H200, and kernel workspaces are not in the estimate):

{plans}

{shown.to_markdown(index=False)}
"""
    (folder / "checkpointing.md").write_text(text)
    return text
