"""Families behind one interface. A family is one network design in its source's own key
layout; everything above model/ and formats/ reaches a model only through ``family_of(x)``:

    module(cfg)                  the network for a config (meta-device friendly)
    complete_state(cfg, state)   what a state dict may leave out and the config determines
    after_load(model)            buffers built from the config once the weights are in
    initialise(model, label_std) the reference training initialisation of a fresh model
                                 (``create``): DiT's, with the class table's std; PixArt-α's
    stack_keys                   the state-dict prefixes of the block stacks depth pruning cuts, in
                                 order (DiT: ``blocks``; MAR: ``encoder_blocks``, ``decoder_blocks``);
                                 ``model.blocks`` is every stack as one list on every family, and
                                 ``config.stack_split`` the blocks in each (``block_prefixes``)
    condition                    "labels" (class-conditional) or "captions" (text-to-image)
    check_condition(model, c, n) the condition of n samples, checked, on the model's device
    null_condition(model, c, negative)  the guidance null for ``c``: the null class, or the
                                 given negative caption (the pipeline's encoding of "")
    cat(a, b)                    two conditions as one batch
    supports                     what this toolkit implements on the family so far, by name
                                 ("routing", "training", "eval"); ``require(model, what)``
                                 refuses the rest in one line
    example_condition(cfg, n, g) (condition, negative) for n samples when no data gives one:
                                 class-balanced labels; random caption features of the
                                 model's caption length (benchmarks, shape-only runs)
    check_data(cfg, data, name)  training data fits the condition (labels in range; caption
                                 features of the model's width, with the null caption)
    drop_condition(cfg, y, drop, data)  guidance dropout in training: the rows ``drop`` get the
                                 null class, or the data's null caption (the encoding of "")
    condition_key(cfg)           what a teacher must share with its student (classes, or the
                                 caption width)
    lora_targets                 the linears a LoRA recovery adapts (peft ``target_modules``)
    process                      the generation process that samples it: "diffusion" (the samplers of
                                 diffusion/sampling.py) or "masked-ar" (diffusion/mar.py);
                                 ``diffusion.generation_loop(model)`` is what bench times
    info_fields(model)           what ``ditc info`` says of the network beyond the shared fields
    static_macs(cfg)             one forward's multiply-accumulates for one sample, by part
    width_layout(cfg)            where dynamic width's heads and MLP channels sit in a block's
                                 linears (``WidthLayout``): sorting and routing use it

A family is a module and one entry in ``FAMILIES``: MAR (two stacks, a per-token diffusion
head and its own sampler) is the third.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DitcError, UsageError
from .dit import DiT, sincos_2d
from .mar import MAR
from .flops import PIXART_CAPTION_TOKENS, mar_static_macs, static_macs
from .pixart import Captions, PixArt


@dataclass(frozen=True)
class WidthLayout:
    """Where a block's heads and MLP channels sit in its linears (paths relative to the block):
    head h owns rows ``offset + h*hd .. offset + (h+1)*hd`` of each of ``head_rows`` (query,
    key, value), of which ``value`` is the value's, and the same columns of ``head_cols`` (the
    output projection); MLP channel c owns row c of ``chan_rows`` and column c of ``chan_cols``."""

    head_rows: tuple[tuple[str, int], ...]
    value: tuple[str, int]
    head_cols: str
    chan_rows: str
    chan_cols: str


@dataclass
class EvalConditions:
    """What an eval samples: ``labels`` [n] (the class, or the prompt index, of each sample),
    ``batch(lo, hi)`` the condition of samples lo..hi, the guidance ``negative`` (None: the
    family's own null), ``groups`` (distinct labels: grid rows), the prompt ``texts`` when
    known (CLIP score), and ``asks`` [groups], the class each label's condition asks for when
    it is known (the class itself; a digit caption's digit), scored by a held-out classifier as
    ``asks_metric`` (class accuracy, or prompt-following accuracy)."""

    labels: np.ndarray
    batch: object
    negative: object
    groups: int
    texts: list | None = None
    asks: np.ndarray | None = None
    asks_metric: str = "class_accuracy"


def _checked_tensor(t) -> bool:
    return not (t.is_meta or type(t).__name__ == "FakeTensor")


def _device(model) -> torch.device:
    inner = getattr(model, "module", model)
    if isinstance(inner, torch.nn.Module):
        for p in inner.parameters():
            return p.device
    return torch.device("cpu")


def _transformer_info(model) -> dict:
    """``ditc info``'s fields of a DiT-style transformer (DiT, SiT, REPA, PixArt)."""
    cfg = model.config
    fam = family_of(cfg)
    return {
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_heads,
        "patch_size": cfg.patch_size,
        "input": f"{cfg.in_channels}x{cfg.input_size}x{cfg.input_size}",
        "tokens": cfg.num_patches,
        "num_classes": cfg.num_classes if fam.condition == "labels" else None,
        "condition": fam.condition_key(cfg),
        "learn_sigma": cfg.learn_sigma,
        "prediction": cfg.prediction if cfg.prediction == "eps" else
        f"velocity ({cfg.path_type} path; network time: {'t, 1 = data (SiT)' if cfg.time_input == 'sit' else '1 - t, 1 = noise (REPA)'})",
        "numerics": cfg.numerics,
        "embedders": "per block (final layer: the source's block 0)" if cfg.block_embedders else "shared",
        "latent": f"x{cfg.latent_scale} of {cfg.vae}" if cfg.latent_scale is not None else "pixels",
    }


def _mar_info(model) -> dict:
    cfg, m = model.config, model.config.mar
    enc, dec = cfg.stack_split
    macs = mar_static_macs(cfg)
    return {
        "stacks": {"encoder": enc, "decoder": dec, "source": list(m.stack_depths)},
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_heads,
        "decoder_hidden_size": m.decoder_hidden_size or cfg.hidden_size,
        "decoder_num_heads": m.decoder_num_heads or cfg.num_heads,
        "patch_size": cfg.patch_size,
        "input": f"{cfg.in_channels}x{cfg.input_size}x{cfg.input_size}",
        "tokens": cfg.num_patches,
        "buffer_size": m.buffer_size,
        "num_classes": cfg.num_classes,
        "condition": "labels (the null class is the fake latent)",
        "diffusion_head": f"SimpleMLPAdaLN {m.diffloss_d} blocks x {m.diffloss_w}, cosine schedule, "
                          f"{m.num_sampling_steps} sampling steps per token",
        "gflops_head_per_step": macs["head_per_step"] / 1e9,
        "gflops_counts": "both stacks with every token visible, plus one head step on every token",
        "latent": f"x{cfg.latent_scale} of {cfg.vae}" if cfg.latent_scale is not None else "pixels",
    }


class DiTFamily:
    """Class-conditional DiT / SiT / REPA (original layout ``blocks.i.attn.qkv``)."""

    name, stack_key, condition = "dit", "blocks", "labels"
    stack_keys = ("blocks",)
    supports = frozenset({"width", "tokens", "training", "distill", "influence", "cache", "eval"})
    implemented = "every command"
    process = "diffusion"
    predictions = ("eps", "velocity")  # what its network may be trained to predict
    learn_sigma_choices = (True, False)  # whether its network may predict its variance, or not
    info_fields = staticmethod(_transformer_info)
    static_macs = staticmethod(static_macs)

    @staticmethod
    def teacher_facts(cfg) -> str:
        """What a teacher must share with its student beyond its input and condition (distill)."""
        return ""

    @staticmethod
    def module(cfg):
        return DiT(cfg)

    @staticmethod
    def complete_state(cfg, state: dict) -> dict:
        if "pos_embed" not in state:
            grid = int(cfg.num_patches ** 0.5)
            state["pos_embed"] = torch.from_numpy(sincos_2d(cfg.hidden_size, grid)).float().unsqueeze(0)
        return state

    @staticmethod
    def after_load(model):
        model.pos_embed.requires_grad_(False)
        return model

    @staticmethod
    def initialise(model, label_std: float) -> None:  # the constructor ran DiT's reference init
        torch.nn.init.normal_(model.y_embedder.embedding_table.weight, std=label_std)

    @staticmethod
    def check_condition(model, y, n: int):
        cfg = model.config
        if isinstance(y, Captions):
            raise UsageError("this is a class-conditional model: `y` takes class labels, not captions")
        if not torch.is_tensor(y):
            try:
                y = torch.as_tensor(np.asarray(y), dtype=torch.long)
            except (TypeError, ValueError, RuntimeError):
                raise UsageError(f"`y` must be class labels (a tensor of ints), got {type(y).__name__}") from None
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise UsageError(f"`y` must hold integer class labels, got {y.dtype}")
        if y.dim() != 1 or len(y) != n:
            raise UsageError(f"`y` must be one label per sample ({n}), got shape {list(y.shape)}")
        if _checked_tensor(y) and len(y) and (int(y.min()) < 0 or int(y.max()) > cfg.num_classes):
            raise UsageError(f"`y` holds labels outside 0..{cfg.num_classes} ({cfg.num_classes} is the null class)")
        return y.long().to(_device(model))

    @staticmethod
    def null_condition(model, y, negative=None):
        if negative is not None:
            raise UsageError("`negative` is for text-to-image models; a class-conditional model guides with its null class")
        return torch.full_like(y, model.config.num_classes)

    @staticmethod
    def cat(a, b):
        return torch.cat([a, b], 0)

    @staticmethod
    def example_condition(cfg, n: int, generator=None):
        return torch.from_numpy(np.arange(n) % cfg.num_classes).long(), None

    # the block linears, adaLN and timestep MLPs, the final layer (TinyFusion's LoRA on DiT)
    lora_targets = (r"(blocks\.\d+\.attn\.(qkv|proj)|blocks\.\d+\.mlp\.fc[12]|blocks\.\d+\.adaLN_modulation\.1"
                    r"|t_embedder\.mlp\.[02]|final_layer\.linear|final_layer\.adaLN_modulation\.1)")

    @staticmethod
    def width_layout(cfg) -> WidthLayout:
        D = cfg.hidden_size
        return WidthLayout((("attn.qkv", 0), ("attn.qkv", D), ("attn.qkv", 2 * D)), ("attn.qkv", 2 * D), "attn.proj",
                           "mlp.fc1", "mlp.fc2")

    @staticmethod
    def check_data(cfg, data, name: str) -> None:
        y = data.y
        if not torch.is_tensor(y):
            raise UsageError(f"data {name} holds captions; this class-conditional model trains on class labels "
                             "(class folders, or latents with labels)")
        bad = (y < 0) | (y >= cfg.num_classes)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise DitcError(f"data {name}: label {int(y[i])} of sample {i} is outside 0..{cfg.num_classes - 1}")

    @staticmethod
    def drop_condition(cfg, y, drop, data):
        return torch.where(drop, torch.full_like(y, cfg.num_classes), y)

    @staticmethod
    def condition_key(cfg) -> str:
        return f"{cfg.num_classes} classes"

    @staticmethod
    def eval_conditions(cfg, n: int, prompts=None) -> EvalConditions:
        """Class-balanced labels (sample i gets class i mod num_classes)."""
        if prompts is not None:
            raise UsageError("`prompts` are for text-to-image models; a class-conditional model samples class-balanced "
                             "labels")
        labels = np.arange(n) % cfg.num_classes
        return EvalConditions(labels, lambda lo, hi: torch.from_numpy(labels[lo:hi]).long(), None, cfg.num_classes,
                              asks=np.arange(cfg.num_classes))


class PixArtFamily:
    """PixArt-α / Σ (diffusers layout ``transformer_blocks.i.attn1.to_q``)."""

    name, stack_key, condition = "pixart", "transformer_blocks", "captions"
    stack_keys = ("transformer_blocks",)
    supports = frozenset({"width", "tokens", "training", "distill", "influence", "cache", "eval"})
    implemented = "every command"
    process = "diffusion"
    predictions = ("eps",)  # PixArtAlphaPipeline
    learn_sigma_choices = (True, False)
    teacher_facts = DiTFamily.teacher_facts
    info_fields = staticmethod(_transformer_info)
    static_macs = staticmethod(static_macs)

    @staticmethod
    def module(cfg):
        return PixArt(cfg)

    @staticmethod
    def complete_state(cfg, state: dict) -> dict:
        return state

    @staticmethod
    def after_load(model):
        model.reset_pos_table()
        return model

    @staticmethod
    def initialise(model, label_std: float) -> None:
        model.initialize_weights()  # no class table: the caption projection has PixArt's own std

    @staticmethod
    def check_condition(model, c, n: int):
        cfg = model.config
        if not isinstance(c, Captions):
            raise UsageError("this is a text-to-image model: the condition is Captions(emb [B, L, C], mask [B, L])")
        if not (torch.is_tensor(c.emb) and c.emb.is_floating_point() and c.emb.dim() == 3):
            raise UsageError("caption embeddings must be a float tensor [B, L, C]")
        if c.emb.shape[0] != n or c.emb.shape[2] != cfg.caption_channels:
            raise UsageError(f"caption embeddings have shape {list(c.emb.shape)}; the model takes [{n}, L, "
                             f"{cfg.caption_channels}] (its caption width)")
        if c.emb.shape[1] < 1:
            raise UsageError("captions hold no tokens (L = 0); even the empty prompt encodes to one (</s>)")
        if not torch.is_tensor(c.mask) or tuple(c.mask.shape) != tuple(c.emb.shape[:2]):
            raise UsageError(f"the caption mask must be [B, L] = {list(c.emb.shape[:2])}")
        if cfg.additional_conditions and (c.resolution is None or c.aspect_ratio is None):
            raise UsageError("this PixArt takes resolution and aspect-ratio conditions (a 1024 px model): give "
                             "Captions(..., resolution=[B, 2], aspect_ratio=[B, 1])")
        for name, v, width in (("resolution", c.resolution, 2), ("aspect_ratio", c.aspect_ratio, 1)):
            if v is not None and not (torch.is_tensor(v) and tuple(v.shape) == (n, width)):
                raise UsageError(f"captions' {name} must be a tensor [{n}, {width}], got "
                                 f"{list(v.shape) if torch.is_tensor(v) else type(v).__name__}")
        if _checked_tensor(c.emb):
            if not bool(torch.isfinite(c.emb).all()):
                raise UsageError("caption embeddings hold NaN or inf values")
            if not bool(((c.mask == 0) | (c.mask == 1)).all()):
                raise UsageError("the caption mask must hold 0 (padding) and 1 (a token) only")
            for v in (c.resolution, c.aspect_ratio):
                if v is not None and not bool(torch.isfinite(v.float()).all()):
                    raise UsageError("the size conditions hold NaN or inf values")
        extra = cfg.additional_conditions  # size conditions of a model without them are ignored, as diffusers does
        return Captions(c.emb.float(), c.mask.float(),
                        None if c.resolution is None or not extra else c.resolution.float(),
                        None if c.aspect_ratio is None or not extra else c.aspect_ratio.float()).to(_device(model))

    @classmethod
    def null_condition(cls, model, c, negative=None):
        if negative is None:
            raise UsageError("classifier-free guidance of a text-to-image model needs the null caption: give "
                             "`negative` (the text encoder's encoding of the empty prompt, as the pipeline's "
                             "negative_prompt_embeds)")
        if not isinstance(negative, Captions):
            raise UsageError("`negative` must be Captions (the encoding of the empty prompt)")
        neg = negative if len(negative) == len(c) else _repeat(negative, len(c))
        # the null half runs at the conditional half's size conditions, as the pipeline's guidance does
        neg = Captions(neg.emb, neg.mask, c.resolution, c.aspect_ratio)
        return cls.check_condition(model, neg, len(c))

    @staticmethod
    def cat(a, b):
        return a.cat(b)

    @staticmethod
    def example_condition(cfg, n: int, generator=None):
        L = cfg.caption_length or PIXART_CAPTION_TOKENS
        extra = {}
        if cfg.additional_conditions:
            side = float(cfg.input_size * 8)
            extra = dict(resolution=torch.tensor([[side, side]]).repeat(n, 1), aspect_ratio=torch.ones(n, 1))

        def caption(k):
            return Captions(torch.randn(k, L, cfg.caption_channels, generator=generator), torch.ones(k, L),
                            **{key: v[:k] for key, v in extra.items()})

        return caption(n), caption(1)

    # both attentions (self and cross), the feed-forward, adaLN-single and the timestep MLP,
    # the output projection: the DiT family's targets, plus cross-attention
    lora_targets = (r"(transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
                    r"|adaln_single\.(linear|emb\.timestep_embedder\.linear_[12])|proj_out)")

    @staticmethod
    def width_layout(cfg) -> WidthLayout:
        """Self-attention heads and feed-forward channels (cross-attention keeps every head:
        model/pixart.py says why)."""
        return WidthLayout((("attn1.to_q", 0), ("attn1.to_k", 0), ("attn1.to_v", 0)), ("attn1.to_v", 0),
                           "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")

    @staticmethod
    def check_data(cfg, data, name: str) -> None:
        y = data.y
        if not isinstance(y, Captions):
            raise UsageError(f"data {name} holds class labels; a text-to-image model trains on caption shards "
                             "(ditc prepare-data IMAGES --text-encoder PIPELINE -o SHARDS)")
        if y.emb.shape[-1] != cfg.caption_channels:
            raise UsageError(f"data {name} holds caption features {y.emb.shape[-1]} wide; the model's caption "
                             f"projection takes {cfg.caption_channels} (encode the captions with its own text encoder)")
        if getattr(data, "null", None) is None:
            raise UsageError(f"data {name} lacks the null caption (the encoding of \"\") that guidance dropout needs")
        if cfg.additional_conditions and y.resolution is None:
            raise UsageError(f"data {name} lacks the resolution and aspect-ratio conditions this 1024 px PixArt takes")

    @staticmethod
    def drop_condition(cfg, y, drop, data):
        null = _repeat(data.null, len(y))
        if null.emb.shape[1] != y.emb.shape[1]:
            raise UsageError(f"the null caption has {null.emb.shape[1]} tokens, the captions {y.emb.shape[1]}")
        keep = ~drop
        return Captions(torch.where(keep[:, None, None], y.emb, null.emb), torch.where(keep[:, None], y.mask, null.mask),
                        y.resolution, y.aspect_ratio)

    @staticmethod
    def condition_key(cfg) -> str:
        return f"captions {cfg.caption_channels} wide"

    @staticmethod
    def eval_conditions(cfg, n: int, prompts=None) -> EvalConditions:
        """The prompts in turn (sample i gets prompt i mod P), guided by their null caption."""
        if prompts is None:
            raise UsageError("eval of a text-to-image model needs `prompts`: caption shards (ditc prepare-data "
                             "--text-encoder) or a text file with one prompt per line (and `text_encoder`)")
        caps = prompts.captions
        if caps.emb.shape[-1] != cfg.caption_channels:
            raise UsageError(f"the prompts' caption features are {caps.emb.shape[-1]} wide; the model takes "
                             f"{cfg.caption_channels} (encode them with its own text encoder)")
        labels = np.arange(n) % len(caps)
        return EvalConditions(labels, lambda lo, hi: caps[torch.from_numpy(labels[lo:hi])], prompts.null, len(caps),
                              prompts.texts, prompts.classes, "prompt_accuracy")


def _repeat(c: Captions, n: int) -> Captions:
    if len(c) != 1:
        raise UsageError(f"`negative` holds {len(c)} captions; give one (repeated) or one per sample ({n})")
    return c[torch.zeros(n, dtype=torch.long)]


class MARFamily(DiTFamily):
    """MAR (LTH14/mar layout ``encoder_blocks.i.attn.qkv``, ``decoder_blocks.i...``,
    ``diffloss.net...``): class-conditional (label ``num_classes`` is the fake latent, the
    guidance null), two stacks, its own objective and sampler (model/mar.py)."""

    name, stack_key, condition = "mar", None, "labels"
    stack_keys = ("encoder_blocks", "decoder_blocks")
    supports = frozenset({"training", "distill", "influence", "eval"})
    process = "masked-ar"
    predictions = ("eps",)  # the diffusion head (DiffLoss)
    learn_sigma_choices = (True,)  # DiffLoss always learns the variance (learn_sigma=True in models/diffloss.py)

    @staticmethod
    def teacher_facts(cfg) -> str:
        """The heads compare token by token and the stacks see the buffer: same tokens, same buffer."""
        return f", {cfg.patch_size}x{cfg.patch_size} tokens and {cfg.mar.buffer_size} buffer tokens"
    info_fields = staticmethod(_mar_info)
    static_macs = staticmethod(mar_static_macs)
    implemented = ("loading (checkpoint-last.pth with args, ditc), convert, depth pruning within each stack "
                   "(learned with LoRA, block influence, min-loss, uniform, random, --keep), finetune, distill, eval and "
                   "bench (its masked-AR loop), info and sampling through dit_compress.sample_mar")

    @staticmethod
    def module(cfg):
        return MAR(cfg)

    @staticmethod
    def complete_state(cfg, state: dict) -> dict:
        return state

    @staticmethod
    def after_load(model):
        return model

    @staticmethod
    def initialise(model, label_std: float) -> None:
        model.initialize_weights()  # MAR's own: every table normal(0.02)

    # every linear of both stacks, the embeddings' projections and the head (LoRA recovery)
    lora_targets = (r"((encoder|decoder)_blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])|z_proj|decoder_embed"
                    r"|diffloss\.net\..*(linear|proj|mlp\.[02]|adaLN_modulation\.1|cond_embed))")

    @staticmethod
    def width_layout(cfg):
        raise UsageError("dynamic width is not defined for MAR models (DyDiT covers DiT)")


FAMILIES = {"dit": DiTFamily, "pixart": PixArtFamily, "mar": MARFamily}


def block_prefixes(cfg) -> list[str]:
    """The state-dict prefix of every block of a model, in ``model.blocks`` order
    (``blocks.3``; MAR ``encoder_blocks.0`` .. then ``decoder_blocks.0`` ..)."""
    keys = family_of(cfg).stack_keys
    return [f"{key}.{i}" for key, n in zip(keys, cfg.stack_split) for i in range(n)]


def stack_of_source(cfg, source_index: int) -> tuple[str, int]:
    """(stack name, index within it) of a source block (``kept_layers`` numbering)."""
    keys = family_of(cfg).stack_keys
    bounds = cfg.mar.stack_depths if cfg.mar is not None else [cfg.source_depth]
    for key, n in zip(keys, bounds):
        if source_index < n:
            return key, source_index
        source_index -= n
    raise UsageError(f"source block {source_index} is beyond the model's stacks")

WHAT = {"width": "dynamic width (DyDiT's timestep-wise width routers)",
        "tokens": "token routing (DyDiT's spatial token routers)",
        "training": "training and data-driven layer selection (finetune, learned prune-depth)",
        "distill": "distillation from a teacher (output KD and masked RepKD)",
        "influence": "block-influence and calibration-loss layer selection (block-influence, min-loss and "
                     "oracle scoring)",
        "cache": "learned feature caching (learn-cache)",
        "eval": "eval (sampling from a prompt set, FID, CLIP score)"}


def require(model, what: str) -> None:
    """Refuse in one line what the model's family does not implement yet."""
    fam = family_of(model)
    if what not in fam.supports:
        raise UsageError(f"{WHAT[what]} is not implemented for {fam.name} models in this version; "
                         f"supported on them: {fam.implemented}")


def family_of(x):
    """The family of a config, a model, or a model wrapped by accelerate/DDP."""
    cfg = getattr(getattr(x, "module", x), "config", x)
    return FAMILIES[getattr(cfg, "family", "dit")]
