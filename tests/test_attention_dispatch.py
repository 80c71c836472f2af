"""backend="auto" chooses from the measured dispatch table: the shipped table holds what the H200
measured, its choice is what ``attention`` runs, anything unmeasured is SDPA, a broken table is
an error naming its file, and the benchmark's --write-table output reads back."""

import csv
import json
from pathlib import Path

import pytest
import torch

import sdiff.models.attention as ab
from sdiff.bench import bench_attention as bench
from sdiff.models.attention import attention, load_dispatch_table, select_backend, seq_bucket

H200 = ("NVIDIA H200", "9.0")
SOURCE_CSV = Path(__file__).parents[1] / "reports" / "gpu" / "attention.csv"


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch):
    monkeypatch.delenv("SDIFF_ATTN_DISPATCH", raising=False)
    ab.clear_dispatch_cache()
    yield
    ab.clear_dispatch_cache()


def on_gpu(monkeypatch, identity=H200):
    """Make every device look like the GPU ``identity`` (name, capability) to the dispatcher."""
    monkeypatch.setattr(ab, "_device_identity", lambda device: identity)


def qkv(n=256, d=64, dtype=torch.bfloat16, lk=None, grad=False):
    q = torch.randn(1, 2, n, d, dtype=dtype, requires_grad=grad)
    k, v = (torch.randn(1, 2, lk or n, d, dtype=dtype) for _ in range(2))
    return q, k, v


def entry(ms, device="GPU X", capability="8.9", dtype="bfloat16", head_dim=64, bucket=256,
          mask=False, mode="fwd"):  # fmt: skip
    return {"device": device, "capability": capability, "dtype": dtype, "head_dim": head_dim,
            "seq_bucket": bucket, "mask": mask, "mode": mode, "ms": ms}  # fmt: skip


def use_table(monkeypatch, tmp_path, entries):
    path = tmp_path / "dispatch.json"
    path.write_text(json.dumps({"format": 1, "entries": entries}))
    monkeypatch.setenv("SDIFF_ATTN_DISPATCH", str(path))
    return path


def test_seq_bucket_is_the_next_power_of_two():
    assert [seq_bucket(n) for n in (1, 2, 3, 200, 256, 257, 1000, 16384)] == [
        1, 2, 4, 256, 256, 512, 1024, 16384
    ]  # fmt: skip


def test_symbolic_length_helpers_agree_with_seq_bucket():
    assert all(ab._bucket(n) == seq_bucket(n) and ab._exact(n) == n for n in range(1, 2100))


def test_shipped_table_is_the_h200_csv():
    table = load_dispatch_table()
    rows = [r for r in csv.DictReader(open(SOURCE_CSV)) if r["status"] == "ok"]
    assert len(table["entries"]) == len({(r["mode"], r["seq_len"], r["head_dim"]) for r in rows})
    for e in table["entries"]:
        assert e["source"] == "reports/gpu/attention.csv" and e["date"] == "2026-11-26"
        assert (e["device"], e["capability"], e["mask"]) == (*H200, False)
        want = {r["backend"]: float(r["ms"]) for r in rows
                if (r["mode"], int(r["seq_len"]), int(r["head_dim"]))
                == (e["mode"], e["seq_bucket"], e["head_dim"])}  # fmt: skip
        assert e["ms"] == want
        assert e["fastest"] == min(want, key=want.get)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("grad", [False, True])
def test_uvit_shape_on_h200_goes_to_cudnn(monkeypatch, d, grad):
    # what the H200 measured at the U-ViT's 256 tokens: cuDNN beats our kernel, fwd and fwd+bwd
    on_gpu(monkeypatch)
    assert select_backend(*qkv(256, d, grad=grad)) == "sdpa-cudnn"


