"""The per-call run context: what the caller of a model knows on the host about one call.

A sampler knows the step it is at and the time input every row of the batch shares; passing
them as ``model(x, t, y, run=RunContext(step=i, t=t_i))`` lets the model reuse per-step
decisions (the dynamic width of that timestep) without reading ``t`` back from the device,
so a sampling step holds no host sync. ``branch`` says whether the call carries the
conditional rows only or the guided pair (conditional + null), for hooks such as feature
caches. In training, ``full_rows`` > 0 marks the last rows of the batch to run at full width
(DyDiT's stage-1 full-model loss, computed in the same forward as the routed one).
"""

from __future__ import annotations

from dataclasses import dataclass

BRANCHES = ("cond", "guided", "uncond")


@dataclass(frozen=True)
class RunContext:
    step: int | None = None
    t: float | int | None = None
    branch: str = "cond"
    full_rows: int = 0

    def guided(self) -> "RunContext":
        return RunContext(self.step, self.t, "guided", self.full_rows)


def accepts_run(model) -> bool:
    """Whether ``model`` takes ``run=`` (ditc models do; a user's wrapper may not)."""
    return bool(getattr(getattr(model, "module", model), "accepts_run", False))
