"""Learning-to-Cache (horseee/learning-to-cache): with the model frozen, learn for steps of one
sampler and every block whether that block may reuse its residual from the step before.

Each block at each cacheable step has a router logit; its gate beta = sigmoid(logit) mixes, in
training, the block's computed output with its cached one (the block's input plus the residual it
had at the previous step): out = beta * block(h) + (1 - beta) * (h + residual_prev). A training
draw takes a batch of data and a cacheable step n; it noises the batch to step n - 1's time, runs
the full model there (filling the cache) and takes the sampler's own deterministic step with that
output (DDIM eta 0 for the eps samplers, an Euler step for the flow samplers: Learning-to-Cache's
``router_training_losses``), then trains step n's gates toward the full model's output at the
point it reached, under an L1 pull of the gates toward 0 (cache as much as the output allows).
The schedule is the gates at or below ``threshold``: those blocks reuse at that step.

Which steps may reuse (Learning-to-Cache's layout): every other network call, counting back from
the last, so every cacheable step follows a fully computed one and a reused residual is never more
than one step old; ``every_step=True`` lets every call after the first reuse (a cached residual
can then be several steps old). Step 0 never reuses (nothing is cached yet). Departures from the
paper, named in docs/paper-defaults.md: one gate per block (the paper: one each for attention
and MLP), logits start at ``init`` (the paper: randn), labels are not dropped to the null class
(the reference drops 10%), one Adam state for all gates, and the budget (the reference: AdamW at
lr 1e-3, batch 64, thousands of steps on ImageNet; the L1 weight is on the gates' mean, the
reference's on their sum).

Eps-prediction models learn it for DDPM / DDIM (Learning-to-Cache's own setting, trained on the
DDIM step for both); flow models (SiT, velocity prediction) for the Euler ODE and the SDE sampler,
whose steps each call the network once (trained on the Euler step for both). The schedule keeps one
row per point of the sampler's grid, as many as its steps; the Euler grid's last point (t = 1, the
data) is never evaluated, so its row reuses nothing. Heun (two calls per step) and dopri5
(adaptive) have no fixed step to learn for and are refused.
"""

from __future__ import annotations

import copy

import torch

from ..data.batches import draw_examples
from ..diffusion import objective_for
from ..diffusion.flow import FlowMatching
from ..diffusion.gaussian import GaussianDiffusion
from ..diffusion.sampling import flow_times, resolve_spacing
from ..errors import UsageError
from ..model.run import RunContext
from ..progress import make_progress

EPS_SAMPLERS = ("ddpm", "ddim")
FLOW_SAMPLERS = ("euler", "sde")
SAMPLERS = EPS_SAMPLERS + FLOW_SAMPLERS


def default_sampler(config) -> str:
    """The sampler a schedule is learned for when none is named: DDIM, or Euler for a flow model."""
    return "euler" if config.prediction == "velocity" else "ddim"


class _Times:
    """The sampler's steps as training pairs: for step n, the batch noised to its time (``noised``)
    and the network's time input (``net_t``), on one noise."""

    def __init__(self, config, sampler: str, steps: int, spacing):
        if config.prediction == "velocity":
            if sampler not in FLOW_SAMPLERS:
                raise UsageError(f"learned caching on a flow model learns a schedule for the {' or '.join(FLOW_SAMPLERS)} "
                                 f"sampler, not {sampler!r} (heun calls twice a step, dopri5 has no fixed steps)")
            self.flow = FlowMatching(config.time_input)
            self.channels = config.in_channels
            grid = flow_times(sampler, steps)
            self.calls = grid if sampler == "sde" else grid[:-1]  # the Euler endpoint is never evaluated
        elif config.prediction == "eps":
            if sampler not in EPS_SAMPLERS:
                raise UsageError(f"learned caching on an eps-prediction model learns a schedule for the "
                                 f"{' or '.join(EPS_SAMPLERS)} sampler, not {sampler!r}")
            self.flow = None
            diff = GaussianDiffusion.create(int(steps), learn_sigma=config.learn_sigma, spacing=spacing)
            self.calls = [diff.timestep_map[i] for i in reversed(range(diff.num_timesteps))]  # the network's t at step n
            self.full = objective_for(config)  # the 1000-step process: q_sample at any t
        else:
            raise UsageError(f"learned caching needs an eps or velocity model, not prediction {config.prediction!r}")

    def __len__(self):
        return len(self.calls)

    def advance(self, n: int, x, out):
        """The sampler's deterministic step from call ``n`` to call ``n + 1`` with the full model's
        output ``out`` at ``x``: DDIM (eta 0) for the eps samplers, Euler for the flow samplers."""
        C = x.shape[1]
        pred = out[:, :C]
        if self.flow is not None:
            return x + (float(self.calls[n + 1]) - float(self.calls[n])) * pred
        a0, a1 = (float(self.full.alphas_cumprod[self.calls[k]]) for k in (n, n + 1))
        x0 = (x - (1.0 - a0) ** 0.5 * pred) / a0 ** 0.5
        return a1 ** 0.5 * x0 + (1.0 - a1) ** 0.5 * pred

    def used(self, out):
        """The output channels the sampler reads (a flow sampler ignores a SiT's sigma channels)."""
        return out if self.flow is None else out[:, : self.channels]

    def at(self, n: int, x0, noise):
        """(x at step n's time, the network's time input), one per row of the batch."""
        b, dev = x0.shape[0], x0.device
        if self.flow is None:
            t = torch.full((b,), self.calls[n], device=dev, dtype=torch.long)
            return self.full.q_sample(x0, t, noise), t
        s = torch.full((b,), float(self.calls[n]), device=dev, dtype=torch.float32)
        return self.flow.q_sample(x0, s, noise), self.flow.model_t(s).to(x0.dtype)


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


