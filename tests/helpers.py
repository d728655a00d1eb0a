"""Small models and files in the real formats, created by the tests themselves."""

from __future__ import annotations

import torch

from dit_compress.config import DiTConfig
from dit_compress.model import DiT


def tiny_config(**kw) -> DiTConfig:
    base = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2,
                num_classes=10, latent_scale=0.18215, vae=None, name="tiny")
    base.update(kw)
    return DiTConfig(**base)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter so zero-initialised parts (adaLN-Zero, final layer) matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_model(seed: int = 0, **kw) -> DiT:
    torch.manual_seed(seed)
    return randomize(DiT(tiny_config(**kw)), seed).eval()


def diffusers_model(seed: int = 0, layers: int = 3, out_channels: int = 8):
    """A small diffusers DiTTransformer2DModel with the per-block embedder copies kept equal."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    d = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=out_channels,
                              num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    g = torch.Generator().manual_seed(seed)
    shared = {}
    with torch.no_grad():
        for name, p in d.named_parameters():
            key = name.split(".norm1.emb.", 1)[1] if ".norm1.emb." in name else None
            if key is not None and key in shared:
                p.copy_(shared[key])
                continue
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
            if key is not None:
                shared[key] = p.detach().clone()
    return d


def inputs(batch: int = 2, channels: int = 4, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 11, (batch,), generator=g)
    return x, t, y


class Recorder:
    """Wraps a model for ``dit_compress.sample``: records (x, t) of every model call."""

    def __init__(self, m):
        self.m, self.config, self.calls = m, m.config, []

    def __call__(self, x, t, y):
        self.calls.append((x.clone(), t.clone()))
        return self.m(x, t, y)


def training_vs_inference_flops(m, data, idx, draws: int = 30) -> tuple[float, float]:
    """(block FLOPs ratio training expects: the mean over ``draws`` Gumbel draws, the ratio the
    deterministic inference masks run) on the examples ``idx`` of ``data``, noised at
    timesteps spread over 0..999 (fixed draws)."""
    import torch

    from dit_compress.diffusion.gaussian import GaussianDiffusion

    g = torch.Generator().manual_seed(0)
    x0, y = data.get(idx, generator=g)
    t = torch.linspace(0, 999, len(idx)).long()
    xt = GaussianDiffusion.create().q_sample(x0, t, torch.randn(x0.shape, generator=g))
    with torch.no_grad():
        m.train()
        train_exp = sum(float(m(xt, t, y, return_aux=True)[1].flops_ratio.mean()) for _ in range(draws)) / draws
        m.eval()
        m.routing = "dense"
        infer = float(m(xt, t, y, return_aux=True)[1].flops_ratio.mean())
    return train_exp, infer
