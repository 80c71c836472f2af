"""Triton kernels, each beside its pure-PyTorch reference; installed as ``sdiff.kernels``.

``attention``: flash attention, forward and backward (``flash_attention``, registered with
``torch.library``), and its reference ``attention_ref``. The library's attention entry point
offers it as the ``triton`` backend.

``attention_short``: attention for at most 512 keys (fewer at large head dims, ``max_keys``;
``short_attention``, registered with ``torch.library``), the whole K and V of a head in one
tile: the softmax in one shot, and the backward in one kernel and one sweep (a program per
head). Same semantics and reference as ``attention``; the library's attention entry point
offers it as the ``triton-short`` backend.

``norm_modulate``: LayerNorm + adaLN modulate (shift, scale) of the U-ViT blocks, forward and
backward (``norm_modulate``, registered with ``torch.library``), and its reference
``norm_modulate_ref``. The models use it with ``kernels="triton"`` in their config (opt-in;
the default ``"torch"`` keeps PyTorch's ops), through ``sdiff.models.blocks.norm_modulate``.

``groupnorm_silu``: GroupNorm + scale-shift conditioning + SiLU (the U-Net ResBlock's second
norm), forward and backward (``groupnorm_silu``, registered with ``torch.library``), and its
reference ``groupnorm_silu_ref``. The models' ResBlocks use it with ``kernels="triton"`` in
their config (opt-in, as ``norm_modulate``), through ``sdiff.models.blocks.groupnorm_silu``.

``_common``: what the kernels share (the triton import, ``interpreting``, dtypes, output buffers,
error messages, the autograd registration and the tile helpers of the two norms).

This folder is mapped into the ``sdiff`` package by ``[tool.setuptools.package-dir]`` in
pyproject.toml. Kernels are the bottom layer: they import torch and triton only.

May import: nothing of ``sdiff``.
"""
