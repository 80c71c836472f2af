"""The paper's tables as grids: every table expands at every scale into valid, distinct cells;
Table 1's figures against a hand computation; the literature rows as cited in simple diffusion
(arXiv 2301.11093), Table 7, and SiD2 (arXiv 2410.19324)."""

import itertools

import pytest

from sdiff.ablations import TABLES, get_table
from sdiff.ablations.grid import expand
from sdiff.ablations.table1_memory import UNET_512, compute
from sdiff.data.datasets import DataConfig
from sdiff.models.presets import build_model, get_preset
from sdiff.training.config import RunConfig


def overrides_for(scale):
    return [] if scale == "smoke" else [f"{k}=/x" for k in scale.needs]


@pytest.mark.parametrize("number", sorted(TABLES))
def test_every_table_expands_at_every_scale(number):
    table = TABLES[number]
    assert table.number == number and table.title and table.metrics
    assert "smoke" in table.scales
    for name, scale in table.scales.items():
        cells = expand(table, name, overrides=overrides_for(scale))
        assert len(cells) == len(scale.rows) * len(scale.columns)
        assert len({c.hash for c in cells}) == len(cells)
        for cell in cells:
            assert isinstance(cell.config, RunConfig)
            assert cell.config.model.resolution == cell.config.data.resolution
            if name == "smoke" and cell.kind == "train":
                assert cell.config.data.name == "mnist"  # bundled data only
                with __import__("torch").device("meta"):
                    build_model(cell.config.model)  # the model really builds
        if scale.needs:
            with pytest.raises(ValueError, match=r"--set data\.root="):
                expand(table, name)
    assert table.__class__.__name__ == "Table"


@pytest.mark.parametrize("number", sorted(TABLES))
def test_cells_hash_the_evaluation_fields_they_always_have(number):
    """Every evaluation setting of the paper's tables other than these five is at its
    default: the cells of results stores written before the other fields existed keep their
    hashes (``sdiff.ablations.grid.eval_identity``)."""
    table = TABLES[number]
    for name, scale in table.scales.items():
        for cell in expand(table, name, overrides=overrides_for(scale)):
            if cell.kind == "train":
                assert set(cell.spec["eval"]) == {"n", "reference_n", "steps", "guidance",
                                                  "metrics"}  # fmt: skip


def test_hashes_are_stable_and_sensitive():
    table = get_table(2)
    a = [c.hash for c in expand(table, "smoke")]
    assert a == [c.hash for c in expand(table, "smoke")]
    b = [c.hash for c in expand(table, "smoke", overrides=["train.lr=0.001"])]
    assert not set(a) & set(b)
    assert len(a[0]) == 16 and all(isinstance(h, str) for h in a)


def test_rows_and_aliases():
    assert get_table("schedule") is get_table(2) is get_table("table2") is get_table(" 2 ")
    assert get_table("t2i").number == 8
    with pytest.raises(ValueError, match="unknown table 'nine'"):
        get_table("nine")
    with pytest.raises(ValueError, match=r"no row\(s\) \['warm'\]"):
        expand(get_table(2), "smoke", rows=["warm"])
    with pytest.raises(ValueError, match="has no scale 'huge'"):
        expand(get_table(2), "huge")
    assert [c.row for c in expand(get_table(2), "smoke", rows=["cosine"])] == ["cosine", "cosine"]


def test_table1_against_a_hand_computation():
    cfg = RunConfig(
        model=UNET_512, data=DataConfig(name="folder", resolution=512, channels=3, root="x")
    )
    m = compute(cfg)
    # side 512 has 128 channels: kernel 9*128*128*4 bytes, feature map 1024*128*512*512*2 bytes
    assert m["kernel_mib@512"] == pytest.approx(9 * 128 * 128 * 4 / 2**20)
    assert m["feature_gib@512"] == pytest.approx(1024 * 128 * 512 * 512 * 2 / 2**30)  # 64 GiB
    assert m["feature_gib@512"] == 64.0
    assert m["kernel_mib@16"] == pytest.approx(9 * 1024 * 1024 * 4 / 2**20)  # 36 MiB
    assert m["feature_gib@16"] == pytest.approx(0.5)
    # feature maps shrink 4x per level while kernels grow with channels: their ratio falls fast
    ratios = [m[f"ratio@{s}"] for s in (512, 256, 128, 64, 32, 16, 8)]
    assert all(a > b for a, b in itertools.pairwise(ratios))
    uvit = compute(
        RunConfig(
            model=get_preset("uvit-l-512"),
            data=DataConfig(name="folder", resolution=512, channels=3, root="x"),
        )
    )
    # the transformer level: a 2048x2048 projection and (1024, 256, 2048) activations
    assert uvit["kernel_mib@16"] == pytest.approx(2048 * 2048 * 4 / 2**20)
    assert uvit["feature_gib@16"] == pytest.approx(1024 * 256 * 2048 * 2 / 2**30)


def test_table7_literature_rows_are_papers():
    paper = get_table(7).paper
    assert paper[("simple diffusion U-Net", "128")] == {
        "fid_train": 2.26,
        "fid_eval": 2.88,
        "isc": 137.3,
    }
    assert paper[("simple diffusion U-ViT L", "512")] == {
        "fid_train": 3.54,
        "fid_eval": 4.53,
        "isc": 205.3,
    }
    assert paper[("simple diffusion U-ViT L, guided", "256")]["fid_train"] == 2.44
    assert paper[("SiD2", "512")]["fid_train"] == 1.48
    assert len(paper) == 17
