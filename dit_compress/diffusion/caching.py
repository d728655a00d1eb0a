"""Feature caching over a sampling run: consecutive steps compute nearly the same block
outputs, so some steps reuse (or forecast) what an earlier step computed instead of running
the blocks. One policy per method, for every model ditc loads or writes (dense, depth-pruned,
dynamic; DiT, SiT, PixArt): each reaches the blocks through the model's block hook, called
with the block index, its input, the block's own computation and the call's run context
(step and branch), so no model has a special case.

What is cached is each block's residual (its output minus its input): a cached step adds the
stored residual to the block's *current* input, so the step's own x_t still flows through the
embedding and every block (reusing whole block outputs would return the last full step's
output whatever the input). Policies, by spec:

- ``fora:N`` (FORA): every block computed on steps 0, N, 2N, ... and its residual reused on
  the N-1 steps between (FORA reuses attention and MLP outputs, the two residual branches
  of a block; here the block's residual as one).
- ``fbcache:T`` (first-block cache, cache-dit's FBCache/DBCache): block 0 always runs; when its
  residual changed by less than T (relative L1) since the last step that ran every block, the
  other blocks reuse their residual sum from that step. The decision reads one number back to
  the host per step (a data-dependent choice, as in cache-dit).
- learned (Learning-to-Cache): a per-step, per-block schedule learned with the model frozen
  (train/cache.py, ``ditc learn-cache``), kept in the model's config and followed whenever the
  model samples with the sampler and steps it was learned for.
- ``taylorseer:N,O`` (TaylorSeer; ``taylorseer:N:O`` in comma lists): every block computed on every N-th step; between, each block's
  residual is forecast by a Taylor series of order O whose derivatives are finite differences
  of the last O+1 computed residuals.

Caches are kept per branch (the conditional rows, or the guided pair of classifier-free
guidance), and a policy that never skips (``fora:1``, ``fbcache:0``, ``taylorseer:1,O``) gives
the uncached sampler's output exactly. ``stats()`` counts the blocks that ran and were skipped.
"""

from __future__ import annotations

import contextlib
import math
import re

import torch

from ..errors import UsageError

POLICIES = ("fora", "fbcache", "taylorseer")
SPEC_HELP = "fora:N (N >= 1), fbcache:T (T >= 0), taylorseer:N,O or taylorseer:N:O (N >= 1, O in 0..4), or none"


class BlockCache:
    """The shared bookkeeping: per-branch state, counts of blocks run and skipped, and which
    blocks ran in the last call (for the FLOPs meter)."""

    spec = "none"

    def __init__(self):
        self.state: dict = {}
        self.computed = 0
        self.skipped = 0
        self.ran_last: list[int] = []
        self._call = None

    def reset(self) -> None:
        self.state.clear()
        self.computed = self.skipped = 0

    def _begin(self, i: int, run):
        key = (run.step, run.branch)
        if i == 0 or self._call != key:
            self._call = key
            self.ran_last = []
        return self.state.setdefault(run.branch, {})

    def __call__(self, i: int, h: torch.Tensor, compute, run, depth: int) -> torch.Tensor:
        if run is None or run.step is None:  # a call outside a sampling run: nothing to reuse
            return compute(h)
        st = self._begin(i, run)
        out = self.block(i, h, compute, run.step, st, depth)
        return out

    def run_block(self, i: int, h, compute):
        self.computed += 1
        self.ran_last.append(i)
        return compute(h)

    def skip(self) -> None:
        self.skipped += 1

    def stats(self) -> dict:
        total = self.computed + self.skipped
        return {"policy": self.spec, "blocks_computed": self.computed, "blocks_skipped": self.skipped,
                "skip_rate": self.skipped / total if total else 0.0}


class Fora(BlockCache):
    def __init__(self, n: int):
        super().__init__()
        self.n, self.spec = n, f"fora:{n}"

    def block(self, i, h, compute, step, st, depth):
        res = st.setdefault("res", {})
        if step % self.n == 0 or i not in res:
            out = self.run_block(i, h, compute)
            res[i] = out - h
            return out
        self.skip()
        return h + res[i]


class FirstBlockCache(BlockCache):
    def __init__(self, threshold: float):
        super().__init__()
        self.threshold, self.spec = threshold, f"fbcache:{threshold:g}"

    def block(self, i, h, compute, step, st, depth):
        if i == 0:
            out = self.run_block(i, h, compute)
            r0 = out - h
            prev, rest = st.get("r0"), st.get("rest")
            change = None
            if prev is not None and rest is not None and depth > 1:
                change = float((r0 - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))  # one host read a step
            st["reuse"] = change is not None and change < self.threshold
            if not st["reuse"]:
                st["r0"] = r0
            return out
        if st.get("reuse"):
            self.skip()
            return h + st["rest"] if i == 1 else h
        if i == 1:
            st["start"] = h
        out = self.run_block(i, h, compute)
        if i == depth - 1:
            st["rest"] = out - st.pop("start", h)
        return out


