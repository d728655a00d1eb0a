"""CUDA graphs for inference: a model's forward captured once per static call signature and
replayed afterwards, so a small batch on a GPU stops paying one kernel launch (and the Python
around it) per operation.

A call's signature is everything its kernels depend on that is not a tensor value: the input
shapes and dtypes, the condition's shapes, and the width profile of dynamic models (the
per-block (heads, channels) that the run's width cache resolves from ``run.t`` on the host).
Calls with the same signature replay one graph: their inputs are copied into the graph's
static input tensors, and the output is copied out (a later replay overwrites the graph's
own). Token routing takes part only with a capacity (a static top-k); the exact per-sample
counts are a data-dependent shape and cannot be captured.

Graphs are kept per model (outside the module, so a copy or a pickle of it carries none) for as
long as its weights are the same tensors at the same versions and its config is the same object:
an in-place update of any weight (an optimiser step, ``load_state_dict``), a change of device or
dtype, or a new config (a token capacity set) drops them; the routing mode, the training flag and
the autocast state are part of each graph's key. (An update through ``p.data`` bypasses the
version counter: call it with other weights, or not at all, after such an update.) Module hooks inside the model do not run on a
replay, so a model with such hooks (a FLOPs meter, a feature cache) is not graphed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref

import torch

from ..errors import UsageError
from .identity import weights_state

MODES = ("auto", "on", "off")


def _tensors(obj) -> list:
    """The tensors of a forward input, in a fixed order: a tensor, None, or a dataclass of
    tensors (``Captions``)."""
    if obj is None:
        return []
    if torch.is_tensor(obj):
        return [obj]
    if dataclasses.is_dataclass(obj):
        return [v for f in dataclasses.fields(obj) for v in _tensors(getattr(obj, f.name))]
    raise UsageError(f"a CUDA graph cannot take a {type(obj).__name__} input")


def _signature(obj) -> tuple:
    if obj is None:
        return (None,)
    if torch.is_tensor(obj):
        return (tuple(obj.shape), obj.dtype, obj.device)
    return (type(obj).__name__,) + tuple(_signature(getattr(obj, f.name)) for f in dataclasses.fields(obj))


def _clone(obj):
    if obj is None or torch.is_tensor(obj):
        return None if obj is None else obj.clone()
    return type(obj)(**{f.name: _clone(getattr(obj, f.name)) for f in dataclasses.fields(obj)})


def why_not_graphable(model) -> str | None:
    """Why ``model``'s forward cannot be captured (None when it can)."""
    if model.__dict__.get("_block_hook") is not None:
        return "a feature cache policy changes what each step computes (its state lives between the steps)"
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cuda" or not torch.cuda.is_available() or type(p).__name__ == "FakeTensor":
        return "CUDA graphs need the model on a CUDA device"
    tokens = getattr(model.config, "tokens", None)
    if tokens is not None and tokens.capacity is None:
        return ("token routing without a capacity runs per-sample token counts (a data-dependent shape): set one "
                "(--token-capacity, set_token_capacity) to capture it")
    for name, m in model.named_modules():
        if m is not model and (m._forward_hooks or m._forward_pre_hooks):
            return f"module {name} has hooks, which a graph replay would not run"
    return None


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list  # static tensors the replay reads
    output: torch.Tensor


def _model_state(model) -> tuple:
    """What a captured forward depends on beyond its inputs and weights: the model's config
    object (a token capacity or any other change replaces it), its routing mode, training flag
    and the autocast state."""
    mode = model._mode() if hasattr(model, "_mode") else None
    return (id(model.config), mode, model.training, torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None)


_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its GraphCache (kept off the module:
_ACTIVE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # a copy or pickle of the model carries none)


class GraphCache:
    """The captured forwards of one model (see the module docstring)."""

    def __init__(self, model):
        self.weights = weights_state(model)
        self.config = model.config
        self.graphs: dict = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.captures = 0
        self.replays = 0

    def __call__(self, model, eager, x, t, cond, run):
        """``eager(x, t, cond)`` is the model's own forward for this call (its run context
        bound); it runs on capture, and once before it on a side stream (warm-up)."""
        profile = model.graph_profile(t, run)
        if profile is False:  # widths not resolved on the host for this call: it runs eagerly
            return eager(x, t, cond)
        key = (_signature(x), _signature(t), _signature(cond), profile, _model_state(model))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(eager, x, t, cond)
        for dst, src in zip(entry.inputs, _tensors(x) + _tensors(t) + _tensors(cond)):
            dst.copy_(src, non_blocking=True)
        entry.graph.replay()
        self.replays += 1
        return entry.output.clone()

    def _capture(self, eager, x, t, cond) -> _Graph:
        sx, st, sc = x.clone(), t.clone(), _clone(cond)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy initialisation and autotuning stay out of the graph
            eager(sx, st, sc)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = eager(sx, st, sc)
        self.captures += 1
        return _Graph(graph, _tensors(sx) + _tensors(st) + _tensors(sc), out)


def check_mode(mode) -> str:
    if isinstance(mode, bool):
        mode = "on" if mode else "off"
    if mode is None:
        mode = "auto"
    if mode not in MODES:
        raise UsageError(f"`cuda_graphs` must be one of {', '.join(MODES)}, got {mode!r}"[:200])
    return mode


@contextlib.contextmanager
def cuda_graphs(model, mode="auto"):
    """``with cuda_graphs(model, mode): <sampling run>``: the model's plain forwards (no
    ``return_aux``) run as CUDA graphs, one per call signature, kept on the model across runs
    while its weights stay the same. ``auto``: when the model is on a CUDA device and can be
    captured; ``on``: refuse (one line) when it cannot; ``off``: eager."""
    mode = check_mode(mode)
    inner = getattr(model, "module", model)
    reason = why_not_graphable(inner) if mode != "off" and isinstance(inner, torch.nn.Module) else "off"
    if mode == "on" and reason is not None:
        raise UsageError(f"cannot run CUDA graphs: {reason}")
    if reason is not None or not hasattr(inner, "graph_profile"):
        if reason is not None and reason != "off" and isinstance(inner, torch.nn.Module):
            _CACHES.pop(inner, None)  # e.g. moved off the GPU: its graphs and their memory go
        yield None
        return
    cache = _CACHES.get(inner)
    if cache is None or cache.weights != weights_state(inner) or cache.config is not inner.config:
        cache = _CACHES[inner] = GraphCache(inner)
    previous = _ACTIVE.get(inner)
    _ACTIVE[inner] = cache
    try:
        yield cache
    finally:
        if previous is None:
            _ACTIVE.pop(inner, None)
        else:
            _ACTIVE[inner] = previous


def graph_cache(model) -> GraphCache | None:
    """The graphs kept for ``model`` (None when it has none)."""
    return _CACHES.get(getattr(model, "module", model))


def active_graphs(model):
    """The graph cache a forward should go through now (None: run eagerly): set by
    ``cuda_graphs`` and not while a graph is being captured (the capture runs the eager forward)."""
    cache = _ACTIVE.get(model) if _ACTIVE else None
    if cache is None or torch.cuda.is_current_stream_capturing():
        return None
    return cache
