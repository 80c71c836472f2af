"""The commands behind ``sdiff <command>``: one ``cmd_<name>(args)`` per subcommand (the
parser is in ``sdiff.cli``). This module imports torch and the core library; applications
(``sdiff.ablations``, ``sdiff.bench``, ``sdiff.report``) are imported inside the command that
uses them.
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
from sdiff.diffusion.schedules import ScheduleConfig, alpha_sigma
from sdiff.util.tables import markdown_table


def _markdown(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    return markdown_table(list(df.columns), df.itertuples(index=False), floatfmt=floatfmt)


def _schedule_config(args: argparse.Namespace) -> ScheduleConfig:
    """The schedule the options name; options left out keep ScheduleConfig's defaults."""
    fields = ("name", "base", "base_noisy", "base_clean", "logsnr_min", "logsnr_max")
    given = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    return ScheduleConfig(**given)


def schedule_table(config: ScheduleConfig, resolution: int, points: int) -> pd.DataFrame:
    if points < 2:
        raise ValueError(f"--points must be >= 2; got {points}")
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    logsnr = config.build(resolution)(t)
    alpha, sigma = alpha_sigma(logsnr)
    return pd.DataFrame(
        {"t": t.numpy(), "logsnr": logsnr.numpy(), "alpha": alpha.numpy(), "sigma": sigma.numpy()}
    )


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
    from sdiff.diffusion.sampler_check import run_sampler_check

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
    from sdiff.data.images import save_grid
    from sdiff.eval.run_eval import evaluate_run
    from sdiff.eval.sample import generate, load_trained
    from sdiff.eval.spec import EvalSpec
    from sdiff.training.trainer import Trainer

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
    spec = EvalSpec(n=10 * k, sampler="ddpm", steps=args.steps, guidance=args.guidance,
                    seed=args.seed, metrics=("fid", "kid"), reference_n=args.reference_n,
                    device=device)  # fmt: skip
    images, _ = generate(model, config, spec)
    grid = save_grid(images, out / "samples" / "final-grid.png", nrow=k)
    print(f"sample grid: {grid} (one column per class, guidance w={args.guidance})")
    record = evaluate_run(out, replace(spec, n=args.eval_n))
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
    from sdiff.models.flops import model_stats
    from sdiff.models.presets import get_preset

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


