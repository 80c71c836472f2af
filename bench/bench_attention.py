"""Attention throughput: sdiff's Triton kernels vs SDPA with each backend forced vs
flex_attention vs xformers, and the dispatch table that ``backend="auto"`` reads.

    python -m sdiff.bench.bench_attention                # CUDA, bf16, head dims 64 and 128
    python -m sdiff.bench.bench_attention --csv out.csv --markdown out.md --masked
    python -m sdiff.bench.bench_attention --write-table sdiff/models/attention_dispatch.json
    python -m sdiff.bench.bench_attention --from-csv reports/gpu/attention.csv \
        --capability 9.0 --write-table sdiff/models/attention_dispatch.json  # no timing

FLOPs (non-causal): forward 4 B H N^2 D (two matmuls of 2 B H N^2 D each); backward 2.5x the
forward (five N^2 matmuls); forward+backward 3.5x. TFLOP/s = FLOPs / median time. The batch is
chosen so that B x N = ``--tokens`` (16k by default) and H = width / D with width 2048, the
U-ViT L transformer's: at N = 256 (its 16x16 tokens) that is B = 64.

``triton`` is the flash kernel (``sdiff.kernels.attention``), ``triton-short`` the short-sequence
one (``sdiff.kernels.attention_short``), timed only at lengths it takes (``max_keys``: 512 keys,
256 at head dim 128 in bf16).

Each backend runs in the same process on the same inputs, one shape after another, so ratios
are side by side; timing is ``triton.testing.do_bench`` (CUDA events, warm-up, median) on a GPU
and ``time.perf_counter`` medians on the CPU (only for smoke tests of this script). A backend
that cannot run a shape (not built for this GPU, out of memory, unsupported head dim) gets a row
with its reason instead of a number. Rows go to CSV with the GPU name, torch and triton versions,
git SHA and date; a table is printed (and written as markdown with ``--markdown``).

``--masked`` times every backend with a key padding mask (the last eighth of each sequence's
keys padded), which is how captions reach the text-conditioned models; FLOPs still count every
key. ``flex`` is ``torch.nn.attention.flex_attention`` under ``torch.compile`` (the mask as a
``score_mod``); it is timed beside the others but ``auto`` does not dispatch to it.

``--write-table PATH`` merges the rows that ran into the dispatch table at PATH (see
``sdiff.models.attention``): one entry per (GPU name and compute capability, dtype, head dim,
sequence-length bucket, mask, mode) with every backend's median ms and the fastest; an entry
already there for the same key is replaced, others are kept. On the CPU the script runs too,
at toy sizes for smoke tests (SDPA's math and CPU flash kernels, flex forward only, and our
kernel in the Triton interpreter if ``TRITON_INTERPRET=1``; the CUDA-only kernels give
"unavailable" rows), but it writes no table entries for the CPU: ``auto`` is SDPA there.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from sdiff.models import attention as dispatch
from sdiff.util.cli_args import ExtendList, show_defaults
from sdiff.util.files import append_csv_row, atomic_write_text, ensure_folder
from sdiff.util.provenance import git_sha
from sdiff.util.tables import markdown_table

SDPA = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-math": "MATH",
}
BACKENDS = ["triton", "triton-short", *SDPA, "flex", "xformers"]
MODES = ("fwd", "fwd+bwd")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def device_capability(device: str) -> str:
    """ "major.minor" of a CUDA device, the dispatch table's fallback key; "" elsewhere."""
    if not device.startswith("cuda"):
        return ""
    return "{}.{}".format(*torch.cuda.get_device_capability(device))


def attention_fn(backend: str, mask: torch.Tensor | None = None):
    """q, k, v (B, H, N, D) -> out, through one forced backend; ``mask`` (B, N) True = padded."""
    if backend == "triton":
        from sdiff.kernels.attention import flash_attention

        return lambda q, k, v: flash_attention(q, k, v, mask)
    if backend == "triton-short":
        from sdiff.kernels.attention_short import short_attention

        return lambda q, k, v: short_attention(q, k, v, mask)
    if backend == "xformers":
        return lambda q, k, v: dispatch._attention_xformers(q, k, v, mask)
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        if mask is None:
            return lambda q, k, v: compiled(q, k, v)

        def padded(score, b, h, q_idx, kv_idx):
            return torch.where(mask[b, kv_idx], -math.inf, score)

        return lambda q, k, v: compiled(q, k, v, score_mod=padded)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, SDPA[backend])

    def run(q, k, v):
        with sdpa_kernel(chosen):  # this kernel only: one that cannot run is an error row
            return dispatch._attention_sdpa(q, k, v, mask)

    return run


