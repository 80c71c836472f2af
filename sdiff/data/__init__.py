"""Data: datasets (an ImageNet-layout folder, the bundled MNIST digits, scikit-image photo
crops; ``datasets``), prepared datasets (the folder decoded and center-cropped once into
memory-mapped uint8 shards: the format and its reader in ``prepared``, ``sdiff data prepare``
in ``prepare``) and image conversion, PNG grids and folders (``images``). The names of
``datasets`` and ``prepared`` are re-exported here.

May import: ``sdiff.util``.
"""

from sdiff.data import datasets, prepared
from sdiff.data.datasets import *  # noqa: F403
from sdiff.data.prepared import *  # noqa: F403

__all__ = [*datasets.__all__, *prepared.__all__]
