"""Evaluation: the one evaluation spec (``spec``: sampling, reference and metric settings),
sampling from a trained run (``sample``), FID, KID,
precision/recall and IS from Inception features (``metrics``), the offline Inception weights
(``inception``) and evaluating a run folder into ``metrics.json`` (``run_eval``).

May import: ``sdiff.util``, ``sdiff.kernels``, ``sdiff.diffusion``, ``sdiff.models``,
``sdiff.data``, ``sdiff.training``.
"""
