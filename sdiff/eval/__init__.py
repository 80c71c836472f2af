"""Evaluation: the one evaluation spec (``spec``: sampling, reference and metric settings),
sampling from a trained run in chunks whose noise depends on the global image index only
(``sample``), Inception features (``features``) and FID, KID, precision/recall and IS from them
(``metrics``), the offline Inception weights (``inception``), evaluating a run folder into
``metrics.json`` (``run_eval``), the processes of a torchrun job (``distributed``), ADM-format
sample batches (``adm_batch``) and progress bars (``progress``).

May import: ``sdiff.util``, ``sdiff.kernels``, ``sdiff.diffusion``, ``sdiff.models``,
``sdiff.data``, ``sdiff.training``.
"""
