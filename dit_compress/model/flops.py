"""Analytic FLOPs in the DiT convention: multiply-accumulates, reported as "GFLOPs".

DiT-XL/2 at 256 px is 118.6 GFLOPs, S/2 6.06, B/2 23.0, L/2 80.7 (DiT paper, Table 1).
"""

from __future__ import annotations

from ..config import DiTConfig


PIXART_CAPTION_TOKENS = 120  # PixArtAlphaPipeline's max_sequence_length, when the model does not state its own


def caption_tokens(cfg: DiTConfig) -> int:
    return cfg.caption_length or PIXART_CAPTION_TOKENS


def block_macs(cfg: DiTConfig) -> tuple[float, float]:
    """(attention, MLP) MACs of one full-width block over all tokens: the parts dynamic width
    scales (with the share of heads / channels kept).

    Attention: qkv + proj 4ND^2 and the two N x N products 2N^2D. MLP 2*N*D*hidden.
    """
    N, D = cfg.num_patches, cfg.hidden_size
    return float(4 * N * D * D + 2 * N * N * D), float(2 * N * D * cfg.mlp_hidden)


def block_fixed_macs(cfg: DiTConfig) -> float:
    """MACs of one block that no router scales: PixArt's cross-attention to L caption tokens
    (q + out 2ND^2, k + v 2LD^2, the two N x L products 2NLD); none for DiT."""
    if cfg.family != "pixart":
        return 0.0
    N, D, L = cfg.num_patches, cfg.hidden_size, caption_tokens(cfg)
    return float(2 * N * D * D + 2 * L * D * D + 2 * N * L * D)


def block_share(cfg: DiTConfig, heads, channels, tokens):
    """One block's FLOPs at the given active shares over its full-width FLOPs (DyDiT's
    F_dyn / F_static for the block; a fixed part, e.g. cross-attention, counts in both).
    Works on floats and on per-sample tensors."""
    attn, mlp = block_macs(cfg)
    fixed = block_fixed_macs(cfg)
    return (fixed + attn * heads + mlp * channels * tokens) / (fixed + attn + mlp)


def static_macs(cfg: DiTConfig) -> dict:
    """Breakdown of one forward pass for one sample."""
    N, D, p = cfg.num_patches, cfg.hidden_size, cfg.patch_size
    attn, mlp = block_macs(cfg)
    attn += block_fixed_macs(cfg)
    ada = 6 * D * D
    embed = N * p * p * cfg.in_channels * D + 256 * D + D * D
    final = 2 * D * D + N * D * p * p * cfg.out_channels
    if cfg.family == "pixart":  # adaLN-single once (not per block), the caption projection, no final adaLN
        L = caption_tokens(cfg)
        embed += 6 * D * D + L * (cfg.caption_channels * D + D * D)
        final = N * D * p * p * cfg.out_channels
        ada = 0
    routers = 0.0
    if cfg.width is not None:
        routers += 2 * D * cfg.num_heads
    if cfg.tokens is not None:
        r = max(1, D // cfg.tokens.reduction)
        routers += N * (D * r + r)
    blocks = cfg.depth * (attn + mlp + ada + routers)
    return {
        "attention": cfg.depth * attn,
        "mlp": cfg.depth * mlp,
        "adaln": cfg.depth * ada,
        "routers": cfg.depth * routers,
        "embed_final": embed + final,
        "total": blocks + embed + final,
    }


def dynamic_macs(cfg: DiTConfig, head_frac, channel_frac, token_frac, skipped=None) -> float:
    """MACs for given per-layer active shares (lists of floats, one per block); ``skipped``
    (one flag per block) marks blocks a feature cache did not run: they cost nothing."""
    attn, mlp = block_macs(cfg)
    fixed = block_fixed_macs(cfg)
    s = static_macs(cfg)
    per_block = (s["adaln"] + s["routers"]) / cfg.depth
    total = s["embed_final"]
    for i, (h, c, t) in enumerate(zip(head_frac, channel_frac, token_frac)):
        if skipped is None or not skipped[i]:
            total += per_block + fixed + attn * h + mlp * c * t
    return total


def gflops(cfg: DiTConfig) -> float:
    return static_macs(cfg)["total"] / 1e9


def mar_static_macs(cfg: DiTConfig) -> dict:
    """One MAR network pass for one sample with every token visible (the encoder's upper
    bound; sampling shows it fewer): both stacks over ``buffer + L`` tokens, then one step of
    the per-token head on all ``L`` tokens (a sampling iteration runs the head's steps only on
    the tokens it predicts)."""
    m = cfg.mar
    L = cfg.num_patches
    T = L + m.buffer_size
    tok = cfg.in_channels * cfg.patch_size ** 2
    D, Dd = cfg.hidden_size, m.decoder_hidden_size or cfg.hidden_size
    enc, dec = cfg.stack_split

    def block(width):  # qkv + proj + MLP on T tokens, then scores and the weighted sum
        return T * (4 * width * width + 2 * cfg.mlp_ratio * width * width) + 2 * T * T * width

    w = m.diffloss_w
    head = L * (tok * w + Dd * w + 256 * w + w * w + m.diffloss_d * 5 * w * w + 2 * w * w + w * 2 * tok)
    embed = L * tok * D + D * Dd * T
    return {"encoder": enc * block(D), "decoder": dec * block(Dd), "head_per_step": head, "embed_final": embed,
            "total": enc * block(D) + dec * block(Dd) + head + embed}
