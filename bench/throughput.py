"""Training and sampling throughput per preset x resolution x batch x eager/compiled x backend.

    sdiff bench                                  # CPU: tiny presets at 32 and 64 px
    sdiff bench --presets uvit-l-256 --res 256 --batch 32 --compiled both      # a GPU row

For each configuration, on its own freshly built model (weights, fp32 EMA copy, Adam, random
data of the right shape, label dropout off), it measures:
- training: one full step (forward, loss, backward, clip, Adam, EMA), bf16 autocast on CUDA;
  ``warmup`` steps are excluded (they include compilation), the median of ``steps`` is
  reported as ms/step and img/s; ``compile_s`` is the wall time of the first compiled step
  minus an eager step's time;
- sampling: one denoiser evaluation at the same batch without gradients, as denoiser
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
import copy
import csv
import math
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from sdiff.bench import git_sha
from sdiff.cli_args import ExtendList
from sdiff.compile import maybe_compile
from sdiff.devices import resolve_device
from sdiff.diffusion import DiffusionConfig, diffusion_loss
from sdiff.flops import example_inputs, model_stats
from sdiff.presets import PRESETS, ModelConfig, build_model, get_preset
from sdiff.uvit import UViTConfig

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


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def at_resolution(config: ModelConfig, resolution: int) -> ModelConfig:
    """The preset at another resolution, the way the paper scales its models: U-ViTs keep
    their conv levels and transformer side and change the patch size (patch 2 at 256, 4 at
    512); a U-Net at a higher resolution keeps its network behind extra DWT levels (as
    unet-256/512 do), at a lower one its attention/dropout sides shrink with the image."""
    if resolution == config.resolution:
        return config
    if not isinstance(config, UViTConfig):
        ratio = resolution / config.resolution
        if ratio > 1 and ratio.is_integer() and (int(ratio) & (int(ratio) - 1)) == 0:
            levels = int(math.log2(ratio)) + (
                config.dwt_levels if config.downsample == "dwt" else 0
            )
            if config.downsample in ("none", "dwt"):
                return replace(config, resolution=resolution, downsample="dwt", dwt_levels=levels)
        if ratio < 1:
            scale = lambda sides: tuple(int(s * ratio) for s in sides if (s * ratio).is_integer())  # noqa: E731
            return replace(config, resolution=resolution,
                           attention_resolutions=scale(config.attention_resolutions),
                           dropout_resolutions=scale(config.dropout_resolutions))  # fmt: skip
    if isinstance(config, UViTConfig) and config.downsample == "patch":
        inner = config.transformer_resolution * 2 ** len(config.channels)
        if resolution % inner:
            raise ValueError(
                f"{resolution} px cannot reach this U-ViT's {config.transformer_resolution}x"
                f"{config.transformer_resolution} transformer through its conv levels"
            )
        return replace(config, resolution=resolution, patch_size=resolution // inner)
    return replace(config, resolution=resolution)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def make_train_step(config: ModelConfig, batch: int, device: torch.device, compiled: bool):
    """A closure running one full training step on fixed random data."""
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (seconds, not a minute, for 1.9B)
        model = build_model(config)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    step_model = maybe_compile(model, enabled=compiled)
    z, _, cond = example_inputs(config, batch, device=device)
    x = torch.rand(z.shape, device=device) * 2 - 1
    diffusion = DiffusionConfig()
    schedule = diffusion.schedule.build(config.resolution)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def step() -> None:
        if autocast is not None:
            with autocast:
                loss = diffusion_loss(step_model, x, diffusion, cond, schedule=schedule).loss
        else:
            loss = diffusion_loss(step_model, x, diffusion, cond, schedule=schedule).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1e-4)

    def sample_eval() -> None:
        with torch.no_grad():
            if autocast is not None:
                with autocast:
                    step_model(z, torch.zeros(batch, device=device), cond)
            else:
                step_model(z, torch.zeros(batch, device=device), cond)

    return step, sample_eval


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
        config = replace(at_resolution(get_preset(preset), resolution), attention_backend=backend)
        macs = model_stats(config).macs
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step, sample_eval = make_train_step(config, batch, device, compiled)
        first = _timed(step, device)
        for _ in range(max(warmup - 1, 0)):
            step()
        times = [_timed(step, device) for _ in range(steps)]
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
    p.add_argument("--presets", nargs="+", action=ExtendList,
                   default=["unet-tiny-32", "uvit-tiny-32"])  # fmt: skip
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
    args = p.parse_args(argv)
    unknown = sorted(set(args.presets) - set(PRESETS))
    if unknown:
        get_preset(unknown[0])  # raises with the known names
    device = resolve_device(args.device)
    meta = {
        "device": device_label(device),
        "torch": str(torch.__version__),
        "triton": _triton_version(),
        "git_sha": git_sha(),
        "date": time.strftime("%Y-%m-%d"),
    }
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
                        _append_row(path, rows[-1])  # row by row: a killed run keeps its rows
                        print(f"{preset} {res}px batch {batch} {backend} "
                              f"{'compiled' if comp else 'eager'}: "
                              f"{row.get('train_img_s') or row['status']}", flush=True)  # fmt: skip
    print(f"\n{meta['device']}, torch {meta['torch']}, git {meta['git_sha']}, {meta['date']}")
    print(table(rows))
    print(f"\nrows appended to {path}")
    return 0


def _append_row(path: Path, row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    raise SystemExit(main())
