"""Image folders: one sub-folder per class (encoded on the fly, or once into latent shards by
``ditc prepare-data``: center crop as ADM does, image + horizontal flip, scale 0.18215), or
images with captions (a ``.txt`` beside each image, or a ``metadata.jsonl`` as Hugging Face's
imagefolder reads it) encoded with a text encoder into caption shards."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file

from ..errors import DitcError, UsageError
from ..outputs import atomic_dir, resumable_work
from ..progress import make_progress
from .vae import load_vae, vae_identity

EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def scan(root: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    if not classes:
        raise DitcError(f"{root} has no class sub-folders (expected ROOT/<class>/<image>)")
    files, labels = [], []
    for ci, c in enumerate(classes):
        for f in sorted((Path(root) / c).rglob("*")):
            if f.suffix.lower() in EXTS:
                files.append(f)
                labels.append(ci)
    if not files:
        raise DitcError(f"{root} holds no images ({', '.join(EXTS)})")
    return files, labels, classes


CAPTION_FILES = ("metadata.jsonl", "captions.jsonl")


def scan_captioned(root: Path) -> tuple[list[Path], list[str], str]:
    """(images, their captions, where the captions came from) of ``root``: every image below it
    with its caption, from ``metadata.jsonl`` (lines ``{"file_name": ..., "text": ...}``; keys
    ``file`` / ``caption`` also read) or else ``<image stem>.txt`` beside each image. An image
    without a caption, a caption without an image, or captions in both forms are refused."""
    root = Path(root)
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in EXTS and f.is_file())
    txts = sorted(f for f in root.rglob("*.txt") if f.is_file())
    jsonl = [root / n for n in CAPTION_FILES if (root / n).is_file()]
    if not files:
        raise UsageError(f"{root} holds no images ({', '.join(EXTS)})")
    if len(jsonl) > 1 or (jsonl and txts):
        raise UsageError(f"{root} holds captions in more than one form ({', '.join(p.name for p in (jsonl + txts)[:3])}"
                         "...): keep one metadata.jsonl or one .txt per image")
    if jsonl:
        captions = _read_jsonl(jsonl[0], root)
        where = jsonl[0].name
    else:
        captions = {}
        for t in txts:
            try:
                captions[t.with_suffix("").relative_to(root).as_posix()] = t.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"cannot read caption {t}: {str(e)[:120]}") from None
        where = ".txt files"
        if not captions:
            raise UsageError(f"{root} holds images but no captions (a .txt beside each image, or a metadata.jsonl)")
    key = (lambda f: f.relative_to(root).as_posix()) if jsonl else (lambda f: f.with_suffix("").relative_to(root).as_posix())
    keys = [key(f) for f in files]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise UsageError(f"{root}: two images share the caption name {dup!r} (one caption per image)")
    missing = [f for f, k in zip(files, keys) if k not in captions]
    if missing:
        raise UsageError(f"image {missing[0]} has no caption in {where} ({len(missing)} image(s) without one)")
    orphans = sorted(set(captions) - set(keys))
    if orphans:
        raise UsageError(f"caption {orphans[0]!r} in {where} names no image ({len(orphans)} caption(s) without one)")
    return files, [captions[k] for k in keys], where


def _read_jsonl(path: Path, root: Path) -> dict[str, str]:
    out = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {str(e)[:120]}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{i} is not a JSON object: {e.msg}") from None
        name = row.get("file_name", row.get("file")) if isinstance(row, dict) else None
        text = row.get("text", row.get("caption")) if isinstance(row, dict) else None
        if not isinstance(name, str) or not isinstance(text, str):
            raise UsageError(f"{path}:{i} needs a string \"file_name\" and a string \"text\"")
        name = Path(name).as_posix()
        if name in out:
            raise UsageError(f"{path}:{i} captions {name!r} a second time")
        out[name] = text.strip()
    if not out:
        raise UsageError(f"{path} holds no captions")
    return out


def center_crop(img, size: int):
    """ADM's center_crop_arr: halve with BOX while large, resize with BICUBIC, center crop."""

    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img.convert("RGB"))
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


def load_pixels(files: list[Path], size: int, channels: int) -> torch.Tensor:
    out = []
    for f in files:
        try:
            arr = center_crop(Image.open(f), size)
        except OSError as e:
            raise DitcError(f"cannot read image {f}: {e}") from None
        x = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1
        if channels == 1:
            x = x.mean(0, keepdim=True)
        out.append(x)
    return torch.stack(out)


class ImageFolderData:
    """Pixel models: images resized to the model's input. Latent models: VAE-encoded per batch."""

    flip_pairs = False

    def __init__(self, root: Path, cfg=None):
        self.files, labels, self.classes = scan(root)
        self.y = torch.tensor(labels, dtype=torch.long)
        self.name = str(root)
        self.cfg = cfg
        self._vae = None

    def __len__(self):
        return len(self.files)

    @property
    def sample_shape(self):
        c = self.cfg
        return (c.in_channels, c.input_size, c.input_size) if c is not None else (3, 0, 0)

    def get(self, idx, generator=None):
        c = self.cfg
        if c is None:
            raise DitcError("an image folder needs the model's config to be encoded")
        files = [self.files[i] for i in idx.tolist()]
        if c.latent_scale is None:
            x = load_pixels(files, c.input_size, c.in_channels)
        else:
            if self._vae is None:
                self._vae = load_vae(c.vae)
            stride = 2 ** (len(self._vae.config.block_out_channels) - 1)  # the VAE's own downsampling
            px = load_pixels(files, c.input_size * stride, 3)
            with torch.no_grad():
                x = self._vae.encode(px).latent_dist.sample(generator) * c.latent_scale
        return x, self.y[idx]