def test_the_table_choice_is_what_auto_runs(monkeypatch, tmp_path):
    on_gpu(monkeypatch, ("GPU X", "8.9"))
    use_table(monkeypatch, tmp_path, [
        entry({"sdpa-flash": 1.0, "triton": 2.0, "sdpa-cudnn": 3.0}),
        entry({"sdpa-flash": 1.0, "triton": 0.5}, mode="fwd+bwd"),
        entry({"sdpa-efficient": 1.0, "sdpa-cudnn": 3.0}, bucket=1024, mask=True),
    ])  # fmt: skip
    assert select_backend(*qkv(200)) == "sdpa-flash"
    assert select_backend(*qkv(256, grad=True)) == "triton"
    with torch.no_grad():  # no gradient needed: the forward entry
        assert select_backend(*qkv(256, grad=True)) == "sdpa-flash"
    q, k, v = qkv(1000)
    pad = torch.zeros(1, 1000, dtype=torch.bool)
    assert select_backend(q, k, v, pad) == "sdpa-efficient"
    calls = []
    monkeypatch.setitem(ab._IMPLEMENTATIONS, "sdpa-efficient", lambda *a: calls.append(a) or a[0])
    attention(q, k, v, key_padding_mask=pad)
    assert len(calls) == 1 and calls[0][3] is pad


def test_capability_stands_in_for_an_unmeasured_gpu_of_the_same_kind(monkeypatch):
    on_gpu(monkeypatch, ("NVIDIA H100 80GB HBM3", "9.0"))
    assert select_backend(*qkv(256)) == "sdpa-cudnn"


@pytest.mark.parametrize("identity", [None, ("NVIDIA A100-SXM4-80GB", "8.0")])
def test_unknown_devices_fall_back_to_sdpa(monkeypatch, identity):
    on_gpu(monkeypatch, identity)  # None: not a CUDA device
    assert select_backend(*qkv(256)) == "sdpa"


@pytest.mark.parametrize(
    "shape, masked",
    [
        (dict(n=512), False),  # a length bucket nobody measured
        (dict(n=256, lk=77), False),  # cross-attention between two regimes
        (dict(n=256, d=32), False),  # head dim
        (dict(n=256, dtype=torch.float16), False),  # dtype
        (dict(n=256), True),  # with a key padding mask
    ],
)
def test_unmeasured_shapes_fall_back_to_sdpa(monkeypatch, shape, masked):
    on_gpu(monkeypatch)
    q, k, v = qkv(**shape)
    pad = torch.zeros(1, k.shape[2], dtype=torch.bool) if masked else None
    assert select_backend(q, k, v, pad) == "sdpa"


def test_backends_that_cannot_run_here_are_passed_over(monkeypatch, tmp_path):
    on_gpu(monkeypatch, ("GPU X", "8.9"))
    use_table(monkeypatch, tmp_path, [
        entry({"flex": 0.1, "xformers": 0.2, "triton": 0.3, "sdpa-cudnn": 0.4}),
        entry({"flex": 0.1}, bucket=1024),
    ])  # fmt: skip
    monkeypatch.setattr(ab, "_xformers_available", lambda: False)
    assert select_backend(*qkv(256)) == "triton"  # flex is timed, not dispatched; no xformers
    monkeypatch.setattr(ab, "_TRITON_FAILED", ["RuntimeError: no kernel"])
    assert select_backend(*qkv(256)) == "sdpa-cudnn"
    assert select_backend(*qkv(1024)) == "sdpa"


@pytest.mark.parametrize(
    "text, why",
    [
        ("{not json", "not a readable JSON file"),
        ('{"format": 2, "entries": []}', "not a format 1 table"),
        ('{"format": 1, "entries": {}}', "'entries' must be a list"),
        (json.dumps({"format": 1, "entries": [{"device": "GPU X"}]}), "entry 0 needs 'capability'"),
        (json.dumps({"format": 1, "entries": [entry({"triton": -1.0})]}), "positive milliseconds"),
        (json.dumps({"format": 1, "entries": [entry({"sdpa": 1.0}, bucket=300)]}), "power of two"),
    ],
)
def test_a_malformed_table_is_an_error_naming_the_file(monkeypatch, tmp_path, text, why):
    on_gpu(monkeypatch)
    path = tmp_path / "broken.json"
    path.write_text(text)
    monkeypatch.setenv("SDIFF_ATTN_DISPATCH", str(path))
    with pytest.raises(ValueError, match=f"attention dispatch table {path}: .*{why}"):
        select_backend(*qkv(256))


def test_a_missing_table_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / 'nope.json'}: not a readable JSON file"):
        load_dispatch_table(tmp_path / "nope.json")


