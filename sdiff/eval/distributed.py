"""Sampling and evaluation over torchrun's processes: the process group and the few collectives.

    torchrun --nproc_per_node=8 -m sdiff -- eval --run runs/uvit --n 50000 --save-npz s.npz

(The ``--`` keeps torchrun's own parser, which accepts abbreviations, from reading ``--run`` and
``--n`` as abbreviations of its ``--run-path`` and ``--nnodes``, ``--nproc-per-node``, ...)

``sdiff sample`` and ``sdiff eval`` join the process group when ``WORLD_SIZE`` > 1, as the
trainer does (NCCL for a CUDA device, gloo for the CPU; a CUDA device without an index becomes
``cuda:LOCAL_RANK``). Each process draws its own chunks of images (``sdiff.eval.sample``: a
chunk's noise depends on the seed and the chunk only, so the images do not depend on the
number of processes) and sends what rank 0 needs (Inception features, grid images) with
``gather_to_main``; rank 0 computes the metrics, writes the record and prints, and
``broadcast_from_main`` hands its result back to the others. Rank 0 alone computes the
reference statistics and the metrics while the others wait, so the group is joined with a
timeout of ``TIMEOUT`` rather than NCCL's 10 minutes. Without torchrun (or with one process)
every function here is a no-op on a ``World()`` of one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "SINGLE",
    "TIMEOUT",
    "World",
    "barrier",
    "broadcast_from_main",
    "current_world",
    "gather_to_main",
    "join",
    "process_group",
]

T = TypeVar("T")

# Rank 0's reference statistics (up to 50k images through the Inception) and metrics run while
# the other processes wait in a collective.
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class World:
    """This process's place among the ones that sample together (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank must lie in [0, {self.size - 1}]; got {self.rank}")

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = World()  # one process: no torchrun


def current_world() -> World:
    """The process group this process has joined, or a world of one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return SINGLE


def join(device: str) -> tuple[World, str, bool]:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1 and it is not joined yet.

    Returns (the world, this process's device, whether this call joined). On CUDA the backend
    is NCCL and a device without an index becomes ``cuda:LOCAL_RANK`` (made current, which
    NCCL's object collectives use); on the CPU it is gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    d = torch.device(device)
    if world_size > 1 and d.type == "cuda" and d.index is None:
        d = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if d.type == "cuda" and d.index is not None:
        torch.cuda.set_device(d)
    joined = False
    if world_size > 1 and not dist.is_initialized():
        if d.type == "cuda":  # bound to its GPU: collectives need not guess it from the rank
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=d)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
        joined = True
    return current_world(), str(d), joined


@contextlib.contextmanager
def process_group(device: str) -> Iterator[tuple[World, str]]:
    """``join`` for the length of a command: (world, device), leaving the group on exit when
    this call joined it."""
    world, device, joined = join(device)
    try:
        yield world, device
    finally:
        if joined:
            dist.destroy_process_group()


def gather_to_main(obj: T, world: World) -> list[T] | None:
    """Every process's ``obj`` (any picklable object), in rank order, on rank 0; None on the
    others."""
    if world.size == 1:
        return [obj]
    out: list[Any] | None = [None] * world.size if world.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: T | None, world: World) -> T:
    """Rank 0's ``obj`` on every process (what the others pass is ignored)."""
    if world.size == 1:
        return obj  # type: ignore[return-value]
    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    """Wait until every process has arrived."""
    if world.size > 1:
        dist.barrier()
