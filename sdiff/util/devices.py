"""The device a command runs on, checked before anything is built or written."""

from __future__ import annotations

import torch

from sdiff.util.errors import DeviceUnavailable

__all__ = ["resolve_device"]


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``name`` ("cpu", "cuda", "cuda:1", "mps", ...) as a device that exists here; None picks
    the first CUDA GPU when there is one, else the CPU. A malformed name, a GPU this machine
    does not have, or an index past the last one is a ``DeviceUnavailable`` naming it."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as err:
        raise DeviceUnavailable(
            f"unknown device {str(name)!r} ({str(err).splitlines()[0]}); use cpu, cuda or cuda:N"
        ) from None
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise DeviceUnavailable("device 'meta' holds no data; use cpu, cuda or cuda:N")
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        available = torch.backends.mps.is_available()
    else:
        available = bool(backend is not None and backend.is_available())
    if not available:
        built = f", CUDA {torch.version.cuda}" if torch.version.cuda else ", a CPU-only build"
        raise DeviceUnavailable(
            f"device {str(name)!r} is not available here (no {device.type} device visible to "
            f"torch {torch.__version__}{built}); use --device cpu"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise DeviceUnavailable(
            f"device {str(name)!r} does not exist: this machine has {count} {device.type} "
            f"device(s), numbered from 0"
        )
    return device
