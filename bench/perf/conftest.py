"""Set-up shared by the perf benchmarks: the device and the facts each JSON records."""

from __future__ import annotations

import os
import platform

import pytest
import torch


def bench_device() -> torch.device:
    """CUDA when present; SDIFF_BENCH_DEVICE (e.g. ``cpu``, ``cuda:1``) overrides."""
    name = os.environ.get("SDIFF_BENCH_DEVICE")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


# One CPU thread unless SDIFF_BENCH_THREADS says otherwise. On a shared machine, OpenMP threads
# that spin-wait for a core another process holds made a 20 ms forward take 1.1 s (2 threads on
# 2 busy cores); one thread degrades gracefully (40 ms). A regression gate wants that stability
# more than the multi-core figure.
if bench_device().type == "cpu":
    torch.set_num_threads(int(os.environ.get("SDIFF_BENCH_THREADS", "1")))


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


def pytest_benchmark_update_json(config, benchmarks, output_json) -> None:
    dev = bench_device()
    name = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})"
    )
    output_json["sdiff_run"] = {
        "device": str(dev),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
    }
