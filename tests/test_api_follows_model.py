"""The public surface follows the model's family and objective (or refuses in one line):
losses, exports that reload without options, sampling modes, compiled copies, search hooks,
token-router targets, Taylor importance, and the FLOPs a short DyDiT fine-tune promises."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import randomize

import dit_compress as dc
from dit_compress.compress import dynamic as Y
from dit_compress.data.datasets import load_data
from dit_compress.diffusion import GaussianDiffusion
from dit_compress.diffusion.measure import inference_flops
from dit_compress.model.compile import compile_model


def pixel(prediction="eps", hidden=32, heads=2, depth=2, seed=0):
    m = dc.create("custom", input_size=8, patch_size=2, in_channels=1, hidden_size=hidden, depth=depth, num_heads=heads,
                  num_classes=10, pixel=True, prediction=prediction, seed=seed)
    return randomize(m, seed).eval()


def test_training_losses_follow_the_objective():
    """On a velocity model the public loss is SiT's velocity loss (re-derived here), on an eps
    model DiT's hybrid loss; a time of the wrong kind is refused, not silently misread."""
    g = torch.Generator().manual_seed(0)
    x1, noise, y = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g), torch.tensor([1, 2, 3, 4])
    sit = pixel("velocity")
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    res = dc.training_losses(sit, x1, t, y, noise=noise)
    tb = t.view(-1, 1, 1, 1).double()
    xt = tb * x1.double() + (1 - tb) * noise.double()
    with torch.no_grad():
        v = sit(xt.float(), t, y)[:, :1].double()
    want = ((v - (x1.double() - noise.double())) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(res["loss"].double(), want, atol=1e-5) and torch.all(res["vb"] == 0)
    dit = pixel("eps")
    steps = torch.tensor([0, 10, 500, 999])
    ref = GaussianDiffusion.create(learn_sigma=True).training_losses(dit, x1, steps, y, noise=noise)
    assert torch.allclose(dc.training_losses(dit, x1, steps, y, noise=noise)["loss"], ref["loss"])
    with pytest.raises(dc.UsageError, match="velocity"):
        dc.training_losses(sit, x1, steps, y)
    with pytest.raises(dc.UsageError, match="integer diffusion steps"):
        dc.training_losses(dit, x1, t, y)


@pytest.mark.parametrize("source", ["digits-sit", "unpublished-dit", "repa"])
def test_original_export_reloads_exactly_with_no_options(tmp_path, source):
    """SiT (velocity), a DiT of an unpublished width (heads not inferable) and a REPA-time
    model -> original .pt -> load with no options: the same model, stated facts recorded."""
    if source == "digits-sit":
        m = dc.load_model("digits-sit")
    elif source == "repa":
        m = pixel("velocity")
        m.config = m.config.copy(time_input="repa")
    else:
        m = pixel("eps", hidden=40, heads=5)
    dc.save_model(m, tmp_path / "m.pt", format="original")
    back = dc.load_model(str(tmp_path / "m.pt"))
    for fact in ("prediction", "time_input", "num_heads", "learn_sigma", "num_classes", "input_size"):
        assert getattr(back.config, fact) == getattr(m.config, fact), fact
    a, b = m.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_velocity_models_export_to_diffusers_without_claiming_an_eps_pipeline(tmp_path):
    m = pixel("velocity")
    dc.save_model(m, tmp_path / "d", format="diffusers")
    assert (tmp_path / "d" / "transformer" / "config.json").exists() and not (tmp_path / "d" / "model_index.json").exists()
    back = dc.load_model(str(tmp_path / "d"))
    assert back.config.prediction == "velocity"
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in m.state_dict().items())
    dc.save_model(pixel(), tmp_path / "e", format="diffusers")
    assert (tmp_path / "e" / "model_index.json").exists()  # eps models stay loadable in DiTPipeline


def test_sample_runs_a_dynamic_model_in_eval_mode_and_restores_its_mode():
    m = Y.add_token_router(Y.add_dynamic_width(pixel(), 0.5, sort_by="none"), init_bias=0.5).train()
    noise, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    a = dc.sample(m, noise, y, sampler="ddim", steps=4, cfg_scale=2.0)
    assert m.training
    b = dc.sample(m, noise, y, sampler="ddim", steps=4, cfg_scale=2.0)
    assert torch.equal(a, b)  # no Gumbel draws: the inference masks
    m.eval()
    assert torch.equal(dc.sample(m, noise, y, sampler="ddim", steps=4, cfg_scale=2.0), a) and not m.training


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_compiled_models_copy_runs_its_own_weights(dynamic):
    m = pixel(depth=2)
    if dynamic:
        m = Y.add_dynamic_width(m, 0.5, sort_by="none")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    compile_model(m)
    twin = copy.deepcopy(m)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
        eager_twin = copy.deepcopy(twin)
        eager_twin.__dict__.pop("_ditc_compiled", None)
        for b in eager_twin.blocks:
            b.__dict__.pop("_ditc_compiled", None)
        out_m, out_twin, want = m(x, t, y), twin(x, t, y), eager_twin(x, t, y)
    assert not torch.allclose(out_m, out_twin)
    assert torch.allclose(out_twin, want, atol=1e-4), (out_twin - want).abs().max()


def test_the_learned_search_leaves_no_hooks_on_the_recovered_model(tmp_path):
    from dit_compress.compress.depth import LearnedConfig, learned_search

    m = pixel(depth=4)
    _, _, recovered, _, _, _ = learned_search(m, load_data("digits"), [(1, 2)] * 2,
                                              LearnedConfig(steps=2, batch_size=4, recover="full"), tmp_path / "w")
    assert all(not b._forward_hooks for b in recovered.blocks) and not m.blocks[0]._forward_hooks


