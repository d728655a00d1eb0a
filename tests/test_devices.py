"""Device correctness without a GPU: every path runs with the model on a fake CUDA device
(torch's FakeTensorMode holds CUDA tensors on a CPU-only build and raises as soon as a CPU
tensor meets them, or a value is read back to the host), and the sampling loop is counted
for host syncs on real tensors."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dit_compress as dc
from dit_compress.compress.depth import LearnedConfig, search_setup
from dit_compress.compress.dynamic import add_dynamic_width, add_token_router, set_banded_width, set_token_capacity
from dit_compress.data.batches import condition_dropout_batch_fn
from dit_compress.data.datasets import load_data
from dit_compress.diffusion import objective_for
from dit_compress.diffusion.sampling import sampler_timesteps
from dit_compress.evaluate import bench as B
from dit_compress.evaluate.fidelity import sample_batch
from dit_compress.model import Routing, routing
from dit_compress.train.losses import combined_loss
from dit_compress.train.trainer import to_device

EPS = ("ddpm", "ddim", "dpm-solver")
FLOW = ("euler", "heun", "sde")


def digits_model(prediction="eps", depth=2, seed=0):
    return dc.create("custom", input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=depth, num_heads=2,
                     num_classes=10, pixel=True, prediction=prediction, seed=seed)


def dynamic(model, tokens=False):
    m = add_dynamic_width(model, 0.5, sort_by="none")
    return add_token_router(m, init_bias=1.0) if tokens else m


@contextlib.contextmanager
def fake_cuda():
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield torch.device("cuda")


def on_cuda(t) -> bool:
    return t.device.type == "cuda"


@pytest.mark.parametrize("sampler", EPS + FLOW)
@pytest.mark.parametrize("kind", ["static", "dynamic-dense"])
def test_every_sampler_on_a_fake_cuda_device(sampler, kind):
    """Each sampler's loop, with CFG and a guidance interval, noise drawn on a CPU generator:
    every tensor the loop makes lives on the model's device. (Dynamic models run their
    masked-dense path here: the sliced path reads each timestep's width to the host once per
    run, which a fake tensor, holding no values, cannot give.)"""
    m = digits_model("velocity" if sampler in FLOW else "eps")
    if kind != "static":
        m = dynamic(m, tokens=True)
    with fake_cuda() as cuda, routing(m, Routing.DENSE):
        m = m.to(cuda)
        noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # on the CPU
        x = dc.sample(m, noise, torch.tensor([1, 2, 10]), sampler=sampler, steps=4, cfg_scale=2.0,
                      guidance_interval=(0.0, 0.7), generator=torch.Generator().manual_seed(1))
        assert on_cuda(x) and x.shape == (3, 1, 8, 8)


def _objective(name):
    """(model, teacher, loss_fn, batch_fn) for one training objective, built on the CPU."""
    data = load_data("digits")
    if name == "search":
        st = search_setup(digits_model(depth=4), data, [(1, 2)] * 2, LearnedConfig(steps=4, batch_size=4))
        return st.wrapper, None, st.loss_fn, st.batch_fn
    model = digits_model("velocity" if name == "velocity" else "eps")
    teacher = digits_model(seed=1, depth=4) if name == "distill" else None
    kd = {}
    if name == "distill":
        kd = {"rep": 0.01, "k_sigma": 2.0}
    if name == "dydit":
        model = dynamic(model, tokens=True)
        kd = {"flops_hold": 0, "flops_decay": 2}  # DyDiT defaults otherwise: the full-model loss is on
    model.train()
    loss_fn, _ = combined_loss(objective_for(model.config), model, teacher, kd, total_steps=4)
    batch_fn = condition_dropout_batch_fn(data, 4, model.config, t_strata=4 if name == "dydit" else 0)
    return model, teacher, loss_fn, batch_fn


@pytest.mark.parametrize("name", ["finetune", "velocity", "distill", "dydit", "search"])
def test_a_training_step_of_each_objective_on_a_fake_cuda_device(name):
    """finetune (eps and velocity), distill with a teacher and masked RepKD, DyDiT's FLOPs
    training with its stage-1 full-model loss, and TinyFusion's learned search (Gumbel masks,
    LoRA): batches drawn on the CPU and moved by the trainer's own helper, the teacher on the
    device, the whole loss of a step. (The backward pass cannot run on fake CUDA tensors: the
    autograd engine asks for a real CUDA context. It follows the forward graph's devices.)"""
    model, teacher, loss_fn, batch_fn = _objective(name)
    with fake_cuda() as cuda:
        model = model.to(cuda)
        if teacher is not None:
            teacher.to(cuda)
        batch = to_device(batch_fn(0, torch.Generator().manual_seed(0), 0, 1), cuda)
        out = loss_fn(model, batch, 0)
        assert all(on_cuda(v) for v in out.values() if torch.is_tensor(v)) and out["loss"].requires_grad
        if name == "dydit":
            assert "full_loss" in out and "flops_ratio" in out


def test_eval_sampling_and_bench_loop_on_a_fake_cuda_device():
    """eval's batch (CPU generator noise, class labels) and bench's timed loop and FLOPs meter."""
    m = digits_model()
    with fake_cuda() as cuda:
        m = m.to(cuda)
        x = sample_batch(m, [0, 1, 2, 3], torch.Generator().manual_seed(0), sampler="ddim", steps=3, cfg_scale=2.0)
        assert on_cuda(x)
        rows = B._loop_rows(m, m.config, [2], 1, 1, "ddim", 3, None, 2.0, torch.float32)
        assert rows[0]["batch"] == 2
        rows = B._static_forward_rows(m, m.config, [2], 1, 1, [0, 500], torch.float32)
        assert rows[0]["latency_ms"] > 0
        macs, calls, _ = B._loop_macs(m, m.config, "ddim", 3, None, 2.0, torch.float32)
        assert calls == 3


SYNCS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "nonzero")


