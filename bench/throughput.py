"""Training and sampling throughput per preset x resolution x batch x eager/compiled x backend.

    sdiff bench                                  # CPU: tiny presets at 32 and 64 px
    sdiff bench --model uvit-l-256 --res 256 --batch 32 --compiled both      # a GPU row

For each configuration it builds the training state a run would (``run_config``: the preset
at the resolution, the default diffusion and training settings at this batch, so label dropout
0.1, clipping at 1, Adam, the EMA with its warm-up, fp32 on the CPU and bf16 autocast on CUDA;
``sdiff.training.step.build_state``) and measures:
- training: the trainer's own step, ``prepare_batch`` then ``train_step`` from
  ``sdiff.training.step`` (label dropout, warm-up lr, loss, backward, clip, the
  non-finite check with its host sync, Adam, EMA); ``warmup`` steps are excluded (they include
  compilation), the median of ``steps`` is reported as ms/step and img/s; ``compile_s`` is the
  wall time of the first compiled step minus an eager step's time. What differs from a real
  run: the images are one fixed random batch of the right shape (with random labels) instead
  of a dataset behind a loader, so the figure is the step's, not the data pipeline's; and
  there is no logging, checkpointing or sampling between steps;
- sampling: one forward of the step's model at the same batch without gradients, as denoiser
  evaluations/s (images x evaluations per second) and img/s for ``--sample-steps`` steps;
- peak memory of the training step (CUDA allocator; blank on CPU, see ``sdiff bench memory``);
- MFU = achieved training FLOP/s / the device's dense bf16 peak, with training FLOPs per image
  = 6 x the forward multiply-accumulates counted on the meta device (forward 2 FLOPs per MAC,
  backward twice the forward). Peaks come from ``GPU_PEAK_BF16_TFLOPS`` (NVIDIA datasheets,
  dense, no sparsity); unknown devices and CPUs get no MFU.
Rows are appended to a CSV (``reports/bench/throughput.csv`` by default) with device,
versions, git SHA and date; a table is printed. A row that cannot run (out of memory, a
resolution the model cannot reach) is kept with its reason.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from sdiff.data.datasets import DataConfig
from sdiff.models.flops import model_stats
from sdiff.models.presets import PRESETS, ModelConfig, get_preset
from sdiff.training.config import RunConfig, TrainConfig
from sdiff.training.step import TrainState, autocast, build_state, prepare_batch, train_step
from sdiff.util.cli_args import ExtendList, renamed, show_defaults
from sdiff.util.devices import resolve_device
from sdiff.util.files import append_csv_row
from sdiff.util.provenance import provenance

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from NVIDIA's datasheets; matched in order
# against torch.cuda.get_device_name.
GPU_PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
]

FIELDS = [
    "preset", "resolution", "batch", "backend", "compiled", "dtype", "train_ms", "train_img_s",
    "sample_evals_s", "sample_img_s", "sample_steps", "peak_mem_gib", "train_tflops", "mfu",
    "compile_s", "status", "device", "torch", "triton", "git_sha", "date",
]  # fmt: skip


def peak_for_name(name: str) -> float | None:
    """Dense bf16 peak of a GPU by its name (first matching key), None if unknown."""
    return next((peak for key, peak in GPU_PEAK_BF16_TFLOPS if key in name), None)


def peak_tflops(device: torch.device) -> float | None:
    return peak_for_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def at_resolution(config: ModelConfig, resolution: int) -> ModelConfig:
    """The preset at another resolution, the way the paper scales its models: each model
    config's ``at_resolution`` (U-ViTs keep their conv levels and transformer side and change
    the patch size, patch 2 at 256 and 4 at 512; a U-Net at a higher resolution keeps its
    network behind extra DWT levels, at a lower one its attention/dropout sides shrink)."""
    return config.at_resolution(resolution)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def run_config(
    model: ModelConfig,
    batch: int,
    *,
    compiled: bool = False,
    precision: str = "auto",
    seed: int = 0,
) -> RunConfig:
    """The run config a benchmark trains ``model`` with: the default diffusion and training
    settings (``TrainConfig``'s: lr 1e-4, no lr warm-up, clipping at 1, label dropout 0.1, EMA
    0.9999 with its warm-up; ``precision`` "auto" is bf16 autocast on CUDA, fp32 on the CPU) at
    global batch ``batch``. The data section only states the image shape: no dataset is built,
    the benchmark feeds ``random_batch`` images."""
    if getattr(model, "text_dim", None) is not None:
        raise ValueError("benchmarking a text-conditioned U-ViT is not supported (no captions)")
    data = DataConfig(resolution=model.resolution, channels=model.in_channels)
    train = TrainConfig(batch_size=batch, compile=compiled, precision=precision, seed=seed,
                        sample_every_images=0)  # fmt: skip
    return RunConfig(model=model, data=data, train=train)


def random_batch(
    model: ModelConfig, batch: int, device: torch.device | str = "cpu", seed: int = 0
) -> tuple[Tensor, Tensor | None]:
    """Images (B, C, H, W) uniform in [-1, 1] and labels (B,) (None for an unconditional
    model), from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    c, r = model.in_channels, model.resolution
    x = torch.rand(batch, c, r, r, generator=gen) * 2 - 1
    y = torch.randint(0, max(model.num_classes, 1), (batch,), generator=gen)
    return x.to(device), (y.to(device) if model.num_classes else None)


def make_train_step(config: RunConfig, device: torch.device | str):
    """(state, step): a fresh ``TrainState`` for ``config`` and ``step(x, y)``, one training
    step as the trainer takes it (``prepare_batch``, then ``train_step``), returning (loss,
    gradient norm)."""
    state = build_state(config, device)

    def step(x: Tensor, y: Tensor | None):
        return train_step(state, prepare_batch(state, x, y, config), config)

    return state, step


