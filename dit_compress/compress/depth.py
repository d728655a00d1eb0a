"""Depth pruning: TinyFusion's learned N:M layer selection and the baselines.

All methods end in ``prune_layers(model, keep)``: a smaller standard DiT holding the kept
blocks with bit-identical weights, and ``config.kept_layers`` naming their source indices.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import random
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from ..data.batches import (
    CalibSet,
    calibration_set,
    draw_examples,
    condition_dropout_batch_fn,
)
from ..data.datasets import check_fits
from ..diffusion import objective_for
from ..diffusion.calibration import calib_device, calibration_losses
from ..errors import TrainingError, UsageError
from ..model.build import build_model
from ..model.family import block_prefixes, family_of, require, stack_of_source
from ..report import plot_lines
from ..train.losses import plain_loss
from ..train.trainer import TrainConfig, Trainer

METHODS = ("learned", "block-influence", "uniform", "oracle", "random", "min-loss")
RECOVERIES = ("lora", "full", "frozen")


# ---------------------------------------------------------------------------- patterns
def parse_groups(depth: int, pattern: str | None = None, groups: str | None = None,
                 stacks: list[int] | None = None) -> list[tuple[int, int]]:
    """``--pattern N:M`` repeated over the depth, or an explicit ``--groups 2:4,2:4,3:4``. With
    several block ``stacks`` (MAR's encoder and decoder: their block counts), a pattern repeats
    within each stack and explicit groups must tile each stack: no group straddles two."""
    stacks = [depth] if not stacks else list(stacks)
    if sum(stacks) != depth:
        raise UsageError(f"stacks {stacks} do not add up to the depth {depth}")
    if pattern and groups:
        raise UsageError("give either `pattern` or `groups`, not both")
    text = groups if groups else pattern
    if text is not None and not isinstance(text, str):
        raise UsageError(f"`{'groups' if groups else 'pattern'}` must be text such as 1:2, got {text!r}")
    if not text:
        raise UsageError("a pattern is needed: `pattern` N:M or `groups` N:M,N:M,...")
    out = []
    for part in text.split(","):
        try:
            n, m = (int(v) for v in part.strip().split(":"))
        except ValueError:
            raise UsageError(f"bad pattern {part.strip()!r}: expected N:M with integers, e.g. 1:2") from None
        if m < 1 or n < 1:
            raise UsageError(f"bad pattern {n}:{m}: N and M must be at least 1")
        if n >= m:
            raise UsageError(f"bad pattern {n}:{m}: N must be smaller than M (keep N of every M layers)")
        out.append((n, m))
    if groups:
        total = sum(m for _, m in out)
        if total != depth:
            raise UsageError(f"`groups` cover {total} layers but the model has {depth}")
        bounds = set(itertools.accumulate(stacks))
        ends = set(itertools.accumulate(m for _, m in out))
        if not bounds <= ends:
            raise UsageError(f"`groups` must tile each block stack {stacks} (encoder, decoder): a group may not "
                             "straddle two; keep every group within one stack")
        return out
    n, m = out[0]
    for size in stacks:
        if size % m:
            where = f"the depth {depth}" if len(stacks) == 1 else f"a stack of {size} blocks (stacks {stacks})"
            raise UsageError(f"pattern {n}:{m} does not divide {where} (groups of {m} layers)")
    return [(n, m)] * (depth // m)


def group_starts(groups: list[tuple[int, int]]) -> list[int]:
    starts, s = [], 0
    for _, m in groups:
        starts.append(s)
        s += m
    return starts


def candidates(n: int, m: int) -> list[tuple[int, ...]]:
    return list(itertools.combinations(range(m), n))


def check_keep(keep: list[int], depth: int) -> list[int]:
    if not keep:
        raise UsageError("`keep` lists no layers")
    if len(set(keep)) != len(keep):
        dup = next(k for k in keep if keep.count(k) > 1)
        raise UsageError(f"`keep` lists layer {dup} twice")
    bad = [k for k in keep if k < 0 or k >= depth]
    if bad:
        raise UsageError(f"`keep` index {bad[0]} is out of range for a depth of {depth} (0..{depth - 1})")
    return sorted(keep)


# ---------------------------------------------------------------------------- export
def prune_layers(model, keep: list[int], op_params: dict | None = None):
    """A new model with blocks ``keep`` (indices into ``model.blocks``), weights copied exactly."""

    keep = check_keep(list(keep), model.config.depth)
    tokens = model.config.tokens
    if tokens is not None and tokens.capacity is not None:  # per-block data follows its blocks
        tokens = dataclasses.replace(tokens, capacity=[tokens.capacity[i] for i in keep])
    schedule = model.config.cache_schedule
    if schedule is not None:  # a learned cache schedule keeps the columns of the kept blocks
        schedule = {**schedule, "skip": [[row[i] for i in keep] for row in schedule["skip"]]}
    cfg = model.config.copy(depth=len(keep), kept_layers=[model.config.kept_layers[i] for i in keep], tokens=tokens,
                            cache_schedule=schedule)
    if 0 in cfg.stack_split:
        raise UsageError(f"`keep` {keep} removes every block of a stack ({cfg.stack_split} blocks per stack): keep at "
                         "least one in each")
    if op_params is not None:
        cfg = cfg.with_step("prune-depth", **op_params)
    old = {p + ".": i for i, p in enumerate(block_prefixes(model.config))}
    new = block_prefixes(cfg)
    stacks = tuple(k + "." for k in family_of(model).stack_keys)
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith(stacks):
            head = ".".join(k.split(".", 2)[:2]) + "."
            i = old[head]
            if i in keep:
                state[f"{new[keep.index(i)]}.{k[len(head):]}"] = v.detach().clone()
        else:
            state[k] = v.detach().clone()
    return build_model(cfg, state, dtype=next(model.parameters()).dtype)


# ---------------------------------------------------------------------------- calibration
def calibration_loss(model, calib: CalibSet, keep: list[int] | None = None, batch: int = 64) -> float:
    return calibration_losses(model, calib, keep, batch)["loss"]


@torch.no_grad()
def block_influence(model, calib: CalibSet, batch: int = 64, noisy: bool = False) -> list[float]:
    """ShortGPT's Block Influence: 1 - cos(input, output) per block, averaged over tokens.
    Fed the clean latents with random t, as TinyFusion's reference scorer does (``noisy``:
    x_t = q_sample(x, t) instead)."""
    diff = objective_for(model.config)
    if hasattr(diff, "network_call"):  # a process with its own network inputs (MAR: tokens and mask)
        return _hooked_influence(model, calib, batch, diff.network_call)
    depth = model.config.depth
    scores = torch.zeros(depth)
    count = 0
    dev = calib_device(model)
    for s in range(0, len(calib.y), batch):
        sl = slice(s, s + batch)
        t = diff.continuous_t(calib.t[sl]).to(dev)
        x, y = calib.x[sl].to(dev), calib.y[sl].to(dev)
        xt = diff.q_sample(x, t, calib.noise[sl].to(dev)) if noisy else x
        _, aux = model(xt, diff.model_t(t), y, return_aux=True)
        h_in = aux.block_input
        for i, h_out in enumerate(aux.features):
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)  # B N
            scores[i] += float((1 - cos).sum())
            h_in = h_out
        count += xt.shape[0] * aux.features[0].shape[1]
    return (scores / count).tolist()


@torch.no_grad()
def _hooked_influence(model, calib: CalibSet, batch: int, network_call) -> list[float]:
    """Block Influence read by hooks on ``model.blocks`` (each block's input and output, over
    the tokens it sees), the network run by ``network_call(model, batch)`` on the calibration
    draws."""
    blocks = list(model.blocks)
    sums, counts = torch.zeros(len(blocks), dtype=torch.float64), torch.zeros(len(blocks), dtype=torch.float64)

    def hook(i):
        def fn(mod, args, out):
            cos = torch.nn.functional.cosine_similarity(args[0].float(), out.float(), dim=-1)
            sums[i] += float((1 - cos).sum())
            counts[i] += cos.numel()
        return fn

    hooks = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    dev = calib_device(model)
    was = model.training
    model.eval()  # dropout off: the scores of a fixed set are fixed
    try:
        for s in range(0, len(calib.y), batch):
            network_call(model, {k: v.to(dev) for k, v in calib.batch(slice(s, s + batch)).items()})
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return (sums / counts.clamp(min=1)).tolist()


def keep_by_influence(scores: list[float], n_keep: int) -> list[int]:
    """Remove the blocks with the lowest influence, never the last one."""
    depth = len(scores)
    order = sorted(range(depth - 1), key=lambda i: scores[i])  # most similar first
    removed = set(order[: depth - n_keep])
    return [i for i in range(depth) if i not in removed]


def uniform_keep(groups) -> list[int]:
    """Evenly spaced positions in each group, ending at its last layer (1:2 keeps odd layers)."""
    keep = []
    for s, (n, m) in zip(group_starts(groups), groups):
        pos = sorted({m - 1 - int(round(k * m / n)) for k in range(n)})
        keep += [s + p for p in pos]
    return keep


def random_keep(groups, rng: random.Random) -> list[int]:
    keep = []
    for s, (n, m) in zip(group_starts(groups), groups):
        keep += [s + p for p in sorted(rng.sample(range(m), n))]
    return keep


# ---------------------------------------------------------------------------- learned (TinyFusion)
class MaskSearch(nn.Module):
    """Per-group logits over all C(M, N) candidate masks, Gumbel-softmax sampled per sample."""

    def __init__(self, groups: list[tuple[int, int]], logit_scale: float = 100.0, ema: float = 0.999):
        super().__init__()
        self.groups = groups
        self.logit_scale = logit_scale
        self.ema_decay = ema
        self.logits = nn.ParameterList([nn.Parameter(torch.zeros(math.comb(m, n))) for n, m in groups])
        for gi, (n, m) in enumerate(groups):
            mat = torch.zeros(math.comb(m, n), m)
            for ci, cand in enumerate(candidates(n, m)):
                mat[ci, list(cand)] = 1.0
            self.register_buffer(f"cand_{gi}", mat)
            self.register_buffer(f"ema_{gi}", torch.zeros(math.comb(m, n)))
        self.tau = 4.0

    def cand(self, gi):
        return getattr(self, f"cand_{gi}")

    def ema(self, gi):
        return getattr(self, f"ema_{gi}")

    def sample_gates(self, batch: int) -> torch.Tensor:
        """[B, depth] hard 0/1 gates with straight-through gradients to the logits."""
        parts = []
        for gi, logit in enumerate(self.logits):
            scaled = logit * self.logit_scale
            g = -torch.log(-torch.log(torch.rand(batch, len(logit), device=logit.device).clamp(1e-9, 1 - 1e-9)))
            soft = torch.softmax((scaled.unsqueeze(0) + g) / self.tau, dim=-1)
            hard = torch.nn.functional.one_hot(soft.argmax(-1), len(logit)).to(soft.dtype)
            choice = hard - soft.detach() + soft
            parts.append(choice @ self.cand(gi))
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def update_ema(self):
        for gi, logit in enumerate(self.logits):
            self.ema(gi).mul_(self.ema_decay).add_(logit.detach(), alpha=1 - self.ema_decay)

    @torch.no_grad()
    def probabilities(self, use_ema: bool = True) -> list[list[float]]:
        src = [self.ema(gi) for gi in range(len(self.groups))] if use_ema else list(self.logits)
        return [torch.softmax(v * self.logit_scale, -1).tolist() for v in src]

    @torch.no_grad()
    def decision(self) -> list[int]:
        keep = []
        for gi, ((n, m), s) in enumerate(zip(self.groups, group_starts(self.groups))):
            best = int(self.ema(gi).argmax())
            keep += [s + p for p in candidates(n, m)[best]]
        return keep

    def confidence(self) -> float:
        return min(max(p) for p in self.probabilities())


class SearchWrapper(nn.Module):
    """DiT + MaskSearch: ``forward(x, t, y)`` samples a mask per sample; pruned layers are
    still computed and blended with the identity, x = m * block(x) + (1 - m) * x, through
    forward hooks on the blocks (the DiT's own forward is unchanged)."""

    def __init__(self, dit, search: MaskSearch):
        super().__init__()
        self.dit = dit
        self.search = search
        self.config = dit.config
        self._gates = None
        self._hooks = [block.register_forward_hook(lambda mod, args, out, i=i: self._blend(i, args[0], out))
                       for i, block in enumerate(dit.blocks)]

    def close(self) -> None:
        """Remove the blending hooks from the blocks (the recovered model is a plain DiT again)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _blend(self, i: int, h, out):
        if self._gates is None:  # a forward outside the search: the block as it is
            return out
        g = self._gates[:, i].to(out.dtype).view(-1, 1, 1)
        return g * out + (1 - g) * h

    def forward(self, x, t, y, **kw):
        self._gates = self.search.sample_gates(x.shape[0])
        try:
            return self.dit(x, t, y, **kw)
        finally:
            self._gates = None


def add_lora(model, rank: int, alpha: int):
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=family_of(model).lora_targets, lora_dropout=0.0, bias="none")
    model = inject_adapter_in_model(cfg, model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def merged_state(model) -> dict:
    """State dict with LoRA deltas merged into the base weights, in the plain key layout."""
    from peft.tuners.lora import LoraLayer

    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.merge()
    out = {}
    for k, v in model.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v.detach().clone()
    return out


@dataclass
class LearnedConfig:
    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-4  # LoRA / weights
    logit_lr: float = 1e-3
    tau_start: float = 4.0
    tau_end: float = 0.1
    logit_scale: float = 100.0
    logit_ema: float = 0.999
    recover: str = "lora"  # lora | full | frozen
    lora_rank: int = 8
    lora_alpha: int = 16
    seed: int = 0
    ckpt_every: int = 0
    log_every: int = 10


@dataclass
class SearchSetup:
    """Everything the learned search trains: the wrapped model (DiT + recovery + mask logits),
    its loss, batches, parameter groups and per-step callbacks (built on the CPU; the trainer
    moves them to the training device)."""

    wrapper: nn.Module
    loss_fn: object
    batch_fn: object
    param_groups: list
    on_step: object
    status: object
    history_probs: list


def search_setup(model, data, groups, lc: LearnedConfig) -> SearchSetup:
    if lc.recover not in RECOVERIES:
        raise UsageError(f"`recover` must be lora, full or frozen, not {lc.recover!r}")
    dit = copy.deepcopy(model)
    dit.train()
    torch.manual_seed(lc.seed)  # the LoRA initialisation draws from the global generator: seeded, reproducible
    if lc.recover == "lora":
        dit = add_lora(dit, lc.lora_rank, lc.lora_alpha)
    else:
        for n, p in dit.named_parameters():
            p.requires_grad_(lc.recover == "full" and n != "pos_embed")
    search = MaskSearch(groups, lc.logit_scale, lc.logit_ema)
    wrapper = SearchWrapper(dit, search)
    groups_param = [{"params": list(search.logits.parameters()), "lr": lc.logit_lr}]
    weights = [p for n, p in dit.named_parameters() if p.requires_grad]
    if weights:
        groups_param.append({"params": weights, "lr": lc.lr})
    history_probs = []

    def tau_at(step):
        return lc.tau_start + (lc.tau_end - lc.tau_start) * min(1.0, step / max(1, lc.steps))

    objective = objective_for(model.config)
    base_loss = plain_loss(objective)

    def loss_fn(m, batch, step):
        search.tau = tau_at(step)  # a function of the step, so a resumed run anneals identically
        return base_loss(m, batch, step)

    def on_step(step, w):
        w.search.update_ema()
        if step % lc.log_every == 0 or step == lc.steps:
            history_probs.append({"step": step, "tau": w.search.tau, "probs": w.search.probabilities()})

    def status(w):
        return f"keep {w.search.decision()} conf {w.search.confidence():.2f}"

    batch_fn = condition_dropout_batch_fn(data, lc.batch_size, model.config, draws=getattr(objective, "draws", None))
    return SearchSetup(wrapper, loss_fn, batch_fn, groups_param, on_step, status, history_probs)


def learned_search(model, data, groups, lc: LearnedConfig, work_dir, resume: bool = False, producer: dict | None = None):
    """TinyFusion: jointly train mask logits and a recovery (LoRA / full / none). Returns
    (keep, search module, recovered model, history, decision probabilities, seconds). Every
    process of a multi-process run reaches the same decision (the logits are synchronised);
    a disagreement stops the run rather than writing one process's mask."""
    st = search_setup(model, data, groups, lc)
    tcfg = TrainConfig(steps=lc.steps, batch_size=lc.batch_size, lr=lc.lr, ema=0.0, seed=lc.seed, grad_clip=1.0,
                       ckpt_every=lc.ckpt_every, log_every=lc.log_every)
    trainer = Trainer(st.wrapper, st.loss_fn, st.batch_fn, tcfg, work_dir, param_groups=st.param_groups,
                      on_step=st.on_step, desc="mask search", status_fn=st.status, producer=producer)
    res = trainer.run(resume=resume)
    w = res.model
    w.close()
    if resume and not st.history_probs:
        st.history_probs.append({"step": lc.steps, "tau": w.search.tau, "probs": w.search.probabilities()})
    keep = w.search.decision()
    if res.processes > 1:
        _same_on_every_process(keep)
    return keep, w.search, w.dit, res.history, st.history_probs, res.seconds


def _same_on_every_process(keep: list[int]) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        return
    mine = torch.tensor(keep, dtype=torch.long)
    first = mine.clone()
    dist.broadcast(first, src=0)
    if not torch.equal(mine, first):
        raise TrainingError(f"the learned depth search decided {keep} on process {dist.get_rank()} and "
                            f"{first.tolist()} on process 0; refusing to write either")


def require_data(method: str, data) -> None:
    if data is None:
        raise UsageError(f"`method` {method} needs calibration/training data: pass `data` (e.g. `data` digits)")


def step_cost_ratio(model, groups, lc: LearnedConfig, data, reps: int = 3) -> dict:
    """Seconds per learned-search step vs per plain training step of the unpruned model,
    same batch, measured side by side (median of ``reps`` after one warm-up step)."""

    diff = objective_for(model.config)
    g = torch.Generator().manual_seed(0)
    x, y = draw_examples(data, lc.batch_size, g)
    t = diff.batch_t({"t": torch.randint(0, 1000, (lc.batch_size,), generator=g),
                      **(diff.draws(x, g) if hasattr(diff, "draws") else {})})

    def timed(module, params):
        opt = torch.optim.AdamW(params, lr=1e-6)
        times = []
        for i in range(reps + 1):
            t0 = time.perf_counter()
            loss = diff.training_losses(module, x, t, y)["loss"].mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    plain = copy.deepcopy(model).train()
    plain_s = timed(plain, [p for n, p in plain.named_parameters() if n != "pos_embed"])
    dit = copy.deepcopy(model).train()
    if lc.recover == "lora":
        dit = add_lora(dit, lc.lora_rank, lc.lora_alpha)
    w = SearchWrapper(dit, MaskSearch(groups, lc.logit_scale))
    search_s = timed(w, [p for p in w.parameters() if p.requires_grad])
    return {"plain_step_s": plain_s, "search_step_s": search_s, "ratio": search_s / plain_s, "batch_size": lc.batch_size}


@dataclass
class Selection:
    """What a layer selector sees, and the report it adds to."""

    model: object
    groups: list | None
    data: object
    calib: CalibSet | None
    lc: LearnedConfig
    work_dir: object = None
    resume: bool = False
    num_candidates: int = 16
    influence_noisy: bool = False
    measure_cost: bool = True
    report: dict = field(default_factory=dict)
    recovered: object = None  # learned: the model with its recovery weights
    producer: dict | None = None  # learned: what the search is (model, data, options), for its resume check


def _select_uniform(s: Selection) -> list[int]:
    return uniform_keep(s.groups)


def _select_random(s: Selection) -> list[int]:
    return random_keep(s.groups, random.Random(s.lc.seed))


def _select_block_influence(s: Selection) -> list[int]:
    scores = block_influence(s.model, s.calib, noisy=s.influence_noisy)
    s.report["influence_input"] = ("the calibration tokens under their draws' masks"
                                   if hasattr(objective_for(s.model.config), "network_call") else
                                   "noisy x_t" if s.influence_noisy else "clean latents, random t (TinyFusion's scorer)")
    s.report["block_influence"] = scores
    keep, start, gi = [], 0, 0
    for size in s.model.config.stack_split:  # each stack keeps what its groups keep (one stack: all of them)
        n_keep, covered = 0, 0
        while covered < size and gi < len(s.groups):
            n_keep += s.groups[gi][0]
            covered += s.groups[gi][1]
            gi += 1
        keep += [start + i for i in keep_by_influence(scores[start:start + size], n_keep)]
        start += size
    return keep


def _select_min_loss(s: Selection) -> list[int]:
    rng = random.Random(s.lc.seed)
    tried = []
    for _ in range(s.num_candidates):
        k = random_keep(s.groups, rng)
        tried.append({"keep": k, "calib_loss": calibration_loss(s.model, s.calib, k)})
    s.report["candidates"] = tried
    return min(tried, key=lambda r: r["calib_loss"])["keep"]


def _select_learned(s: Selection) -> list[int]:
    keep, search, s.recovered, hist, probs, secs = learned_search(s.model, s.data, s.groups, s.lc, s.work_dir, s.resume,
                                                                  s.producer)
    s.report.update(search_seconds=secs, search_history=hist, decision_probabilities=probs,
                    final_probabilities=search.probabilities(), confidence=search.confidence(),
                    learned_config=s.lc.__dict__)
    if s.measure_cost:
        s.report["search_cost"] = step_cost_ratio(s.model, s.groups, s.lc, s.data)
    return keep


# method -> (selector, needs data); "oracle" keeps the layers it is given
SELECTORS = {
    "learned": (_select_learned, True),
    "block-influence": (_select_block_influence, True),
    "uniform": (_select_uniform, False),
    "random": (_select_random, False),
    "min-loss": (_select_min_loss, True),
}


def _check_request(method: str, groups, keep, depth: int) -> list[int] | None:
    if method not in METHODS:
        raise UsageError(f"unknown `method` {method!r}; choose one of {', '.join(METHODS)}")
    if method == "oracle":
        if keep is None:
            raise UsageError("`method` oracle needs `keep` i,j,k,... (the layers to keep)")
        return check_keep(keep, depth)
    if keep is not None:
        raise UsageError("`keep` goes with `method` oracle")
    if groups is None:
        raise UsageError("a pattern is needed: `pattern` N:M or `groups` N:M,N:M,...")
    return None


def _recovered_source(s: Selection, keep_recovery_weights: bool):
    if not keep_recovery_weights:
        return s.model
    if s.recovered is None:
        raise UsageError("`keep_recovery_weights` applies to `method` learned only")
    r = s.recovered
    state = merged_state(r) if s.lc.recover == "lora" else {k: v.detach().clone() for k, v in r.state_dict().items()}
    return build_model(s.model.config, state)


def prune_depth(model, method: str, groups=None, keep: list[int] | None = None, data=None, lc: LearnedConfig | None = None,
                work_dir=None, resume: bool = False, calib_samples: int = 128, num_candidates: int = 16,
                keep_recovery_weights: bool = False, measure_cost: bool = True, influence_noisy: bool = False,
                producer: dict | None = None):
    """Select the layers to keep with ``method`` (a selector of ``SELECTORS``, or "oracle" with
    ``keep``) and build the smaller model from the source layers: (pruned model, report)."""
    lc = lc or LearnedConfig()
    t0 = time.time()
    keep = _check_request(method, groups, keep, model.config.depth)
    calib = None
    if data is not None:
        require(model, "training")
        check_fits(data, model.config)
        calib = calibration_set(data, calib_samples, seed=lc.seed + 12345,
                                draws=getattr(objective_for(model.config), "draws", None))
    sel = Selection(model, groups, data, calib, lc, work_dir, resume, num_candidates, influence_noisy, measure_cost,
                    report={"method": method, "source_depth": model.config.depth}, producer=producer)
    if groups is not None:
        sel.report["groups"] = [f"{n}:{m}" for n, m in groups]
    if method in ("block-influence", "min-loss"):
        require(model, "influence")
    if method != "oracle":
        selector, needs_data = SELECTORS[method]
        if needs_data:
            require_data(method, data)
        keep = selector(sel)
    params = {"method": method, "keep": keep, **({"groups": sel.report["groups"]} if groups is not None else {})}
    if method == "learned":
        params.update(steps=lc.steps, recover=lc.recover, recovery_weights="merged" if keep_recovery_weights else "discarded")
    pruned = prune_layers(_recovered_source(sel, keep_recovery_weights), keep, params)
    report = sel.report
    by_stack: dict[str, list[int]] = {}
    for k in pruned.config.kept_layers:  # which blocks of which stack (MAR: encoder_blocks i, decoder_blocks j)
        stack, i = stack_of_source(model.config, k)
        by_stack.setdefault(stack, []).append(i)
    report.update(kept_layers=keep, kept_source_layers=pruned.config.kept_layers, kept_by_stack=by_stack,
                  depth_after=pruned.config.depth,
                  params_before=model.num_params(), params_after=pruned.num_params(),
                  gflops_before=family_of(model).static_macs(model.config)["total"] / 1e9,
                  gflops_after=family_of(pruned).static_macs(pruned.config)["total"] / 1e9, seconds=time.time() - t0)
    if calib is not None:
        report["calib_loss_chosen"] = calibration_loss(model, calib, keep)
        report["calib_loss_full"] = calibration_loss(model, calib, None)
    return pruned, report


def plot_decisions(report: dict, path) -> None:
    probs = report.get("decision_probabilities") or []
    if not probs:
        return
    steps = [p["step"] for p in probs]
    series = {}
    for gi in range(len(probs[-1]["probs"])):
        final = probs[-1]["probs"][gi]
        best = max(range(len(final)), key=lambda c: final[c])
        series[f"group {gi}"] = [p["probs"][gi][best] for p in probs]
    plot_lines(path, steps, series, "probability of the final choice per group (EMA logits)", "step", "probability")
