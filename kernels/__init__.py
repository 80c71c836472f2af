"""Triton kernels, each beside its pure-PyTorch reference; installed as ``sdiff.kernels``.

``attention``: flash attention, forward and backward (``flash_attention``, registered with
``torch.library``), and its reference ``attention_ref``. The library's attention entry point
offers it as the ``triton`` backend.

This folder is mapped into the ``sdiff`` package by ``[tool.setuptools.package-dir]`` in
pyproject.toml. Kernels are the bottom layer: they import torch and triton only.

May import: nothing of ``sdiff``.
"""
