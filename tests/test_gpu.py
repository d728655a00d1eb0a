"""Real CUDA: a training step of each objective with backward (fp32 and bf16 autocast), the
sliced and gathered paths against masked-dense, CUDA-graph capture and replay of each width
profile and of token capacity, and CPU against CUDA samples. Skipped (with the reason) where
no CUDA device is present; benchmarks/gpu_check.sh runs them on a GPU machine."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize
from test_devices import _objective, digits_model, dynamic

import dit_compress as dc
from dit_compress.compress.dynamic import set_banded_width, set_token_capacity, set_token_keep
from dit_compress.diffusion.sampling import loop_time_inputs
from dit_compress.model import Routing, routing
from dit_compress.model.graphs import graph_cache
from dit_compress.train.trainer import to_device

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["finetune", "velocity", "distill", "dydit", "search"])
def test_a_training_step_of_each_objective_with_backward_on_cuda(name, precision):
    model, teacher, loss_fn, batch_fn = _objective(name)
    model.to(CUDA)
    if teacher is not None:
        teacher.to(CUDA)
    batch = to_device(batch_fn(0, torch.Generator().manual_seed(0), 0, 1), CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = loss_fn(model, batch, 0)
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.device.type == "cuda" and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(out["loss"])


def _dynamic(tokens: bool, capacity=None, seed=0):
    m = dynamic(randomize(digits_model(depth=3, seed=seed)), tokens=tokens)
    set_banded_width(m, 0.5, loop_time_inputs(m.config, "ddim", 12, None))
    if tokens:
        set_token_keep(m, 0.5)
        if capacity is not None:
            set_token_capacity(m, capacity)
    return m.to(CUDA)


@pytest.mark.parametrize("tokens", [False, True])
def test_sliced_and_gathered_paths_equal_masked_dense_on_cuda(tokens):
    m = _dynamic(tokens)
    x, y = torch.randn(6, 1, 8, 8, device=CUDA), torch.arange(6, device=CUDA)
    for t in (torch.tensor([0, 100, 400, 700, 900, 999], device=CUDA), torch.full((6,), 400, device=CUDA)):
        with torch.no_grad():
            fast = m(x, t, y)
            with routing(m, Routing.DENSE):
                dense = m(x, t, y)
        assert torch.allclose(fast, dense, atol=1e-5), (fast - dense).abs().max()


def _sample(m, graphs, steps=12):
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return dc.sample(m, noise, torch.tensor([1, 2, 3, 4]), sampler="ddim", steps=steps, cfg_scale=2.0,
                     generator=torch.Generator().manual_seed(1), cuda_graphs=graphs)


@pytest.mark.parametrize("kind", ["static", "width", "width+capacity"])
def test_each_call_signature_is_captured_once_and_replays_the_eager_result(kind):
    if kind == "static":
        m = randomize(digits_model(depth=3)).to(CUDA)
        profiles = 1
    else:
        m = _dynamic(tokens=kind.endswith("capacity"), capacity=0.5)
        times = loop_time_inputs(m.config, "ddim", 12, None)
        profiles = len({tuple(w) for w in m.widths_at(torch.tensor(times))})
        assert profiles >= 2  # the bands: on 2 heads the middle one rounds to one of the others
    eager = _sample(m, "off")
    graphed = _sample(m, "on")
    cache = graph_cache(m)
    assert cache.captures == profiles and cache.replays == 12
    assert torch.allclose(graphed, eager, atol=1e-5), (graphed - eager).abs().max()
    again = _sample(m, "on")  # the same weights: the graphs are reused
    assert cache.captures == profiles and torch.equal(again, graphed)
    with torch.no_grad():
        next(m.parameters()).mul_(1.01)  # an in-place weight update drops them
    _sample(m, "on")
    assert graph_cache(m) is not cache


def test_exact_token_counts_are_not_captured_and_auto_runs_them_eagerly():
    m = _dynamic(tokens=True)
    with pytest.raises(dc.UsageError, match="capacity"):
        _sample(m, "on")
    assert torch.equal(_sample(m, "auto"), _sample(m, "off"))


def test_cpu_and_cuda_samples_agree():
    m = randomize(digits_model(depth=3))
    cpu = _sample(m, "off")
    cuda = _sample(m.to(CUDA), "on").cpu()
    assert (cpu - cuda).abs().max() < 1e-3


def test_a_new_capacity_or_routing_mode_is_never_served_an_old_graph_and_a_sampled_model_copies():
    """A graph is keyed by the model's config (a capacity replaces it), routing mode, training
    flag and autocast state: changing any of them is another capture, never a stale replay; the
    graphs live outside the module, so a sampled model deep-copies (EMA, transforms) and, moved to
    the CPU, frees them."""
    import copy

    m = _dynamic(tokens=True, capacity=0.5)
    first = _sample(m, "on")
    set_token_capacity(m, 0.125)
    assert torch.equal(_sample(m, "on"), _sample(m, "off")) and not torch.equal(_sample(m, "off"), first)
    with routing(m, Routing.DENSE):
        set_token_capacity(m, None)
        assert torch.equal(_sample(m, "auto"), _sample(m, "off"))
    copy.deepcopy(m)
    m.cpu()
    _sample(m, "auto")
    assert graph_cache(m) is None
