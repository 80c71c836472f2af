"""sdiff's U-Net beside diffusers' ``UNet2DModel`` at matched size, on this machine.

    pip install diffusers            # not a dependency of sdiff: only this comparison needs it
    python -m sdiff.bench.peers [--batch 8] [--threads 2] [--rounds 12]

Both networks: two levels of 32 and 64 channels, two ResBlocks down and three up per level,
self-attention (head dim 32) at 16 x 16, GroupNorm with 8 groups, 10 classes, 32 x 32 images;
diffusers' middle block is left out (``mid_block_type=None``): sdiff's deepest level has none,
its down and up blocks meet directly. sdiff then has 0.877 M parameters, diffusers 0.823 M.
Timed, interleaved round by round so that load on a shared machine hits both alike: a training
step (forward, mean-square loss, backward, foreach Adam) and a sampling evaluation (forward
without gradients) on one fixed batch; medians, and the ratio diffusers / sdiff (above 1: sdiff
is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sdiff.models.presets import build_model
from sdiff.models.unet import UNetConfig

OURS = UNetConfig(
    resolution=32, channels=(32, 64), blocks_down=(2, 2), blocks_up=(3, 3),
    attention_resolutions=(16,), head_dim=32, norm_groups=8, num_classes=10,
)  # fmt: skip


def _peer():
    try:
        from diffusers import UNet2DModel
    except ImportError as err:
        raise SystemExit(f"the comparison needs diffusers (pip install diffusers): {err}") from None
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64),
        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=32,
        num_class_embeds=10, mid_block_type=None,
    )  # fmt: skip


def compare(batch: int = 8, rounds: int = 12) -> dict[str, dict[str, float]]:
    """{"train"|"sample": {"sdiff": ms, "diffusers": ms, "ratio": diffusers / sdiff}}."""
    torch.manual_seed(0)
    models = {"sdiff": build_model(OURS), "diffusers": _peer()}
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, 3, 32, 32, generator=g)
    logsnr = torch.randn(batch, generator=g)
    t = torch.rand(batch, generator=g) * 999  # diffusers' timesteps
    y = torch.randint(0, 10, (batch,), generator=g)
    forward = {
        "sdiff": lambda: models["sdiff"](z, logsnr, y),
        "diffusers": lambda: models["diffusers"](z, t, class_labels=y).sample,
    }
    optim = {k: torch.optim.Adam(m.parameters(), foreach=True) for k, m in models.items()}

    def train(k: str) -> None:
        optim[k].zero_grad(set_to_none=True)
        forward[k]().square().mean().backward()
        optim[k].step()

    @torch.no_grad()
    def sample(k: str) -> None:
        forward[k]()

    out = {}
    for what, fn in (("train", train), ("sample", sample)):
        for k in models:  # warm-up
            for _ in range(3):
                fn(k)
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(rounds):
            for k in models:
                start = time.perf_counter()
                fn(k)
                times[k].append(time.perf_counter() - start)
        ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
        out[what] = ms | {"ratio": ms["diffusers"] / ms["sdiff"]}
    return out


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.split("\n")[0]
    p = argparse.ArgumentParser(prog="python -m sdiff.bench.peers", description=doc)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=12)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    for what, r in compare(a.batch, a.rounds).items():
        print(
            f"{what}: sdiff {r['sdiff']:.1f} ms, diffusers {r['diffusers']:.1f} ms "
            f"-> sdiff {r['ratio']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
