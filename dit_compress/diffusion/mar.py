"""MAR's objective and sampler (LTH14/mar ``MAR.forward`` / ``forward_loss`` / ``sample_tokens``
and ``DiffLoss``): the token diffusion loss (ADM's Gaussian diffusion on the cosine schedule,
learned sigma, averaged over the masked tokens and ``diffusion_batch_mul`` copies) with every
random draw explicit (``MARDraws``), and the masked autoregressive sampler with each sample's
draws from its own generator, so a seed gives the same loss and the same images on any batch
or process split.

Departures from the official code, each the same distribution: label dropout is applied to the
labels (index ``num_classes`` selects ``fake_latent``) by whoever draws the batch, not inside the
encoder; a sample's head noise is drawn per token position from its own generator (the official
code draws one stream for the whole batch, and a second, unused half under guidance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import checks
from ..config import DiTConfig
from ..errors import UsageError
from ..model.flops import mar_static_macs
from ..model.mar import patchify
from .gaussian import GaussianDiffusion


def cosine_diffusion(steps: str | int | None = None) -> GaussianDiffusion:
    """ADM's Gaussian diffusion with the cosine schedule (1000 steps, learned sigma), respaced
    to ``steps`` for sampling (``create_diffusion(num_sampling_steps, noise_schedule="cosine")``)."""
    return GaussianDiffusion.create(steps, learn_sigma=True, schedule="cosine")


def processes(model) -> tuple[GaussianDiffusion, GaussianDiffusion]:
    """(training process, sampling process) of a MAR's head, made once per model."""
    cache = model.__dict__.setdefault("_mar_processes", {})
    key = model.diffloss.num_sampling_steps
    if key not in cache:
        cache.clear()
        cache[key] = (cosine_diffusion(), cosine_diffusion(key))
    return cache[key]


_TRAINING = {}


def training_process() -> GaussianDiffusion:
    """The head's training process (1000 cosine steps), made once."""
    if "d" not in _TRAINING:
        _TRAINING["d"] = cosine_diffusion()
    return _TRAINING["d"]


def head_losses(net, target, z, t, noise) -> dict:
    """Per-token ADM hybrid loss (eps MSE + VLB with the eps term detached) of the head ``net``
    at steps ``t`` with ``noise``; ``target`` and ``noise`` [N, C], ``z`` [N, Dz], ``t`` [N]."""
    d = training_process()
    xt = d.q_sample(target, t, noise)
    out = net(xt, t, z)
    res = d.losses_from_output(out, target, xt, t, noise)
    res["output"], res["xt"] = out, xt
    return res


