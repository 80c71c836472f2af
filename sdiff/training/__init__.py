"""Training: the run config (``config``), the one training step every caller shares
(``step``: ``TrainState`` and ``train_step``), the loop around it (``trainer``: data,
logging, checkpoints, sample grids), checkpoint files, whole or sharded (``checkpoint``),
experiment trackers (``trackers``: TensorBoard, W&B, MLflow; ``train.logger``) and exports of
trained runs and EMA snapshots (``export``).

May import: ``sdiff.util``, ``sdiff.kernels``, ``sdiff.diffusion``, ``sdiff.models``,
``sdiff.data``.
"""