def time_ms(fn, device: str, cpu_reps: int = 5) -> float:
    if device.startswith("cuda"):
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench_one(backend, mode, b, h, n, d, dtype, device, masked: bool = False) -> dict:
    row = {"backend": backend, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
           "batch": b, "heads": h, "seq_len": n, "head_dim": d, "mask": masked}  # fmt: skip
    flops = 4 * b * h * n * n * d * (1.0 if mode == "fwd" else 3.5)
    try:
        mask = None
        if masked:  # the last eighth of every sequence's keys is padding
            mask = torch.zeros(b, n, dtype=torch.bool, device=device)
            mask[:, n - n // 8 :] = True
        fn = attention_fn(backend, mask)
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen)
                   for _ in range(3))  # fmt: skip
        if mode == "fwd":
            with torch.no_grad():
                ms = time_ms(lambda: fn(q, k, v), device)
        else:
            q, k, v = (x.requires_grad_(True) for x in (q, k, v))
            grad = torch.randn_like(q)

            def step():
                for x in (q, k, v):
                    x.grad = None
                fn(q, k, v).backward(grad)

            ms = time_ms(step, device)
        row.update(ms=float(f"{ms:.5g}"), tflops=float(f"{flops / ms / 1e9:.4g}"), status="ok")
    except Exception as err:  # report and go on: one backend must not stop the table
        reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"
        row.update(ms=None, tflops=None, status=f"unavailable: {reason}")
    finally:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict]) -> None:
    """ratio_flash / ratio_cudnn / ratio_best_sdpa: this row's TFLOP/s over theirs, same shape."""
    key = lambda r: (r["mode"], r["mask"], r["seq_len"], r["head_dim"])  # noqa: E731
    by = {}
    for r in rows:
        if r["tflops"]:
            by.setdefault(key(r), {})[r["backend"]] = r["tflops"]
    for r in rows:
        shape = by.get(key(r), {})
        best = max((v for b, v in shape.items() if b.startswith("sdpa")), default=None)
        refs = {"ratio_flash": shape.get("sdpa-flash"), "ratio_cudnn": shape.get("sdpa-cudnn"),
                "ratio_best_sdpa": best}  # fmt: skip
        for name, ref in refs.items():
            r[name] = round(r["tflops"] / ref, 3) if r["tflops"] and ref else None


def markdown(rows: list[dict], meta: dict) -> str:
    head = (f"# Attention TFLOP/s on {meta['device']}\n\n{meta['dtype']}, non-causal; torch "
            f"{meta['torch']}, triton {meta['triton']}, git {meta['git_sha']}, {meta['date']}. "
            f"FLOPs: forward 4 B H N^2 D, backward 2.5x forward.\n\n")  # fmt: skip
    cols = ["mode", "mask", "head_dim", "seq_len", "batch", "heads", "backend", "ms", "tflops",
            "ratio_flash", "ratio_cudnn", "ratio_best_sdpa", "status"]  # fmt: skip
    return head + markdown_table(cols, [[r.get(c) for c in cols] for r in rows], right=range(2, 12))


TABLE_KEY = ("device", "capability", "dtype", "head_dim", "seq_bucket", "mask", "mode")


def table_entries(rows: list[dict], capability: str | None = None, source: str = "") -> list[dict]:
    """Dispatch-table entries from benchmark rows (as ``main`` makes them, or read back from its
    CSV): the rows that ran on a GPU, grouped by TABLE_KEY, with every backend's median ms and
    the fastest. ``capability`` ("9.0") is for rows that lack one (CSVs written before the
    column existed); rows measured on the CPU give no entries."""
    entries: dict[tuple, dict] = {}
    for r in rows:
        if r["status"] != "ok" or str(r["device"]).startswith("cpu"):
            continue
        cap = r.get("capability") or capability
        if not cap:
            raise ValueError(f"row for {r['device']} has no compute capability; pass --capability")
        n, d = int(r["seq_len"]), int(r["head_dim"])
        entry = {"device": r["device"], "capability": str(cap), "dtype": r["dtype"],
                 "head_dim": d, "seq_bucket": dispatch.seq_bucket(n),
                 "mask": str(r.get("mask", False)) == "True", "mode": r["mode"]}  # fmt: skip
        key = tuple(entry[k] for k in TABLE_KEY)
        entry = entries.setdefault(key, {**entry, "fastest": "", "ms": {}})
        entry["ms"][r["backend"]] = float(r["ms"])
        entry["fastest"] = min(entry["ms"], key=entry["ms"].get)
        entry.update(shape=[int(r["batch"]), int(r["heads"]), n, d], source=source or "measured")
        entry.update({k: r[k] for k in ("date", "git_sha", "torch", "triton")})
    return list(entries.values())


