"""DyDiT on PixArt: dynamic width (self-attention heads and feed-forward channels by
timestep; cross-attention at full width) and token routing before the feed-forward, and
PixArt's FLOPs against torch's own counter on diffusers' model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import training_vs_inference_flops
from test_pixart import diffusers_out, diffusers_pixart, inputs
from test_pixart_training import one_line_refusal, run, world  # noqa: F401 - `world` is a fixture

import dit_compress as dc
from dit_compress.compress import dynamic as Y
from dit_compress.data.datasets import load_data
from dit_compress.model.flops import static_macs
from dit_compress.model.pixart import Captions


def pixart(tmp_path, layers=4):
    diffusers_pixart(layers=layers).save_pretrained(tmp_path / "t")
    return dc.load_model(str(tmp_path / "t"))


def out(m, x, t, c, mode):
    m.routing = mode
    with torch.no_grad():
        return m(x, t, c)


def test_pixart_flops_equal_torch_flop_counter_on_diffusers_model(tmp_path):
    """2 x our MACs == the FLOPs torch's FlopCounterMode counts in diffusers' forward (math
    attention, so its products are counted), cross-attention to 5 caption tokens included."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    d = diffusers_pixart(layers=4)
    d.save_pretrained(tmp_path / "t")
    m = dc.load_model(str(tmp_path / "t"))
    x, t, c = inputs(batch=1, tokens=5)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        diffusers_out(d, x, t, c)
    assert fc.get_total_flops() == 2 * static_macs(m.config.copy(caption_length=5))["total"]


@pytest.mark.parametrize("sort_by", ["magnitude", "taylor"])
def test_sorting_keeps_the_function_and_all_on_routers_reproduce_the_source(tmp_path, world, sort_by):  # noqa: F811
    m = dc.load_model(str(world / "pipe"))
    data = load_data(str(world / "shards"), cfg=m.config) if sort_by == "taylor" else None
    w = Y.add_dynamic_width(m, 0.8, sort_by, data)
    key = "transformer_blocks.0.ff.net.0.proj.weight"
    assert not torch.equal(w.state_dict()[key], m.state_dict()[key])  # really permuted
    x, t, c = inputs(batch=3)
    for mode in ("fast", "dense"):
        assert torch.allclose(out(w, x, t, c, mode), out(m, x, t, c, "fast"), atol=1e-5)
    for hs, cs in Y.importance(Y.add_dynamic_width(m, 0.8, "magnitude"), "magnitude"):
        assert torch.all(hs[:-1] >= hs[1:] - 1e-6) and torch.all(cs[:-1] >= cs[1:] - 1e-6)


def _routed(tmp_path, width=True, tokens=False):
    w = pixart(tmp_path)
    if width:
        w = Y.add_dynamic_width(w, 0.8)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # routers that depend on t: different widths at different timesteps
            for b in w.blocks:
                for r in (b.head_router, b.channel_router):
                    r.linear.weight.copy_(torch.randn(r.linear.weight.shape, generator=g) * 0.3)
                    r.linear.bias.copy_(torch.tensor([2.0, 0.0, -1.0]))
    if tokens:
        w = Y.add_token_router(w)
        Y.set_token_keep(w, 0.5)
    return w


@pytest.mark.parametrize("width,tokens", [(True, False), (False, True), (True, True)])
def test_fast_paths_equal_masked_dense_and_under_guided_sampling(tmp_path, width, tokens):
    w = _routed(tmp_path, width, tokens)
    x, t, c = inputs(batch=4)
    t = torch.tensor([5, 300, 700, 999])
    if width:
        widths = {tuple(v) for v in (tuple(map(tuple, r)) for r in w.widths_at(t))}
        assert len(widths) > 1  # the batch really mixes widths
    for tt in (t, torch.full_like(t, 400)):
        fast, dense = out(w, x, tt, c, "fast"), out(w, x, tt, c, "dense")
        assert torch.allclose(fast, dense, atol=1e-5), (fast - dense).abs().max()
    neg = Captions(torch.randn(1, 5, 32), torch.tensor([[1.0, 0, 0, 0, 0]]))
    w.routing = "fast"
    a = dc.sample(w, x[:2], c[:2], sampler="ddim", steps=6, cfg_scale=4.5, negative=neg)
    w.routing = "dense"
    b = dc.sample(w, x[:2], c[:2], sampler="ddim", steps=6, cfg_scale=4.5, negative=neg)
    # float32 rounding relative to the sample's scale (this random model's samples reach |x| ~ 600)
    assert (a - b).abs().max() <= 1e-4 + 2e-6 * a.abs().max(), ((a - b).abs().max(), a.abs().max())
    info = json.loads(run("info", _save(w, tmp_path / "dyn"), "--json").stdout)
    assert info["inference_flops_ratio"] < 0.95
    if tokens:
        assert 0.3 < info["token_keep_ratio"] < 0.7


