"""Prompts -> caption features, as the text-to-image pipeline computes them: the pipeline's
own tokenizer and text encoder (T5 for PixArt) through ``transformers``, from local files.

PixArtAlphaPipeline.encode_prompt: tokenize with ``padding="max_length"``, ``max_length`` =
``max_sequence_length`` (120), ``truncation=True``, ``add_special_tokens=True``; the encoder's
last hidden state under that attention mask; the negative (null) prompt "" the same way. The
pipeline's optional caption cleaning (``clean_caption``, needs bs4 and ftfy) is not applied:
prompts are encoded as given.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..assets import embedded
from ..errors import DitcError, UsageError
from ..hashing import file_digest
from ..model.pixart import Captions
from .datasets import CONTENT_ID, CaptionData, load_data

MAX_PROMPT_BYTES = 16 << 20  # a prompt file larger than this is refused (prompts are lines of text)
PIXART_MAX_LENGTH = 120  # PixArtAlphaPipeline's max_sequence_length (PixArt-Σ: 300)


def text_encoder_dirs(path) -> tuple[Path, Path]:
    """(text encoder dir, tokenizer dir) of a pipeline dir (text_encoder/ + tokenizer/) or of a
    dir holding both an encoder config and tokenizer files; an embedded pipeline by its name
    (``digits-pixart``)."""
    root = pipeline_dir(path)
    if root is not None:
        tok = root / "tokenizer"
        if not tok.is_dir():
            raise UsageError(f"{root} has text_encoder/ but no tokenizer/ (the pipeline's tokenizer is needed)")
        return root / "text_encoder", tok
    path = embedded(path) or Path(path)
    if (path / "config.json").exists():
        return path, path
    raise UsageError(f"{path} holds no text encoder (a pipeline dir with text_encoder/ and tokenizer/, or an encoder "
                     "dir with its tokenizer)")


def pipeline_dir(path) -> Path | None:
    """The pipeline dir ``path`` names (it holds text_encoder/; an embedded one by name), or
    None for an encoder dir."""
    path = embedded(path) or Path(path)
    return path if (path / "text_encoder").is_dir() else None


class TextEncoder:
    """A frozen tokenizer + encoder pair; ``encode(prompts)`` -> (Captions, truncated count)."""

    def __init__(self, path, max_length: int = PIXART_MAX_LENGTH, device="cpu"):
        path = embedded(path) or Path(path)  # an embedded pipeline by name (digits-pixart)
        if not path.exists():
            raise UsageError(f"text encoder {path} does not exist (give a local pipeline or text encoder dir)")
        enc_dir, tok_dir = text_encoder_dirs(path)
        try:
            from transformers import AutoTokenizer, T5EncoderModel  # heavy: imported on first use
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # loading bars would break the one-line output
            self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
            self.model = T5EncoderModel.from_pretrained(str(enc_dir)).eval().requires_grad_(False).to(device)
        except ImportError:
            raise DitcError("caption encoding needs transformers (pip install transformers sentencepiece)") from None
        except Exception as e:  # noqa: BLE001 - any failure to read it (a truncated safetensors file too) is a bad dir
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise DitcError(f"cannot load the text encoder from {path}: {first}") from None
        self.path, self.max_length, self.device = path, max_length, torch.device(device)
        self._dirs = sorted({enc_dir, tok_dir})
        self.unknown = 0  # prompts of the last encode() made of unknown words only
        self.width = int(self.model.config.d_model)

    def identity(self) -> str:
        """What the features depend on: the encoder's config and weights and the tokenizer, each
        file by every byte of it (hashing.file_digest: read once per change of the file), and
        the length."""
        h = hashlib.sha256()
        for d in self._dirs:
            for f in sorted(p for p in d.rglob("*") if p.is_file()):
                h.update(f"{f.relative_to(self.path)}:{file_digest(f)}\n".encode())
        h.update(str(self.max_length).encode())
        return CONTENT_ID + h.hexdigest()[:32]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Captions, int]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise UsageError("prompts must be a list of strings")
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        full = self.tokenizer(list(prompts), padding=False, truncation=False, add_special_tokens=True)["input_ids"]
        truncated = sum(len(ids) > self.max_length for ids in full)
        self.unknown = self.unknown_only(prompts, full)
        mask = tok["attention_mask"].to(self.device)
        emb = self.model(tok["input_ids"].to(self.device), attention_mask=mask)[0]
        return Captions(emb.float().cpu(), mask.float().cpu()), truncated

    def unknown_only(self, prompts, ids) -> int:
        """How many non-empty prompts the tokenizer reads as unknown words only (each becomes
        the unknown token: the model sees no word of it)."""
        unk = getattr(self.tokenizer, "unk_token_id", None)
        special = set(getattr(self.tokenizer, "all_special_ids", []) or []) - {unk}
        if unk is None:
            return 0
        count = 0
        for text, seq in zip(prompts, ids):
            words = [i for i in seq if i not in special]
            count += bool(text.strip()) and bool(words) and all(i == unk for i in words)
        return count

    def null(self) -> Captions:
        """The negative caption the pipeline guides with: the encoding of ""."""
        return self.encode([""])[0]


def encode_prompts(text_encoder, prompts: list[str], max_length: int = PIXART_MAX_LENGTH):
    """(captions, null caption) for ``prompts`` with a local pipeline's text encoder: the inputs
    ``dit_compress.sample(model, ..., y=captions, negative=null)`` takes."""
    enc = text_encoder if isinstance(text_encoder, TextEncoder) else TextEncoder(text_encoder, max_length)
    return enc.encode(prompts)[0], enc.null()


@dataclass
class PromptSet:
    """The prompts an eval samples: their captions [P], the null caption [1], the texts when
    known (a prompt file; caption shards whose manifest lists them), what they were read from,
    and the class each prompt asks for when the data states it (the digit captions)."""

    captions: Captions
    null: Captions
    texts: list | None
    source: str
    encoded_by: str | None = None  # the text encoder (path#identity) of a prompt file
    note: str | None = None
    classes: object = None  # np.ndarray [P] of ints, or None


def load_prompts(spec, cfg, text_encoder=None) -> PromptSet:
    """A prompt file (one prompt per line, encoded with ``text_encoder``: a local pipeline dir)
    or caption shards made by ``prepare-data --text-encoder``."""
    p = Path(spec)
    if not p.exists():
        raise UsageError(f"prompts {spec} do not exist (a text file of prompts, or caption shards)")
    if p.is_dir():
        data = load_data(str(p), cfg=cfg)
        if not isinstance(data, CaptionData):
            raise UsageError(f"prompts {spec} are not caption shards (made by `ditc prepare-data --text-encoder`)")
        return PromptSet(data.y, data.null, data.texts, str(p), classes=data.classes)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_PROMPT_BYTES + 1)
        if len(raw) > MAX_PROMPT_BYTES:
            raise UsageError(f"the prompt file {p} is larger than {MAX_PROMPT_BYTES >> 20} MB; prompts are lines of text")
        texts = [line.strip() for line in raw.decode("utf-8-sig").splitlines() if line.strip()]  # a BOM is no text
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the prompt file {p}: {str(e)[:120]}") from None
    if not texts:
        raise UsageError(f"the prompt file {p} holds no prompts (one per line)")
    if text_encoder is None:
        raise UsageError("prompts in a text file need `text_encoder` (the model's pipeline dir with text_encoder/ "
                         "and tokenizer/) to be encoded")
    enc = TextEncoder(text_encoder, cfg.caption_length or PIXART_MAX_LENGTH)
    caps, cut = enc.encode(texts)
    notes = [f"{cut} prompt(s) were longer than {enc.max_length} tokens and were truncated, as the pipeline truncates"
             if cut else None,
             f"{enc.unknown} prompt(s) hold only words the tokenizer does not know (each read as its unknown token)"
             if enc.unknown else None]
    note = "; ".join(n for n in notes if n) or None
    return PromptSet(caps, enc.null(), texts, str(p), f"{enc.path}#{enc.identity()}", note)
