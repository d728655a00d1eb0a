"""The VAE of latent models (diffusers' AutoencoderKL: a hub id or a local dir, or MAR's KL-16
``.ckpt`` mapped onto it exactly): encode images for training data, decode samples for metrics."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DitcError, MissingFactError, UsageError
from ..hashing import tree_digest
from .ldm_vae import is_ldm_vae_file, load_ldm_vae


def decode(model, x: torch.Tensor, vae=None) -> torch.Tensor:
    if model.config.latent_scale is None:
        return x
    if vae is None:
        raise UsageError("this is a latent model: pass `vae` (e.g. stabilityai/sd-vae-ft-ema or a local dir)")
    with torch.no_grad():
        return vae.decode(x / model.config.latent_scale).sample


def load_vae(name: str | None):
    if name is None:
        return None
    if name == "mar-kl16":  # the name MAR configs state for their own tokenizer, which no hub holds
        raise MissingFactError("this MAR's latents are MAR's KL-16 VAE, which has no hub id: pass --vae with its "
                               "file (LTH14/mar pretrained_models/vae/kl16.ckpt) or a diffusers AutoencoderKL dir")
    if is_ldm_vae_file(name):
        return load_ldm_vae(name)
    from diffusers import AutoencoderKL  # heavy: imported on first use

    try:
        return AutoencoderKL.from_pretrained(name).eval()
    except Exception as e:  # noqa: BLE001 - hub/IO errors of several kinds
        raise DitcError(f"cannot load the VAE {name}: {str(e).splitlines()[0]}") from None


def vae_identity(name: str | None) -> dict:
    """``{"vae_identity": digest}`` of a VAE on disk (a file or a folder: its content, so a
    replaced file is a different VAE to every cache), or ``{}`` for a hub id or no VAE."""
    if not name or not Path(name).exists():
        return {}
    try:
        return {"vae_identity": tree_digest(Path(name))}
    except OSError as e:
        raise DitcError(f"cannot read the VAE {name}: {e}") from None
