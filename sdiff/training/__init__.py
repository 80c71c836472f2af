"""Training: the run config (``config``), the one training step every caller shares
(``step``: ``TrainState`` and ``train_step``), the loop around it (``trainer``: data,
logging, checkpoints, sample grids) and checkpoint files (``checkpoint``).

May import: ``sdiff.util``, ``sdiff.kernels``, ``sdiff.diffusion``, ``sdiff.models``,
``sdiff.data``.
"""