def write_table(path: str | Path, entries: list[dict]) -> Path:
    """Merge ``entries`` into the dispatch table at ``path`` (created if missing): an entry with
    the same TABLE_KEY is replaced, the others are kept; one entry a line, sorted by key."""
    path = Path(path)
    merged = {}
    if path.exists():
        for e in dispatch.load_dispatch_table.__wrapped__(path)["entries"]:
            merged[tuple(e[k] for k in TABLE_KEY)] = e
    for e in entries:
        merged[tuple(e[k] for k in TABLE_KEY)] = e
    about = ("Measured attention timings (median ms per backend, bench/bench_attention.py) that "
             "sdiff.models.attention.select_backend reads for backend='auto'; each entry names "
             "its source and date. Key: device or capability, dtype, head_dim, seq_bucket (next "
             "power of two of the sequence length), mask, mode.")  # fmt: skip
    lines = [json.dumps(merged[k]) for k in sorted(merged)]
    text = (f'{{"format": {dispatch.DISPATCH_FORMAT},\n "about": {json.dumps(about)},\n'
            f' "entries": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n")  # fmt: skip
    atomic_write_text(ensure_folder(path.parent) / path.name, text)
    dispatch.load_dispatch_table.__wrapped__(path)  # what was written reads back as a table
    dispatch.clear_dispatch_cache()
    return path


def read_csv_rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--head-dims", type=int, nargs="+", action=ExtendList, default=[64, 128])
    p.add_argument("--lengths", type=int, nargs="+", action=ExtendList,
                   default=[256, 1024, 2048, 4096, 8192, 16384])  # fmt: skip
    p.add_argument("--tokens", type=int, default=16384, help="batch x sequence length")
    p.add_argument("--width", type=int, default=2048, help="heads = width / head dim")
    p.add_argument("--backends", nargs="+", action=ExtendList, default=BACKENDS, choices=BACKENDS)
    p.add_argument("--modes", nargs="+", action=ExtendList, default=list(MODES), choices=MODES)
    p.add_argument("--max-math-len", type=int, default=4096, help="skip sdpa-math above this")
    p.add_argument("--csv", default="runs/bench/attention.csv")
    p.add_argument("--markdown")
    p.add_argument("--masked", action="store_true", help="time with a key padding mask")
    p.add_argument("--write-table", metavar="PATH", help="merge the results into this table")
    p.add_argument("--from-csv", metavar="CSV", help="no timing: table entries from these rows")
    p.add_argument("--capability", help='compute capability ("9.0") for --from-csv rows')
    args = show_defaults(p).parse_args(argv)
    if args.from_csv:
        if not args.write_table:
            p.error("--from-csv needs --write-table PATH")
        try:
            entries = table_entries(read_csv_rows(args.from_csv), args.capability, args.from_csv)
        except ValueError as err:
            p.error(f"{args.from_csv}: {err}")
        path = write_table(args.write_table, entries)
        print(f"{len(entries)} entries from {args.from_csv} -> {path}")
        return 0
    dtype = getattr(torch, args.dtype)
    meta = {
        "device": device_name(args.device),
        "capability": device_capability(args.device),
        "dtype": args.dtype,
        "torch": str(torch.__version__),
        "triton": _triton_version(),
        "git_sha": git_sha(),
        "date": time.strftime("%Y-%m-%d"),
    }
    backends = [b for b in args.backends if b != "xformers" or _has_xformers()]
    rows = []
    for mode in args.modes:
        for d in args.head_dims:
            for n in args.lengths:
                b, h = max(1, args.tokens // n), max(1, args.width // d)
                for backend in backends:
                    if backend == "sdpa-math" and n > args.max_math_len:
                        continue
                    if backend == "triton-short" and n > _short_max_keys(d, dtype):
                        continue
                    row = bench_one(backend, mode, b, h, n, d, dtype, args.device, args.masked)
                    rows.append({**row, **meta})
                    shown = f"{row['tflops']:8.1f} TFLOP/s" if row["tflops"] else row["status"]
                    print(f"{mode:8} D={d:<4} N={n:<6} {backend:15} {shown}", flush=True)
    add_ratios(rows)
    path = ensure_folder(Path(args.csv).parent) / Path(args.csv).name
    for row in rows:
        append_csv_row(path, list(rows[0]), row)
    table = markdown(rows, meta)
    print("\n" + table)
    if args.markdown:
        atomic_write_text(args.markdown, table)
    print(f"rows appended to {path}")
    if args.write_table:
        entries = table_entries(rows, source=str(path))
        print(f"{len(entries)} table entries -> {write_table(args.write_table, entries)}")
    return 0


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def _short_max_keys(head_dim: int, dtype: torch.dtype) -> int:
    """The most keys ``triton-short`` takes at this head dim and dtype."""
    from sdiff.kernels.attention_short import max_keys

    return max_keys(head_dim, dtype)


def _has_xformers() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
