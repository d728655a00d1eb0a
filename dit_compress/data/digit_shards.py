"""Caption shards of the bundled digits: the text-to-image testbed's training and held-out data."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.numpy import save_file

from ..outputs import resumable_work
from ..progress import make_progress
from .datasets import _sklearn_digits, digits_arrays, digits_split
from .digit_captions import digit_captions
from .images import _finish_shards, note_truncated


def prepare_digit_captions(split: str, out: Path, text_encoder, shard_size: int = 1024, seed: int = 0,
                           force: bool = False) -> dict:
    """Caption shards of the bundled digits (pixels in [-1, 1], no VAE): each image with the
    caption ``digit_captions`` gives it (training templates for ``train``, the held-out ones
    for ``test``), encoded by ``text_encoder``, and its label as the class the caption asks for."""
    images, target = _sklearn_digits()
    idx = digits_split(split, len(images))
    texts = digit_captions(images, target, idx, held_out=split == "test", seed=seed)
    x, labels = digits_arrays(split)  # the images of idx as training reads them, and their classes
    producer = {"images": f"digits:{split}", "captions": "digit_captions", "seed": seed, "count": len(idx),
                "shard_size": shard_size, "text_encoder": text_encoder.identity()}
    work, _ = resumable_work(out, producer, force, what="prepare-data")
    null = text_encoder.null()
    n_shards = (len(idx) + shard_size - 1) // shard_size
    truncated = done = 0
    with make_progress("encoding", len(idx)) as bar:
        for s in range(n_shards):
            lo, hi = s * shard_size, min(len(idx), (s + 1) * shard_size)
            target_file = work / f"shard-{s:05d}.safetensors"
            if not target_file.exists():
                cap, cut = text_encoder.encode(texts[lo:hi])
                truncated += cut
                tmp = work / f".shard-{s:05d}.tmp"
                save_file({"latents": x[lo:hi], "labels": labels[lo:hi], "caption_emb": cap.emb.numpy(),
                           "caption_mask": cap.mask.numpy(), "null_caption_emb": null.emb.numpy(),
                           "null_caption_mask": null.mask.numpy()}, str(tmp))
                os.replace(tmp, target_file)
                done += 1
            bar.advance(hi - lo)
    manifest = {"images": f"digits:{split}", "count": len(idx), "vae": None, "image_size": 8, "scale": None,
                "shards": n_shards, "flipped": False, "producer": producer,
                "captions": "digit_captions (" + ("held-out" if split == "test" else "training") + " templates)",
                "text_encoder": str(text_encoder.path), "caption_tokens": text_encoder.max_length,
                "caption_width": text_encoder.width, "texts": texts}
    note_truncated(manifest, truncated, text_encoder.max_length)
    return _finish_shards(work, out, manifest, force, done)
