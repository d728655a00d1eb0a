"""``torch.compile`` for inference, with a bounded number of graphs.

Static models (dense or depth-pruned) compile their whole forward: one graph per input
shape (automatic dynamic shapes after the first change of batch size). Dynamic models
(DyDiT) run a different width at each timestep; compiling the whole forward would
specialise on every width (one graph per distinct width profile, up to one per sampling
step). Instead each block's forward is compiled with ``dynamic=True``: the widths reach it as
plain ints (``DiT``'s per-run width cache) and become symbolic sizes, so one graph serves
every width, and the blocks share it (same code, same shapes). The routers and the per-run
width lookup stay in eager Python around the blocks.
"""

from __future__ import annotations

import sys

import torch


_COMPILED: dict = {}


def compiled(fn, dynamic: bool = False):
    """The compiled form of the plain function ``fn`` (a forward taking the module as its first
    argument), made once per process: a module compiled this way runs its own weights, and so
    does every copy of it (``copy.deepcopy`` for EMA or search copies), since nothing compiled
    is bound to one instance."""
    key = (fn, dynamic)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=dynamic)
    return _COMPILED[key]


def is_compiled(module) -> bool:
    """Whether ``module`` was marked by ``compile_model`` (and is not already being traced)."""
    return bool(module.__dict__.get("_ditc_compiled")) and not torch.compiler.is_compiling()


def compile_model(model):
    """Compile ``model`` (a DiT) in place for inference, once; returns it. The model (static)
    or each of its blocks (dynamic) is marked; its forward then runs the compiled function."""
    if model.__dict__.get("_ditc_compiled"):
        return model
    if model.config.is_dynamic:
        for b in model.blocks:
            b._ditc_compiled = True
    model._ditc_compiled = True
    return model


def compiled_graphs() -> int:
    """Graphs compiled so far in this process (count before and after a run for its share).
    Read from torch's compiler counters only once torch.compile has loaded them (importing
    the compiler costs seconds of CLI start-up)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return int(utils.counters["stats"]["unique_graphs"]) if utils is not None else 0
