"""Flow-matching DiTs (SiT, REPA): the velocity objective and SiT's samplers against float64
re-derivations of SiT's equations, the network's time convention against SiT/REPA-layout
checkpoints written with plain torch.save, and every command on such files."""

import argparse
import json

import pytest
import torch
from helpers import Recorder
from reference_dit import reference_dit
from typer.testing import CliRunner

import dit_compress
from dit_compress.cli import app
from dit_compress.diffusion import FlowMatching
from dit_compress.errors import FormatError, UsageError
from dit_compress.formats import load_model

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def sit_args(**kw):
    base = dict(model="SiT-custom", image_size=64, num_classes=10, vae="mse", path_type="Linear",
                prediction="velocity", loss_weight=None, sample_eps=None, train_eps=None)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture(scope="module")
def sit_files(tmp_path_factory):
    """A SiT training checkpoint and a REPA one (projector heads, REPA args), digits-sized,
    hidden 64 with 4 heads (so --num-heads is needed too)."""
    d = tmp_path_factory.mktemp("sit")
    ref = reference_dit(in_ch=1, hidden=64, heads=4, depth=4, input_size=8, patch=2)
    torch.save({"model": ref.state_dict(), "ema": ref.state_dict(), "opt": {}, "args": sit_args()}, d / "sit.pt")
    repa_state = dict(ref.state_dict())
    repa_state["projectors.0.0.weight"] = torch.randn(32, 64)
    repa_args = argparse.Namespace(model="SiT-custom", resolution=64, num_classes=10, path_type="linear",
                                   prediction="v", enc_type="dinov2-vit-b", encoder_depth=8, proj_coeff=0.5)
    torch.save({"model": repa_state, "ema": repa_state, "opt": {}, "args": repa_args}, d / "repa.pt")
    return ref, d


def test_velocity_loss_matches_sit_equations():
    m = load_model("digits-dit")  # any network: the objective is what is checked
    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 1, 8, 8, generator=g)
    t, y = torch.rand(6, generator=g), torch.arange(6)
    res = FlowMatching().training_losses(m, x1, t, y, noise=x0)
    tt = t.double().view(-1, 1, 1, 1)
    xt = tt * x1.double() + (1 - tt) * x0.double()  # alpha_t = t, sigma_t = 1 - t
    with torch.no_grad():
        v = m(xt.float(), t, y)[:, :1].double()
    ref = ((v - (x1.double() - x0.double())) ** 2).mean(dim=(1, 2, 3))  # u_t = d_alpha x1 + d_sigma x0
    assert torch.allclose(res["loss"].double(), ref, atol=1e-6, rtol=1e-5)
    assert torch.allclose(res["xt"].double(), xt, atol=1e-6)


def _reference_flow(model, noise, y, n, sde, gen=None):
    """float64 SiT sampling: ODE Euler on linspace(0, 1, n); SDE Euler-Maruyama on
    linspace(0, 0.96, n) with diffusion sigma_t = 1 - t, score (t v - x) / (1 - t), then the
    drift-only last step of 0.04 (SiT defaults: --diffusion-form sigma --last-step Mean)."""
    ts = torch.linspace(0, 0.96 if sde else 1.0, n, dtype=torch.float64)
    x, seen = noise.double(), []

    def v_of(x, s):
        with torch.no_grad():
            return model(x.float(), torch.full((x.shape[0],), float(s)), y)[:, :1].double()

    def drift(x, s, v):
        score = (s * v - x) / (1 - s)
        return v + (1 - s) * score

    for i in range(n - 1):
        s, dt = ts[i], ts[i + 1] - ts[i]
        seen.append((x.clone(), float(s)))
        v = v_of(x, s)
        if sde:
            z = torch.randn(x.shape, generator=gen).double()
            x = x + drift(x, s, v) * dt + torch.sqrt(2 * (1 - s)) * torch.sqrt(dt) * z
        else:
            x = x + dt * v
    if sde:
        seen.append((x.clone(), float(ts[-1])))
        x = x + drift(x, ts[-1], v_of(x, ts[-1])) * 0.04
    return x, seen


