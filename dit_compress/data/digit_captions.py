"""Captions for the bundled digits: the text-to-image testbed's training data.

Each 8x8 digit gets a short caption from its label and two properties measured on the image,
each relative to the other images of its class (terciles over the whole set, so a caption
does not depend on the split):
- stroke: the ink (sum of intensities): "thin" (lowest third), "thick" (highest third);
- slant: the intensity-weighted shear -cov(x, y) / var(y) (rows run downwards, so a positive
  value leans right); its magnitude decides: "upright" (lowest third of |slant|), "slanted"
  (highest third), whichever way the digit leans.

Training captions (split ``train``) use TRAIN_TEMPLATES; the held-out split (``test``) uses
HELD_OUT_TEMPLATES: other phrasings made of the same words, so that prompt following can be
measured on prompts never seen in training (no word is new: the word-level tokenizer maps
unknown words to <unk>). Which template and which applicable adjectives a caption uses is
drawn from a generator seeded by the image's index in the full set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STROKE = ("thin", "thick")
SLANT = ("upright", "slanted")
TRAIN_TEMPLATES = ("a {adjs} {name}", "a {adjs} {num}", "the digit {num}", "{name}", "the {adjs} {name}")
HELD_OUT_TEMPLATES = ("the {adjs} digit {name}", "{adjs} {num}", "digit {name}")
SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's ids: pad 0, eos 1
VOCABULARY = (*SPECIALS, "a", "the", "digit", *NAMES, *(str(d) for d in range(10)), *STROKE, *SLANT)


def properties(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ink, slant) of images [N, 8, 8] (intensities >= 0)."""
    im = np.asarray(images, dtype=np.float64)
    ys, xs = np.mgrid[0:im.shape[1], 0:im.shape[2]]
    mass = im.sum((1, 2)).clip(min=1e-9)
    cy = (im * ys).sum((1, 2)) / mass
    cx = (im * xs).sum((1, 2)) / mass
    dy, dx = ys[None] - cy[:, None, None], xs[None] - cx[:, None, None]
    cov = (im * dx * dy).sum((1, 2)) / mass
    var = (im * dy * dy).sum((1, 2)) / mass
    return mass, -cov / var.clip(min=1e-9)


def _terciles(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-1 (lowest third of its class), 0, +1 (highest third)."""
    out = np.zeros(len(values), dtype=np.int64)
    for c in np.unique(labels):
        idx = labels == c
        lo, hi = np.percentile(values[idx], [100 / 3, 200 / 3])
        out[idx] = np.where(values[idx] < lo, -1, np.where(values[idx] > hi, 1, 0))
    return out


def adjectives(images: np.ndarray, labels: np.ndarray) -> list[list[str]]:
    """The adjectives each image's properties earn (stroke, then slant)."""
    ink, slant = properties(images)
    s, t = _terciles(ink, labels), _terciles(np.abs(slant), labels)
    out = []
    for a, b in zip(s, t):
        words = []
        if a:
            words.append(STROKE[(a + 1) // 2])
        if b:
            words.append(SLANT[(b + 1) // 2])
        out.append(words)
    return out


def caption(label: int, adjs: list[str], held_out: bool, rng: np.random.Generator) -> str:
    templates = HELD_OUT_TEMPLATES if held_out else TRAIN_TEMPLATES
    template = templates[int(rng.integers(len(templates)))]
    kept = [a for a in adjs if rng.random() < 0.8]
    text = template.format(adjs=" ".join(kept), name=NAMES[label], num=str(label))
    return " ".join(text.split())  # an empty adjective slot leaves no double space


def digit_captions(all_images: np.ndarray, all_labels: np.ndarray, indices: np.ndarray, held_out: bool,
                   seed: int = 0) -> list[str]:
    """Captions of the images ``indices`` of the full set (properties ranked over the full set)."""
    adjs = adjectives(all_images, all_labels)
    return [caption(int(all_labels[i]), adjs[i], held_out, np.random.default_rng([seed, int(i)])) for i in indices]


def digit_of(text: str) -> int | None:
    """The digit a caption asks for (its name or numeral), or None."""
    words = text.split()
    for w in words:
        if w in NAMES:
            return NAMES.index(w)
        if len(w) == 1 and w.isdigit():
            return int(w)
    return None


def build_text_encoder(out, d_model: int = 64, layers: int = 2, heads: int = 4, max_length: int = 16,
                       seed: int = 0) -> None:
    """The testbed's frozen text encoder, written in the Hugging Face layout a pipeline dir
    holds: ``out/tokenizer`` (a word-level tokenizer over VOCABULARY: lower-cased, split on
    whitespace, ``</s>`` appended as T5 does, unknown words -> ``<unk>``) and
    ``out/text_encoder`` (``transformers``' ``T5EncoderModel`` from a small config, weights
    drawn from ``seed``). Never trained: like PixArt's T5, it is a fixed map from text to
    caption features, and distinct words get distinct embeddings."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out)
    vocab = {w: i for i, w in enumerate(VOCABULARY)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)
    fast.save_pretrained(str(out / "tokenizer"))
    cfg = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model, num_layers=layers,
                   num_heads=heads, pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"],
                   decoder_start_token_id=vocab["<pad>"])
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = T5EncoderModel(cfg).eval()
    finally:
        torch.random.set_rng_state(gen_state)
    model.save_pretrained(str(out / "text_encoder"))
