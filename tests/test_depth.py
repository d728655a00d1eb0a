"""prune-depth: patterns, exports with bit-identical weights, baselines, learned search, resume."""

import json
import os
import signal

import pytest
import torch
from helpers import randomize, tiny_config
from typer.testing import CliRunner

from dit_compress.cli import app
from dit_compress.compress import depth as D
from dit_compress.errors import UsageError
from dit_compress.formats import load_model, save_model
from dit_compress.model import DiT
from dit_compress.data.datasets import load_data

runner = CliRunner()


def digits_model(depth=6, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=depth, num_heads=2,
                      latent_scale=None, name="dig")
    return randomize(DiT(cfg), seed, 0.1).eval()


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_pattern_validation():
    assert D.parse_groups(28, "1:2") == [(1, 2)] * 14
    assert D.parse_groups(28, "7:14") == [(7, 14)] * 2
    assert D.parse_groups(12, groups="2:4,2:4,3:4") == [(2, 4), (2, 4), (3, 4)]
    with pytest.raises(UsageError, match="does not divide the depth 12"):
        D.parse_groups(12, "2:5")
    with pytest.raises(UsageError, match="N must be smaller than M"):
        D.parse_groups(12, "2:2")
    with pytest.raises(UsageError, match="N:M"):
        D.parse_groups(12, "half")
    with pytest.raises(UsageError, match="cover 8 layers but the model has 12"):
        D.parse_groups(12, groups="2:4,2:4")
    with pytest.raises(UsageError, match="twice"):
        D.check_keep([0, 2, 2], 12)
    with pytest.raises(UsageError, match="out of range"):
        D.check_keep([0, 12], 12)


def test_candidates_and_uniform():
    assert len(D.candidates(2, 4)) == 6 and len(D.candidates(7, 14)) == 3432
    assert D.uniform_keep([(1, 2)] * 3) == [1, 3, 5]
    assert D.uniform_keep([(2, 4)]) == [1, 3]


def test_export_has_exact_kept_layers(tmp_path):
    m = digits_model()
    keep = [0, 3, 5]
    p = D.prune_layers(m, keep, {"method": "oracle"})
    assert p.config.depth == 3 and p.config.kept_layers == keep
    sm, sp = m.state_dict(), p.state_dict()
    for j, i in enumerate(keep):
        for k in [k for k in sm if k.startswith(f"blocks.{i}.")]:
            assert torch.equal(sm[k], sp[k.replace(f"blocks.{i}.", f"blocks.{j}.", 1)])
    assert torch.equal(sm["final_layer.linear.weight"], sp["final_layer.linear.weight"])
    # pruning a pruned model composes the source indices
    p2 = D.prune_layers(p, [1, 2])
    assert p2.config.kept_layers == [3, 5]
    # the pruned model equals the source with the dropped blocks skipped
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    gates = torch.zeros(2, 6)
    gates[:, keep] = 1
    with torch.no_grad():
        full = m(x, t, y)
        w = D.SearchWrapper(m, D.MaskSearch([(3, 6)]))  # the search's gating, with the mask fixed
        w.search.sample_gates = lambda batch: gates
        assert torch.allclose(w(x, t, y), p(x, t, y), atol=1e-6)
        assert torch.equal(m(x, t, y), full)  # outside the search the blocks run as they are


def test_pruned_model_diffusers_export_runs_in_pipeline_form(tmp_path):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = randomize(DiT(tiny_config(depth=4)), 0)
    p = D.prune_layers(m, [1, 3])
    save_model(p, tmp_path / "d", format="diffusers")
    dm = DiTTransformer2DModel.from_pretrained(tmp_path / "d" / "transformer").eval()
    assert len(dm.transformer_blocks) == 2
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        ref = dm(x, timestep=t, class_labels=y).sample
        assert torch.allclose(ref, p.set_numerics("diffusers")(x, t, y), atol=1e-5)
    # and it runs inside a real DiTPipeline (a tiny random VAE stands in for sd-vae-ft-ema)
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).eval()
    sched = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    pipe = DiTPipeline(transformer=dm, vae=vae, scheduler=sched)
    images = pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=1.0, output_type="np").images  # its null class is hard-wired to 1000
    assert images.shape == (2, 8, 8, 3) and (images >= 0).all() and (images <= 1).all()


def test_baselines_and_report(digits):
    m = digits_model()
    g = D.parse_groups(6, "1:2")
    lc = D.LearnedConfig(seed=3)
    for method in ("uniform", "random", "block-influence", "min-loss"):
        p, rep = D.prune_depth(m, method, g, data=digits, lc=lc, calib_samples=32, num_candidates=3)
        assert p.config.depth == 3 and rep["depth_after"] == 3
        assert rep["gflops_after"] < rep["gflops_before"] and rep["params_after"] < rep["params_before"]
        assert rep["calib_loss_chosen"] > 0
    _, rep = D.prune_depth(m, "block-influence", g, data=digits, lc=lc, calib_samples=32)
    assert 5 in rep["kept_layers"]  # never removes the last block
    assert len(rep["block_influence"]) == 6
    _, rep = D.prune_depth(m, "min-loss", g, data=digits, lc=lc, calib_samples=32, num_candidates=4)
    assert rep["calib_loss_chosen"] == pytest.approx(min(c["calib_loss"] for c in rep["candidates"]), rel=1e-5)


