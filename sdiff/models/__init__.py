"""Networks: the attention entry point and its backends (``attention``), blocks, wavelets
(DWT), the U-Net and U-ViT, the one model registry ``kind -> (Config, Module)``
(``registry``), the presets, FLOP/parameter counts (``flops``), torch.compile (``compile``)
and text conditioning (``text``).

May import: ``sdiff.kernels`` and ``sdiff.util``.
"""