def prepare(images: Path, out: Path, vae_name: str | None, image_size: int, batch_size: int = 32,
            shard_size: int = 1024, scale: float | None = None, progress: bool = True, force: bool = False,
            text_encoder=None) -> dict:
    """Encode an image folder into ``shard-*.safetensors`` (latents [n, 2, C, h, w]: image and
    its flip; with ``text_encoder`` (a ``text.TextEncoder``) the images with their captions:
    latents [n, C, h, w], unflipped since a caption may say left or right, plus the caption
    features, their masks and the null caption), made in ``out``'s work dir and moved into
    place complete. Resumable: a rerun with the same inputs keeps the finished shards;
    different inputs are refused (``force``: redone)."""

    if text_encoder is not None:
        files, texts, where = scan_captioned(images)
        labels = texts
        classes = None
    else:
        root = Path(images)
        if not any(p.is_dir() for p in root.iterdir()) and (
                any((root / n).is_file() for n in CAPTION_FILES)
                or any(f.with_suffix(".txt").is_file() for f in root.iterdir() if f.suffix.lower() in EXTS)):
            raise UsageError(f"{images} holds captioned images: pass `text_encoder` (the pipeline's, e.g. a local "
                             "PixArt pipeline dir) to encode the captions")
        files, labels, classes = scan(images)
        where = None
    flip = text_encoder is None
    vae = load_vae(vae_name) if vae_name else None
    if vae is not None and scale is None:  # the VAE's own factor: 0.18215 for SD's, 0.2325 for MAR's KL-16
        scale = float(vae.config.scaling_factor)
    listing = hashlib.sha256("\n".join(f"{f.relative_to(images)}:{f.stat().st_size}:{f.stat().st_mtime_ns}:{lab}"
                                       for f, lab in zip(files, labels)).encode()).hexdigest()[:20]
    producer = {"images": str(Path(images).resolve()), "files": listing, "count": len(files), "vae": vae_name,
                **vae_identity(vae_name), "image_size": image_size, "batch_size": batch_size, "shard_size": shard_size,
                "scale": scale if vae_name else None,
                "text_encoder": text_encoder.identity() if text_encoder is not None else None}
    work, _ = resumable_work(out, producer, force, what="prepare-data")
    null = text_encoder.null() if text_encoder is not None else None
    truncated = 0
    n_shards = (len(files) + shard_size - 1) // shard_size
    done = 0
    with make_progress("encoding", len(files)) as bar:
        for s in range(n_shards):
            target = work / f"shard-{s:05d}.safetensors"
            lo, hi = s * shard_size, min(len(files), (s + 1) * shard_size)
            if target.exists():
                bar.advance(hi - lo)
                continue
            lat, emb, mask = [], [], []
            for b in range(lo, hi, batch_size):
                px = load_pixels(files[b:min(hi, b + batch_size)], image_size, 3)
                both = torch.stack([px, px.flip(-1)], 1).flatten(0, 1) if flip else px
                if vae is not None:
                    with torch.no_grad():
                        z = vae.encode(both).latent_dist.sample(torch.Generator().manual_seed(b)) * scale
                else:
                    z = both
                lat.append((z.view(-1, 2, *z.shape[1:]) if flip else z).numpy().astype(np.float32))
                if text_encoder is not None:
                    cap, cut = text_encoder.encode(labels[b:min(hi, b + batch_size)])
                    emb.append(cap.emb.numpy())
                    mask.append(cap.mask.numpy())
                    truncated += cut
                bar.advance(min(hi, b + batch_size) - b)
            tmp = work / f".shard-{s:05d}.tmp"
            if text_encoder is not None:
                arrays = {"latents": np.concatenate(lat), "caption_emb": np.concatenate(emb).astype(np.float32),
                          "caption_mask": np.concatenate(mask).astype(np.float32),
                          "null_caption_emb": null.emb.numpy().astype(np.float32),
                          "null_caption_mask": null.mask.numpy().astype(np.float32)}
            else:
                arrays = {"latents": np.concatenate(lat), "labels": np.asarray(labels[lo:hi], dtype=np.int64)}
            save_file(arrays, str(tmp))
            os.replace(tmp, target)
            done += 1
    manifest = {"images": str(images), "count": len(files), "classes": classes, "vae": vae_name,
                "image_size": image_size, "scale": scale if vae is not None else None, "shards": n_shards,
                "flipped": flip, "producer": producer}
    if text_encoder is not None:
        manifest.update(captions=where, text_encoder=str(text_encoder.path), caption_tokens=text_encoder.max_length,
                        caption_width=text_encoder.width, texts=list(labels))
        note_truncated(manifest, truncated, text_encoder.max_length)
    return _finish_shards(work, out, manifest, force, done)


def note_truncated(manifest: dict, truncated: int, max_length: int) -> None:
    """As the pipeline does: captions cut to the tokenizer's length, said in the manifest."""
    if truncated:
        manifest["note"] = (f"{truncated} caption(s) (of the shards encoded in this run) were longer than "
                            f"{max_length} tokens and were truncated, as the pipeline truncates")


def _finish_shards(work: Path, out: Path, manifest: dict, force: bool, done: int) -> dict:
    """Move the finished shards and their manifest into ``out`` at once; the summary (the
    manifest without its caption texts)."""
    with atomic_dir(out, force) as tmp:
        for f in sorted(work.glob("shard-*.safetensors")):
            os.replace(f, tmp / f.name)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return {**{k: v for k, v in manifest.items() if k != "texts"}, "shards_written_now": done}
