"""MAR's KL-16 tokenizer (LTH14/mar ``models/vae.py``, latent-diffusion's KL autoencoder;
``pretrained_models/vae/kl16.ckpt`` = ``{"model": state_dict}``) as diffusers' ``AutoencoderKL``.

The map is exact, not approximate: both are GroupNorm(32, eps 1e-6) + SiLU res-blocks with the
same convolutions, single-head attention (``q``/``k``/``v``/``proj_out`` 1x1 convolutions become
``to_q``/``to_k``/``to_v``/``to_out.0`` linears), stride-2 convolutions after a (0, 1, 0, 1) pad,
nearest upsampling, ``quant_conv``/``post_quant_conv`` and the same clamped diagonal Gaussian
(checked against an independent re-implementation in ``tests/reference_ldm_vae.py``). Every size
is read from the weights' shapes; levels whose blocks carry attention (KL-16: the encoder's
deepest) become diffusers' ``AttnDownEncoderBlock2D`` / ``AttnUpDecoderBlock2D``. The group
count, 32, is fixed by that file's ``Normalize``. ``scaling_factor`` is MAR's 0.2325, the
constant its training and sampling multiply and divide latents by."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import FormatError
from ..torchfiles import safe_torch_load

MAR_LATENT_SCALE = 0.2325  # engine_mar.py: vae.encode(x).sample().mul_(0.2325); MAR's sampling divides by it
LDM_SUFFIXES = (".ckpt", ".pt", ".pth")


def is_ldm_vae_file(name: str | Path) -> bool:
    """Whether ``name`` points at a KL-VAE checkpoint file in latent-diffusion's layout (a file with
    a PyTorch suffix, or a directory holding ``kl16.ckpt``) rather than a diffusers dir or hub id."""
    p = Path(name)
    return (p.is_file() and p.suffix in LDM_SUFFIXES) or (p.is_dir() and (p / "kl16.ckpt").is_file())


def _levels(keys, prefix: str) -> list[int]:
    """The indices ``i`` of the keys ``{prefix}.{i}.*``, in order."""
    return sorted({int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))})


def _count(keys, prefix: str) -> int:
    return len(_levels(keys, prefix))


class _Used(dict):
    """The source state dict, remembering which keys the map read."""

    def __init__(self, sd):
        super().__init__(sd)
        self.read: set = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)


def _res(src: str, dst: str, sd: dict, out: dict) -> None:
    for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                 ("nin_shortcut", "conv_shortcut")):
        for p in ("weight", "bias"):
            if f"{src}.{a}.{p}" in sd:
                out[f"{dst}.{b}.{p}"] = sd[f"{src}.{a}.{p}"]


def _attn(src: str, dst: str, sd: dict, out: dict) -> None:
    for a, b in (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        w = sd[f"{src}.{a}.weight"]
        out[f"{dst}.{b}.weight"] = w[:, :, 0, 0] if w.dim() == 4 else w  # 1x1 conv -> linear
        out[f"{dst}.{b}.bias"] = sd[f"{src}.{a}.bias"]


def ldm_to_diffusers(sd: dict, source: str = "the VAE") -> tuple[dict, dict]:
    """(diffusers ``AutoencoderKL`` config, its state dict) from a latent-diffusion KL-VAE state dict."""
    sd = _Used(sd)
    keys = list(sd)
    need = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight", "decoder.conv_out.weight",
            "quant_conv.weight", "post_quant_conv.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise FormatError(f"{source} is not a KL autoencoder in latent-diffusion's layout (MAR's models/vae.py): "
                          f"no {missing[0]}")
    down, up = _levels(keys, "encoder.down"), _levels(keys, "decoder.up")
    if not down or down != list(range(len(down))) or up != down:
        raise FormatError(f"{source}: encoder levels {down} and decoder levels {up} do not form one KL autoencoder")
    n_res = _count(keys, "encoder.down.0.block")
    if any(_count(keys, f"encoder.down.{i}.block") != n_res or _count(keys, f"decoder.up.{i}.block") != n_res + 1
           for i in down):
        raise FormatError(f"{source}: every encoder level needs the same number of res-blocks and every decoder "
                          "level one more")
    widths = [int(sd[f"encoder.down.{i}.block.{n_res - 1}.conv2.weight"].shape[0]) for i in down]
    z = int(sd["post_quant_conv.weight"].shape[0])
    if sd["quant_conv.weight"].shape[0] != 2 * z or sd["encoder.conv_out.weight"].shape[0] != 2 * z:
        raise FormatError(f"{source}: only the variational KL autoencoder (mean and log-variance, "
                          f"{2 * z} channels before quant_conv's output) is supported")
    if any(w % 32 for w in widths):
        raise FormatError(f"{source}: widths {widths} are not multiples of the 32 GroupNorm groups of the layout")
    enc_attn = [_count(keys, f"encoder.down.{i}.attn") for i in down]
    dec_attn = [_count(keys, f"decoder.up.{i}.attn") for i in down]
    if any(a not in (0, n_res) for a in enc_attn) or any(a not in (0, n_res + 1) for a in dec_attn):
        raise FormatError(f"{source}: attention must follow every res-block of a level or none")
    config = dict(
        in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
        out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
        down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in enc_attn],
        up_block_types=["AttnUpDecoderBlock2D" if dec_attn[i] else "UpDecoderBlock2D" for i in reversed(down)],
        block_out_channels=widths, layers_per_block=n_res, act_fn="silu", latent_channels=z, norm_num_groups=32,
        scaling_factor=MAR_LATENT_SCALE, use_quant_conv=True, use_post_quant_conv=True,
    )
    try:
        out = _map(sd, down, n_res, enc_attn, dec_attn)
    except KeyError as e:
        raise FormatError(f"{source} is not a KL autoencoder in latent-diffusion's layout: no {e.args[0]}") from None
    unread = sorted(set(keys) - sd.read)
    if unread:
        raise FormatError(f"{source}: {len(unread)} weights have no place in a KL autoencoder of this layout, e.g. "
                          f"{unread[0]}")
    return config, out


def _map(sd: dict, down: list, n_res: int, enc_attn: list, dec_attn: list) -> dict:
    out: dict = {}
    for k in ("quant_conv", "post_quant_conv", "encoder.conv_in", "encoder.conv_out", "decoder.conv_in",
              "decoder.conv_out"):
        out[f"{k}.weight"], out[f"{k}.bias"] = sd[f"{k}.weight"], sd[f"{k}.bias"]
    for side in ("encoder", "decoder"):
        for p in ("weight", "bias"):
            out[f"{side}.conv_norm_out.{p}"] = sd[f"{side}.norm_out.{p}"]
        _res(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", sd, out)
        _res(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", sd, out)
        _attn(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", sd, out)
    last = len(down) - 1
    for i in down:
        for j in range(n_res):
            _res(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", sd, out)
            if enc_attn[i]:
                _attn(f"encoder.down.{i}.attn.{j}", f"encoder.down_blocks.{i}.attentions.{j}", sd, out)
        if i != last:
            for p in ("weight", "bias"):
                out[f"encoder.down_blocks.{i}.downsamplers.0.conv.{p}"] = sd[f"encoder.down.{i}.downsample.conv.{p}"]
        d = last - i  # diffusers lists the decoder's levels deepest first
        for j in range(n_res + 1):
            _res(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{d}.resnets.{j}", sd, out)
            if dec_attn[i]:
                _attn(f"decoder.up.{i}.attn.{j}", f"decoder.up_blocks.{d}.attentions.{j}", sd, out)
        if i != 0:
            for p in ("weight", "bias"):
                out[f"decoder.up_blocks.{d}.upsamplers.0.conv.{p}"] = sd[f"decoder.up.{i}.upsample.conv.{p}"]
    return out


def load_ldm_vae(name: str | Path):
    """diffusers ``AutoencoderKL`` holding MAR's KL-16 (or any latent-diffusion KL-VAE) read from
    ``name``: the ``.ckpt`` file, or a directory holding ``kl16.ckpt``."""
    from diffusers import AutoencoderKL  # heavy: imported on first use

    p = Path(name)
    file = p / "kl16.ckpt" if p.is_dir() else p
    obj = safe_torch_load(file)  # tensors only: nothing pickled is executed
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FormatError(f"{file}: expected a state dict or {{'model': state dict}} of a KL autoencoder")
    sd = {k.removeprefix("module."): v for k, v in sd.items() if not k.startswith("loss.")}  # LDM keeps its disc.
    config, state = ldm_to_diffusers(sd, str(file))
    vae = AutoencoderKL(**config)
    try:
        vae.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FormatError(f"{file}: the weights do not fit a KL autoencoder of the shapes they imply: "
                          f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    return vae.eval()
