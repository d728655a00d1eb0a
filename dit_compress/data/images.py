"""Image folders (one sub-folder per class): encoded on the fly, or once into latent shards
by ``ditc prepare-data`` (center crop as ADM does, image + horizontal flip, scale 0.18215)."""

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

from ..errors import DitcError
from ..outputs import atomic_dir, resumable_work
from ..progress import make_progress
from .vae import load_vae

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
            px = load_pixels(files, c.input_size * 8, 3)
            with torch.no_grad():
                x = self._vae.encode(px).latent_dist.sample(generator) * c.latent_scale
        return x, self.y[idx]


def prepare(images: Path, out: Path, vae_name: str | None, image_size: int, batch_size: int = 32,
            shard_size: int = 1024, scale: float = 0.18215, progress: bool = True, force: bool = False) -> dict:
    """Encode an image folder into ``shard-*.safetensors`` (latents [n, 2, C, h, w]: image and
    its flip), made in ``out``'s work dir and moved into place complete. Resumable: a rerun with
    the same inputs keeps the finished shards; different inputs are refused (``force``: redone)."""

    files, labels, classes = scan(images)
    listing = hashlib.sha256("\n".join(f"{f.relative_to(images)}:{f.stat().st_size}:{lab}"
                                       for f, lab in zip(files, labels)).encode()).hexdigest()[:20]
    producer = {"images": str(Path(images).resolve()), "files": listing, "count": len(files), "vae": vae_name,
                "image_size": image_size, "batch_size": batch_size, "shard_size": shard_size,
                "scale": scale if vae_name else None}
    work, _ = resumable_work(out, producer, force, what="prepare-data")
    vae = load_vae(vae_name) if vae_name else None
    n_shards = (len(files) + shard_size - 1) // shard_size
    done = 0
    with make_progress("encoding", len(files)) as bar:
        for s in range(n_shards):
            target = work / f"shard-{s:05d}.safetensors"
            lo, hi = s * shard_size, min(len(files), (s + 1) * shard_size)
            if target.exists():
                bar.advance(hi - lo)
                continue
            lat = []
            for b in range(lo, hi, batch_size):
                px = load_pixels(files[b:min(hi, b + batch_size)], image_size, 3)
                both = torch.stack([px, px.flip(-1)], 1).flatten(0, 1)
                if vae is not None:
                    with torch.no_grad():
                        z = vae.encode(both).latent_dist.sample(torch.Generator().manual_seed(b)) * scale
                else:
                    z = both
                lat.append(z.view(-1, 2, *z.shape[1:]).numpy().astype(np.float32))
                bar.advance(min(hi, b + batch_size) - b)
            tmp = work / f".shard-{s:05d}.tmp"
            save_file({"latents": np.concatenate(lat), "labels": np.asarray(labels[lo:hi], dtype=np.int64)}, str(tmp))
            os.replace(tmp, target)
            done += 1
    manifest = {"images": str(images), "count": len(files), "classes": classes, "vae": vae_name,
                "image_size": image_size, "scale": scale if vae is not None else None, "shards": n_shards,
                "producer": producer}
    with atomic_dir(out, force) as tmp:
        for f in sorted(work.glob("shard-*.safetensors")):
            os.replace(f, tmp / f.name)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return {**manifest, "shards_written_now": done}
