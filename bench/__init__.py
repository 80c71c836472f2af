"""Benchmarks, installed as ``sdiff.bench`` (the top-level ``bench/`` folder is mapped into the
package by pyproject.toml, as ``kernels/`` is): training and sampling throughput with MFU
(``throughput``), training memory estimated and measured (``memory``, ``memory_counting``), the
attention kernels (``bench_attention``), the deterministic regression gate (``gate``, against
``baseline.json``) and the side-by-side timing of two revisions (``compare``). Results go to CSV
files under ``reports/bench/``; ``bench/asv/`` holds the asv suite, ``bench/perf/`` the
pytest-benchmark timings and ``bench/gpu/`` the prepared GPU scripts (none of the three is part
of the installed package). Whatever times or measures training calls the trainer's own step
(``sdiff.training.step``), never a copy of it.

May import: the core library (``sdiff.diffusion``, ``sdiff.models``, ``sdiff.data``,
``sdiff.training``, ``sdiff.eval``), ``sdiff.kernels`` and ``sdiff.util``; not
``sdiff.ablations``, ``sdiff.report`` or ``sdiff.cli``. Provenance (commit, device, versions)
comes from ``sdiff.util.provenance``.
"""