class TaylorSeer(BlockCache):
    def __init__(self, n: int, order: int):
        super().__init__()
        self.n, self.order, self.spec = n, order, f"taylorseer:{n},{order}"

    def block(self, i, h, compute, step, st, depth):
        derivs = st.setdefault("derivs", {})  # block -> [r, dr, d2r, ...] at the last computed step
        last = st.setdefault("last", {})
        if step % self.n == 0 or i not in derivs:
            out = self.run_block(i, h, compute)
            r, old = out - h, derivs.get(i)
            gap = step - last[i] if i in last else None
            new = [r]
            if old is not None and gap:
                for m in range(min(self.order, len(old))):
                    new.append((new[m] - old[m]) / gap)
            derivs[i], last[i] = new, step
            return out
        self.skip()
        k = step - last[i]
        forecast = derivs[i][0]
        for m in range(1, len(derivs[i])):
            forecast = forecast + derivs[i][m] * (k ** m / math.factorial(m))
        return h + forecast


class LearnedCache(BlockCache):
    """Learning-to-Cache: a schedule learned with the model frozen (``ditc learn-cache``) says,
    per step and block, whether the block reuses its residual of the step before."""

    def __init__(self, schedule: list[list[bool]], spec: str = "learned"):
        super().__init__()
        self.schedule, self.spec = schedule, spec

    def block(self, i, h, compute, step, st, depth):
        res = st.setdefault("res", {})
        if step < len(self.schedule) and self.schedule[step][i] and i in res:
            self.skip()
            return h + res[i]
        out = self.run_block(i, h, compute)
        res[i] = out - h
        return out


def learned_policy(schedule: dict, sampler: str, steps: int, spacing) -> LearnedCache:
    """The learned schedule of a model, for a run of ``sampler``/``steps``/``spacing``: the run it
    was learned for, or a one-line refusal (its steps mean nothing for another run)."""
    want = (schedule["sampler"], schedule["steps"], schedule["spacing"])
    if (sampler, steps, spacing) != want:
        sp = lambda v: f" ({v} spacing)" if v is not None else ""  # noqa: E731 - flow samplers have none
        raise UsageError(f"this model's learned cache schedule is for {want[0]} {want[1]} steps{sp(want[2])}, "
                         f"not {sampler} {steps}{sp(spacing)}: sample with those, or run it uncached "
                         "(`feature_cache` none)")
    return LearnedCache(schedule["skip"], f"learned ({want[0]} {want[1]})")


def run_policy(config, feature_cache, sampler: str, steps: int, spacing) -> BlockCache | None:
    """The policy a sampling run follows: ``feature_cache`` when given (``none``: uncached), else the
    model's learned schedule, which holds for its own sampler and steps only (another is refused)."""
    policy = parse_policy(feature_cache)
    schedule = getattr(config, "cache_schedule", None)
    if feature_cache is None and schedule is not None:
        policy = learned_policy(schedule, sampler, steps, spacing)
    return policy


def parse_policy(spec) -> BlockCache | None:
    """A policy from its spec (None for ``none`` or None); anything else is one line."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none", "off")):
        return None
    if isinstance(spec, BlockCache):
        return spec
    if not isinstance(spec, str):
        raise UsageError(f"unknown feature cache policy {spec!r}; use {SPEC_HELP}"[:240])
    m = re.fullmatch(r"\s*([a-z]+)\s*(?::\s*([^\s]*))?\s*", spec.lower())
    name, arg = (m.group(1), m.group(2)) if m else (None, None)
    try:
        if name == "fora" and arg and re.fullmatch(r"\d+", arg) and int(arg) >= 1:
            return Fora(int(arg))
        if name == "fbcache" and arg:
            t = float(arg)
            if math.isfinite(t) and t >= 0:
                return FirstBlockCache(t)
        if name == "taylorseer" and arg and re.fullmatch(r"\d+[,:]\d+", arg):
            n, o = (int(v) for v in re.split(r"[,:]", arg))
            if n >= 1 and 0 <= o <= 4:
                return TaylorSeer(n, o)
    except ValueError:
        pass
    raise UsageError(f"unknown feature cache policy {spec!r}; use {SPEC_HELP}"[:240])


@contextlib.contextmanager
def feature_cache(model, policy):
    """``with feature_cache(model, policy): <one sampling run>``: the model's blocks go through
    ``policy`` (a ``BlockCache`` or a spec), its state fresh for the run; yields the policy
    (None when there is none)."""
    policy = parse_policy(policy)
    inner = getattr(model, "module", model)
    if policy is None:
        yield None
        return
    policy.reset()
    previous = inner.__dict__.get("_block_hook")
    inner.__dict__["_block_hook"] = policy
    try:
        yield policy
    finally:
        inner.__dict__["_block_hook"] = previous