def presets_table():
    """One row per run preset (``sdiff.training.config.RUN_PRESETS``): its model, data, image
    size, batch, learning rate, training budget and parameter count (meta device)."""
    import pandas as pd
    import torch

    from sdiff.models.presets import build_model
    from sdiff.training.config import RUN_PRESETS, get_run_preset

    rows = []
    for name in RUN_PRESETS:
        c = get_run_preset(name)
        with torch.device("meta"):  # shapes only: U-ViT L's 1.9B parameters allocate nothing
            params = sum(p.numel() for p in build_model(c.model).parameters())
        rows.append({
            "preset": name, "model": c.model.kind, "params_M": params / 1e6,
            "data": c.data.name, "px": c.data.resolution, "batch": c.train.batch_size,
            "lr": c.train.lr, "images": c.train.total_images,
            "steps": -(-c.train.total_images // c.train.batch_size),
            "schedule": c.diffusion.schedule.name,
        })  # fmt: skip
    return pd.DataFrame(rows)


def cmd_presets(args: argparse.Namespace) -> int:
    df = presets_table()
    if args.json:
        print(json.dumps(df.to_dict(orient="records"), indent=2))
        return 0
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print("\nsdiff train --run-preset NAME [--set key=value ...] trains one; `sdiff train "
          "--run-preset NAME --dry-run` prints its whole config; model presets: "
          "`sdiff models`")  # fmt: skip
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from sdiff.models.presets import PRESETS

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
    from sdiff.training.config import RunConfig, from_dict

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
    from sdiff.training.config import apply_overrides, get_run_preset

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
    from sdiff.training.config import to_json

    config = resolve_run_config(args)
    if args.dry_run:
        print(to_json(config))
        return 0
    if not args.out:
        raise ValueError("--out is required (the run folder)")
    from sdiff.training.trainer import Trainer

    device = _device(args.device) if args.device else None
    trainer = Trainer(config, args.out, device=device, progress=not args.no_progress)
    finished = trainer.step >= trainer.total_steps()
    if trainer.dist.main:
        print(trainer.header(), flush=True)
    result = trainer.run()
    if trainer.dist.main:
        state = "already finished; nothing to do" if finished else "trained"
        print(f"run: {Path(args.out).resolve()} {state} (step {result.step}, "
              f"{result.images} images)")  # fmt: skip
        print(f"last checkpoint: {result.last_checkpoint}")
    return 0


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


def _eval_spec(args: argparse.Namespace, **settings):
    """The EvalSpec of ``sdiff sample``/``sdiff eval``: the sampling flags, the device (checked
    first) and ``settings`` (the eval command's metric and reference flags)."""
    from sdiff.eval.spec import EvalSpec

    return EvalSpec(
        n=args.n, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        labels=tuple(args.labels) if args.labels else None, seed=args.seed,
        batch_size=args.batch_size, compile=args.compile, device=_device(args.device),
        **settings,
    )  # fmt: skip


def _device(name: str | None) -> str:
    """The device to run on, checked first: one this machine lacks is an error before anything
    is built or written."""
    from sdiff.util.devices import resolve_device

    return str(resolve_device(name))


def _check_npz_path(path: str | None, flag: str) -> None:
    """An ADM sample batch path must name an .npz in a folder that can be written."""
    from sdiff.util.files import ensure_folder

    if path is None:
        return
    if Path(path).suffix != ".npz":
        raise ValueError(f"{flag} must name an .npz file; got {path!r}")
    ensure_folder(Path(path).parent)


def cmd_sample(args: argparse.Namespace) -> int:
    """Draw the images; under torchrun every process draws its chunks (``sdiff.eval.sample``),
    writes its PNGs and its part of the .npz, and rank 0 writes the grid and prints."""
    from sdiff.data.images import save_grid
    from sdiff.eval.distributed import process_group
    from sdiff.eval.sample import draw, load_trained
    from sdiff.util.files import ensure_folder

    if not (args.grid or args.folder or args.npz):
        raise ValueError("give --grid PATH and/or --folder DIR and/or --npz PATH for the images")
    if not (args.run or args.checkpoint):
        raise ValueError("give --run FOLDER (a run) or --checkpoint FILE")
    source = _source(args)
    spec = _eval_spec(args)
    # outputs that cannot be written fail now, not after the sampling
    if args.grid:
        ensure_folder(Path(args.grid).parent)
    if args.folder:
        ensure_folder(args.folder)
    _check_npz_path(args.npz, "--npz")
    with process_group(spec.device) as (world, device):
        spec = replace(spec, device=device)
        model, config, step = load_trained(source, ema=not args.no_ema, device=device)
        images = draw(model, config, spec, world=world, folder=args.folder, npz=args.npz,
                      keep=bool(args.grid), progress=not args.no_progress)  # fmt: skip
        if not world.main:
            return 0
        if args.grid:
            print(f"grid: {save_grid(images, args.grid)}")
        if args.folder:
            print(f"{spec.n} images in {Path(args.folder).resolve()}")
        if args.npz:
            print(f"sample batch: {Path(args.npz).resolve()}")
        processes = f", {world.size} processes" if world.size > 1 else ""
        print(f"from step {step} of {source} ({'raw' if args.no_ema else 'EMA'} weights"
              f"{processes})")  # fmt: skip
    return 0


# Below this many samples an FID is noticeably biased upwards (its bias falls roughly as 1/n,
# so FIDs compare only at equal n); ImageNet papers report 10k (ablations) to 50k samples.
FID_MIN_SAMPLES = 10_000


def eval_summary(record: dict) -> str:
    """One line a person reads before the JSON: the metrics, of how many samples against what."""
    parts = []
    if record.get("fid") is not None:
        parts.append(f"FID {record['fid']:.2f}")
    if record.get("kid_mean") is not None:
        parts.append(f"KID {record['kid_mean']:.4f} ± {record.get('kid_std') or 0:.4f}")
    if record.get("precision") is not None:
        parts.append(f"precision {record['precision']:.3f}, recall {record['recall']:.3f}")
    if record.get("isc_mean") is not None:
        parts.append(f"IS {record['isc_mean']:.2f}")
    n, ref = record.get("num_generated"), record.get("num_reference")
    against = f" against {ref} reference images" if ref else ""
    fx = f" ({record['feature_extractor']})" if record.get("feature_extractor") else ""
    return f"{'; '.join(parts) or 'no metrics'} of {n} samples{against}{fx}"


def fid_sample_warning(record: dict) -> str | None:
    """The warning for an FID of fewer than ``FID_MIN_SAMPLES`` samples, or None."""
    n = record.get("num_generated")
    if record.get("fid") is None or n is None or n >= FID_MIN_SAMPLES:
        return None
    return (
        f"FID of {n} samples is biased upwards (the bias falls roughly as 1/n): compare it only "
        f"with FIDs of the same n, and use at least {FID_MIN_SAMPLES:,} samples (the papers' "
        "50,000 for ImageNet) for a number to quote"
    )


def _report_eval(record: dict) -> None:
    """The summary and the small-n warning on stderr; stdout stays one JSON document."""
    warning = fid_sample_warning(record)
    if warning:
        warnings.warn(warning, stacklevel=2)
    print(eval_summary(record), file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate; under torchrun every process samples and extracts the features of its chunks
    (``sdiff.eval.run_eval``) and rank 0 alone writes the record and prints. ``--samples`` and
    ``--save-reference`` run on rank 0 alone."""
    from sdiff.eval.distributed import process_group
    from sdiff.eval.metrics import evaluate, save_reference_stats

    spec = _eval_spec(args, metrics=tuple(args.metrics), eval_batch_size=args.eval_batch_size,
                      weights=args.weights, reference=args.reference or "train",
                      reference_n=args.reference_n,
                      reference_stats=args.reference_stats)  # fmt: skip
    progress = not args.no_progress
    if args.save_reference:
        if args.reference in (None, "train"):
            raise ValueError("--save-reference needs --reference FOLDER (the images to summarise)")
        with process_group(spec.device) as (world, device):
            if world.main:
                save_reference_stats(args.reference, args.save_reference,
                                     replace(spec, device=device), progress=progress)  # fmt: skip
                print(f"reference statistics: {Path(args.save_reference).resolve()}")
        return 0
    generated = bool(args.run or args.checkpoint)
    if generated == bool(args.samples):
        raise ValueError(
            "give exactly one of --run FOLDER or --checkpoint FILE (generate from a trained "
            "model) or --samples FOLDER"
        )
    if generated:
        from sdiff.eval.run_eval import evaluate_run, metrics_path
        from sdiff.util.files import ensure_folder

        source = _source(args)
        ensure_folder(metrics_path(source).parent)  # the record must be writable: check first
        if args.save_samples:
            ensure_folder(args.save_samples)
        _check_npz_path(args.save_npz, "--save-npz")
        with process_group(spec.device) as (world, device):
            record = evaluate_run(source, replace(spec, device=device), ema=not args.no_ema,
                                  samples_dir=args.save_samples, npz=args.save_npz,
                                  progress=progress, world=world)  # fmt: skip
            if not world.main:
                return 0
        _report_eval(record)
        print(json.dumps(record, indent=2, default=str))
        # stdout stays one JSON document (pipe it into jq); the location goes to stderr
        print(f"recorded in {metrics_path(source).resolve()}", file=sys.stderr)
        return 0
    if not args.reference or args.reference == "train":
        raise ValueError("--samples needs --reference FOLDER or .npz")
    with process_group(spec.device) as (world, device):
        if not world.main:
            return 0
        record = evaluate(args.samples, args.reference, replace(spec, device=device),
                          progress=progress)  # fmt: skip
    _report_eval(record)
    print(json.dumps(record, indent=2, default=str))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from sdiff.ablations.runner import ablate_main

    return ablate_main(list(args.rest), debug=args.debug)


def cmd_report(args: argparse.Namespace) -> int:
    from sdiff.report import report_main

    return report_main(list(args.rest))


def cmd_results(args: argparse.Namespace) -> int:
    """``sdiff results``: the stores' cells as a file or stdout, or as MLflow runs."""
    from sdiff.ablations.results import export_mlflow, write_results

    if args.to == "mlflow":
        if args.format or args.out:
            raise ValueError("--format and --out write files; --to mlflow writes MLflow runs")
        if args.status == "all":
            raise ValueError("--to mlflow exports the done cells only; drop --status all")
        if not args.tracking_uri:
            raise ValueError("--to mlflow needs --tracking-uri (e.g. file:/path/mlruns)")
        experiment = args.experiment or "sdiff"
        done = export_mlflow(args.stores, args.tracking_uri, experiment)
        print(f"MLflow experiment {experiment!r} at {args.tracking_uri}: {done['added']} runs "
              f"added, {done['skipped']} cells already there")  # fmt: skip
        return 0
    if args.tracking_uri or args.experiment:
        raise ValueError("--tracking-uri and --experiment go with --to mlflow")
    text, n = write_results(args.stores, args.format or "csv", args.out,
                            status=args.status or "all")  # fmt: skip
    if text is not None:
        sys.stdout.write(text)
    else:
        print(f"wrote {n} cells to {Path(args.out).resolve()}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    rest = list(args.rest)
    if rest and rest[0] == "attention":
        from sdiff.bench.bench_attention import main as attention_main

        return attention_main(rest[1:])
    if rest and rest[0] == "memory":
        from sdiff.bench.memory import memory_main

        return memory_main(rest[1:])
    from sdiff.bench.throughput import main as throughput_main

    return throughput_main(rest)


def cmd_data(args: argparse.Namespace) -> int:
    """``sdiff data prepare | verify | bench``: prepared datasets (``sdiff.data.prepared``)."""
    if args.data_command == "prepare":
        from sdiff.data.prepare import prepare

        start = time.perf_counter()
        manifest = prepare(args.src, args.out, args.res, channels=args.channels,
                           shard_size=args.shard_size, workers=args.workers, limit=args.limit,
                           skip_bad=args.skip_bad, progress=not args.no_progress)  # fmt: skip
        seconds = time.perf_counter() - start
        size = sum(s["bytes"] for s in manifest.shards) / 1e9
        print(f"prepared {manifest.count:,} images ({len(manifest.classes)} classes) at "
              f"{manifest.resolution} px into {args.out}: {len(manifest.shards)} shards, "
              f"{size:.3g} GB, {seconds:.1f} s ({manifest.count / seconds:.0f} img/s)")  # fmt: skip
        for item in manifest.skipped:
            print(f"  skipped {item['file']}: {item['reason']}")
        return 0
    if args.data_command == "verify":
        from sdiff.data.prepared import verify_prepared

        manifest = verify_prepared(args.path)
        print(f"{args.path}: {manifest.count:,} images in {len(manifest.shards)} shards; every "
              "file matches its manifest's sha256")  # fmt: skip
        return 0
    from sdiff.bench.data import run_data_bench

    command = "sdiff " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["data"] else None
    run_data_bench(args.path, folder=args.folder, out=args.out, workers=tuple(args.workers),
                   batch=args.batch, batches=args.batches, warmup=args.warmup, seed=args.seed,
                   device=args.device, command=command)  # fmt: skip
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``sdiff export RUN OUT``: a checkpoint as a portable model (``sdiff.training.export``)."""
    from sdiff.models.pretrained import DTYPES
    from sdiff.training.export import export_run

    out = export_run(args.run, args.out, ema=not args.raw, step=args.step,
                     checkpoint=args.checkpoint, dtype=DTYPES.get(args.dtype))  # fmt: skip
    provenance = json.loads((out / "config.json").read_text())["provenance"]
    weights = "raw" if args.raw else "EMA"
    print(f"exported step {provenance['step']} ({provenance['checkpoint']}, {weights} weights, "
          f"{args.dtype or 'as trained'}) of {args.run} to {out.resolve()}")  # fmt: skip
    return 0
