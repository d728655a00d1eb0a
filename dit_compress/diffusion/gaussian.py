"""DiT's Gaussian diffusion: linear betas, eps prediction, learned-range variance,
the hybrid loss (eps MSE + VLB in bits with the eps term detached), respacing."""

from __future__ import annotations

import math

import numpy as np
import torch


def linear_betas(steps: int = 1000, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    scale = 1000 / steps
    return np.linspace(scale * start, scale * end, steps, dtype=np.float64)


def cosine_betas(steps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    """ADM's cosine schedule (Nichol & Dhariwal 2021): alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2,
    beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta)."""
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - abar((i + 1) / steps) / abar(i / steps), max_beta) for i in range(steps)], dtype=np.float64)


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}
SPACINGS = ("linspace", "leading", "trailing")


def space_timesteps(num_timesteps: int, spec: str | int) -> list[int]:
    """The reference respacing (ADM/DiT ``space_timesteps``): ``"250"`` keeps 250 steps
    evenly spaced over [0, T-1] with both ends (cumulative float stride, rounded), ``"ddim50"``
    a fixed integer stride from 0."""
    spec = str(spec)
    if spec.startswith("ddim"):
        want = int(spec[4:])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == want:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take exactly {want} steps with an integer stride")
    count = int(spec)
    if count < 1 or count > num_timesteps:
        raise ValueError(f"cannot respace {num_timesteps} steps into {count}")
    stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    cur, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "linspace") -> list[int]:
    """The kept original steps (ascending), with diffusers' ``timestep_spacing`` names:
    ``linspace`` = the reference DiT respacing ``create_diffusion(str(N))`` (0, 111, ..., 999 for
    N = 10); ``leading`` = stride T // N from 0 (0, 100, ..., 900; ADM's ``ddimN`` when N divides T);
    ``trailing`` = from T-1 down by T / N (99, 199, ..., 999)."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose {', '.join(SPACINGS)}")
    if steps < 1 or steps > num_timesteps:
        raise ValueError(f"cannot respace {num_timesteps} steps into {steps}")
    if spacing == "linspace":
        return space_timesteps(num_timesteps, str(steps))
    if spacing == "leading":
        return [i * (num_timesteps // steps) for i in range(steps)]
    return sorted(int(v) - 1 for v in np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under a Gaussian."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """A (possibly respaced) diffusion process. ``timestep_map[i]`` is the original step
    that the model sees for step ``i`` of this process."""

    def __init__(self, betas: np.ndarray, timestep_map: list[int] | None = None, learn_sigma: bool = True):
        self.betas = betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.timestep_map = list(timestep_map) if timestep_map is not None else list(range(len(betas)))
        self.learn_sigma = learn_sigma
        alphas = 1.0 - betas
        self.alphas_cumprod = acp = np.cumprod(alphas)
        self.alphas_cumprod_prev = acp_prev = np.append(1.0, acp[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1)
        self.posterior_variance = pv = betas * (1.0 - acp_prev) / (1.0 - acp)
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.log(np.maximum(pv, 1e-20))
        self.posterior_mean_coef1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)
        self.log_betas = np.log(betas)
        self.log_fixed_large = np.log(np.append(pv[1], betas[1:])) if len(pv) > 1 else np.log(betas)  # no learn_sigma

    @classmethod
    def create(cls, steps: str | int | None = None, learn_sigma: bool = True, num_timesteps: int = 1000,
               spacing: str = "linspace", schedule: str = "linear"):
        """The 1000-step process, or one respaced to ``steps`` (an int with ``spacing``, or a
        reference spec string such as ``"250"`` / ``"ddim50"``); DiT's linear betas, or ADM's
        cosine schedule (MAR's head)."""
        base = SCHEDULES[schedule](num_timesteps)
        if steps is None or (str(steps) == str(num_timesteps) and spacing == "linspace"):
            return cls(base, learn_sigma=learn_sigma)
        if isinstance(steps, int):
            use = spaced_timesteps(num_timesteps, steps, spacing)
        else:
            use = space_timesteps(num_timesteps, steps)
        acp = np.cumprod(1.0 - base)
        last, new_betas = 1.0, []
        for i in use:
            new_betas.append(1 - acp[i] / last)
            last = acp[i]
        return cls(np.array(new_betas), timestep_map=use, learn_sigma=learn_sigma)

    # ------------------------------------------------------------------ helpers
    def _table(self, name: str, device) -> torch.Tensor:
        """The schedule array ``name`` as a tensor on ``device``, made once per (table, device)."""
        cache = self.__dict__.setdefault("_tables", {})
        key = (name, str(device))
        if key not in cache:
            arr = getattr(self, name)
            cache[key] = (torch.tensor(arr, dtype=torch.long, device=device) if name == "timestep_map"
                          else torch.from_numpy(np.asarray(arr)).float().to(device))
        return cache[key]

    def _take(self, name: str, t: torch.Tensor, shape) -> torch.Tensor:
        return self._table(name, t.device)[t].view(-1, *([1] * (len(shape) - 1)))

    def model_t(self, t: torch.Tensor) -> torch.Tensor:
        return self._table("timestep_map", t.device)[t]

    def step_coefficients(self, i: int) -> dict:
        """Every schedule quantity step ``i`` of sampling needs, as host numbers."""
        return {"i": i, "sqrt_recip_acp": float(self.sqrt_recip_alphas_cumprod[i]),
                "sqrt_recipm1_acp": float(self.sqrt_recipm1_alphas_cumprod[i]),
                "coef1": float(self.posterior_mean_coef1[i]), "coef2": float(self.posterior_mean_coef2[i]),
                "min_log": float(self.posterior_log_variance_clipped[i]), "max_log": float(np.log(self.betas[i])),
                "fixed_log": float(self.log_fixed_large[i]), "acp_prev": float(self.alphas_cumprod_prev[i])}

    def p_mean_variance_step(self, out, x, k: dict, clip: bool = False):
        """``p_mean_variance`` at one step whose coefficients ``k`` are host numbers (sampling)."""
        eps, v = self.split_output(out, x)
        if v is not None:
            frac = (v + 1) / 2
            log_var = frac * k["max_log"] + (1 - frac) * k["min_log"]
        else:
            log_var = torch.full_like(x, k["fixed_log"])
        x0 = k["sqrt_recip_acp"] * x - k["sqrt_recipm1_acp"] * eps
        if clip:
            x0 = x0.clamp(-1, 1)
        return k["coef1"] * x0 + k["coef2"] * x, log_var, x0, eps

    @staticmethod
    def batch_t(batch: dict) -> torch.Tensor:
        return batch["t"]

    @staticmethod
    def continuous_t(t: torch.Tensor, frac=None) -> torch.Tensor:
        return t  # integer steps are this process's own time

    def q_sample(self, x0, t, noise):
        return self._take("sqrt_alphas_cumprod", t, x0.shape) * x0 + self._take(
            "sqrt_one_minus_alphas_cumprod", t, x0.shape
        ) * noise

    def q_posterior(self, x0, xt, t):
        mean = self._take("posterior_mean_coef1", t, xt.shape) * x0 + self._take("posterior_mean_coef2", t, xt.shape) * xt
        return mean, self._take("posterior_log_variance_clipped", t, xt.shape)

    def predict_x0(self, xt, t, eps):
        return self._take("sqrt_recip_alphas_cumprod", t, xt.shape) * xt - self._take(
            "sqrt_recipm1_alphas_cumprod", t, xt.shape
        ) * eps

    def split_output(self, out, x):
        C = x.shape[1]
        if self.learn_sigma and out.shape[1] == 2 * C:
            return out[:, :C], out[:, C:]
        return out[:, :C], None

    def p_mean_variance(self, out, x, t, clip: bool = False):
        eps, v = self.split_output(out, x)
        if v is not None:
            min_log = self._take("posterior_log_variance_clipped", t, x.shape)
            max_log = self._take("log_betas", t, x.shape)
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        else:  # fixed-large variance, as DiT without learn_sigma
            log_var = self._take("log_fixed_large", t, x.shape).expand_as(x)
        x0 = self.predict_x0(x, t, eps)
        if clip:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, x, t)
        return mean, log_var, x0, eps

    # ------------------------------------------------------------------ losses
    def vb_terms_bpd(self, out, x0, xt, t):
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        mean, log_var, _, _ = self.p_mean_variance(out, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def losses_from_output(self, out, x0, xt, t, noise) -> dict:
        """Per-sample hybrid loss from a model output (lets distillation reuse one forward)."""
        eps, v = self.split_output(out, x0)
        mse = mean_flat((noise - eps) ** 2)
        if v is not None:
            vb = self.vb_terms_bpd(torch.cat([eps.detach(), v], 1), x0, xt, t)
        else:
            vb = torch.zeros_like(mse)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def training_losses(self, model, x0, t, y, noise=None, **model_kwargs) -> dict:
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        out = model(xt, self.model_t(t), y, **model_kwargs)
        if isinstance(out, tuple):
            out, aux = out
            res = self.losses_from_output(out, x0, xt, t, noise)
            res["aux"] = aux
        else:
            res = self.losses_from_output(out, x0, xt, t, noise)
        res["output"] = out
        res["xt"] = xt
        return res
