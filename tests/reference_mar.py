"""An independent re-implementation of MAR's network (the semantics of LTH14/mar
``models/mar.py`` with timm's ``Block`` and ``models/diffloss.py``), written for the tests
without any dit_compress code: explicit softmax attention, boolean-mask token dropping and
padding as the official code does them, the official loss row order (token copies outermost),
and ADM's ``p_sample`` with the noise given.

Checkpoints saved from it with plain ``torch.save`` in main_mar.py's layout (``model``,
``model_ema``, ``args``) are what other people's MAR files look like, at any size."""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn as nn


class RefBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.mlp.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x):
        B, N, C = x.shape
        h = self.norm1(x)
        q, k, v = self.attn.qkv(h).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5).softmax(-1)
        x = x + self.attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))
        h = self.mlp.fc1(self.norm2(x))
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU (timm's nn.GELU)
        return x + self.mlp.fc2(h)


class RefRes(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.in_ln = nn.LayerNorm(ch, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(ch, ch), nn.SiLU(), nn.Linear(ch, ch))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(ch, 3 * ch))

    def forward(self, x, y):
        a, b, g = self.adaLN_modulation(y).chunk(3, -1)
        return x + g * self.mlp(self.in_ln(x) * (1 + b) + a)


class RefHead(nn.Module):
    """SimpleMLPAdaLN: net(x, t, c)."""

    def __init__(self, cin, width, zc, depth):
        super().__init__()
        self.cin = cin
        self.time_embed = nn.Module()
        self.time_embed.mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(zc, width)
        self.input_proj = nn.Linear(cin, width)
        self.res_blocks = nn.ModuleList([RefRes(width) for _ in range(depth)])
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(width, 2 * cin)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, t, c):
        half = 128
        # the official embedding is float32 whatever the weights' dtype (its ``dtype=torch.float32``)
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        ang = t.float()[:, None] * freqs[None]
        te = self.time_embed.mlp(torch.cat([torch.cos(ang), torch.sin(ang)], -1).to(x.dtype))
        y = te + self.cond_embed(c)
        h = self.input_proj(x)
        for b in self.res_blocks:
            h = b(h, y)
        s, sc = self.final_layer.adaLN_modulation(y).chunk(2, -1)
        return self.final_layer.linear(self.final_layer.norm_final(h) * (1 + sc) + s)


