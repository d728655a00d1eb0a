"""DyDiT transforms: sorting is a no-op on the function, fast paths equal the masked-dense
reference, all-on routers reproduce the source, training moves FLOPs toward the target."""

import numpy as np
import pytest
import torch
from helpers import tiny_config, tiny_model, training_vs_inference_flops
from typer.testing import CliRunner

from dit_compress.cli import app
from dit_compress.compress import depth as D
from dit_compress.compress import dynamic as Y
from dit_compress.errors import DitcError, UsageError
from dit_compress.formats import load_model, save_model
from dit_compress.model import DiT
from dit_compress.data.datasets import load_data

runner = CliRunner()


def wide_model(seed=0):
    return tiny_model(seed=seed, hidden_size=64, num_heads=4, depth=4)


def xs(batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randint(0, 11, (batch,), generator=g))


def outputs(m, x, t, y, mode):
    m.routing = mode
    with torch.no_grad():
        return m(x, t, y)


@pytest.mark.parametrize("sort_by", ["magnitude", "taylor"])
def test_sorting_keeps_function_and_all_on_routers_reproduce(sort_by):
    m = wide_model()
    data = None
    if sort_by == "taylor":
        from dit_compress.data.datasets import TensorData

        data = TensorData(torch.randn(16, 4, 8, 8), torch.randint(0, 10, (16,)))
    w = Y.add_dynamic_width(m, 0.5, sort_by, data)
    x, t, y = xs()
    assert not torch.equal(w.state_dict()["blocks.0.mlp.fc1.weight"], m.state_dict()["blocks.0.mlp.fc1.weight"])
    for mode in ("fast", "dense"):
        assert torch.allclose(outputs(w, x, t, y, mode), outputs(m, x, t, y, "fast"), atol=1e-5)
    tk = Y.add_token_router(w)
    assert torch.allclose(outputs(tk, x, t, y, "fast"), outputs(m, x, t, y, "fast"), atol=1e-5)


def test_sorted_order_is_descending_importance():
    m = wide_model()
    w = Y.add_dynamic_width(m, 0.5, "magnitude")
    for hs, cs in Y.importance(w, "magnitude"):
        assert torch.all(hs[:-1] >= hs[1:] - 1e-6) and torch.all(cs[:-1] >= cs[1:] - 1e-6)


def _routed(seed=0, width=True, tokens=True):
    m = wide_model(seed)
    if width:
        m = Y.add_dynamic_width(m, 0.5)
        with torch.no_grad():  # timestep-dependent routers: different widths at different t
            g = torch.Generator().manual_seed(seed)
            for b in m.blocks:
                for r in (b.head_router, b.channel_router):
                    r.linear.weight.copy_(torch.randn(r.linear.weight.shape, generator=g) * 0.2)
                    r.linear.bias.copy_(torch.tensor([1.0, 0.5, 0.0, -0.5]))
    if tokens:
        m = Y.add_token_router(m)
        Y.set_token_keep(m, 0.5)
    return m


@pytest.mark.parametrize("width,tokens", [(True, False), (False, True), (True, True)])
def test_fast_paths_equal_masked_dense(width, tokens):
    m = _routed(width=width, tokens=tokens)
    x, t, y = xs(batch=6)
    # mixed timesteps in one batch (split by width) and a shared timestep (one slice)
    for tt in (t, torch.full_like(t, 400)):
        fast, dense = outputs(m, x, tt, y, "fast"), outputs(m, x, tt, y, "dense")
        assert torch.allclose(fast, dense, atol=1e-5), (fast - dense).abs().max()
    # the routers really are switching work off
    from dit_compress.evaluate.describe import describe

    d = describe(m)
    assert d["inference_flops_ratio"] < 0.95