def test_write_table_round_trips_and_merges(monkeypatch, tmp_path):
    fields = ["backend", "mode", "dtype", "batch", "heads", "seq_len", "head_dim", "ms", "status",
              "device", "torch", "triton", "git_sha", "date"]  # fmt: skip
    common = ["bfloat16", 4, 2, 256, 64]
    meta = ["GPU X", "2.0", "3.0", "abc1234", "2026-01-02"]
    rows = [["triton", "fwd", *common, 0.5, "ok", *meta],
            ["sdpa-cudnn", "fwd", *common, 0.7, "ok", *meta],
            ["sdpa-flash", "fwd", *common, None, "unavailable: no", *meta],
            ["sdpa-cudnn", "fwd+bwd", *common, 1.5, "ok", *meta]]  # fmt: skip
    source = tmp_path / "rows.csv"
    with open(source, "w", newline="") as f:
        csv.writer(f).writerows([fields, *rows])
    table = tmp_path / "out" / "dispatch.json"
    args = ["--from-csv", str(source), "--write-table", str(table)]
    with pytest.raises(SystemExit):  # the rows lack a capability column: it must be given
        bench.main(args)
    with pytest.raises(ValueError, match="no compute capability"):
        bench.table_entries(list(csv.DictReader(open(source))))
    assert bench.main([*args, "--capability", "8.9"]) == 0
    got = load_dispatch_table(table)["entries"]
    assert [(e["mode"], e["fastest"], e["ms"]) for e in got] == [
        ("fwd", "triton", {"triton": 0.5, "sdpa-cudnn": 0.7}),
        ("fwd+bwd", "sdpa-cudnn", {"sdpa-cudnn": 1.5}),
    ]
    assert got[0]["source"] == str(source) and got[0]["date"] == "2026-01-02"
    on_gpu(monkeypatch, ("GPU X", "8.9"))
    monkeypatch.setenv("SDIFF_ATTN_DISPATCH", str(table))
    assert select_backend(*qkv(256)) == "triton"
    # a new measurement of the same key replaces the entry, the others stay
    faster = bench.table_entries([dict(zip(fields, rows[0], strict=True), ms="0.9")], "8.9")
    bench.write_table(table, faster)
    got = load_dispatch_table(table)["entries"]
    assert [(e["mode"], e["ms"]) for e in got] == [
        ("fwd", {"triton": 0.9}),
        ("fwd+bwd", {"sdpa-cudnn": 1.5}),
    ]
    assert select_backend(*qkv(256)) == "triton"  # the cache was cleared with the write
    assert select_backend(*qkv(256, grad=True)) == "sdpa-cudnn"


def test_cpu_benchmark_writes_a_table_without_cpu_entries(tmp_path):
    table = tmp_path / "dispatch.json"
    args = ["--device", "cpu", "--dtype", "float32", "--head-dims", "32", "--lengths", "64",
            "--tokens", "64", "--width", "64", "--backends", "sdpa-math", "--modes", "fwd",
            "--masked", "--csv", str(tmp_path / "a.csv"), "--write-table", str(table)]  # fmt: skip
    assert bench.main(args) == 0
    assert load_dispatch_table(table)["entries"] == []
    (row,) = csv.DictReader(open(tmp_path / "a.csv"))
    assert row["status"] == "ok" and row["mask"] == "True" and row["capability"] == ""


@pytest.mark.parametrize("dynamic", [False, True])
def test_auto_compiles_without_graph_breaks(monkeypatch, dynamic):
    # the first lookup reads the table file while torch.compile traces; it must stay a constant,
    # also when the lengths and head dim are symbols (then guards pin their buckets)
    on_gpu(monkeypatch)
    compiled = torch.compile(lambda q, k, v: attention(q, k, v), fullgraph=True, dynamic=dynamic)
    for n, d in [(256, 32), (200, 32), (300, 16)]:
        q, k, v = qkv(n, d, dtype=torch.float32)
        torch.testing.assert_close(compiled(q, k, v), attention(q, k, v, backend="math"))
    assert ab._auto_backend.cache_info().misses == 2  # (256, 32) and (512, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("grad", [False, True])
def test_auto_on_this_gpu(grad):
    q, k, v = (x.cuda() for x in qkv(256, 64, grad=False))
    q.requires_grad_(grad)
    if torch.cuda.get_device_name() == H200[0]:  # what the shipped table measured there
        assert select_backend(q, k, v) == "sdpa-cudnn"
    out = attention(q, k, v)
    torch.testing.assert_close(out, attention(q, k, v, backend="math"), atol=2e-2, rtol=2e-2)
    if grad:
        out.float().square().sum().backward()
        assert torch.isfinite(q.grad).all()
