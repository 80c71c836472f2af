"""Benchmarks: throughput, memory and attention, installed as ``sdiff.bench`` (the top-level
``bench/`` folder is mapped into the package by pyproject.toml, as ``kernels/`` is). Results
go to CSV files under ``reports/bench/``; ``bench/asv/`` holds the asv suite and ``bench/gpu/``
the prepared GPU scripts (neither is part of the installed package).
"""
