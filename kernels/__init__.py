"""Triton kernels, each beside its pure-PyTorch reference; installed as ``sdiff.kernels``.

``attention``: flash attention, forward and backward (``flash_attention``, registered with
``torch.library``), and its reference ``attention_ref``. The library's attention entry point
offers it as the ``triton`` backend.

``norm_modulate``: LayerNorm + adaLN modulate (shift, scale) of the U-ViT blocks, forward and
backward (``norm_modulate``, registered with ``torch.library``), and its reference
``norm_modulate_ref``. Not yet used by the models.

``groupnorm_silu``: GroupNorm + scale-shift conditioning + SiLU (the U-Net ResBlock's second
norm), forward and backward (``groupnorm_silu``, registered with ``torch.library``), and its
reference ``groupnorm_silu_ref``. Not yet used by the models.

This folder is mapped into the ``sdiff`` package by ``[tool.setuptools.package-dir]`` in
pyproject.toml. Kernels are the bottom layer: they import torch and triton only.

May import: nothing of ``sdiff``.
"""
