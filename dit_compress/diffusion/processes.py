"""Generation processes other than the diffusion of a whole image, by a family's ``process``
(model/family.py): each is a (training objective, sampling loop) pair. ``objective_for``,
the samplers' resolution, ``ditc bench`` and ``ditc eval`` reach them only through here."""

from __future__ import annotations

from ..model.family import family_of
from .mar import MaskedARLoop, MaskedARObjective

PROCESSES = {"masked-ar": (MaskedARObjective, MaskedARLoop)}


def process_of(x):
    """(objective class, loop class) of a config's or model's family, or None for diffusion."""
    return PROCESSES.get(family_of(x).process)


def generation_loop(model):
    """The sampling loop of a model whose family's process is not one of the diffusion
    samplers (``sample``), or None."""
    proc = process_of(model)
    return proc[1](model) if proc is not None else None
