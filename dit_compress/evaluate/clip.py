"""CLIP score of generated images with their prompts, from a local CLIP model (transformers'
``CLIPModel`` with its tokenizer and image processor): per image 100 * max(cos(image
features, text features), 0), averaged (the definition of torchmetrics' CLIPScore, after
Hessel et al. 2021)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DitcError, UsageError


def check_clip(path, texts) -> None:
    if not Path(path).is_dir():
        raise UsageError(f"CLIP model {path} does not exist (give a local dir with a CLIPModel, its tokenizer and "
                         "image processor)")
    if not (Path(path) / "config.json").is_file():
        raise UsageError(f"{path} is not a CLIP model dir (it has no config.json; give a local dir with a CLIPModel, "
                         "its tokenizer and image processor)")
    if texts is None:
        raise UsageError("the CLIP score needs the prompts' texts: give `prompts` as a text file, or caption shards "
                         "whose manifest lists them (made by this version's prepare-data)")


@torch.no_grad()
def clip_score(images: np.ndarray, texts: list[str], path, batch: int = 64) -> float:
    """Mean CLIP score of uint8 images [N, H, W, 3] with their texts."""
    try:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel  # heavy: imported on first use
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model = CLIPModel.from_pretrained(str(path)).eval()
        tok, proc = AutoTokenizer.from_pretrained(str(path)), AutoImageProcessor.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise DitcError(f"cannot load the CLIP model from {path}: {str(e).splitlines()[0][:200]}") from None
    scores = []
    for lo in range(0, len(images), batch):
        pix = proc(images=[Image.fromarray(a) for a in images[lo:lo + batch]], return_tensors="pt")["pixel_values"]
        t = tok(texts[lo:lo + batch], padding=True, truncation=True, return_tensors="pt")
        img_f = model.get_image_features(pixel_values=pix)
        txt_f = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        cos = torch.nn.functional.cosine_similarity(_tensor(img_f), _tensor(txt_f), dim=-1)
        scores.append((100 * cos.clamp(min=0)).double())
    return float(torch.cat(scores).mean())


def _tensor(out):
    """The feature tensor of ``get_*_features`` (a tensor, or an output object in newer versions)."""
    if torch.is_tensor(out):
        return out
    return getattr(out, "pooler_output", None) if getattr(out, "pooler_output", None) is not None else out[0]