def make_sample_eval(state: TrainState, config: RunConfig, batch: int):
    """One forward of the step's model (compiled when the step is) at ``batch``, without
    gradients: the cost of a denoiser evaluation when sampling."""
    z, y = random_batch(config.model, batch, state.device, seed=1)
    logsnr = torch.zeros(batch, device=state.device)

    @torch.no_grad()
    def sample_eval() -> None:
        with autocast(config.train, state.device):
            state.step_model(z, logsnr, y)

    return sample_eval


def measure(
    preset: str,
    resolution: int,
    batch: int,
    *,
    compiled: bool,
    backend: str = "auto",
    device: torch.device,
    warmup: int = 3,
    steps: int = 10,
    sample_steps: int = 256,
) -> dict:
    row = {"preset": preset, "resolution": resolution, "batch": batch, "backend": backend,
           "compiled": compiled, "dtype": "bf16" if device.type == "cuda" else "fp32",
           "sample_steps": sample_steps}  # fmt: skip
    try:
        model = replace(at_resolution(get_preset(preset), resolution), attention_backend=backend)
        macs = model_stats(model).macs
        config = run_config(model, batch, compiled=compiled)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        state, step = make_train_step(config, device)
        sample_eval = make_sample_eval(state, config, batch)
        x, y = random_batch(model, batch, device)
        first = _timed(lambda: step(x, y), device)
        for _ in range(max(warmup - 1, 0)):
            step(x, y)
        times = [_timed(lambda: step(x, y), device) for _ in range(steps)]
        train_s = statistics.median(times)
        evals = [_timed(sample_eval, device) for _ in range(max(3, steps // 2))]
        eval_s = statistics.median(evals)
        img_s = batch / train_s
        tflops = 6 * macs * img_s / 1e12
        peak = peak_tflops(device)
        row.update(
            train_ms=round(train_s * 1000, 3),
            train_img_s=float(f"{img_s:.4g}"),
            sample_evals_s=float(f"{batch / eval_s:.4g}"),
            sample_img_s=round(batch / (eval_s * sample_steps), 4),
            peak_mem_gib=_peak_gib(device),
            train_tflops=round(tflops, 3),
            mfu=round(tflops / peak, 4) if peak else None,
            compile_s=round(first - train_s, 2) if compiled else None,
            status="ok",
        )
    except Exception as err:  # one configuration must not stop the table
        msg = str(err).splitlines()[0][:160] if str(err) else ""
        row["status"] = f"unavailable: {type(err).__name__}: {msg}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def table(rows: list[dict]) -> str:
    cols = ["preset", "resolution", "batch", "backend", "compiled", "train_ms", "train_img_s",
            "sample_evals_s", "peak_mem_gib", "mfu", "compile_s", "status"]  # fmt: skip
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*cols), *(fmt.format(*row) for row in cells)])


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="sdiff bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "--presets", dest="presets", nargs="+",
                   action=renamed("--presets", action=ExtendList), metavar="PRESET",
                   default=["unet-tiny-32", "uvit-tiny-32"], help="model presets")  # fmt: skip
    p.add_argument("--res", type=int, nargs="+", action=ExtendList, default=[32, 64])
    p.add_argument("--batch", type=int, nargs="+", action=ExtendList, default=[8])
    p.add_argument("--compiled", choices=["no", "yes", "both"], default="no")
    p.add_argument("--backends", nargs="+", action=ExtendList, default=["auto"])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5 if not cuda else 10)
    p.add_argument("--sample-steps", type=int, default=256)
    p.add_argument("--time-budget", type=float, default=math.inf,
                   help="seconds; rows not started by then are recorded as skipped")  # fmt: skip
    p.add_argument("--csv", default="reports/bench/throughput.csv")
    args = show_defaults(p).parse_args(argv)
    unknown = sorted(set(args.presets) - set(PRESETS))
    if unknown:
        get_preset(unknown[0])  # raises with the known names
    device = resolve_device(args.device)
    prov = provenance(device)
    meta = {"device": prov.device, "torch": prov.torch, "triton": prov.triton,
            "git_sha": prov.git_sha, "date": prov.date}  # fmt: skip
    compiled = {"no": [False], "yes": [True], "both": [False, True]}[args.compiled]
    start = time.perf_counter()
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for preset in args.presets:
        for res in args.res:
            for batch in args.batch:
                for backend in args.backends:
                    for comp in compiled:
                        if time.perf_counter() - start > args.time_budget:
                            row = {"preset": preset, "resolution": res, "batch": batch,
                                   "backend": backend, "compiled": comp,
                                   "status": "skipped: time budget"}  # fmt: skip
                        else:
                            row = measure(preset, res, batch, compiled=comp, backend=backend,
                                          device=device, warmup=args.warmup, steps=args.steps,
                                          sample_steps=args.sample_steps)  # fmt: skip
                        rows.append({**row, **meta})
                        # row by row: a killed run keeps its rows
                        append_csv_row(path, FIELDS, _csv_row(rows[-1]))
                        print(f"{preset} {res}px batch {batch} {backend} "
                              f"{'compiled' if comp else 'eager'}: "
                              f"{row.get('train_img_s') or row['status']}", flush=True)  # fmt: skip
    print(f"\n{meta['device']}, torch {meta['torch']}, git {meta['git_sha']}, {meta['date']}")
    print(table(rows))
    print(f"\nrows appended to {path}")
    return 0


def _csv_row(row: dict) -> dict:
    return {k: row.get(k) for k in FIELDS}


if __name__ == "__main__":
    raise SystemExit(main())