def cacheable_steps(calls: int, every_step: bool = False) -> list[int]:
    """The network calls (0-based, in sampling order) whose blocks may reuse: every other call
    counting back from the last (Learning-to-Cache: the routers of the even indices of the
    respaced steps, each reusing what the odd step before it computed), or with ``every_step``
    every call after the first."""
    if every_step:
        return list(range(1, calls))
    return [n for n in range(1, calls) if (calls - 1 - n) % 2 == 0]


def _hooked(model, hook):
    class _Ctx:
        def __enter__(self):
            self.prev = model.__dict__.get("_block_hook")
            model.__dict__["_block_hook"] = hook

        def __exit__(self, *exc):
            model.__dict__["_block_hook"] = self.prev

    return _Ctx()


def learn_cache(model, data, sampler: str | None = None, steps: int = 50, spacing: str | None = None, iters: int = 300,
                batch_size: int = 16, lr: float = 0.1, sparsity: float = 0.01, threshold: float = 0.1, seed: int = 0,
                init: float = 2.0, every_step: bool = False) -> tuple[object, dict]:
    """(a copy of ``model`` whose config holds the learned schedule, a report): the gates' training
    history, the schedule and its skip rate. ``sparsity``: the weight of the gates' mean in the
    loss (more caches more); ``threshold``: gates at or below it reuse (Learning-to-Cache's 0.1);
    ``every_step``: every step after the first may reuse, not every other one. ``sampler``: DDIM / DDPM for
    eps models, Euler / SDE for flow models (default: DDIM, or Euler for a flow model)."""
    sampler = default_sampler(model.config) if sampler is None else sampler
    spacing = resolve_spacing(sampler, spacing)  # DDPM / DDIM: linspace unless given; flow samplers: none
    times = _Times(model.config, sampler, int(steps), spacing)
    if len(times) < 2:
        raise UsageError(f"learned caching needs two network calls or more to reuse across: {sampler} with {steps} "
                         f"steps calls the network {len(times)} time(s); raise `steps`")
    depth = model.config.depth
    rows = cacheable_steps(len(times), every_step)
    net = copy.deepcopy(model).eval().requires_grad_(False)
    dev = next(net.parameters()).device
    logits = torch.full((len(times), depth), float(init), device=dev, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    g = torch.Generator().manual_seed(seed)
    history = []
    with make_progress("learning the cache schedule", iters) as bar:
        for it in range(iters):
            x0, y = draw_examples(data, batch_size, g)
            n = rows[int(torch.randint(0, len(rows), (1,), generator=g))]
            noise = torch.randn(x0.shape, generator=g)
            x0, noise = x0.to(dev), noise.to(dev)
            y = y.to(dev) if torch.is_tensor(y) else y.to(dev)
            xp, tp = times.at(n - 1, x0, noise)
            tc = times.at(n, x0, noise)[1]
            cap = _Capture()
            with torch.no_grad():
                with _hooked(net, cap):
                    prev = net(xp, tp, y, run=RunContext(step=n - 1))
                xc = times.advance(n - 1, xp, prev)  # where the sampler goes from there
                target = net(xc, tc, y)
            gates = torch.sigmoid(logits[n])
            with _hooked(net, _Mix(gates, cap.res)):
                out = net(xc, tc, y, run=RunContext(step=n))
            fit = ((times.used(out) - times.used(target)) ** 2).mean()
            loss = fit + sparsity * gates.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({"iter": it, "fit": float(fit.detach()), "gate_mean": float(gates.detach().mean())})
            bar.advance(1)
    with torch.no_grad():
        gates = torch.sigmoid(logits)
        skip = (gates <= threshold).tolist()
    allowed = set(rows)
    skip = [row if n in allowed else [False] * depth for n, row in enumerate(skip)]
    skip += [[False] * depth for _ in range(int(steps) - len(skip))]  # the Euler endpoint: never evaluated
    schedule = {"sampler": sampler, "steps": int(steps), "spacing": spacing, "skip": skip}
    out = copy.deepcopy(model)
    out.config = model.config.copy(cache_schedule=schedule).with_step(
        "learn-cache", sampler=sampler, steps=int(steps), spacing=spacing, iters=iters, batch_size=batch_size, lr=lr,
        sparsity=sparsity, threshold=threshold, seed=seed, every_step=bool(every_step))
    rate = sum(map(sum, skip[:len(times)])) / (len(times) * depth)  # over the steps that call the network
    report = {"op": "learn-cache", "sampler": sampler, "steps": int(steps), "spacing": spacing, "skip_rate": rate,
              "network_calls": len(times), "cacheable_steps": rows, "blocks_reused_per_step": [sum(r) for r in skip],
              "gates": [[round(float(v), 6) for v in row] for row in gates.tolist()], "history": history}
    return out, report
