"""Parameter and multiply-accumulate counts of a model config, on the meta device.

The model is built on ``torch.device("meta")`` (no memory, so the 2B U-ViT costs nothing) and
one forward pass runs under ``torch.utils.flop_counter.FlopCounterMode``, which counts the
matrix products and convolutions (2 FLOPs per multiply-accumulate); normalisation, activations
and softmax are not counted. MACs = FLOPs / 2, per image (batch 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdiff.models.presets import ModelConfig, build_model
from sdiff.models.uvit import TextCondition

TEXT_TOKENS = 77  # caption length assumed when counting a text-conditioned model


@dataclass(frozen=True)
class ModelStats:
    kind: str
    resolution: int
    params: int
    macs: int  # multiply-accumulates per forward pass per image
    attention_resolutions: tuple[int, ...]
    dropout_resolutions: tuple[int, ...]
    macs_by_op: dict[str, int] = field(default_factory=dict)


def attention_sides(config: ModelConfig) -> tuple[int, ...]:
    """Feature-map sides with attention, largest first (each kind answers for itself)."""
    return config.attention_sides()


def dropout_sides(config: ModelConfig) -> tuple[int, ...]:
    """Feature-map sides with dropout, largest first."""
    return config.dropout_sides()


def example_inputs(config: ModelConfig, batch: int = 1, device: str | torch.device = "meta"):
    """(z, logsnr, cond) of the right shapes for a forward pass: zeros, class 0 when the model
    takes labels, and for a text-conditioned model ``TEXT_TOKENS`` zero text embeddings."""
    c = config
    z = torch.zeros(batch, c.in_channels, c.resolution, c.resolution, device=device)
    logsnr = torch.zeros(batch, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device) if c.num_classes else None
    cond = labels
    if c.text_conditioned:
        text = torch.zeros(batch, TEXT_TOKENS, c.text_dim, device=device)
        cond = TextCondition(text, None, labels)
    return z, logsnr, cond


def model_stats(config: ModelConfig) -> ModelStats:
    with torch.device("meta"):
        model = build_model(config).eval()
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*example_inputs(config))
    by_op = {str(op): int(n) // 2 for op, n in counter.get_flop_counts()["Global"].items()}
    return ModelStats(
        kind=config.kind,
        resolution=config.resolution,
        params=params,
        macs=int(counter.get_total_flops()) // 2,
        attention_resolutions=attention_sides(config),
        dropout_resolutions=dropout_sides(config),
        macs_by_op=by_op,
    )