def test_learned_search_converges(digits, tmp_path):
    """On the digits testbed the search reaches a confident decision within its budget."""
    m = load_model("digits-dit")
    g = D.parse_groups(12, "1:2")
    lc = D.LearnedConfig(steps=80, batch_size=16, logit_ema=0.9, logit_lr=3e-2, log_every=5)
    p, rep = D.prune_depth(m, "learned", g, data=digits, lc=lc, work_dir=tmp_path / "w", calib_samples=32,
                           measure_cost=False)
    assert rep["confidence"] > 0.9, rep["final_probabilities"]
    assert p.config.depth == 6 and len(rep["decision_probabilities"]) >= 10
    first = rep["decision_probabilities"][0]["probs"]
    assert min(max(pr) for pr in first) < rep["confidence"]  # confidence grew


def test_learned_export_reloads_original_weights(digits, tmp_path):
    m = digits_model()
    g = D.parse_groups(6, "1:2")
    lc = D.LearnedConfig(steps=3, batch_size=8)
    p, rep = D.prune_depth(m, "learned", g, data=digits, lc=lc, work_dir=tmp_path / "w", calib_samples=8, measure_cost=False)
    sm, sp = m.state_dict(), p.state_dict()
    for j, i in enumerate(rep["kept_layers"]):
        assert torch.equal(sm[f"blocks.{i}.attn.qkv.weight"], sp[f"blocks.{j}.attn.qkv.weight"])
    assert not any("lora" in k for k in sp)
    p2, _ = D.prune_depth(m, "learned", g, data=digits, lc=D.LearnedConfig(steps=3, batch_size=8, lr=1e-2),
                          work_dir=tmp_path / "w2", calib_samples=8, keep_recovery_weights=True, measure_cost=False)
    assert not torch.equal(p2.state_dict()["final_layer.linear.weight"], sm["final_layer.linear.weight"])


def test_search_cost_is_measured(digits):
    m = digits_model()
    cost = D.step_cost_ratio(m, D.parse_groups(6, "1:2"), D.LearnedConfig(batch_size=16), digits, reps=1)
    assert cost["plain_step_s"] > 0 and cost["search_step_s"] > 0 and cost["ratio"] > 0


def test_killed_search_resumes_identically(digits, tmp_path, monkeypatch):
    m = digits_model()
    g = D.parse_groups(6, "1:2")
    lc = D.LearnedConfig(steps=6, batch_size=8, logit_lr=5e-2, logit_ema=0.5)
    _, full = D.prune_depth(m, "learned", g, data=digits, lc=lc, work_dir=tmp_path / "a", calib_samples=8, measure_cost=False)

    orig = D.MaskSearch.update_ema
    count = {"n": 0}

    def interrupting(self):
        orig(self)
        count["n"] += 1
        if count["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(D.MaskSearch, "update_ema", interrupting)
    from dit_compress.train.trainer import TrainingInterrupted

    with pytest.raises(TrainingInterrupted, match="step 3"):
        D.prune_depth(m, "learned", g, data=digits, lc=lc, work_dir=tmp_path / "b", calib_samples=8, measure_cost=False)
    monkeypatch.setattr(D.MaskSearch, "update_ema", orig)
    _, resumed = D.prune_depth(m, "learned", g, data=digits, lc=lc, work_dir=tmp_path / "b", resume=True,
                               calib_samples=8, measure_cost=False)
    assert resumed["kept_layers"] == full["kept_layers"]
    for a, b in zip(resumed["final_probabilities"], full["final_probabilities"]):
        assert a == pytest.approx(b, abs=1e-6)


def test_cli_prune_depth_and_bad_inputs(tmp_path):
    save_model(digits_model(), tmp_path / "m")
    r = run("prune-depth", tmp_path / "m", "--pattern", "1:2", "--method", "uniform", "-o", tmp_path / "u", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["kept_layers"] == [1, 3, 5]
    assert (tmp_path / "u" / "report.md").exists() and load_model(tmp_path / "u").config.depth == 3
    cases = [
        (["--pattern", "1:4"], "does not divide"),
        (["--pattern", "3:2"], "N must be smaller"),
        (["--pattern", "1:2"], "needs calibration/training data"),  # learned without --data
        (["--method", "oracle", "--keep", "0,1,1"], "twice"),
        (["--method", "oracle", "--keep", "0,9"], "out of range"),
        (["--method", "oracle"], "needs --keep"),
        (["--method", "magic", "--pattern", "1:2"], "unknown --method"),
    ]
    for extra, msg in cases:
        r = run("prune-depth", tmp_path / "m", "-o", tmp_path / "bad", *extra)
        assert r.exit_code == 2, (extra, r.output)
        assert msg in r.stderr, (extra, r.stderr)
        assert not (tmp_path / "bad").exists()


def test_block_influence_reads_clean_latents(digits):
    """TinyFusion's scorer: 1 - cos(block input, block output) on the clean latents at random t."""
    import torch.nn.functional as F

    m = digits_model()
    calib = D.calibration_set(digits, 16, seed=1)
    h = m.x_embedder(calib.x) + m.pos_embed  # clean input, no q_sample
    c = m.t_embedder(calib.t) + m.y_embedder(calib.y)
    ref = []
    with torch.no_grad():
        for b in m.blocks:
            out = b(h, c, None)
            ref.append(float((1 - F.cosine_similarity(h, out, dim=-1)).mean()))
            h = out
    got = D.block_influence(m, calib)
    assert got == pytest.approx(ref, rel=1e-4)
    assert D.block_influence(m, calib, noisy=True) != pytest.approx(ref, rel=1e-2)
