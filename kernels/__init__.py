"""Triton kernels and their pure-PyTorch references, installed as ``sdiff.kernels``.

This folder is mapped into the ``sdiff`` package by ``[tool.setuptools.package-dir]`` in
pyproject.toml. The fused attention kernel lands with the kernels issue; until then the
library's attention uses PyTorch's own backends.
"""