def test_taylor_importance_sums_each_batchs_absolute_estimate():
    """DynaBERT (followed by DyDiT) accumulates |w . g| per batch; summing signed gradients
    first lets batches cancel. Re-derived here with autograd, batch by batch."""
    from dit_compress.data.batches import draw_examples

    m = pixel(depth=2)
    data = load_data("digits")
    got = Y.importance(m, "taylor", data, batches=3, batch_size=8, seed=5)
    diff = GaussianDiffusion.create(learn_sigma=True)
    g = torch.Generator().manual_seed(5)
    want = [torch.zeros(2), torch.zeros(2)]
    for _ in range(3):
        x, y = draw_examples(data, 8, g)
        t = torch.randint(0, 1000, (8,), generator=g)
        noise = torch.randn(x.shape, generator=g)
        mm = copy.deepcopy(m).train()
        loss = diff.training_losses(mm, x, t, y, noise=noise)["loss"].mean()
        W = [mm.blocks[i].attn.qkv.weight for i in range(2)] + [mm.blocks[i].attn.proj.weight for i in range(2)]
        grads = torch.autograd.grad(loss, W)
        for i in range(2):
            qkv = (W[i] * grads[i]).reshape(3, 2, 16, 32).sum(dim=(0, 2, 3))
            proj = (W[2 + i] * grads[2 + i]).reshape(32, 2, 16).sum(dim=(0, 2))
            want[i] += qkv.abs() + proj.abs()
    for i in range(2):
        assert torch.allclose(got[i][0], want[i], rtol=1e-4, atol=1e-9), (got[i][0], want[i])


def test_token_routers_alone_train_toward_their_own_target(tmp_path):
    """`add-token-router --target-flops` on a static model: a short fine-tune brings the
    inference block FLOPs (over DDIM-50) to the target; without a target there is none."""
    src = pixel(depth=2)
    free = Y.add_token_router(src)
    assert free.config.flops_target is None
    dc.save_model(src, tmp_path / "m")
    _, rep = dc.add_token_router(str(tmp_path / "m"), output=tmp_path / "tok", target_flops=0.8, init_bias=3.0)
    assert rep["inference_block_flops_ratio"] > 0.95  # routers as initialised: nothing sampled
    ft, rep = dc.finetune(str(tmp_path / "tok"), output=tmp_path / "ft", data="digits", steps=200, batch_size=16, lr=1e-3)
    got = inference_flops(ft)
    assert abs(got["block_flops_ratio"] - 0.8) <= 0.03, got
    assert rep["target_block_flops"] == 0.8 and 0.4 < got["token_keep_ratio"] < 0.9


def test_add_token_router_samples_nothing_to_fill_its_report(tmp_path, monkeypatch):
    import dit_compress.diffusion.measure as M

    def no_sampling(*a, **k):
        raise AssertionError("add-token-router sampled images for its report")

    monkeypatch.setattr(M, "sample", no_sampling)
    _, rep = dc.add_token_router(pixel(), output=tmp_path / "tok", init_bias=35.0)
    assert rep["token_keep_ratio"] == 1.0 and rep["inference_block_flops_ratio"] == 1.0


def test_the_search_measures_its_cost_on_testbeds_only(tmp_path, monkeypatch):
    import dit_compress.commands.compression as C

    m = pixel(depth=4)
    _, rep = dc.prune_depth(m, output=tmp_path / "a", pattern="1:2", data="digits", steps=2, batch_size=4,
                            calib_samples=8)
    assert "search_cost" in rep
    monkeypatch.setattr(C, "MEASURE_COST_UP_TO", 10)
    _, rep = dc.prune_depth(m, output=tmp_path / "b", pattern="1:2", data="digits", steps=2, batch_size=4,
                            calib_samples=8)
    assert "search_cost" not in rep


def _short_dydit_finetune(tmp_path, strict: bool, **options):
    dc.add_dynamic_width("digits-dit", output=tmp_path / "dyn", target_flops=0.5)
    model, rep = dc.finetune(str(tmp_path / "dyn"), output=tmp_path / "ft", data="digits", steps=300, **options)
    got = inference_flops(model)["block_flops_ratio"]
    assert rep["inference_block_flops_ratio"] == pytest.approx(got)
    if abs(got - 0.5) > 0.03:
        assert "warning" in rep and "from the target 0.5" in rep["warning"], rep.get("warning")
    else:
        assert "warning" not in rep
    if strict:
        assert abs(got - 0.5) <= 0.03, (got, rep.get("warning"))
    return got


@pytest.mark.slow
def test_a_short_dydit_finetune_with_default_schedule_keeps_its_flops_promise(tmp_path):
    """`add-dynamic-width --target-flops 0.5` + a 300-step `finetune` on digits-dit with the
    default schedule, EMA and every other option at its default but the batch (8 instead of 64,
    to fit the suite): within 0.03 of 0.5 over DDIM-50, or the run ends with the one-line
    warning naming the gap (the FLOPs loss on 8 samples is noisy: 0.531 here)."""
    got = _short_dydit_finetune(tmp_path, strict=False, batch_size=8)
    assert abs(got - 0.5) <= 0.06


@pytest.mark.slow
@pytest.mark.expensive
def test_a_default_short_dydit_finetune_keeps_its_flops_promise(tmp_path):
    """The same with every option at its default (batch 64): about 10 minutes here; within 0.03."""
    _short_dydit_finetune(tmp_path, strict=True)