def test_fast_path_under_cfg_sampling():
    import dit_compress

    m = _routed()
    noise = torch.randn(3, 4, 8, 8)
    y = torch.tensor([1, 2, 3])
    m.routing = "fast"
    a = dit_compress.sample(m, noise, y, sampler="ddim", steps=5, cfg_scale=3.0)
    m.routing = "dense"
    b = dit_compress.sample(m, noise, y, sampler="ddim", steps=5, cfg_scale=3.0)
    assert torch.allclose(a, b, atol=1e-4)


def test_chaining_in_any_order():
    m = tiny_model(hidden_size=64, num_heads=4, depth=4)
    x, t, y = xs()
    a = D.prune_layers(Y.add_dynamic_width(m), [0, 2])
    b = Y.add_dynamic_width(D.prune_layers(m, [0, 2]))
    c = Y.add_dynamic_width(Y.add_token_router(D.prune_layers(m, [0, 2])))
    ref = outputs(D.prune_layers(m, [0, 2]), x, t, y, "fast")
    for mm in (a, b, c):
        assert mm.config.kept_layers == [0, 2]
        assert torch.allclose(outputs(mm, x, t, y, "fast"), ref, atol=1e-5)
    assert [s["op"] for s in c.config.lineage] == ["prune-depth", "add-token-router", "add-dynamic-width"] or \
        [s["op"] for s in c.config.lineage][-2:] == ["add-token-router", "add-dynamic-width"]


def test_bad_inputs():
    m = wide_model()
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(UsageError, match="`target_flops` must be in"):
            Y.add_dynamic_width(m, bad)
    w = Y.add_dynamic_width(m, 0.5)
    with pytest.raises(DitcError, match="already has dynamic-width"):
        Y.add_dynamic_width(w, 0.5)
    with pytest.raises(DitcError, match="already has token routers"):
        Y.add_token_router(Y.add_token_router(m))
    odd = DiT(tiny_config(hidden_size=36, num_heads=4, mlp_ratio=2.5))
    with pytest.raises(UsageError, match="cannot be split into 4"):
        Y.add_dynamic_width(odd, 0.5)
    with pytest.raises(UsageError, match="taylor needs `data`"):
        Y.add_dynamic_width(m, 0.5, "taylor")


def test_dynamic_model_round_trips_and_refuses_static_formats(tmp_path):
    m = _routed()
    save_model(m, tmp_path / "d")
    back = load_model(tmp_path / "d")
    x, t, y = xs()
    assert torch.equal(outputs(back, x, t, y, "fast"), outputs(m, x, t, y, "fast"))
    with pytest.raises(DitcError, match="dynamic routers"):
        save_model(m, tmp_path / "x", format="diffusers")
    assert not (tmp_path / "x").exists()


def test_short_finetune_moves_flops_toward_target(tmp_path):
    """On the digits testbed: routers trained with the FLOPs loss switch work off."""
    from dit_compress.train.api import train_model
    from dit_compress.train.trainer import TrainConfig

    base = load_model("digits-dit")
    w = Y.add_token_router(Y.add_dynamic_width(base, target_flops=0.5))
    from dit_compress.evaluate.describe import describe

    before = describe(w)["inference_flops_ratio"]
    cfg = TrainConfig(steps=40, batch_size=16, lr=1e-3, ema=0.0, log_every=5)
    res = train_model(w, load_data("digits"), cfg, tmp_path / "w", kd={"flops_hold": 2, "flops_decay": 15})
    after = describe(res.model)["inference_flops_ratio"]
    ratios = [h["flops_ratio"] for h in res.history]
    assert before > 0.95
    assert after < before - 0.1, (before, after)
    assert ratios[-1] < ratios[0]


