"""An independent re-implementation of the KL autoencoder MAR tokenizes images with (the
semantics and parameter names of LTH14/mar ``models/vae.py``, itself latent-diffusion's
KL-VAE), written for the tests without any dit_compress or diffusers code: GroupNorm(32,
eps 1e-6) + swish res-blocks, single-head attention with 1x1 convolutions, stride-2
convolutions after a (0, 1, 0, 1) zero pad, nearest upsampling, ``quant_conv`` /
``post_quant_conv``, and the diagonal Gaussian posterior with log-variance clamped to
[-30, 20]. ``torch.save({"model": state_dict}, "kl16.ckpt")`` of it is what MAR's
``pretrained_models/vae/kl16.ckpt`` looks like, at any size."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _norm(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class RefRes(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class RefAttn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q = self.q(h).flatten(2).double()  # [b, c, n]; the product in float64, rounded at the end
        k = self.k(h).flatten(2).double()
        v = self.v(h).flatten(2).double()
        w = torch.einsum("bci,bcj->bij", q, k) / c ** 0.5
        w = w.softmax(dim=-1)
        out = torch.einsum("bij,bcj->bci", w, v).to(x.dtype).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class RefDown(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class RefUp(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def _level(cin, cout, n_res, attn):
    """One resolution level: ``n_res`` res-blocks, each followed by attention when ``attn``."""
    lvl = nn.Module()
    lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
    for _ in range(n_res):
        lvl.block.append(RefRes(cin, cout))
        cin = cout
        if attn:
            lvl.attn.append(RefAttn(cout))
    return lvl


def _run_level(lvl, h, resample: str):
    for j, blk in enumerate(lvl.block):
        h = blk(h)
        if len(lvl.attn):
            h = lvl.attn[j](h)
    return getattr(lvl, resample)(h) if hasattr(lvl, resample) else h


class RefEncoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z, attn_levels, in_channels=3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(ch_mult):
            lvl, cin = _level(cin, ch * m, num_res_blocks, i in attn_levels), ch * m
            if i != len(ch_mult) - 1:
                lvl.downsample = RefDown(cin)
            self.down.append(lvl)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = RefRes(cin, cin), RefAttn(cin), RefRes(cin, cin)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * z, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.down:
            h = _run_level(lvl, h, "downsample")
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class RefDecoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z, attn_levels, out_channels=3):
        super().__init__()
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z, cin, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = RefRes(cin, cin), RefAttn(cin), RefRes(cin, cin)
        ups = {}
        for i in reversed(range(len(ch_mult))):  # built deepest first, stored by level
            lvl, cin = _level(cin, ch * ch_mult[i], num_res_blocks + 1, i in attn_levels), ch * ch_mult[i]
            if i != 0:
                lvl.upsample = RefUp(cin)
            ups[i] = lvl
        self.up = nn.ModuleList([ups[i] for i in range(len(ch_mult))])
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for lvl in reversed(self.up):
            h = _run_level(lvl, h, "upsample")
        return self.conv_out(F.silu(self.norm_out(h)))


class RefKLVAE(nn.Module):
    """MAR's ``AutoencoderKL(embed_dim, ch_mult)``: KL-16 is ``RefKLVAE(128, (1, 1, 2, 2, 4), 2, 16,
    enc_attn_levels=(4,))`` (attention at the 16 px level of the encoder only)."""

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, embed_dim=16,
                 enc_attn_levels=(4,), dec_attn_levels=()):
        super().__init__()
        self.encoder = RefEncoder(ch, ch_mult, num_res_blocks, embed_dim, enc_attn_levels)
        self.decoder = RefDecoder(ch, ch_mult, num_res_blocks, embed_dim, dec_attn_levels)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)

    def moments(self, x):
        """(mean, std) of the posterior."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


def randomized(vae: RefKLVAE, seed: int = 0) -> RefKLVAE:
    """Every parameter drawn at random (GroupNorm scales near 1, not 1), so no map can pass by a
    default value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.Conv2d):
                fan = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan ** 0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return vae
