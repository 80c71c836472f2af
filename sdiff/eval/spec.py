"""How a trained model is evaluated: one ``EvalSpec`` for ``sdiff sample``, ``sdiff eval`` and
the cells of an ablation grid.

It holds four groups of settings, and one rules table (``EVAL_RULES``) checks every number of
all of them when a spec is built:

- sampling: how many images (``n``), the sampler and its ``steps``, classifier-free guidance
  with weight ``guidance`` (w: eps = (1 + w) eps_cond - w eps_uncond; other libraries' "guidance
  scale" is 1 + w), applied only inside ``guidance_interval`` (a logSNR interval, as in SiD2
  (arXiv 2410.19324)) when given, the class ``labels`` (cycled), the ``seed``, ``clip_x``;
- the reference: ``"train"`` (the run's own training images, an evenly spaced subset of
  ``reference_n`` of them when given) or a folder or an ``.npz`` of images or statistics;
  ``reference_stats`` says what to do with an ``.npz`` that holds both images (``arr_0``) and
  ``mu``/``sigma``, as ADM's reference batches do: "recompute" them from the images with the
  Inception that measures the samples (default), or use the "stored" ones;
- the metrics (``METRICS``: "fid", "kid", "prc" for precision/recall, "isc" for the Inception
  Score), the Inception ``weights`` (``sdiff.eval.inception``), the KID subsets, the k of the
  precision/recall manifolds, the IS splits and ``metric_seed`` (KID subsets, IS shuffling);
- execution (``EXECUTION_FIELDS``): batch sizes, loader workers, ``torch.compile``, the device.
  These change how fast and where an evaluation runs, not what it measures, so they are left
  out of ``result_fields`` (what a record or an ablation cell's hash is keyed by).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from sdiff.diffusion.samplers import get_sampler
from sdiff.eval.inception import WEIGHTS
from sdiff.util.validation import FINITE, NON_NEGATIVE_INT, POSITIVE_INT, SEED, Range, check_fields

__all__ = [
    "EVAL_RULES",
    "EXECUTION_FIELDS",
    "METRICS",
    "REFERENCE_STATS",
    "SAMPLING_FIELDS",
    "EvalSpec",
]

METRICS = ("fid", "kid", "prc", "isc")
REFERENCE_STATS = ("recompute", "stored")  # an .npz reference with arr_0 and mu/sigma

# Every numeric field of EvalSpec.
EVAL_RULES: dict[str, Range] = {
    "n": POSITIVE_INT,
    "steps": POSITIVE_INT,
    # w = 0 is the conditional model alone; a negative w would mix the unconditional model in
    # instead of pushing samples away from it
    "guidance": Range(ge=0),
    "guidance_interval": FINITE,  # logSNR bounds; a wide finite one (-50, 50) means "all"
    "labels": NON_NEGATIVE_INT,
    "seed": SEED,
    "reference_n": POSITIVE_INT,
    "kid_subset_size": Range(ge=2, integer=True),  # KID's unbiased MMD needs two per subset
    "kid_subsets": POSITIVE_INT,
    "prc_neighborhood": POSITIVE_INT,
    "isc_splits": POSITIVE_INT,
    # numpy's legacy RandomState (torch-fidelity's KID subsets) takes seeds below 2^32
    "metric_seed": SEED,
    "batch_size": POSITIVE_INT,
    "eval_batch_size": POSITIVE_INT,
    "num_workers": NON_NEGATIVE_INT,
}

SAMPLING_FIELDS = ("n", "sampler", "steps", "guidance", "guidance_interval", "labels", "seed",
                   "clip_x", "batch_size", "compile")  # fmt: skip
EXECUTION_FIELDS = ("batch_size", "eval_batch_size", "num_workers", "compile", "device")


@dataclass(frozen=True)
class EvalSpec:
    """Sampling, reference, metric and execution settings of an evaluation (module docstring).
    Lists given for ``labels``, ``guidance_interval`` or ``metrics`` are stored as tuples, and
    one metric name as a one-tuple."""

    # sampling
    n: int = 64
    sampler: str = "ddpm"
    steps: int = 256
    guidance: float = 0.0
    guidance_interval: tuple[float, float] | None = None
    labels: tuple[int, ...] | None = None  # cycled to n; default: all classes in turn
    seed: int = 0
    clip_x: bool = True
    # reference
    reference: str = "train"  # "train", a folder, or an .npz
    reference_n: int | None = None  # with "train": an evenly spaced subset (None: all)
    reference_stats: str = "recompute"  # .npz with arr_0: "recompute" mu/sigma, or "stored"
    # metrics
    metrics: tuple[str, ...] = ("fid", "kid", "prc")
    weights: str = "auto"  # Inception weights: "auto" | "torch-fidelity" | "fid-helper"
    kid_subset_size: int = 1000  # torch-fidelity's default; clipped to the image count
    kid_subsets: int = 100
    prc_neighborhood: int = 3  # k of the k-NN manifold estimate
    isc_splits: int = 10
    metric_seed: int = 2020  # torch-fidelity's rng_seed default
    # execution
    batch_size: int = 256  # images per sampling batch
    eval_batch_size: int = 64  # images per Inception batch
    num_workers: int = 0  # DataLoader workers (decoding an image folder)
    compile: bool = False  # torch.compile the denoiser (SDIFF_COMPILE=0 turns it off)
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("labels", "guidance_interval"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.metrics, str):
            object.__setattr__(self, "metrics", (self.metrics,))
        else:
            object.__setattr__(self, "metrics", tuple(self.metrics))
        check_fields(self, "eval", EVAL_RULES)
        self._check_choices()

    def _check_choices(self) -> None:
        if self.guidance_interval is not None:
            if len(self.guidance_interval) != 2:
                raise ValueError(f"eval.guidance_interval must be (lo, hi); got "
                                 f"{self.guidance_interval}")  # fmt: skip
            lo, hi = self.guidance_interval
            if not lo < hi:
                raise ValueError(f"the guidance interval needs lo < hi; got {lo}, {hi}")
        if not self.metrics:
            raise ValueError(f"eval.metrics is empty; choose from {list(METRICS)}")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known metrics: {list(METRICS)}")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"eval.metrics lists a metric twice: {list(self.metrics)}")
        if self.reference_stats not in REFERENCE_STATS:
            raise ValueError(f"unknown reference_stats {self.reference_stats!r}; choose from "
                             f"{list(REFERENCE_STATS)}")  # fmt: skip
        if self.weights not in WEIGHTS:
            raise ValueError(f"unknown weights {self.weights!r}; choose from {list(WEIGHTS)}")
        get_sampler(self.sampler)  # raises, naming the known samplers
        torch.device(self.device)  # raises on a malformed device string

    def result_fields(self) -> dict[str, Any]:
        """The settings that decide the numbers (every field but ``EXECUTION_FIELDS``), as
        plain JSON values."""
        return {k: v for k, v in asdict(self).items() if k not in EXECUTION_FIELDS}

    def sampling(self) -> dict[str, Any]:
        """The sampling settings that decide the images (``SAMPLING_FIELDS`` less execution)."""
        return {k: getattr(self, k) for k in SAMPLING_FIELDS if k not in EXECUTION_FIELDS}
