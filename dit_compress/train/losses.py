"""Pluggable training losses: plain diffusion, output KD, masked representation KD, FLOPs."""

from __future__ import annotations

import torch

from ..diffusion.gaussian import GaussianDiffusion, mean_flat, normal_kl
from ..errors import UsageError
from ..model.family import family_of, stack_of_source
from ..model.run import RunContext


def plain_loss(diffusion: GaussianDiffusion):
    def fn(model, batch, step):
        res = diffusion.training_losses(model, batch["x"], diffusion.batch_t(batch), batch["y"], noise=batch["noise"])
        return {"loss": res["loss"].mean(), "mse": res["mse"].mean().detach(), "vb": res["vb"].mean().detach()}

    return fn


REP_PAIRS = ("paper", "kept")
REP_MASK_FORMS = ("paper", "joint")


def layer_map(student_cfg, teacher_cfg, pairs: str = "paper") -> list[int]:
    """Teacher block whose output each student block should reproduce, within each stack
    (MAR: encoder blocks to encoder blocks, decoder to decoder; one stack otherwise).

    ``paper`` (TinyFusion): fixed pairs by depth ratio, student i <-> teacher
    (i + 1) * T // S - 1 within the stack, i.e. 2i + 1 for 28 -> 14, whichever layers were kept.
    ``kept``: a student block that stands for source layer k_i replaces source layers
    k_i .. k_{i+1}-1, so its output is matched to the teacher's output just before source
    layer k_{i+1} (the last student block of a stack to the teacher's last block of it); equal
    to ``paper`` for a uniform 1:2 pruning.
    """
    if pairs not in REP_PAIRS:
        raise ValueError(f"unknown layer pairs {pairs!r}; choose {' or '.join(REP_PAIRS)}")
    s_split, t_split = student_cfg.stack_split, teacher_cfg.stack_split
    if len(s_split) != len(t_split):
        raise UsageError(f"the student has {len(s_split)} stacks of blocks, the teacher {len(t_split)}")
    if any(S > T for S, T in zip(s_split, t_split)):
        raise UsageError(f"the student has more blocks in a stack than the teacher ({s_split} against {t_split}): "
                         "its blocks cannot each be paired with a teacher block")
    if pairs == "paper":
        out, to = [], 0
        for S, T in zip(s_split, t_split):
            out += [to + (i + 1) * T // S - 1 for i in range(S)]
            to += T
        return out
    src, tk = student_cfg.kept_layers, teacher_cfg.kept_layers
    stack_s = [stack_of_source(student_cfg, k)[0] for k in src]
    stack_t = [stack_of_source(teacher_cfg, k)[0] for k in tk]
    out = []
    for i, k in enumerate(src):
        same = [j for j in range(len(tk)) if stack_t[j] == stack_s[i]]  # the teacher's blocks of this stack
        nxt = i + 1 < len(src) and stack_s[i + 1] == stack_s[i]
        boundary = src[i + 1] - 1 if nxt else tk[same[-1]]
        # the teacher may itself be pruned: take the last of its blocks at or before the boundary
        cands = [j for j in same if tk[j] <= boundary]
        out.append(max(cands) if cands else same[0])
    return out


def _keep_mask(h: torch.Tensor, k: float) -> torch.Tensor:
    """Elements within k sigma of the per-sample mean (over tokens and channels)."""
    flat = h.flatten(1)
    shape = (-1, *([1] * (h.dim() - 1)))
    mu, sd = flat.mean(1).view(shape), flat.std(1).view(shape)
    return (h - mu).abs() < k * sd


def masked_rep_loss(hs: torch.Tensor, ht: torch.Tensor, k: float | None, form: str = "paper") -> torch.Tensor:
    """MSE between block outputs, ignoring massive activations (|h - mu| >= k sigma, per sample).

    ``paper`` (TinyFusion): each feature zeroed where its own mask is off, the squared
    difference averaged over all elements: mean((m_s * h_s - m_t * h_t)^2). ``joint``: only
    elements both masks keep, averaged over those."""
    if k is None:
        return ((hs - ht) ** 2).mean()
    ms, mt = _keep_mask(hs.detach(), k), _keep_mask(ht, k)
    if form == "paper":
        return ((hs * ms - ht * mt) ** 2).mean()
    if form != "joint":
        raise ValueError(f"unknown mask form {form!r}; choose {' or '.join(REP_MASK_FORMS)}")
    m = (ms & mt).to(hs.dtype)
    diff2 = (hs - ht) ** 2
    return torch.where(m > 0, diff2, torch.zeros_like(diff2)).sum() / m.sum().clamp(min=1.0)


def flops_target(step: int, target: float, hold: int = 100, decay: int = 1) -> float:
    """DyDiT's schedule: 1.0 for ``hold`` steps, then linear to ``target`` over ``decay`` steps."""
    return 1.0 - (1.0 - target) * min(1.0, max(0, step - hold) / max(1, decay))


def flops_schedule(kd: dict, total_steps: int) -> tuple[int, int]:
    """(hold, decay): DyDiT holds 1.0 for 100 iterations and reaches lambda within ~3% of training."""
    hold = int(kd.get("flops_hold", 100))
    decay = kd.get("flops_decay")
    return hold, max(1, int(decay) if decay is not None else round(0.03 * total_steps))


def teacher_terms(diffusion, teacher, res: dict, x0, t, y, w_out: float, lmap, rep_w: float, k_sigma, mask_form):
    """Output KD (eps MSE + the learned variance's KL in bits, as the DiT hybrid loss) and,
    with a layer map, masked RepKD weighted ``rep_w``. Returns (loss, logs)."""
    call = res.get("teacher_call")  # an objective whose network is not (x_t, t, y) -> output (MAR) says how
    with torch.no_grad():
        if call is not None:
            tout = call(teacher, lmap is not None)
        else:
            tout = teacher(res["xt"], diffusion.model_t(t), y, return_aux=lmap is not None)
    if lmap is not None:
        tout, taux = tout
    t = res.get("t", t)  # the steps the outputs were made at (MAR: the head's, one per token copy)
    s_eps, s_v = diffusion.split_output(res["output"], res["xt"])
    t_eps, t_v = diffusion.split_output(tout, res["xt"])
    kd_eps = ((s_eps - t_eps) ** 2).mean()
    logs = {"kd_eps": kd_eps.detach()}
    kd_var = torch.zeros((), device=x0.device)
    if s_v is not None and t_v is not None:
        t_mean, t_logv, _, _ = diffusion.p_mean_variance(tout, res["xt"], t)
        s_mean, s_logv, _, _ = diffusion.p_mean_variance(torch.cat([s_eps.detach(), s_v], 1), res["xt"], t)
        kd_var = mean_flat(normal_kl(t_mean, t_logv, s_mean, s_logv)).mean() / 0.6931471805599453
    loss = w_out * (kd_eps + kd_var)
    if lmap is not None:
        rep = sum(masked_rep_loss(hs, taux.features[j], k_sigma, mask_form)
                  for hs, j in zip(res["aux"].features, lmap)) / len(lmap)
        logs["rep"] = rep.detach()
        loss = loss + rep_w * rep
    return loss, logs


def _split_rows(res: dict, n: int) -> tuple[dict, dict]:
    """A training-loss result over a doubled batch -> (first n rows, the rest); the aux
    (block features, FLOPs ratio over the routed rows) goes with the first part."""
    first, rest = {}, {}
    for k, v in res.items():
        if k == "aux":
            v.features = [f[:n] for f in v.features]
            first[k] = v
        elif torch.is_tensor(v) and v.dim() and len(v) == 2 * n:
            first[k], rest[k] = v[:n], v[n:]
        else:
            first[k] = rest[k] = v
    return first, rest


def _tokens(cfg) -> int:
    return (cfg.input_size // cfg.patch_size) ** 2


def combined_loss(diffusion: GaussianDiffusion, model, teacher, kd: dict, total_steps: int):
    """Plain diffusion loss, plus output KD / masked RepKD with a teacher, plus the FLOPs
    loss for dynamic models. Returns (loss_fn, status_fn)."""
    w_out = kd.get("out", 0.9 if teacher is not None else 0.0)
    w_plain = kd.get("plain", 0.1 if teacher is not None else 1.0)
    beta = kd.get("rep", 0.0)
    k_sigma = kd.get("k_sigma", 2.0)
    lam = model.config.flops_target if model.config.flops_target is not None else 1.0
    w = model.config.width
    dynamic = model.config.tokens is not None or (w is not None and not w.static)
    hold, decay = flops_schedule(kd, total_steps)
    w_full = kd.get("full_loss", 1.0) if dynamic else 0.0  # DyDiT stage 1: the full model's loss too
    full_steps = kd.get("full_steps")
    full_steps = total_steps if full_steps is None else int(full_steps)
    lmap = layer_map(model.config, teacher.config, kd.get("rep_pairs", "paper")) if (teacher is not None and beta > 0) else None
    if lmap is not None and _tokens(model.config) != _tokens(teacher.config):
        raise UsageError(f"masked RepKD matches block outputs token by token: the student sees {_tokens(model.config)} "
                         f"tokens, the teacher {_tokens(teacher.config)} (use kd_rep 0)")
    if lmap is not None and model.config.stack_widths != teacher.config.stack_widths:
        raise UsageError(f"masked RepKD matches block outputs: the student's widths {model.config.stack_widths} differ from "
                         f"the teacher's {teacher.config.stack_widths} (use kd_rep 0)")
    mask_form = kd.get("rep_mask_form", "paper")
    last = {}

    def fn(m, batch, step):
        x0, t, y, noise = batch["x"], diffusion.batch_t(batch), batch["y"], batch["noise"]
        need_aux = dynamic or lmap is not None
        with_full = dynamic and w_full > 0 and step < full_steps
        if with_full:
            # DyDiT's stage 1 adds the full-width model's loss: the same batch a second time,
            # in the same forward (its rows run at full width), so multi-process training
            # (DDP) sees one forward and one backward per step
            B = len(x0)
            both = diffusion.training_losses(m, torch.cat([x0, x0]), torch.cat([t, t]), family_of(m).cat(y, y),
                                             noise=torch.cat([noise, noise]), return_aux=True,
                                             run=RunContext(full_rows=B))
            res, full = _split_rows(both, B)
        elif need_aux:
            res = diffusion.training_losses(m, x0, t, y, noise=noise, return_aux=True)
        else:
            res = diffusion.training_losses(m, x0, t, y, noise=noise)
        logs = {"mse": res["mse"].mean().detach()}
        loss = w_plain * res["loss"].mean()
        if teacher is not None:
            rep_w = beta * max(0.0, 1.0 - step / max(1, total_steps))
            kd_loss, kd_logs = teacher_terms(diffusion, teacher, res, x0, t, y, w_out, lmap, rep_w, k_sigma, mask_form)
            loss = loss + kd_loss
            logs.update(kd_logs)
        if with_full:
            logs["full_loss"] = full["loss"].mean().detach()
            loss = loss + w_full * full["loss"].mean()
        if dynamic:
            ratio = res["aux"].flops_ratio.mean()
            target = flops_target(step, lam, hold, decay)
            loss = loss + 2.0 * (ratio - target) ** 2
            logs["flops_ratio"] = ratio.detach()
            last["flops"] = ratio.detach()
        logs["loss"] = loss
        return logs

    def status(m):
        return f"flops {float(last['flops']):.2f}" if "flops" in last else ""

    return fn, status
