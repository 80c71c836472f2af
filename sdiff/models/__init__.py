"""Networks: the attention entry point and its backends (``attention``), blocks, wavelets
(DWT), the U-Net and U-ViT, the one model registry ``kind -> (Config, Module)``
(``registry``), the presets, FLOP/parameter counts (``flops``), torch.compile (``compile``),
text conditioning (``text``) and portable exports (``pretrained``).

May import: ``sdiff.kernels``, ``sdiff.util`` and ``sdiff.diffusion`` (``pretrained``: the
schedule and prediction a sampler needs).
"""