def test_cli_transforms(tmp_path):
    save_model(wide_model(), tmp_path / "m")
    r = runner.invoke(app, ["add-dynamic-width", str(tmp_path / "m"), "--target-flops", "0.7", "-o", str(tmp_path / "w")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "w" / "width_profile.png").exists()
    r = runner.invoke(app, ["add-token-router", str(tmp_path / "w"), "-o", str(tmp_path / "wt")])
    assert r.exit_code == 0, r.output
    m = load_model(tmp_path / "wt")
    assert m.config.width.target_flops == 0.7 and m.config.tokens is not None
    r = runner.invoke(app, ["add-dynamic-width", str(tmp_path / "wt"), "-o", str(tmp_path / "again")])
    assert r.exit_code == 1 and "already has" in r.stderr
    r = runner.invoke(app, ["add-dynamic-width", str(tmp_path / "m"), "--target-flops", "2", "-o", str(tmp_path / "b")])
    assert r.exit_code == 2 and "(0, 1]" in r.stderr
    r = runner.invoke(app, ["info", str(tmp_path / "wt"), "--json"])
    assert '"inference_flops_ratio"' in r.stdout and '"token_keep_ratio"' in r.stdout


@pytest.mark.parametrize("tokens", [False, True])
def test_inference_flops_equal_training_expectation(tmp_path, tokens):
    """After a short FLOPs-target run the deterministic inference masks run the FLOPs that
    training expects (Monte Carlo over the Gumbel draws), on the same inputs."""
    from dit_compress.diffusion.measure import inference_flops
    from dit_compress.train.api import train_model
    from dit_compress.train.trainer import TrainConfig

    data = load_data("digits")
    m = Y.add_dynamic_width(load_model("digits-dit"), target_flops=0.5, init_bias=3.0)
    if tokens:
        m = Y.add_token_router(m, init_bias=3.0)
    cfg = TrainConfig(steps=50, batch_size=16, lr=2e-3, ema=0.0, log_every=10)
    m = train_model(m, data, cfg, tmp_path / "w", kd={"flops_hold": 0, "flops_decay": 15, "full_loss": 0.0}).model
    train_exp, infer = training_vs_inference_flops(m, data, torch.arange(48))
    assert train_exp < 0.85, train_exp  # the routers did switch work off
    assert abs(infer - train_exp) < 0.03, (infer, train_exp)
    if not tokens:  # the sampler-level figure of `ditc info` agrees with the per-forward one
        e = inference_flops(m, "ddim", 50)
        assert abs(e["block_flops_ratio"] - float(np.mean(list(e["block_ratio_per_t"].values())))) < 1e-9


def test_width_cache_runs_the_routers_once_per_sampling_run():
    """Widths depend on t only: a sampling run resolves them in one router pass per block
    (not one per call), and sampling from the cache equals the masked-dense reference."""
    import dit_compress

    m = _routed(tokens=False)
    calls = []
    hooks = [b.head_router.register_forward_hook(lambda *a: calls.append(1)) for b in m.blocks]
    noise, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    m.routing = "fast"
    a = dit_compress.sample(m, noise, y, sampler="ddim", steps=6, cfg_scale=3.0)
    assert len(calls) == len(m.blocks)
    calls.clear()
    m.routing = "dense"  # no cache: the routers run on every call (6 steps)
    b = dit_compress.sample(m, noise, y, sampler="ddim", steps=6, cfg_scale=3.0)
    assert len(calls) == 6 * len(m.blocks)
    for h in hooks:
        h.remove()
    assert torch.allclose(a, b, atol=1e-4)
    assert m._width_cache is None  # the cache lives for one run only


def test_banded_width_routers_follow_the_bands_and_average_the_share():
    from dit_compress.diffusion.measure import FlopsMeter
    from dit_compress.diffusion.sampling import sampler_timesteps

    m = Y.add_dynamic_width(wide_model(), 0.5, sort_by="none").eval()
    ts = sampler_timesteps("ddim", 10, None, m.config)
    shares = Y.set_banded_width(m, 0.5, ts)
    assert sorted(set(shares)) == [0.25, 0.5, 0.75] and sum(shares) / len(shares) == 0.5
    # the noisiest third (largest DiT t) narrow, the cleanest third wide: 1, 2 and 3 of 4 heads per layer
    widths = m.widths_at(torch.tensor(ts))
    for t, w in zip(ts, widths):
        rank = sorted(ts, reverse=True).index(t)
        want = 1 if rank < 3 else (3 if rank >= 7 else 2)
        assert [h for h, _ in w] == [want] * 4 and [c for _, c in w] == [want * 64] * 4  # MLP 256 = 4 groups of 64
    import dit_compress

    with FlopsMeter(m) as meter:  # measured over the real loop (CFG, cached widths): the block FLOPs average 0.5
        dit_compress.sample(m, torch.randn(2, 4, 8, 8), torch.tensor([0, 1]), sampler="ddim", steps=10, cfg_scale=2.0)
    assert meter.result()["calls"] == 10 and abs(meter.result()["block_flops_ratio"] - 0.5) < 1e-6


def test_compiled_sampling_of_a_dynamic_model_equals_eager_with_bounded_graphs():
    """sample(compile=True): three distinct widths over the loop, four blocks, two batch
    sizes, and still at most two compiled graphs (widths are symbolic ints); same samples."""
    import dit_compress
    from dit_compress.diffusion.sampling import sampler_timesteps
    from dit_compress.model.compile import compiled_graphs

    m = Y.add_dynamic_width(wide_model(), 0.5, sort_by="none").eval()
    Y.set_banded_width(m, 0.5, sampler_timesteps("ddim", 10, None, m.config))
    noise, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    eager = dit_compress.sample(m, noise, y, sampler="ddim", steps=10, cfg_scale=2.0)
    g0 = compiled_graphs()
    compiled = dit_compress.sample(m, noise, y, sampler="ddim", steps=10, cfg_scale=2.0, compile=True)
    assert torch.allclose(compiled, eager, atol=1e-3), (compiled - eager).abs().max()
    dit_compress.sample(m, noise[:2], y[:2], sampler="ddim", steps=10, cfg_scale=2.0, compile=True)
    assert 1 <= compiled_graphs() - g0 <= 2


def test_token_capacity_at_the_routers_own_count_equals_the_exact_path_and_masked_dense():
    """A capacity is a static k per block: at the very count the routers choose for a sample
    (one sample per call, per-block capacities measured on the exact path), the top-k gather
    path equals the exact path and the masked-dense reference; saved and reloaded, the model
    keeps its capacity."""
    from dit_compress.diffusion.measure import FlopsMeter
    from dit_compress.model.routers import expected_topk_mask

    m = _routed(width=True, tokens=True)
    x, t, y = xs(batch=3)
    for i in range(3):
        xi, ti, yi = x[i:i + 1], t[i:i + 1], y[i:i + 1]
        Y.set_token_capacity(m, None)
        counts = []
        hooks = [b.token_router.register_forward_hook(
            lambda mod, a, out: counts.append(float(expected_topk_mask(out).sum()))) for b in m.blocks]
        exact = outputs(m, xi, ti, yi, "fast")
        for h in hooks:
            h.remove()
        N = m.config.num_patches
        Y.set_token_capacity(m, [c / N for c in counts])
        capped, dense = outputs(m, xi, ti, yi, "fast"), outputs(m, xi, ti, yi, "dense")
        assert torch.allclose(capped, exact, atol=1e-6) and torch.allclose(capped, dense, atol=1e-5)
        with FlopsMeter(m) as meter:
            outputs(m, xi, ti, yi, "fast")
        assert meter.result()["token_capacity"]["dropped_share"] == 0.0
    Y.set_token_capacity(m, 0.25)
    with FlopsMeter(m) as meter:  # a quarter of the tokens where the routers want about half
        outputs(m, x, t, y, "fast")
    r = meter.result()
    assert abs(r["token_keep_ratio"] - 0.25) < 1e-9 and 0.2 < r["token_capacity"]["dropped_share"] < 0.8


def test_token_capacity_is_saved_and_follows_depth_pruning(tmp_path):
    m = Y.set_token_capacity(_routed(width=False, tokens=True), [0.25, 0.5, 0.75, 1.0])
    save_model(m, tmp_path / "m")
    back = load_model(str(tmp_path / "m"))
    assert back.config.tokens.capacity == [0.25, 0.5, 0.75, 1.0] and [b.capacity for b in back.blocks] == [0.25, 0.5, 0.75, 1.0]
    x, t, y = xs()
    assert torch.equal(outputs(back, x, t, y, "fast"), outputs(m, x, t, y, "fast"))
    pruned = D.prune_layers(back, [1, 3])
    assert pruned.config.tokens.capacity == [0.5, 1.0] and [b.capacity for b in pruned.blocks] == [0.5, 1.0]


@pytest.mark.parametrize("capacity", [0, -0.5, 1.5, float("nan"), "half", [0.5]])
def test_a_token_capacity_outside_0_1_is_refused(capacity):
    m = _routed(width=False, tokens=True)
    with pytest.raises(UsageError, match="capacity"):
        Y.set_token_capacity(m, capacity)
    with pytest.raises(UsageError, match="token routers"):
        Y.set_token_capacity(wide_model(), 0.5)


@pytest.mark.parametrize("args,msg", [
    (["--token-capacity", "0"], "token-capacity"),
    (["--token-capacity", "1.01"], "token-capacity"),
    (["--cuda-graphs", "on"], "CUDA device"),
    (["--cuda-graphs", "sometimes"], "cuda-graphs"),
    (["--device", "cuda"], "no CUDA device"),
    (["--variants", "d6,width0.5", "--token-capacity", "0.5"], "none of the benched models has them"),
    (["--variants", "tokens0.5", "--dense-masks", "--token-capacity", "0.5"], "give one or the other"),
])
def test_bench_bad_speed_options_are_one_line_exit_2(args, msg):
    r = runner.invoke(app, ["bench", "--shape", "DiT-S/2", "--device", "cpu", *args])
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_cuda_graphs_on_the_cpu_are_refused_in_sample():
    import dit_compress as dc

    m = wide_model()
    with pytest.raises(UsageError, match="CUDA graphs need the model on a CUDA device"):
        dc.sample(m, torch.randn(1, 4, 8, 8), torch.tensor([1]), sampler="ddim", steps=2, cuda_graphs="on")
    with pytest.raises(UsageError, match="cuda_graphs"):
        dc.sample(m, torch.randn(1, 4, 8, 8), torch.tensor([1]), sampler="ddim", steps=2, cuda_graphs="maybe")


@pytest.mark.parametrize("width,tokens", [(True, False), (True, True)])
def test_the_gpu_attention_layout_one_qkv_gemm_per_width_equals_masked_dense(width, tokens, monkeypatch):
    """The projection layout CUDA runs (one qkv GEMM; at a reduced width over the kept rows of
    q, k and v gathered once per width and weight version), forced on the CPU: equal to the
    three-GEMM layout bit for bit, and to masked-dense; a weight update regathers."""
    from dit_compress.model import layers

    m = _routed(width=width, tokens=tokens)
    x, t, y = xs(batch=6)
    t = torch.full_like(t, 400)
    three = outputs(m, x, t, y, "fast")
    monkeypatch.setattr(layers, "FUSE_PROJECTIONS", True)
    one = outputs(m, x, t, y, "fast")
    assert torch.equal(one, three) and torch.allclose(one, outputs(m, x, t, y, "dense"), atol=1e-5)
    assert any(layers._PREFIX_ROWS.get(b.attn) for b in m.blocks)
    with torch.no_grad():
        for b in m.blocks:
            b.attn.qkv.weight.mul_(1.5)
    monkeypatch.setattr(layers, "FUSE_PROJECTIONS", False)
    three = outputs(m, x, t, y, "fast")
    monkeypatch.setattr(layers, "FUSE_PROJECTIONS", True)
    assert torch.equal(outputs(m, x, t, y, "fast"), three)
