"""Learning-to-Cache (horseee/learning-to-cache): with the model frozen, learn for every step of
one sampler and every block whether that block may reuse its residual from the step before.

Each block at each step has a router logit; its gate beta = sigmoid(logit) mixes, in training,
the block's computed output with its cached one (the block's input plus the residual it had at
the previous step): out = beta * block(h) + (1 - beta) * (h + residual_prev). A training draw
takes a batch of data, a sampler step n >= 1 and its previous step n - 1 (their network time
inputs), noises the batch to both times with one noise (the DDIM trajectory of a perfect x0
prediction), runs the full model at the previous time to fill the cache, and trains the gates of
step n toward the full model's output at its time, under an L1 pull of the gates toward 0 (cache
as much as the output allows). The schedule is the gates below ``threshold``: those blocks reuse
at that step. Step 0 never reuses (nothing is cached yet). Eps-prediction models (DDPM / DDIM).
"""

from __future__ import annotations

import copy

import torch

from ..data.batches import draw_examples
from ..diffusion import objective_for
from ..diffusion.gaussian import GaussianDiffusion
from ..errors import UsageError
from ..model.run import RunContext
from ..progress import make_progress

SAMPLERS = ("ddpm", "ddim")


class _Capture:
    """A block hook that runs every block and keeps its residual."""

    def __init__(self):
        self.res: dict = {}

    def __call__(self, i, h, compute, run, depth):
        out = compute(h)
        self.res[i] = (out - h).detach()
        return out


class _Mix:
    """A block hook mixing each block's computed output with its cached one by the step's gates."""

    def __init__(self, gates: torch.Tensor, res: dict):
        self.gates, self.res = gates, res

    def __call__(self, i, h, compute, run, depth):
        out = compute(h)
        g = self.gates[i]
        return g * out + (1 - g) * (h + self.res[i])


def _hooked(model, hook):
    class _Ctx:
        def __enter__(self):
            self.prev = model.__dict__.get("_block_hook")
            model.__dict__["_block_hook"] = hook

        def __exit__(self, *exc):
            model.__dict__["_block_hook"] = self.prev

    return _Ctx()


def learn_cache(model, data, sampler: str = "ddim", steps: int = 50, spacing: str = "linspace", iters: int = 300,
                batch_size: int = 16, lr: float = 0.1, sparsity: float = 0.01, threshold: float = 0.5, seed: int = 0,
                init: float = 2.0) -> tuple[object, dict]:
    """(a copy of ``model`` whose config holds the learned schedule, a report): the gates' training
    history, the schedule and its skip rate. ``sparsity``: the weight of the gates' mean in the
    loss (more caches more); ``threshold``: gates below it reuse."""
    if model.config.prediction != "eps":
        raise UsageError("learned caching is implemented for eps-prediction models (DDPM / DDIM samplers)")
    if sampler not in SAMPLERS:
        raise UsageError(f"learned caching learns a schedule for {', '.join(SAMPLERS)}, not {sampler!r}")
    diff = GaussianDiffusion.create(int(steps), learn_sigma=model.config.learn_sigma, spacing=spacing)
    times = [diff.timestep_map[i] for i in reversed(range(diff.num_timesteps))]  # the network's t at step n
    full = objective_for(model.config)  # the 1000-step process: q_sample at any t
    depth = model.config.depth
    net = copy.deepcopy(model).eval().requires_grad_(False)
    dev = next(net.parameters()).device
    logits = torch.full((len(times), depth), float(init), device=dev, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    g = torch.Generator().manual_seed(seed)
    history = []
    with make_progress("learning the cache schedule", iters) as bar:
        for it in range(iters):
            x0, y = draw_examples(data, batch_size, g)
            n = int(torch.randint(1, len(times), (1,), generator=g))
            noise = torch.randn(x0.shape, generator=g)
            x0, noise = x0.to(dev), noise.to(dev)
            y = y.to(dev) if torch.is_tensor(y) else y.to(dev)
            tp = torch.full((batch_size,), times[n - 1], device=dev, dtype=torch.long)
            tc = torch.full((batch_size,), times[n], device=dev, dtype=torch.long)
            xp, xc = full.q_sample(x0, tp, noise), full.q_sample(x0, tc, noise)
            cap = _Capture()
            with torch.no_grad():
                with _hooked(net, cap):
                    net(xp, tp, y, run=RunContext(step=n - 1))
                target = net(xc, tc, y)
            gates = torch.sigmoid(logits[n])
            with _hooked(net, _Mix(gates, cap.res)):
                out = net(xc, tc, y, run=RunContext(step=n))
            fit = ((out - target) ** 2).mean()
            loss = fit + sparsity * gates.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({"iter": it, "fit": float(fit.detach()), "gate_mean": float(gates.detach().mean())})
            bar.advance(1)
    with torch.no_grad():
        skip = (torch.sigmoid(logits) < threshold).tolist()
    skip[0] = [False] * depth
    schedule = {"sampler": sampler, "steps": int(steps), "spacing": spacing, "skip": skip}
    out = copy.deepcopy(model)
    out.config = model.config.copy(cache_schedule=schedule).with_step(
        "learn-cache", sampler=sampler, steps=int(steps), spacing=spacing, iters=iters, batch_size=batch_size, lr=lr,
        sparsity=sparsity, threshold=threshold, seed=seed)
    rate = sum(map(sum, skip)) / (len(skip) * depth)
    report = {"op": "learn-cache", "sampler": sampler, "steps": int(steps), "spacing": spacing, "skip_rate": rate,
              "blocks_reused_per_step": [sum(r) for r in skip], "history": history}
    return out, report