def head_sample(model, z, noise, temperature: float = 1.0, cfg: float = 1.0, guided: bool | None = None,
                clip: bool = False):
    """Token latents from the respaced process (``p_sample_loop``; ``clip``: the predicted x0
    clamped to [-1, 1] at each step, ADM's ``clip_denoised``); ``noise`` [S+1, N, C]: the start
    and one draw per step (``N`` conditional rows; under guidance ``z`` holds 2N rows,
    conditional then null)."""
    d = processes(model)[1]
    net = model.diffloss.net
    guided = cfg != 1.0 if guided is None else guided
    x = torch.cat([noise[0], noise[0]]) if guided else noise[0]
    for i in reversed(range(d.num_timesteps)):
        k = d.step_coefficients(i)
        t = torch.full((len(x),), d.timestep_map[i], device=x.device, dtype=torch.long)
        out = net.forward_with_cfg(x, t, z, cfg) if guided else net(x, t, z)
        mean, log_var, _, _ = d.p_mean_variance_step(out, x, k, clip)
        if i > 0:
            eps = noise[d.num_timesteps - i]
            eps = torch.cat([eps, eps]) if guided else eps
            x = mean + torch.exp(0.5 * log_var) * eps * temperature
        else:
            x = mean
    return x[: len(x) // 2] if guided else x


def truncnorm_ratio(u: torch.Tensor, lo: float) -> torch.Tensor:
    """The mask ratio from uniforms ``u``: a normal centred at 1 (std 0.25) truncated to
    [lo, 1] (scipy's ``truncnorm((lo - 1) / 0.25, 0, loc=1, scale=0.25)``), by its inverse CDF."""
    a = (lo - 1.0) / 0.25
    cdf_a = 0.5 * (1 + math.erf(a / math.sqrt(2)))
    p = cdf_a + u.double() * (0.5 - cdf_a)
    return (1.0 + 0.25 * math.sqrt(2) * torch.special.erfinv(2 * p - 1)).clamp(lo, 1.0)


@dataclass
class MARDraws:
    """The random draws of one training batch: per sample a generation ``order`` [B, L]
    (a permutation of token positions), the batch's mask ``ratio`` (one scalar, repeated per
    sample: the encoder takes the same number of tokens in every row), and per copy
    (``diffusion_batch_mul``) and token a step ``t`` [B, mul, L] and ``noise`` [B, mul, L, C]."""

    order: torch.Tensor
    ratio: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor

    def __getitem__(self, sl) -> "MARDraws":
        return MARDraws(self.order[sl], self.ratio[sl], self.t[sl], self.noise[sl])

    def to(self, device, non_blocking: bool = False) -> "MARDraws":
        """On ``device``, except ``ratio``: it sets how many tokens are masked (a shape), so it stays
        on the host and reading it costs no device sync."""
        move = lambda v: v.to(device, non_blocking=non_blocking)  # noqa: E731
        return MARDraws(move(self.order), self.ratio.cpu(), move(self.t), move(self.noise))


def draw(cfg: DiTConfig, n: int, generator: torch.Generator | None = None, num_timesteps: int = 1000,
         per_row: bool = False) -> MARDraws:
    """One batch's draws (official: ``sample_orders``, ``mask_ratio_generator.rvs(1)``,
    ``torch.randint`` steps and Gaussian noise per token copy)."""
    L = (cfg.input_size // cfg.patch_size) ** 2
    C = cfg.in_channels * cfg.patch_size ** 2
    mul = cfg.mar.diffusion_batch_mul
    order = torch.argsort(torch.rand(n, L, generator=generator), dim=1)
    u = torch.rand(n if per_row else 1, generator=generator)
    ratio = truncnorm_ratio(u, cfg.mar.mask_ratio_min).float().expand(n).clone()
    t = torch.randint(0, num_timesteps, (n, mul, L), generator=generator)
    noise = torch.randn(n, mul, L, C, generator=generator)
    return MARDraws(order, ratio, t, noise)


def mask_from_order(order: torch.Tensor, n_masked: int) -> torch.Tensor:
    """[B, L] float mask: 1 at the first ``n_masked`` positions of each order (official
    ``random_masking`` / ``mask_by_order``)."""
    mask = torch.zeros(order.shape, device=order.device)
    return mask.scatter(1, order[:, :n_masked], 1.0)


def token_losses(model, imgs, labels, draws: MARDraws, return_aux: bool = False) -> dict:
    """The official ``forward``'s loss with its draws given: per sample, the mean head loss
    over its masked tokens and token copies (``loss``, ``mse``, ``vb`` [B]). Labels equal to
    ``num_classes`` take the fake latent (label dropout, drawn by the caller).

    For distillation also the head's ``output``, ``xt`` and step ``t`` of the masked token
    copies (the rows the loss averages) and ``teacher_call(teacher, features)``: the teacher's
    head output on the same rows (same mask, steps and noise; its own conditions), with its
    block outputs when ``features``; ``return_aux``: every block's output (``aux.features``,
    encoder then decoder)."""
    x = patchify(imgs, model.config.patch_size)
    B, L, C = x.shape
    if not bool((draws.ratio == draws.ratio[0]).all()):  # calibration draws: one ratio per row, grouped
        if return_aux:
            raise UsageError("distillation draws one mask ratio per batch (the encoder takes the same count per row)")
        return _by_ratio(draws, lambda idx: {k: v for k, v in token_losses(model, imgs[idx], labels[idx],
                                                                            draws[idx]).items()
                                             if k in ("loss", "mse", "vb")})
    n_masked = int(math.ceil(L * float(draws.ratio[0])))
    mask = mask_from_order(draws.order, n_masked)
    mul = draws.t.shape[1]
    rows = lambda v: v.unsqueeze(1).expand(B, mul, *v.shape[1:]).reshape(B * mul * L, *v.shape[2:])  # noqa: E731
    w = mask.unsqueeze(1).expand(B, mul, L).reshape(B, -1)
    per = lambda v: (v.view(B, -1) * w).sum(1) / w.sum(1)  # noqa: E731
    # the masked token copies (the rows the loss averages), as indices into the [B, mul, L] rows: every
    # sample's masked positions are the first n_masked of its order (no host sync to find them)
    sel = (torch.arange(B, device=x.device).view(B, 1, 1) * (mul * L)
           + torch.arange(mul, device=x.device).view(1, mul, 1) * L
           + draws.order[:, None, :n_masked].to(x.device)).reshape(-1)

    def head(net, z):  # inside the model's forward: one forward for wrappers and DDP
        res = head_losses(net, rows(x), rows(z), draws.t.reshape(-1), draws.noise.reshape(-1, C).to(z.dtype))
        out = {k: per(res[k]) for k in ("loss", "mse", "vb")}
        out.update(output=res["output"][sel], xt=res["xt"][sel], t=draws.t.reshape(-1).to(sel.device)[sel])
        return out

    if return_aux:
        with BlockOutputs(model) as feats:
            res = model(x, mask, labels, head=head)
        res["aux"] = feats
    else:
        res = model(x, mask, labels, head=head)

    xt_kd, t_kd = res["xt"], res["t"]  # locals: the closure does not hold ``res`` (no reference cycle)

    def teacher_call(teacher, features: bool):
        def thead(net, z):
            return net(xt_kd, t_kd, rows(z)[sel])

        if not features:
            return teacher(x, mask, labels, head=thead)
        with BlockOutputs(teacher) as tfeats:
            out = teacher(x, mask, labels, head=thead)
        return out, tfeats

    res["teacher_call"] = teacher_call
    return res


class BlockOutputs:
    """Within ``with``: every block's output of a model's forwards (``features``, in
    ``model.blocks`` order: encoder, then decoder), read by forward hooks."""

    def __init__(self, model):
        self.blocks = list(getattr(model, "module", model).blocks)
        self.features = []

    def __enter__(self):
        self._hooks = [b.register_forward_hook(lambda mod, a, out: self.features.append(out)) for b in self.blocks]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return False


def _by_ratio(draws: "MARDraws", fn):
    """``fn(rows)`` for each group of rows sharing a mask ratio (the encoder takes the same
    number of tokens in every row of a call), the per-row results put back in order."""
    out = None
    for r in torch.unique(draws.ratio):
        idx = (draws.ratio == r).nonzero().flatten()
        part = fn(idx)
        if out is None:
            out = {k: torch.empty(len(draws.ratio), *v.shape[1:], dtype=v.dtype, device=v.device)
                   for k, v in part.items()}
        for k, v in part.items():
            out[k][idx] = v
    return out


class MaskedARObjective:
    """``objective_for`` of a masked autoregressive model: what the trainer and the learned
    depth search call on every objective. ``draws(x, g)`` adds the batch's MAR draws (orders,
    mask ratio, head steps and noise) from the batch generator; ``training_losses`` is the
    official token loss with them (``t`` is the draws, ``batch_t`` picks them)."""

    def __init__(self, config: DiTConfig):
        self.config = config

    def draws(self, x: torch.Tensor, generator: torch.Generator, per_row: bool = False) -> dict:
        """The batch's draws; ``per_row``: a mask ratio for every row (fixed calibration sets,
        so held-out losses and block scores average over ratios, not one ratio per set)."""
        return {"draws": draw(self.config, len(x), generator, per_row=per_row)}

    @staticmethod
    def batch_t(batch: dict) -> MARDraws:
        return batch["draws"]

    def network_call(self, model, batch: dict) -> torch.Tensor:
        """The network on a batch's tokens with its draws' mask (the head's conditions ``z``),
        no loss: what block-wise scores read."""
        x = patchify(batch["x"], model.config.patch_size)
        d = batch["draws"]
        if not bool((d.ratio == d.ratio[0]).all()):
            return _by_ratio(d, lambda idx: {"z": self.network_call(model, {"x": batch["x"][idx], "y": batch["y"][idx],
                                                                             "draws": d[idx]})})["z"]
        mask = mask_from_order(d.order, int(math.ceil(x.shape[1] * float(d.ratio[0]))))
        return model(x, mask, batch["y"])

    def training_losses(self, model, x0, t, y, noise=None, return_aux: bool = False, run=None) -> dict:
        if run is not None:
            raise UsageError("a MAR's objective has no run context (routers, a full-width pass)")
        return token_losses(model, x0, y, t, return_aux=return_aux)

    # the head's process: output KD compares the head's predictions on the masked token copies
    @staticmethod
    def split_output(out, x):
        return training_process().split_output(out, x)

    @staticmethod
    def p_mean_variance(out, xt, t):
        return training_process().p_mean_variance(out, xt, t)


@torch.no_grad()
def sample_tokens(model, labels: torch.Tensor, num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear",
                  temperature: float = 1.0, generators: list | None = None, progress=None,
                  clip: bool = False) -> torch.Tensor:
    """The official masked autoregressive sampler: ``num_iter`` steps in a random order per
    sample, mask ratio cos(pi/2 (step+1)/num_iter) with at least one token per step, CFG on
    the linear (or constant) schedule, the head's respaced DDPM at ``temperature``. Sample
    i draws its order and its tokens' noise from ``generators[i]`` alone (same images on any
    batch split). ``labels`` of ``num_classes`` sample unconditionally. Returns latents
    [B, C, H, W] (token scale: the VAE latent times ``latent_scale``)."""
    check_sampling(num_iter, cfg, cfg_schedule, temperature, model.seq_len)
    B, L, C = len(labels), model.seq_len, model.token_embed_dim
    dev = model.fake_latent.device
    if generators is None:
        generators = [None] * B
    if len(generators) != B:
        raise UsageError(f"{len(generators)} generators for {B} samples")
    S = processes(model)[1].num_timesteps
    orders, noise = [], []
    for g in generators:  # one draw per sample: its order, then every token position's noise
        orders.append(torch.argsort(torch.rand(L, generator=g)))
        noise.append(torch.randn(L, S + 1, C, generator=g))
    orders = torch.stack(orders).to(dev)
    noise = torch.stack(noise).to(dev)  # [B, L, S+1, C]
    mask = torch.ones(B, L, device=dev)
    tokens = torch.zeros(B, L, C, device=dev, dtype=model.fake_latent.dtype)
    labels = labels.to(dev)
    guided = cfg != 1.0
    null = torch.full_like(labels, model.num_classes)
    cond_labels = torch.cat([labels, null]) if guided else labels
    for step, mask_len in enumerate(mask_lengths(L, num_iter)):
        tk, mk = (torch.cat([tokens, tokens]), torch.cat([mask, mask])) if guided else (tokens, mask)
        z = model.conditions(tk, mk, cond_labels)
        mask_next = mask_from_order(orders, mask_len)
        to_pred = mask.bool() if step >= num_iter - 1 else mask.bool() ^ mask_next.bool()
        mask = mask_next
        pos = to_pred.nonzero(as_tuple=True)  # every row predicts the same count of tokens
        zc = z[:B][pos]
        if guided:
            zc = torch.cat([zc, z[B:][pos]])
            cfg_iter = 1 + (cfg - 1) * (L - mask_len) / L if cfg_schedule == "linear" else cfg
        else:
            cfg_iter = 1.0
        eps = noise[pos].transpose(0, 1)  # [S+1, n, C]
        tokens = tokens.clone()
        tokens[pos] = head_sample(model, zc, eps.to(zc.dtype), temperature, cfg_iter, guided, clip).to(tokens.dtype)
        if progress is not None:
            progress()
    return model.unpatchify(tokens)


def mask_lengths(seq_len: int, num_iter: int) -> list[int]:
    """Tokens still masked after each sampling step: floor(L cos(pi/2 (step+1)/num_iter)), at
    least one and fewer than before (the last step predicts every token left)."""
    out, remaining = [], seq_len
    for step in range(num_iter):
        n = int(np.floor(seq_len * np.cos(math.pi / 2.0 * (step + 1) / num_iter)))
        remaining = max(1, min(remaining - 1, n))
        out.append(remaining)
    return out


def loop_macs(cfg: DiTConfig, num_iter: int, cfg_scale: float) -> float:
    """Multiply-accumulates of one image's sampling loop, counted from the loop's own token
    counts: each step runs the encoder on the buffer and the known tokens, the decoder on the
    buffer and every token, and the head's respaced steps on the tokens the step predicts;
    guidance doubles every row (the official code runs the conditional and the null batch)."""
    m, L = cfg.mar, cfg.num_patches
    D, Dd = cfg.hidden_size, m.decoder_hidden_size or cfg.hidden_size
    enc, dec = cfg.stack_split
    tok = cfg.in_channels * cfg.patch_size ** 2
    head_token_step = mar_static_macs(cfg)["head_per_step"] / L
    head_steps = len(cosine_diffusion(m.num_sampling_steps).timestep_map)

    def block(width, T):
        return T * (4 + 2 * cfg.mlp_ratio) * width * width + 2 * T * T * width

    total, remaining = 0.0, L
    for step, left in enumerate(mask_lengths(L, num_iter)):
        known = L - remaining
        total += L * tok * D + enc * block(D, m.buffer_size + known)  # z_proj on every token, as the official
        total += (m.buffer_size + known) * D * Dd + dec * block(Dd, m.buffer_size + L)
        total += (remaining if step == num_iter - 1 else remaining - left) * head_steps * head_token_step
        remaining = left
    return total * (2 if cfg_scale != 1.0 else 1)


class MaskedARLoop:
    """What ``ditc bench`` times for a masked autoregressive model: ``sample_mar`` at
    ``num_iter`` steps (each running the head's respaced DDPM on its tokens), and the loop's
    MACs (``loop_macs``)."""

    name = "mar"
    default_steps = 64  # the official evaluation's num_iter (a model of fewer tokens: one step per token)

    def __init__(self, model):
        self.model = model

    @classmethod
    def resolve(cls, config: DiTConfig, sampler: str | None, steps: int | None) -> tuple[str, int]:
        """(sampler name, num_iter) for a MAR: its own loop only, ``num_iter`` in 1..tokens."""
        if sampler not in (None, cls.name):
            raise UsageError(f"a MAR samples by its masked autoregressive loop (sampler {cls.name}, `steps` = num_iter); "
                             f"{sampler!r} is a diffusion sampler")
        n = min(cls.default_steps, config.num_patches) if steps is None else steps  # at most one step per token
        checks.integer("num_iter (`steps`)", n, lo=1, hi=config.num_patches)
        return cls.name, n

    def steps(self, steps: int | None) -> int:
        return self.resolve(self.model.config, None, steps)[1]

    def sample_batch(self, labels, generator: torch.Generator, steps: int, cfg_scale: float) -> torch.Tensor:
        """One eval batch: each sample's generator seeded from the shard's ``generator`` in turn
        (the same images on any device and process split)."""
        labels = torch.as_tensor(np.asarray(labels)).long()
        seeds = torch.randint(0, 2**62, (len(labels),), generator=generator).tolist()
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return sample_mar(self.model, labels, num_iter=steps, cfg_scale=cfg_scale, generators=gens)

    def describe(self, steps: int) -> str:
        return f"masked-AR {steps} steps x head DDPM {processes(self.model)[1].num_timesteps}"

    def macs_per_image(self, steps: int, cfg_scale: float) -> float:
        return loop_macs(self.model.config, steps, cfg_scale)

    def run(self, n: int, steps: int, cfg_scale: float, seed: int = 0) -> torch.Tensor:
        labels = torch.arange(n) % self.model.num_classes
        return sample_mar(self.model, labels, num_iter=steps, cfg_scale=cfg_scale, seed=seed)


def check_sampling(num_iter, cfg, cfg_schedule, temperature, seq_len: int) -> None:
    """MAR's sampling options, in range, in one line each."""
    checks.integer("num_iter", num_iter, lo=1, hi=seq_len)
    checks.real("cfg_scale", cfg, lo=0.0)
    checks.choice("cfg_schedule", cfg_schedule, ("linear", "constant"))
    checks.real("temperature", temperature, lo=0.0, lo_open=True, hi=100.0)


def sample_generators(seed: int, first_index: int, n: int, device="cpu") -> list:
    """One generator per sample, seeded by (seed, the sample's index): sample i draws the same
    order and noise whichever batch or process it falls in."""
    seed, first_index = checks.integer("seed", seed, lo=0, hi=2**63 - 1), checks.integer("first_index", first_index, lo=0)
    states = [np.random.SeedSequence([seed, first_index + i]).generate_state(2, np.uint32) for i in range(n)]
    return [torch.Generator(device).manual_seed(int(s[0]) << 32 | int(s[1])) for s in states]


def sample_mar(model, labels, *, num_iter: int | None = None, cfg_scale: float = 1.0, cfg_schedule: str = "linear",
               temperature: float = 1.0, seed: int = 0, first_index: int = 0, generators: list | None = None,
               progress=None, clip_denoised: bool | None = None) -> torch.Tensor:
    """Sample a MAR (``ditc`` loads it from main_mar.py's checkpoint-last.pth): ``labels`` [B]
    class indices (``num_classes``: unconditional), ``num_iter`` autoregressive steps (default 64,
    the official fast setting, at most one per token), guidance
    ``cfg_scale`` on the ``linear`` (or ``constant``) schedule, head ``temperature``; sample i
    draws from a generator seeded by (``seed``, ``first_index + i``) unless ``generators`` are
    given. ``clip_denoised``: clamp the head's predicted token to [-1, 1] at every step; default
    for a pixel-space MAR only (its data range), never for latents (the official
    ``clip_denoised=False``). Returns the token latents [B, C, H, W] (VAE latent times
    ``config.latent_scale``; pixels in [-1, 1] for a pixel model)."""
    inner = getattr(model, "module", model)
    if not hasattr(inner, "conditions") or not hasattr(inner, "diffloss") or not hasattr(inner, "config"):
        raise UsageError("sample_mar samples MAR models; DiT, SiT and PixArt models sample with dit_compress.sample")
    if not torch.is_tensor(labels):
        try:
            labels = torch.as_tensor(np.asarray(labels))
        except (TypeError, ValueError, OverflowError):
            raise UsageError(f"`labels` must be class indices, got {str(labels)[:60]!r}") from None
    if labels.numel() == 0:
        raise UsageError("`labels` is empty: give one class index per sample")
    if num_iter is None:
        num_iter = min(MaskedARLoop.default_steps, inner.seq_len)
    if generators is not None and not all(isinstance(g, torch.Generator) for g in generators):
        raise UsageError("`generators` must be torch.Generator objects, one per sample")
    if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise UsageError(f"`labels` must be one class index per sample, got {labels.dtype} of shape {list(labels.shape)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > inner.num_classes):
        raise UsageError(f"`labels` hold classes outside 0..{inner.num_classes} ({inner.num_classes}: unconditional)")
    if generators is None:
        generators = sample_generators(seed, first_index, len(labels))
    clip = inner.config.latent_scale is None if clip_denoised is None else bool(clip_denoised)
    was = inner.training
    inner.eval()
    try:
        return sample_tokens(inner, labels.long(), num_iter=num_iter, cfg=cfg_scale, cfg_schedule=cfg_schedule,
                             temperature=temperature, generators=generators, progress=progress, clip=clip)
    finally:
        inner.train(was)