@contextlib.contextmanager
def count_host_syncs():
    """Counts every read of a tensor's value to the host (a sync on a GPU) while active."""
    counts = {"n": 0}
    saved = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counting(fn):
        def wrapper(*a, **k):
            counts["n"] += 1
            return fn(*a, **k)
        return wrapper

    for name, fn in saved.items():
        setattr(torch.Tensor, name, counting(fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("sampler", EPS + FLOW)
@pytest.mark.parametrize("kind", ["static", "dynamic-width", "tokens-capacity", "width+tokens-capacity"])
def test_the_sampling_loop_has_no_host_sync_per_step(sampler, kind):
    """Schedule coefficients are host numbers computed once per run; dynamic widths come from
    the run's width cache keyed by the step's host time; token routers with a capacity take a
    static top-k: a step reads nothing back. Counted over runs of 4 and 8 steps with CFG (the
    per-run checks, e.g. the final NaN check, cancel)."""
    m = digits_model("velocity" if sampler in FLOW else "eps")
    if kind.startswith("tokens"):
        m = set_token_capacity(add_token_router(m, init_bias=1.0), 0.5)
    elif kind != "static":
        m = dynamic(m, tokens=kind.endswith("capacity"))
        if kind.endswith("capacity"):
            set_token_capacity(m, 0.5)
        set_banded_width(m, 0.5, sampler_timesteps(sampler, 8, None, m.config))
    noise, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 4])
    counts = []
    for steps in (4, 8):
        with count_host_syncs() as c:
            dc.sample(m, noise, y, sampler=sampler, steps=steps, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
        counts.append(c["n"])
    assert counts[1] == counts[0], f"{(counts[1] - counts[0]) / 4} host syncs per step ({counts})"


def test_exact_token_counts_read_back_each_step_which_the_capacity_avoids():
    """The counter above is able to fail: the exact per-sample token counts (no capacity) read
    their data-dependent shape back at every routed block of every step."""
    m = add_token_router(digits_model(), init_bias=1.0)
    noise, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 4])
    counts = []
    for steps in (4, 8):
        with count_host_syncs() as c:
            dc.sample(m, noise, y, sampler="ddim", steps=steps, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
        counts.append(c["n"])
    assert counts[1] - counts[0] >= 4 * m.config.depth


def _aten_ops(model, x, t, y, run=None, views=True) -> list[str]:
    """The aten ops one forward dispatches (``views=False``: without the zero-copy views)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if views or not func._schema.returns or func._schema.returns[0].alias_info is None:
                ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), Count():
        model(x, t, y, run=run)
    return ops


def test_routing_adds_no_ops_per_forward_beyond_the_router_and_its_gather():
    """What a routed forward runs beyond the dense model's ops, counted op by op: per block the
    token router (two linears, a ReLU, a squeeze), the top-k, the index view, one gather, the
    gate product and a scatter-add in place of the gated residual add. A width-routed forward at
    a cached width runs exactly the dense model's ops (no router), at every width."""
    from collections import Counter

    from dit_compress.model.dit import width_cache
    from dit_compress.model.run import RunContext

    depth = 3
    dense = digits_model(depth=depth)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 4])
    base = Counter(_aten_ops(dense, x, torch.full((2,), 500), y))
    tok = set_token_capacity(add_token_router(dense, init_bias=1.0), 0.5)
    routed = Counter(_aten_ops(tok, x, torch.full((2,), 500), y))
    per_block = {"aten.linear": 2, "aten.relu": 1, "aten.squeeze": 1, "aten.topk": 1, "aten.unsqueeze": 1,
                 "aten.expand": 1, "aten.gather": 1, "aten.mul": 1, "aten.scatter_add_": 1}
    assert dict(routed - base) == {k: v * depth for k, v in per_block.items()}
    assert dict(base - routed) == {"aten.addcmul": depth}
    wid = dynamic(dense)
    times = [100, 500, 900]
    set_banded_width(wid, 0.5, times)
    with width_cache(wid, times):
        assert len({tuple(wid._width_cache[t]) for t in times}) >= 2  # two widths at least
        plain = Counter(_aten_ops(dense, x, torch.full((2,), 500), y, views=False))
        for t in times:
            ops = Counter(_aten_ops(wid, x, torch.full((2,), t), y, run=RunContext(t=t), views=False))
            assert ops == plain
