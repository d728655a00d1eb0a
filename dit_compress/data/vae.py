"""The VAE of latent models (diffusers' AutoencoderKL): encode images for training data,
decode samples for metrics."""

from __future__ import annotations

import torch

from ..errors import DitcError, UsageError


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
    if name == "mar-kl16":  # the name MAR configs state for their own tokenizer
        raise UsageError("MAR's KL-16 VAE (LTH14/mar models/vae.py, kl16.ckpt) is not loaded by this version: pass "
                         "`vae`, a diffusers AutoencoderKL dir that decodes these latents")
    from diffusers import AutoencoderKL  # heavy: imported on first use

    try:
        return AutoencoderKL.from_pretrained(name).eval()
    except Exception as e:  # noqa: BLE001 - hub/IO errors of several kinds
        raise DitcError(f"cannot load the VAE {name}: {str(e).splitlines()[0]}") from None