class RefMAR(nn.Module):
    def __init__(self, *, seq_side=4, tok=4, enc=(64, 2, 4), dec=(64, 2, 4), buffer=8, classes=10, head=(2, 48),
                 patch=1, vae_dim=4):
        super().__init__()
        D, ne, he = enc
        Dd, nd, hd = dec
        self.L, self.buffer, self.patch, self.vae_dim, self.side = seq_side * seq_side, buffer, patch, vae_dim, seq_side
        self.class_emb = nn.Embedding(classes, D)
        self.fake_latent = nn.Parameter(torch.randn(1, D) * 0.02)
        self.z_proj = nn.Linear(tok, D)
        self.z_proj_ln = nn.LayerNorm(D, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.randn(1, self.L + buffer, D) * 0.02)
        self.encoder_blocks = nn.ModuleList([RefBlock(D, he) for _ in range(ne)])
        self.encoder_norm = nn.LayerNorm(D, eps=1e-6)
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.randn(1, 1, Dd) * 0.02)
        self.decoder_pos_embed_learned = nn.Parameter(torch.randn(1, self.L + buffer, Dd) * 0.02)
        self.decoder_blocks = nn.ModuleList([RefBlock(Dd, hd) for _ in range(nd)])
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.randn(1, self.L, Dd) * 0.02)
        self.diffloss = nn.Module()
        self.diffloss.net = RefHead(tok, head[1], Dd, head[0])
        with torch.no_grad():  # every weight non-trivial (the real init zeroes the head's output)
            for p in self.parameters():
                p.add_(torch.randn_like(p) * 0.05)

    def patchify(self, x):
        B, c, h, w = x.shape
        p = self.patch
        x = x.reshape(B, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (h // p) * (w // p), c * p * p)

    def encoder(self, x, mask, class_embedding):
        x = self.z_proj(x)
        B, L, D = x.shape
        x = torch.cat([torch.zeros(B, self.buffer, D, dtype=x.dtype), x], 1)
        mwb = torch.cat([torch.zeros(B, self.buffer), mask], 1)
        x[:, : self.buffer] = class_embedding.unsqueeze(1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        x = x[(1 - mwb).nonzero(as_tuple=True)].reshape(B, -1, D)
        for b in self.encoder_blocks:
            x = b(x)
        return self.encoder_norm(x)

    def decoder(self, x, mask):
        x = self.decoder_embed(x)
        mwb = torch.cat([torch.zeros(x.size(0), self.buffer), mask], 1)
        pad = self.mask_token.repeat(mwb.shape[0], mwb.shape[1], 1).to(x.dtype).clone()
        pad[(1 - mwb).nonzero(as_tuple=True)] = x.reshape(-1, x.shape[2])
        x = pad + self.decoder_pos_embed_learned
        for b in self.decoder_blocks:
            x = b(x)
        return self.decoder_norm(x)[:, self.buffer:] + self.diffusion_pos_embed_learned

    def class_embedding(self, labels, classes):
        e = self.class_emb(labels.clamp(max=classes - 1))
        return torch.where((labels >= classes)[:, None], self.fake_latent.expand_as(e), e)

    def state_for_official(self):
        return {k: v.detach().clone() for k, v in self.state_dict().items()}


def official_checkpoint(ref: RefMAR, args: argparse.Namespace | None, path, ema_offset: float = 0.0):
    """main_mar.py's ``checkpoint-last.pth``: ``model``, ``model_ema`` (shifted by ``ema_offset``
    so a test can tell which was read), ``optimizer``, ``epoch``, ``scaler``, ``args``."""
    state = ref.state_for_official()
    ema = {k: v + ema_offset for k, v in state.items()}
    obj = {"model": state, "model_ema": ema, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
           "epoch": 3, "scaler": {"scale": 65536.0}}
    if args is not None:
        obj["args"] = args
    torch.save(obj, path)


def args_for(ref: RefMAR, **over) -> argparse.Namespace:
    a = dict(model="", img_size=ref.side * ref.patch * 16, vae_stride=16, patch_size=ref.patch, vae_embed_dim=ref.vae_dim,
             buffer_size=ref.buffer, diffloss_d=len(ref.diffloss.net.res_blocks),
             diffloss_w=ref.diffloss.net.input_proj.out_features, num_sampling_steps="100", diffusion_batch_mul=4,
             mask_ratio_min=0.7, label_drop_prob=0.1, attn_dropout=0.1, proj_dropout=0.1,
             class_num=ref.class_emb.num_embeddings, epochs=400, lr=None, blr=1e-4)
    a.update(over)
    return argparse.Namespace(**a)


# ---------------------------------------------------------------------------- ADM, float64, numpy
def cosine_alpha_bar(T=1000):
    """ADM's cosine schedule re-derived: betas clipped at 0.999, alpha_bar as their product."""
    f = lambda s: math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=np.float64)
    return betas, np.cumprod(1 - betas)


def adm_token_loss(x0, eps_pred, v_pred, t, noise, T=1000):
    """Per-row ADM hybrid loss (IDDPM eq. 16 with the learned-range variance of eq. 15): the eps
    MSE plus the VLB term in bits (KL of q(x_{t-1}|x_t,x0) to p, or at t=0 the discretized
    Gaussian NLL), with the eps of the VLB term treated as a constant. All numpy float64."""
    betas, ab = cosine_alpha_bar(T)
    ab_prev = np.append(1.0, ab[:-1])
    out = []
    for r in range(len(x0)):
        i, x, e, v, n = int(t[r]), x0[r], eps_pred[r], v_pred[r], noise[r]
        xt = math.sqrt(ab[i]) * x + math.sqrt(1 - ab[i]) * n
        mse = np.mean((n - e) ** 2)
        pvar = betas * (1 - ab_prev) / (1 - ab)
        min_log = math.log(pvar[1]) if i == 0 else math.log(pvar[i])
        max_log = math.log(betas[i])
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        c1 = betas[i] * math.sqrt(ab_prev[i]) / (1 - ab[i])
        c2 = (1 - ab_prev[i]) * math.sqrt(1 - betas[i]) / (1 - ab[i])
        x0_hat = xt / math.sqrt(ab[i]) - math.sqrt(1 / ab[i] - 1) * e
        mean = c1 * x0_hat + c2 * xt
        true_mean = c1 * x + c2 * xt
        if i == 0:
            # discretized Gaussian log-likelihood of x0 in bins of width 2/255 on [-1, 1], with
            # ADM's tanh approximation of the normal CDF (its definition of the decoder term)
            cdf = lambda z: 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))  # noqa: E731
            ll = []
            for xj, mj, lv in zip(x, mean, log_var):
                inv = math.exp(-0.5 * lv)
                up, lo = cdf(inv * (xj - mj + 1 / 255)), cdf(inv * (xj - mj - 1 / 255))
                p = up if xj < -0.999 else (1 - lo if xj > 0.999 else up - lo)
                ll.append(math.log(max(p, 1e-12)))
            vb = -np.mean(ll) / math.log(2)
        else:
            true_log = math.log(pvar[i])
            kl = 0.5 * (-1 + log_var - true_log + math.exp(true_log) * np.exp(-log_var)
                        + (true_mean - mean) ** 2 * np.exp(-log_var))
            vb = np.mean(kl) / math.log(2)
        out.append(mse + vb)
    return np.array(out)