def _save(m, path):
    dc.save_model(m, path)
    return path


@pytest.mark.parametrize("tokens", [False, True])
def test_inference_flops_equal_the_training_expectation(tmp_path, world, tokens):  # noqa: F811
    """After a short FLOPs-target run on caption data, the deterministic inference masks run
    the block FLOPs that training expects (Monte Carlo over the Gumbel draws)."""
    from dit_compress.train.api import train_model
    from dit_compress.train.trainer import TrainConfig

    # a low initial bias and a high rate: this test model's timestep embeddings are small, so its
    # routers move slowly at the rates the digits DiT test uses
    m = Y.add_dynamic_width(dc.load_model(str(world / "pipe")), target_flops=0.8, init_bias=1.0)
    if tokens:
        m = Y.add_token_router(m, init_bias=1.0)
    data = load_data(str(world / "shards"), cfg=m.config)
    cfg = TrainConfig(steps=80, batch_size=8, lr=5e-3, ema=0.0, log_every=10)
    m = train_model(m, data, cfg, tmp_path / "w", kd={"flops_hold": 0, "flops_decay": 15, "full_loss": 0.0}).model
    train_exp, infer = training_vs_inference_flops(m, data, torch.arange(12).repeat(2))
    assert train_exp < 0.85, train_exp  # the routers did switch work off
    assert abs(infer - train_exp) < 0.03, (infer, train_exp)


def test_the_cli_path_and_what_dynamic_pixarts_refuse(tmp_path, world):  # noqa: F811
    r = run("add-dynamic-width", world / "pipe", "--target-flops", "0.8", "-o", tmp_path / "w")
    assert r.exit_code == 0, r.output
    r = run("finetune", tmp_path / "w", "--data", world / "shards", "--steps", 4, "--batch-size", 4, "-o", tmp_path / "f")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "f" / "report.json").read_text())
    assert rep["target_block_flops"] == 0.8 and "inference_block_flops_ratio" in rep
    assert np.isfinite(rep["history"][-1]["flops_ratio"])
    # the diffusers layout has no routers: refused
    one_line_refusal(run("convert", tmp_path / "f", "--to", "diffusers", "-o", tmp_path / "d"))
    assert not (tmp_path / "d").exists()
    back = dc.load_model(str(tmp_path / "f"))
    assert back.config.width is not None and type(back.blocks[0]).__name__ == "RoutedPixArtBlock"
    r = run("add-token-router", world / "pipe", "--target-flops", "0.8", "-o", tmp_path / "k")
    assert r.exit_code == 0, r.output
    r = run("finetune", tmp_path / "k", "--data", world / "shards", "--steps", 4, "--batch-size", 4, "-o", tmp_path / "kf")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "kf" / "report.json").read_text())["target_block_flops"] == 0.8


def test_bench_variants_on_the_pixart_shape():
    from dit_compress.evaluate.bench import build

    m = build("shape:PixArt-XL/2-256+d2+dynwidth0.5", schedule=("ddim", 4, None))
    assert m.config.depth == 2 and m.config.width is not None
    ts = [999, 749, 499, 249]
    shares = [sum(h for h, _ in layer) / (2 * m.config.num_heads) for layer in m.widths_at(torch.tensor(ts))]
    assert abs(np.mean(shares) - 0.5) < 0.1 and len(set(shares)) > 1  # banded: width changes with t
