"""The diffusion process, independent of any network: logSNR schedules (``schedules``), the
forward process, prediction targets, weightings and losses (``process``, re-exported here so
``sdiff.diffusion.diffusion_loss`` keeps working), samplers with guidance (``samplers``), exact
denoisers for Gaussian-mixture data (``analytic``) and the sampler check built on them
(``sampler_check``). Formulas: simple diffusion (arXiv 2301.11093) and SiD2 (arXiv 2410.19324).

May import: ``sdiff.util``.
"""

from sdiff.diffusion.process import *  # noqa: F403
from sdiff.diffusion.process import __all__  # noqa: F401
