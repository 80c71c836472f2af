"""Data: datasets (an ImageNet-layout folder, the bundled MNIST digits, scikit-image photo
crops; ``datasets``, re-exported here) and image conversion, PNG grids and folders
(``images``).

May import: ``sdiff.util``.
"""

from sdiff.data.datasets import *  # noqa: F403
from sdiff.data.datasets import __all__  # noqa: F401