@pytest.mark.parametrize("sampler", ["euler", "sde"])
def test_flow_trajectories_match_sit_equations(sampler):
    m = load_model("digits-dit", prediction=None)
    m.config = m.config.copy(prediction="velocity")
    noise, y = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([1, 4, 10])
    rec = Recorder(m)
    ours = dit_compress.sample(rec, noise, y, sampler=sampler, steps=8, generator=torch.Generator().manual_seed(4))
    ref, seen = _reference_flow(m, noise, y, 8, sampler == "sde", torch.Generator().manual_seed(4))
    assert len(rec.calls) == len(seen) == (8 if sampler == "sde" else 7)
    for (xa, ta), (xb, tb) in zip(rec.calls, seen):
        assert abs(float(ta[0]) - tb) < 1e-6
        assert torch.allclose(xa.double(), xb, atol=1e-4, rtol=1e-4)
    assert torch.allclose(ours.double(), ref, atol=1e-4, rtol=1e-4)


def test_sit_and_repa_time_conventions(sit_files, capsys):
    ref, d = sit_files
    sit = load_model(d / "sit.pt", num_heads=4)
    repa = load_model(d / "repa.pt", num_heads=4)
    assert (sit.config.prediction, sit.config.time_input) == ("velocity", "sit")
    assert (repa.config.prediction, repa.config.time_input) == ("velocity", "repa")
    assert "projectors" in repa.config.provenance["skipped"]
    # the network is SiT's: fed t as it is (no x1000), output equal to the reference module's
    x, y, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7]), torch.tensor([0.25, 0.9])
    with torch.no_grad():
        assert torch.allclose(sit(x, t, y), ref(x, t, y), atol=1e-5)
    # first sampler call: SiT starts at t = 0 (noise), REPA's network sees 1 - t = 1
    for m, first in ((sit, 0.0), (repa, 1.0)):
        rec = Recorder(m)
        dit_compress.sample(rec, torch.randn(2, 1, 8, 8), y, sampler="euler", steps=3)
        assert [float(c[1][0]) for c in rec.calls] == pytest.approx([first, abs(first - 0.5)])
    info = json.loads(run("info", d / "repa.pt", "--num-heads", "4", "--json").stdout)
    assert "REPA" in info["prediction"] and "projectors" in info["provenance"]["skipped"]


def test_natural_sampler_and_guidance_interval(sit_files):
    _, d = sit_files
    m = load_model(d / "sit.pt", num_heads=4)
    rec = Recorder(m)
    dit_compress.sample(rec, torch.randn(1, 1, 8, 8), torch.tensor([2]), steps=6)  # natural: SiT's SDE
    assert len(rec.calls) == 6 and float(rec.calls[-1][1][0]) == pytest.approx(0.96)
    # guidance only while the noise level 1 - t is within [0, 0.5]: the batch doubles there only
    class Twice:  # forward_with_cfg is reached through the model object
        config = m.config

        def __init__(self):
            self.sizes = []

        def __call__(self, x, t, y):
            self.sizes.append(x.shape[0])
            return m(x, t, y)

        def forward_with_cfg(self, *a, **k):
            self.sizes.append(a[0].shape[0])
            return m.forward_with_cfg(*a, **k)

    tw = Twice()
    dit_compress.sample(tw, torch.randn(1, 1, 8, 8), torch.tensor([2]), sampler="euler", steps=5, cfg_scale=3.0,
                        guidance_interval=(0.0, 0.5))
    assert tw.sizes == [1, 1, 2, 2]  # t = 0, 0.25 unguided; t = 0.5, 0.75 guided


