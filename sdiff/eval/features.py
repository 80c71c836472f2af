"""Inception features of images: the network every metric of ``sdiff.eval.metrics`` reads.

Conventions:
- Images are uint8 in [0, 255], laid out (N, C, H, W), C = 3 (or C = 1, repeated to 3). Model
  outputs in [-1, 1] must be converted first (``sdiff.data.images.to_uint8``). Accepted sources: a
  uint8 tensor, a ``Dataset`` whose items are uint8 (C, H, W) tensors, a folder of PNG/JPEG files
  (not searched recursively), or an ``.npz`` whose ``arr_0`` holds (N, H, W, C) uint8 images
  (the layout of OpenAI ADM's sample batches and reference batches).
- Features are torch-fidelity's ``inception-v3-compat`` network, the TensorFlow FID Inception
  (2015-12-05) ported to PyTorch: TF1-style bilinear resize to 299 x 299, then (x - 128) / 128,
  then the 2048-d pool3 features (FID, KID, precision/recall) or the 1008 logits (IS).
  Extraction runs in float32 with TF32 turned off on CUDA, so features do not depend on the GPU.
- Weights (``EvalSpec.weights``: "auto", "torch-fidelity", "fid-helper"): see
  ``sdiff.eval.inception``.
- Each image's features depend on that image alone (the network is in eval mode), so images
  may go through in any grouping: all at once, chunk by chunk as they are sampled, or on
  several processes (``sdiff.eval.run_eval``). ``progress`` / ``bar`` count the images done.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sdiff.eval.inception import EXTRACTOR, InceptionWeights, resolve_weights
from sdiff.eval.progress import progress_bar
from sdiff.eval.spec import EvalSpec

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageSource",
    "extract",
    "image_dataset",
    "inception_features",
    "inception_outputs",
    "metric_layers",
]

# Images: a uint8 tensor (N, C, H, W), a Dataset of uint8 (C, H, W), a folder, or an .npz (arr_0).
ImageSource = Tensor | Dataset | str | os.PathLike

IMAGE_EXTENSIONS = "png,jpg,jpeg"  # torch-fidelity's folder filter (comma-separated)


class _Images(Dataset):
    """Validates items as uint8 (C, H, W), C in {1, 3}, and repeats grayscale to RGB."""

    def __init__(self, source: Any, what: str) -> None:
        self.source, self.what = source, what

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Tensor:
        x = self.source[i]
        if isinstance(x, (tuple, list)):  # (image, label) datasets
            x = x[0]
        if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.ndim != 3:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{self.what} image {i} must be a uint8 tensor (C, H, W); got {got}. Convert "
                f"[-1, 1] floats with sdiff.data.images.to_uint8"
            )
        if x.shape[0] not in (1, 3):
            raise ValueError(f"{self.what} image {i} has {x.shape[0]} channels; expected 1 or 3")
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x  # (3, H, W)


def _check_image_tensor(x: Tensor, what: str) -> Tensor:
    if x.dtype != torch.uint8:
        raise ValueError(
            f"{what} images must be uint8 in [0, 255]; got {x.dtype}. Convert [-1, 1] floats "
            f"with sdiff.data.images.to_uint8"
        )
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"{what} images must be (N, 3, H, W) or (N, 1, H, W); got {tuple(x.shape)}"
        )
    return x


def _npz_images(path: Path, what: str) -> Tensor:
    """``arr_0`` of an ADM-style .npz: (N, H, W, C) uint8 -> (N, C, H, W)."""
    with np.load(path) as f:
        if "arr_0" not in f:
            raise ValueError(f"{what} {path} has no 'arr_0' images (keys: {sorted(f.keys())})")
        arr = f["arr_0"]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"{what} {path}: 'arr_0' must be (N, H, W, 1 or 3); got {arr.shape}")
    return _check_image_tensor(torch.from_numpy(arr).permute(0, 3, 1, 2), f"{what} {path}")


def image_dataset(images: ImageSource, what: str) -> Dataset:
    """A tensor, a Dataset, a folder or an .npz with arr_0 -> Dataset of uint8 (3, H, W)."""
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if not path.exists():
            raise ValueError(f"{what} path {str(path)!r} does not exist")
        if path.is_dir():
            from torch_fidelity.datasets import ImagesPathDataset
            from torch_fidelity.utils import glob_samples_paths

            files = glob_samples_paths(str(path), False, IMAGE_EXTENSIONS, verbose=False)
            if not files:
                raise ValueError(
                    f"{what} folder {str(path)!r} holds no images with extensions "
                    f"{IMAGE_EXTENSIONS} (sub-folders are not searched)"
                )
            return _Images(ImagesPathDataset(files), what)  # PIL -> RGB uint8 (3, H, W)
        if path.suffix == ".npz":
            return _Images(_npz_images(path, what), what)
        raise ValueError(f"{what} path {str(path)!r} is neither a folder nor an .npz")
    if isinstance(images, Tensor):
        return _Images(_check_image_tensor(images, what), what)
    if isinstance(images, np.ndarray):
        raise ValueError(
            f"{what} images: pass a torch uint8 tensor (N, C, H, W), not a numpy array "
            f"(e.g. torch.from_numpy(arr).permute(0, 3, 1, 2) for (N, H, W, C))"
        )
    if isinstance(images, Dataset):
        return _Images(images, what)
    raise ValueError(
        f"{what} images must be a uint8 tensor, a Dataset, a folder or an .npz path; "
        f"got {type(images).__name__}"
    )


@contextlib.contextmanager
def _ieee_fp32(device: torch.device) -> Iterator[None]:
    """Turn TF32 off for cuDNN convolutions and CUDA matmuls inside the block (both APIs)."""
    if device.type != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    if hasattr(conv, "fp32_precision"):  # torch >= 2.9
        old = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = old
    else:
        old = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = old


@functools.lru_cache(maxsize=2)
def _extractor(path: str | None, layers: tuple[str, ...], device: str) -> torch.nn.Module:
    # torch-fidelity's own constructor and loader (strict load_state_dict), CPU then moved.
    from torch_fidelity.utils import create_feature_extractor

    model = create_feature_extractor(
        EXTRACTOR, list(layers), cuda=False, feature_extractor_weights_path=path, verbose=False
    )
    return model.to(device)


def extract(
    dataset: Dataset,
    spec: EvalSpec,
    weights: InceptionWeights,
    layers: tuple[str, ...],
    *,
    bar: Any = None,
    progress: bool = False,
    desc: str = "features",
) -> dict[str, np.ndarray]:
    """Run the Inception over ``dataset``: {layer: float32 (N, dim)} for "2048" and/or
    "logits_unbiased" (N, 1008). ``bar`` (``progress_bar``) counts the images done; without
    one, ``progress`` draws its own, labelled ``desc``.
    """
    if len(dataset) == 0:
        raise ValueError("no images to evaluate (empty dataset)")
    own_bar = bar is None
    if own_bar:
        bar = progress_bar(len(dataset), desc, enabled=progress)
    device = torch.device(spec.device)
    model = _extractor(weights.path, layers, str(device))
    loader = DataLoader(dataset, batch_size=spec.eval_batch_size, num_workers=spec.num_workers)
    out: dict[str, list[Tensor]] = {layer: [] for layer in layers}
    try:
        with torch.no_grad(), _ieee_fp32(device):
            for batch in loader:  # (B, 3, H, W) uint8
                for layer, feats in zip(layers, model(batch.to(device)), strict=True):
                    out[layer].append(feats.cpu())
                bar.update(len(batch))
    finally:
        if own_bar:
            bar.close()
    return {layer: torch.cat(v).numpy() for layer, v in out.items()}


def metric_layers(spec: EvalSpec, weights: InceptionWeights) -> tuple[str, ...]:
    """The Inception outputs ``spec``'s metrics need: pool features, and logits for IS."""
    want_isc = "isc" in spec.metrics and weights.has_classifier
    return ("2048", "logits_unbiased") if want_isc else ("2048",)


def inception_features(
    images: ImageSource, spec: EvalSpec | None = None, *, progress: bool = False
) -> np.ndarray:
    """Inception pool3 features, float32 (N, 2048), of a uint8 tensor / Dataset / folder /
    .npz, with the weights ``spec.weights`` resolves to (``resolve_weights``); ``progress``
    draws a bar.
    """
    spec = spec or EvalSpec()
    dataset = image_dataset(images, "images")
    weights = resolve_weights(spec.weights)
    return extract(dataset, spec, weights, ("2048",), progress=progress)["2048"]


def inception_outputs(
    images: ImageSource,
    spec: EvalSpec,
    weights: InceptionWeights,
    *,
    bar: Any = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """What ``spec``'s metrics need from the Inception for ``images``: {"2048": pool features
    (N, 2048)} and, for the Inception Score with weights that have the classifier,
    "logits_unbiased" (N, 1008). ``bar`` / ``progress`` as for ``extract``."""
    dataset = image_dataset(images, "generated")
    layers = metric_layers(spec, weights)
    return extract(dataset, spec, weights, layers, bar=bar, progress=progress)
