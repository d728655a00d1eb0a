"""MAR (Li et al., "Autoregressive Image Generation without Vector Quantization"; LTH14/mar
``models/mar.py`` and ``models/diffloss.py``) in the official key layout and with the official
forward pieces and their names: ``patchify`` / ``unpatchify``, ``forward_mae_encoder(x, mask,
class_embedding)``, ``forward_mae_decoder(x, mask)``, ``class_emb``, ``fake_latent``,
``diffloss.net(x, t, c)``.

A masked autoregressive transformer over continuous tokens (an MAE-style encoder that sees the
known tokens and ``buffer_size`` buffer tokens holding the class embedding, a decoder that pads
the unknown positions with the mask token) conditions a small diffusion MLP per token
(``SimpleMLPAdaLN``, ADM Gaussian diffusion with the cosine schedule and learned sigma).

The objective (the token diffusion loss) and the masked autoregressive sampler are in
diffusion/mar.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DiTConfig
from ..errors import UsageError
from .layers import timestep_sinusoid
from .routers import Routing

LN_EPS = 1e-6  # mar_base/large/huge pass LayerNorm(eps=1e-6); z_proj_ln and the head use it too


# ---------------------------------------------------------------------------- transformer blocks
class Attention(nn.Module):
    """timm's ``Attention`` (``qkv``, ``proj``; scale head_dim^-0.5), through SDPA."""

    def __init__(self, dim: int, heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.attn_drop, self.proj_drop = attn_drop, proj_drop

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        o = self.proj(o.transpose(1, 2).reshape(B, N, D))
        return F.dropout(o, self.proj_drop, self.training)


class Mlp(nn.Module):
    """timm's ``Mlp``: fc1, exact GELU, fc2 (dropout after each in training)."""

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = drop

    def forward(self, x):
        h = F.dropout(F.gelu(self.fc1(x)), self.drop, self.training)
        return F.dropout(self.fc2(h), self.drop, self.training)


class Block(nn.Module):
    """timm's pre-norm ViT ``Block`` (``norm1``, ``attn``, ``norm2``, ``mlp``)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, attn_drop: float, proj_drop: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------- diffusion head
def patchify(x, p: int):
    """[B, C, H, W] -> [B, (H/p)(W/p), C p p], the official token order."""
    B, c, h, w = x.shape
    x = x.reshape(B, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwcpq", x)
    return x.reshape(B, (h // p) * (w // p), c * p * p)


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.freq = freq

    def forward(self, t):
        # the head's sinusoid is [cos, sin] over exp(-ln(10^4) i / half), as DiT's
        return self.mlp(timestep_sinusoid(t, dim=self.freq).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(ch, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(ch, ch), nn.SiLU(), nn.Linear(ch, ch))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(ch, 3 * ch))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class HeadFinalLayer(nn.Module):
    def __init__(self, ch: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(ch, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(ch, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(ch, 2 * ch))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The per-token denoiser: ``net(x [N, C], t [N], c [N, Dz]) -> [N, 2C]`` (eps, variance)."""

    def __init__(self, in_channels: int, width: int, z_channels: int, depth: int):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = HeadFinalLayer(width, 2 * in_channels)

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for b in self.res_blocks:
            nn.init.zeros_(b.adaLN_modulation[-1].weight)
            nn.init.zeros_(b.adaLN_modulation[-1].bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    def forward(self, x, t, c):
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)

    def forward_with_cfg(self, x, t, c, cfg_scale):
        """Guided eps on the first half of the rows (``c``: conditional then null rows), as the
        official head does: the variance channels stay each half's own."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, c)
        C = self.in_channels
        cond, uncond = out[:, :C].chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), out[:, C:]], dim=1)


class DiffLoss(nn.Module):
    """The diffusion head's module (``diffloss.net``); its processes (ADM, cosine schedule: 1000
    training steps, ``num_sampling_steps`` for sampling) live in diffusion/mar.py."""

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int, num_sampling_steps: str):
        super().__init__()
        self.in_channels = target_channels
        self.num_sampling_steps = str(num_sampling_steps)
        self.net = SimpleMLPAdaLN(target_channels, width, z_channels, depth)


# ---------------------------------------------------------------------------- the network
class MAR(nn.Module):
    """``MAR(config)``: encoder and decoder stacks (``encoder_blocks``, ``decoder_blocks``) and
    the diffusion head (``diffloss``). ``model.blocks`` is both stacks as one list (encoder
    first), the list depth pruning and layer selection index; assigning to it splits the blocks
    back by the stack each came from."""

    accepts_run = False

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.routing = Routing.FAST  # no routers: the mode is held so every model answers routing(model, mode)
        m = config.mar
        D = config.hidden_size
        Dd = m.decoder_hidden_size or D
        Hd = m.decoder_num_heads or config.num_heads
        self.seq_h = self.seq_w = config.input_size // config.patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = config.in_channels * config.patch_size ** 2
        self.buffer_size = m.buffer_size
        self.num_classes = config.num_classes
        self.class_emb = nn.Embedding(config.num_classes, D)
        self.fake_latent = nn.Parameter(torch.zeros(1, D))
        self.z_proj = nn.Linear(self.token_embed_dim, D)
        self.z_proj_ln = nn.LayerNorm(D, eps=LN_EPS)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + m.buffer_size, D))
        enc, dec = config.stack_split
        block = dict(mlp_ratio=config.mlp_ratio, attn_drop=m.attn_dropout, proj_drop=m.proj_dropout)
        self.encoder_blocks = nn.ModuleList([Block(D, config.num_heads, **block) for _ in range(enc)])
        self.encoder_norm = nn.LayerNorm(D, eps=LN_EPS)
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + m.buffer_size, Dd))
        self.decoder_blocks = nn.ModuleList([Block(Dd, Hd, **block) for _ in range(dec)])
        self.decoder_norm = nn.LayerNorm(Dd, eps=LN_EPS)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, Dd))
        self.diffloss = DiffLoss(self.token_embed_dim, Dd, m.diffloss_d, m.diffloss_w, m.num_sampling_steps)
        self.initialize_weights()

    def initialize_weights(self):
        """The official initialisation: normal(0.02) embeddings and tokens, xavier linears,
        unit LayerNorms; the head's own (adaLN and output zeroed)."""
        if self.fake_latent.is_meta:
            return
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm) and mod.weight is not None:
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
        self.diffloss.net.initialize_weights()

    def num_params(self, include_routers: bool = True) -> int:
        """Every parameter (MAR's position embeddings are learned); it has no routers."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ the stacks as one list
    @property
    def blocks(self) -> nn.ModuleList:
        return nn.ModuleList([*self.encoder_blocks, *self.decoder_blocks])

    def __setattr__(self, name, value):
        if name != "blocks":
            return super().__setattr__(name, value)
        enc_ids = self.__dict__.setdefault("_encoder_ids", set())
        enc_ids.update(id(b) for b in self._modules.get("encoder_blocks", []))
        enc = [b for b in value if id(b) in enc_ids]
        dec = [b for b in value if id(b) not in enc_ids]
        if list(value) != enc + dec:
            raise UsageError("MAR blocks must list encoder blocks before decoder blocks")
        super().__setattr__("encoder_blocks", nn.ModuleList(enc))
        super().__setattr__("decoder_blocks", nn.ModuleList(dec))

    # ------------------------------------------------------------------ official pieces
    def patchify(self, x):
        return patchify(x, self.config.patch_size)

    def unpatchify(self, x):
        B = x.shape[0]
        p, c = self.config.patch_size, self.config.in_channels
        x = x.reshape(B, self.seq_h, self.seq_w, c, p, p)
        x = torch.einsum("nhwcpq->nchpwq", x)
        return x.reshape(B, c, self.seq_h * p, self.seq_w * p)

    def class_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        """``class_emb(labels)``, with ``fake_latent`` where a label is ``num_classes`` (the null)."""
        null = labels >= self.num_classes
        emb = self.class_emb(labels.clamp(max=self.num_classes - 1))
        return torch.where(null[:, None], self.fake_latent.to(emb.dtype).expand_as(emb), emb)

    @staticmethod
    def _kept(mask_with_buffer: torch.Tensor) -> torch.Tensor:
        """[B, K] indices of the unmasked positions of each row, in order (every row keeps K)."""
        keep = mask_with_buffer == 0
        n = int(keep[0].sum())
        if bool((keep.sum(1) != n).any()):
            raise UsageError("every row of a MAR mask must hide the same number of tokens (the encoder takes the "
                             "same count in each row)")
        return torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n]

    def forward_mae_encoder(self, x, mask, class_embedding):
        x = self.z_proj(x)
        B, L, D = x.shape
        buf = torch.zeros(B, self.buffer_size, D, device=x.device, dtype=x.dtype)
        buf = buf + class_embedding.to(x.dtype).unsqueeze(1)
        x = torch.cat([buf, x], dim=1) + self.encoder_pos_embed_learned
        x = self.z_proj_ln(x)
        mask_wb = torch.cat([torch.zeros(B, self.buffer_size, device=x.device), mask], dim=1)
        idx = self._kept(mask_wb)
        x = torch.gather(x, 1, idx[..., None].expand(-1, -1, D))
        for block in self.encoder_blocks:
            x = block(x)
        return self.encoder_norm(x)

    def forward_mae_decoder(self, x, mask):
        x = self.decoder_embed(x)
        B = x.shape[0]
        mask_wb = torch.cat([torch.zeros(B, self.buffer_size, device=x.device), mask], dim=1)
        idx = self._kept(mask_wb)
        Dd = x.shape[-1]
        pad = self.mask_token.to(x.dtype).expand(B, mask_wb.shape[1], Dd)
        x = pad.scatter(1, idx[..., None].expand(-1, -1, Dd), x) + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned

    def forward(self, x, t, y, head=None, **kw):
        """The network in the project's ``(x, t, y)`` call order, so wrappers that act on
        ``model(x, t, y)`` (the learned depth search, DDP) see one forward: ``x`` the known
        tokens [B, L, C], ``t`` the mask [B, L] (1 = unknown), ``y`` the labels. Returns the
        conditions ``z``, or ``head(self.diffloss.net, z)`` when a head function is given (the
        objective's loss, so the head's parameters are inside the same forward)."""
        if kw:
            raise UsageError(f"a MAR forward takes no {', '.join(sorted(kw))} (block features and run contexts are "
                             "the diffusion transformers')")
        z = self.conditions(x, t, y)
        return z if head is None else head(self.diffloss.net, z)

    def conditions(self, tokens, mask, labels):
        """The head's condition ``z`` [B, L, Dd] of every token position, given the known
        ``tokens`` [B, L, C], the ``mask`` [B, L] (1 = unknown) and ``labels`` (``num_classes`` =
        the null): encoder, then decoder."""
        return self.forward_mae_decoder(self.forward_mae_encoder(tokens, mask, self.class_embedding(labels)), mask)