def respaced_cosine(count: int, T: int = 1000):
    """(kept original steps, betas) of ADM's ``space_timesteps(T, str(count))`` on the cosine
    schedule: a cumulative float stride over [0, T-1], rounded."""
    stride = (T - 1) / (count - 1) if count > 1 else 1
    use = sorted({round(i * stride) for i in range(count)})
    _, ab = cosine_alpha_bar(T)
    last, betas = 1.0, []
    for i in use:
        betas.append(1 - ab[i] / last)
        last = ab[i]
    return use, np.array(betas)


@torch.no_grad()
def ref_sample(ref: RefMAR, labels, orders, noise, num_iter, cfg, temperature, classes, head_steps=100, clip=False):
    """MAR's ``sample_tokens`` with the generation ``orders`` [B, L] and each token position's
    head noise ``noise`` [B, L, S+1, C] given (start, then one per step from the last), float64;
    ``clip``: ADM's ``clip_denoised`` (x0 clamped to [-1, 1])."""
    B, L = orders.shape
    C = noise.shape[-1]
    use, betas = respaced_cosine(head_steps)
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    pvar = betas * (1 - ab_prev) / (1 - ab)
    plog = np.log(np.append(pvar[1], pvar[1:]))
    mask = torch.ones(B, L, dtype=torch.float64)
    tokens = torch.zeros(B, L, C, dtype=torch.float64)
    for step in range(num_iter):
        emb = ref.class_embedding(labels, classes)
        tk, mk = tokens, mask
        if cfg != 1.0:
            tk, mk = torch.cat([tokens, tokens]), torch.cat([mask, mask])
            emb = torch.cat([emb, ref.fake_latent.expand(B, -1)])
        z = ref.decoder(ref.encoder(tk, mk, emb), mk)
        mask_len = math.floor(L * math.cos(math.pi / 2 * (step + 1) / num_iter))
        mask_len = max(1, min(int(mask.sum(1)[0]) - 1, mask_len))
        nxt = torch.zeros(B, L, dtype=torch.float64)
        for b in range(B):
            nxt[b, orders[b, :mask_len]] = 1
        pred = mask.bool() if step >= num_iter - 1 else (mask.bool() ^ nxt.bool())
        mask = nxt
        scale = 1 + (cfg - 1) * (L - mask_len) / L
        for b in range(B):
            for pos in pred[b].nonzero().flatten().tolist():
                x = noise[b, pos, 0].double()
                for j, i in enumerate(reversed(range(len(use)))):
                    t = torch.tensor([use[i]])
                    out_c = ref.diffloss.net(x[None], t, z[b, pos][None])[0]
                    eps, v = out_c[:C], out_c[C:]
                    if cfg != 1.0:
                        out_u = ref.diffloss.net(x[None], t, z[B + b, pos][None])[0]
                        eps = out_u[:C] + scale * (out_c[:C] - out_u[:C])
                    frac = (v + 1) / 2
                    lv = frac * math.log(betas[i]) + (1 - frac) * plog[i]
                    x0 = math.sqrt(1 / ab[i]) * x - math.sqrt(1 / ab[i] - 1) * eps
                    if clip:
                        x0 = x0.clamp(-1, 1)
                    c1 = betas[i] * math.sqrt(ab_prev[i]) / (1 - ab[i])
                    c2 = (1 - ab_prev[i]) * math.sqrt(1 - betas[i]) / (1 - ab[i])
                    mean = c1 * x0 + c2 * x
                    x = mean + torch.exp(0.5 * lv) * noise[b, pos, j + 1].double() * temperature if i > 0 else mean
                tokens[b, pos] = x
    p, side, c = ref.patch, ref.side, ref.vae_dim
    return tokens.reshape(B, side, side, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, c, side * p, side * p)