def test_every_command_on_sit_and_repa_files(sit_files, tmp_path):
    _, d = sit_files
    H = ["--num-heads", "4"]
    for name in ("repa.pt", "sit.pt"):
        src, o = d / name, tmp_path / name
        assert run("info", src, *H).exit_code == 0
        assert run("convert", src, *H, "-o", o / "c").exit_code == 0
        if name == "repa.pt":  # the same code paths as SiT's past loading; sampled once
            r = run("eval", o / "c", "-o", o / "e", "-n", "10", "--steps", "3", "--metrics", "prc", "--json")
            assert r.exit_code == 0, r.output
            continue
        r = run("prune-depth", src, *H, "--pattern", "1:2", "--data", "digits", "--steps", "3", "--batch-size", "4",
                "--no-measure-cost", "-o", o / "p")
        assert r.exit_code == 0, r.output
        r = run("prune-depth", src, *H, "--method", "block-influence", "--pattern", "1:2", "--data", "digits",
                "--calib-samples", "8", "-o", o / "bi")
        assert r.exit_code == 0, r.output
        assert run("add-dynamic-width", src, *H, "-o", o / "w").exit_code == 0
        assert run("add-token-router", o / "w", "-o", o / "wt").exit_code == 0
        r = run("finetune", o / "wt", "--data", "digits", "--steps", "2", "--batch-size", "4", "-o", o / "f")
        assert r.exit_code == 0, r.output
        rep = json.loads((o / "f" / "report.json").read_text())
        assert rep["final_loss"] > 0 and "inference_block_flops_ratio" in rep
        r = run("distill", o / "p", "--teacher", o / "c", "--data", "digits", "--steps", "2", "--batch-size", "4",
                "--kd-rep", "0.01", "-o", o / "k")
        assert r.exit_code == 0, r.output
        r = run("eval", o / "k", "-o", o / "e", "-n", "10", "--steps", "3", "--metrics", "prc", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["sampler"] == "euler"
        r = run("bench", o / "c", o / "p", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--json")
        assert r.exit_code == 0, r.output


def test_flow_bad_inputs(sit_files, tmp_path):
    _, d = sit_files
    r = run("eval", d / "sit.pt", "--num-heads", "4", "-o", tmp_path / "e", "--sampler", "ddim")
    assert r.exit_code == 2 and "velocity (SiT) model" in r.stderr and not (tmp_path / "e").exists()
    r = run("eval", d / "sit.pt", "--num-heads", "4", "-o", tmp_path / "e", "--timestep-spacing", "leading")
    assert r.exit_code == 2 and "eps samplers" in r.stderr
    r = run("info", d / "sit.pt", "--num-heads", "4", "--prediction", "eps")
    assert r.exit_code == 2 and "contradicts" in r.stderr
    ref = reference_dit(in_ch=1, hidden=64, heads=4, depth=2)
    torch.save({"ema": ref.state_dict(), "args": sit_args(path_type="GVP")}, tmp_path / "gvp.pt")
    with pytest.raises(FormatError, match="path type 'GVP' is not supported"):
        load_model(tmp_path / "gvp.pt", num_heads=4)
    r = run("info", tmp_path / "gvp.pt", "--num-heads", "4")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(UsageError, match="guidance interval"):
        dit_compress.sample(load_model(d / "sit.pt", num_heads=4), torch.randn(1, 1, 8, 8), torch.tensor([1]),
                            sampler="euler", steps=3, guidance_interval=(0.8, 0.2))


def test_embedded_digits_sit_is_the_digits_network_with_the_velocity_objective():
    """The shipped flow-matching testbed: digits-dit's network, SiT's objective and time
    convention, and samples that are the digits asked for (Euler ODE, CFG 2)."""
    from dit_compress.evaluate.features import class_accuracy

    sit, dit = load_model("digits-sit"), load_model("digits-dit")
    assert sit.config.prediction == "velocity" and sit.config.time_input == "sit" and sit.config.path_type == "linear"
    shape = ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels", "num_classes")
    assert all(getattr(sit.config, k) == getattr(dit.config, k) for k in shape)
    assert sit.config.lineage[0]["op"] == "create" and sit.config.lineage[-1]["op"] == "convert"
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 10
    x = dit_compress.sample(sit, torch.randn(40, 1, 8, 8, generator=g), y, sampler="euler", steps=20, cfg_scale=2.0)
    assert class_accuracy(x.clamp(-1, 1), y) >= 0.9
