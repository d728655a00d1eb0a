"""Feature caching policies over a sampling run (diffusion/caching.py): a policy that never
skips gives the uncached sampler exactly, on dense, depth-pruned, dynamic and PixArt models;
FORA runs the blocks on exactly the steps it says; the FLOPs meter counts what ran; bad
policies are one line."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize
from typer.testing import CliRunner

import dit_compress as dc
from dit_compress.cli import app
from dit_compress.compress.depth import prune_layers
from dit_compress.compress.dynamic import add_dynamic_width, add_token_router, set_banded_width, set_token_capacity
from dit_compress.diffusion.caching import parse_policy
from dit_compress.diffusion.measure import FlopsMeter
from dit_compress.diffusion.sampling import loop_time_inputs

runner = CliRunner()
STEPS = 8


def digits(prediction="eps"):
    return randomize(dc.create("custom", input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4,
                               num_heads=2, num_classes=10, pixel=True, prediction=prediction, seed=0))


def kinds():
    dense = digits()
    dyn = add_dynamic_width(dense, 0.5, sort_by="none")
    set_banded_width(dyn, 0.5, loop_time_inputs(dyn.config, "ddim", STEPS, None))
    tok = set_token_capacity(add_token_router(dense, init_bias=1.0), 0.5)
    pix = randomize(dc.create("custom", family="pixart", input_size=8, patch_size=2, in_channels=1, hidden_size=32,
                              depth=3, num_heads=2, caption_channels=16, pixel=True, seed=0))
    return {"dense": dense, "depth-pruned": prune_layers(dense, [1, 3]), "dynamic width": dyn,
            "token capacity": tok, "pixart": pix}


def run_sampler(m, policy=None, sampler="ddim", seed=1):
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    if m.config.family == "pixart":
        from dit_compress.model.pixart import Captions

        g = torch.Generator().manual_seed(2)
        y = Captions(torch.randn(3, 5, 16, generator=g), torch.ones(3, 5))
        extra = {"negative": Captions(torch.randn(1, 5, 16, generator=g), torch.ones(1, 5))}
    else:
        y, extra = torch.tensor([1, 2, 3]), {}
    return dc.sample(m, noise, y, sampler=sampler, steps=STEPS, cfg_scale=2.0,
                     generator=torch.Generator().manual_seed(seed), feature_cache=policy, **extra)


@pytest.mark.parametrize("spec", ["fora:1", "fbcache:0", "taylorseer:1,2"])
@pytest.mark.parametrize("kind", ["dense", "depth-pruned", "dynamic width", "token capacity", "pixart"])
def test_a_policy_that_never_skips_is_the_uncached_sampler_exactly(kind, spec):
    m = kinds()[kind]
    policy = parse_policy(spec)
    assert torch.equal(run_sampler(m, policy), run_sampler(m))
    assert policy.stats()["skip_rate"] == 0.0 and policy.stats()["blocks_computed"] == STEPS * m.config.depth


@pytest.mark.parametrize("n", [2, 3])
def test_fora_runs_the_blocks_on_exactly_the_steps_it_says(n):
    m = digits()
    steps_run = []
    hooks = [b.register_forward_pre_hook(lambda mod, a, i=i: steps_run.append(i)) for i, b in enumerate(m.blocks)]
    policy = parse_policy(f"fora:{n}")
    calls = []
    m.register_forward_pre_hook(lambda mod, a, k: calls.append(k["run"].step), with_kwargs=True)
    run_sampler(m, policy)
    for h in hooks:
        h.remove()
    full = [s for s in calls if s % n == 0]
    assert len(steps_run) == len(full) * m.config.depth  # every block on the full steps, none between
    assert policy.stats()["blocks_skipped"] == (len(calls) - len(full)) * m.config.depth


@pytest.mark.parametrize("spec", ["fora:2", "taylorseer:2,1", "fbcache:0.5"])
def test_a_skipping_policy_changes_the_samples_and_the_meter_counts_what_ran(spec):
    m = digits()
    base = run_sampler(m)
    policy = parse_policy(spec)
    with FlopsMeter(m) as meter:
        cached = run_sampler(m, policy)
    assert not torch.equal(cached, base) and torch.isfinite(cached).all()
    with FlopsMeter(m) as full:
        run_sampler(m)
    skip = policy.stats()["skip_rate"]
    assert 0 < skip < 1
    # the blocks that did not run cost nothing: the block FLOPs fall by the skip rate
    assert abs(meter.result()["block_flops_ratio"] - (1 - skip) * full.result()["block_flops_ratio"]) < 1e-9


def test_taylorseer_of_order_zero_is_fora():
    m = digits()
    assert torch.equal(run_sampler(m, "taylorseer:3,0"), run_sampler(m, "fora:3"))


def test_fbcache_with_a_large_threshold_reuses_every_step_after_the_first():
    m = digits()
    policy = parse_policy("fbcache:1e9")
    run_sampler(m, policy)
    s = policy.stats()
    calls = STEPS  # DDIM with CFG: one guided call per step
    assert s["blocks_computed"] == m.config.depth + (calls - 1) and s["blocks_skipped"] == (calls - 1) * (m.config.depth - 1)


@pytest.mark.parametrize("bad", ["fora:0", "fora:-1", "fora:x", "fbcache:-0.1", "fbcache:nan", "taylorseer:2",
                                 "taylorseer:0,1", "taylorseer:2,9", "lru:4", "fora", 3])
def test_a_bad_policy_is_one_line(bad):
    with pytest.raises(dc.UsageError, match="unknown feature cache policy"):
        parse_policy(bad)


@pytest.mark.parametrize("args", [["--feature-cache", "fora:0", "--loop"], ["--feature-cache", "nope", "--loop"],
                                  ["--variants", "@fora:0", "--loop"], ["--feature-cache", "fora:2"]])
def test_bench_refuses_a_bad_policy_in_one_line(args):
    r = runner.invoke(app, ["bench", "--shape", "DiT-S/2", *args])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "Traceback" not in r.output, r.output


def test_a_cache_policy_cannot_run_in_a_cuda_graph():
    from dit_compress.diffusion.caching import feature_cache
    from dit_compress.model.graphs import why_not_graphable

    m = digits()
    with feature_cache(m, "fora:2"):
        assert "feature cache" in why_not_graphable(m)
        with pytest.raises(dc.UsageError, match="feature cache"):
            dc.sample(m, torch.randn(1, 1, 8, 8), torch.tensor([1]), sampler="ddim", steps=2, cuda_graphs="on",
                      feature_cache="fora:2")
    assert m.__dict__.get("_block_hook") is None  # the run's policy is gone after it


def test_eval_reports_the_cache_and_the_fidelity_to_the_base_from_the_same_noise(tmp_path):
    import json

    args = ["-n", 20, "--steps", 4, "--cfg-scale", 2, "--metrics", "fid", "--loss-data", "none", "--json"]
    base = runner.invoke(app, ["eval", "digits-dit", "-o", str(tmp_path / "base"), *map(str, args), "--no-cache"])
    assert base.exit_code == 0, base.output
    same = runner.invoke(app, ["eval", "digits-dit", "-o", str(tmp_path / "same"), *map(str, args), "--no-cache",
                               "--fidelity-ref", str(tmp_path / "base")])
    rep = json.loads(same.stdout)
    assert rep["metrics"]["fidelity_mse"] == 0.0 and rep["metrics"]["fidelity_psnr"] is None
    r = runner.invoke(app, ["eval", "digits-dit", "-o", str(tmp_path / "fora"), *map(str, args),
                            "--feature-cache", "fora:2", "--fidelity-ref", str(tmp_path / "base")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["feature_cache"]["skip_rate"] == 0.5 and abs(rep["inference_flops_ratio"] - 0.5) < 0.05
    assert 0 < rep["metrics"]["fidelity_mse"] < 0.05 and rep["metrics"]["fidelity_psnr"] > 13
    bad = runner.invoke(app, ["eval", "digits-dit", "-o", str(tmp_path / "bad"), *map(str, args), "--seed", "1",
                              "--fidelity-ref", str(tmp_path / "base")])
    assert bad.exit_code == 2 and "not the same noise" in bad.stderr
    bad = runner.invoke(app, ["eval", "digits-dit", "-o", str(tmp_path / "bad"), *map(str, args),
                              "--feature-cache", "fora:0"])
    assert bad.exit_code == 2 and "unknown feature cache policy" in bad.stderr and not (tmp_path / "bad").exists()


def _fake_eval(d, source, steps, secs, fid, psnr=None, loss=0.1, policy=None, seed=0):
    import json

    d.mkdir(parents=True)
    rep = {"source": source, "sampler": "ddim", "steps": steps, "num_samples": 100, "seed": seed,
           "steady_seconds_per_image": secs,
           "metrics": {"frechet_inception_distance": fid, "fidelity_psnr": psnr, "heldout_loss": loss}}
    if policy:
        rep["feature_cache"] = {"policy": policy, "skip_rate": 0.5}
    (d / "report.json").write_text(json.dumps(rep))


def test_the_frontier_marks_pareto_points_and_which_beat_fewer_steps(tmp_path):
    """Hand-made eval reports with known positions: the baseline (base at 10/25/50 steps), a
    cached point above the baseline curve, one below it, and a dominated one; two seeds of one
    point averaged."""
    import json

    for seed in (0, 1):
        root = tmp_path / f"s{seed}"
        _fake_eval(root / "base-10", "digits-dit", 10, 1.0, 60.0)
        _fake_eval(root / "base-25", "digits-dit", 25, 2.5, 50.0)
        _fake_eval(root / "base-50", "digits-dit", 50, 5.0, 45.0)
        _fake_eval(root / "fora2", "digits-dit", 50, 2.5, 46.0 + seed * 2, policy="fora:2")   # beats fewer steps
        _fake_eval(root / "fora4", "digits-dit", 50, 1.75, 70.0, policy="fora:4")            # worse than fewer steps
        _fake_eval(root / "slow", "digits-dit", 50, 6.0, 47.0, policy="fora:1")              # dominated
    r = runner.invoke(app, ["frontier", str(tmp_path / "s0"), str(tmp_path / "s1"), "-o", str(tmp_path / "f"), "--json"])
    assert r.exit_code == 0, r.output
    pts = {p["point"]: p for p in json.loads(r.stdout)["points"]}
    assert json.loads(r.stdout)["base"] == "digits-dit" and pts["base-10"]["baseline"]
    f = "frechet_inception_distance"
    assert pts["fora2"][f] == 47.0 and pts["fora2"][f"{f}_sd"] > 0 and pts["fora2"]["seeds"] == 2
    assert pts["fora2"][f"beats_fewer_steps_{f}"] is True and pts["fora2"][f"pareto_{f}"] is True
    assert pts["fora4"][f"beats_fewer_steps_{f}"] is False and pts["fora4"][f"pareto_{f}"] is False
    assert pts["slow"][f"pareto_{f}"] is False and pts["slow"][f"beats_fewer_steps_{f}"] is None  # beyond the baseline
    assert pts["base-10"][f"pareto_{f}"] and pts["base-50"][f"pareto_{f}"] and not pts["base-25"][f"pareto_{f}"]
    assert (tmp_path / "f" / "frontier_fid.png").exists() and (tmp_path / "f" / "frontier.md").exists()


def test_the_frontier_takes_seconds_from_the_quiet_run_and_quality_from_all(tmp_path):
    """Seed 1 ran on a busy machine (every clock 3x): with --seconds-from s0 the seconds are s0's
    alone while FID still averages both seeds; a timing run missing a point is refused."""
    import json

    for seed, slow in ((0, 1.0), (1, 3.0)):
        root = tmp_path / f"s{seed}"
        _fake_eval(root / "base-10", "digits-dit", 10, 1.0 * slow, 60.0 + seed)
        _fake_eval(root / "base-50", "digits-dit", 50, 5.0 * slow, 45.0 + seed)
        _fake_eval(root / "fora2", "digits-dit", 50, 2.5 * slow, 46.0 + seed, policy="fora:2")
    args = ["frontier", str(tmp_path / "s0"), str(tmp_path / "s1"), "-o", str(tmp_path / "f"), "--json"]
    pts = {p["point"]: p for p in json.loads(runner.invoke(app, args).stdout)["points"]}
    assert pts["fora2"]["seconds_per_image"] == 5.0  # the mean of 2.5 and 7.5
    r = runner.invoke(app, [*args, "--seconds-from", str(tmp_path / "s0"), "--force"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    pts = {p["point"]: p for p in rep["points"]}
    assert pts["fora2"]["seconds_per_image"] == 2.5 and pts["base-50"]["seconds_per_image"] == 5.0
    assert pts["fora2"]["frechet_inception_distance"] == 46.5 and rep["seconds_from"] == [str(tmp_path / "s0")]
    _fake_eval(tmp_path / "clock" / "base-10", "digits-dit", 10, 1.0, 60.0)
    r = runner.invoke(app, ["frontier", str(tmp_path / "s0"), str(tmp_path / "s1"), "-o", str(tmp_path / "g"),
                            "--seconds-from", str(tmp_path / "clock")])
    assert r.exit_code == 2 and "holds no eval named" in r.stderr and not (tmp_path / "g").exists()


def test_the_frontier_needs_a_baseline_at_several_steps(tmp_path):
    _fake_eval(tmp_path / "r" / "base-50", "digits-dit", 50, 5.0, 45.0)
    _fake_eval(tmp_path / "r" / "fora2", "digits-dit", 50, 2.5, 46.0, policy="fora:2")
    r = runner.invoke(app, ["frontier", str(tmp_path / "r"), "-o", str(tmp_path / "f")])
    assert r.exit_code == 2 and "base" in r.output and not (tmp_path / "f").exists()
    r = runner.invoke(app, ["frontier", str(tmp_path / "nothing"), "-o", str(tmp_path / "f")])
    assert r.exit_code == 2 and not (tmp_path / "f").exists()


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """digits-dit with a schedule learned for DDIM-6 (a short run with a strong pull to cache and a
    threshold a short run reaches)."""
    out = tmp_path_factory.mktemp("l2c") / "m"
    model, report = dc.learn_cache("digits-dit", output=str(out), data="digits", sampler="ddim", steps=6, iters=60,
                                   batch_size=8, sparsity=0.05, threshold=0.5, seed=0)
    return out, report


def test_a_learned_cache_skips_exactly_what_its_schedule_says(learned):
    out, report = learned
    m = dc.load_model(str(out))
    skip = m.config.cache_schedule["skip"]
    assert skip == [[bool(v) for v in row] for row in skip] and not any(skip[0])
    assert 0 < report["skip_rate"] < 1 and report["blocks_reused_per_step"] == [sum(r) for r in skip]
    # Learning-to-Cache's layout: only every other call, counting back from the last, may reuse
    assert report["cacheable_steps"] == [1, 3, 5]
    assert not any(any(skip[n]) for n in (0, 2, 4))
    calls = []
    hooks = [b.register_forward_pre_hook(lambda mod, a, i=i: calls.append(i)) for i, b in enumerate(m.blocks)]
    step_of = []
    m.register_forward_pre_hook(lambda mod, a, k: step_of.append(k["run"].step), with_kwargs=True)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    dc.sample(m, noise, torch.tensor([1, 2]), sampler="ddim", steps=6, cfg_scale=2.0)
    for h in hooks:
        h.remove()
    assert len(step_of) == 6 and len(calls) == sum(m.config.depth - sum(skip[n]) for n in range(6))
    # the uncached model, asked for explicitly, runs every block and differs
    base = dc.sample(dc.load_model("digits-dit"), noise, torch.tensor([1, 2]), sampler="ddim", steps=6, cfg_scale=2.0)
    plain = dc.sample(m, noise, torch.tensor([1, 2]), sampler="ddim", steps=6, cfg_scale=2.0, feature_cache="none")
    assert torch.equal(plain, base)


def test_a_learned_schedule_is_refused_for_another_sampler_or_step_count_and_follows_pruning(learned, tmp_path):
    out, _ = learned
    m = dc.load_model(str(out))
    noise = torch.randn(1, 1, 8, 8)
    for kw in ({"sampler": "ddim", "steps": 10}, {"sampler": "ddpm", "steps": 6}):
        with pytest.raises(dc.UsageError, match="learned cache schedule is for ddim 6 steps"):
            dc.sample(m, noise, torch.tensor([1]), **kw)
    r = runner.invoke(app, ["eval", str(out), "-o", str(tmp_path / "e"), "-n", 4, "--steps", 8, "--metrics", "fid"])
    assert r.exit_code == 2 and "learned cache schedule" in r.output and not (tmp_path / "e").exists()
    r = runner.invoke(app, ["bench", "--loop", str(out), "--steps", 8, "--batch-sizes", 1, "--repeats", 1,
                            "--warmup", 0, "-o", str(tmp_path / "b")])  # refused as an option: exit 2, nothing timed
    assert r.exit_code == 2 and "learned cache schedule is for ddim 6 steps" in r.output, r.output
    assert not (tmp_path / "b").exists()
    import json
    r = runner.invoke(app, ["info", str(out), "--json"])
    lc = json.loads(r.stdout)["learned_cache"]
    skip = m.config.cache_schedule["skip"]
    assert lc["sampler"] == "ddim" and lc["steps"] == 6 and lc["blocks_reused_per_step"] == [sum(x) for x in skip]
    for fmt, name in (("original", "c.pt"), ("diffusers", "c-diffusers")):  # never dropped silently
        r = runner.invoke(app, ["convert", str(out), "--to", fmt, "-o", str(tmp_path / name)])
        assert r.exit_code == 2 and "learned cache schedule" in r.output and not (tmp_path / name).exists(), r.output
    pruned = prune_layers(m, [1, 3, 5])
    assert pruned.config.cache_schedule["skip"] == [[row[i] for i in (1, 3, 5)] for row in m.config.cache_schedule["skip"]]


def test_feature_cache_none_runs_a_learned_model_uncached_in_eval_and_bench(learned, tmp_path):
    """`--feature-cache none` turns the model's own schedule off: eval samples what the uncached base
    samples from the same noise (at any step count), and bench times the uncached loop; without it
    bench reports the schedule's skips."""
    import json

    out, _ = learned
    args = ["-n", "20", "--steps", "6", "--cfg-scale", "2", "--metrics", "fid", "--loss-data", "none", "--json",
            "--no-cache"]
    base = runner.invoke(app, ["eval", "digits-dit", "-o", str(tmp_path / "base"), *args])
    assert base.exit_code == 0, base.output
    r = runner.invoke(app, ["eval", str(out), "-o", str(tmp_path / "off"), *args, "--feature-cache", "none",
                            "--fidelity-ref", str(tmp_path / "base")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["metrics"]["fidelity_mse"] == 0.0 and "feature_cache" not in rep
    r = runner.invoke(app, ["eval", str(out), "-o", str(tmp_path / "off8"), *args[:2], "--steps", "8", *args[4:],
                            "--feature-cache", "none"])
    assert r.exit_code == 0, r.output
    bench = ["bench", "--loop", str(out), "--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--json"]
    r = runner.invoke(app, [*bench, "--steps", "8", "--feature-cache", "none", "-o", str(tmp_path / "b8")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*bench, "--steps", "6", "-o", str(tmp_path / "b6")])
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)["rows"][0]
    assert row["feature_cache"]["policy"] == "learned (ddim 6)" and row["feature_cache"]["skip_rate"] > 0


@pytest.mark.parametrize("args,msg", [(["--threshold", "1.5"], "threshold"), (["--steps", "1"], "steps"),
                                      (["--sampler", "euler"], "sampler"), (["--iters", "0"], "iters")])
def test_learn_cache_bad_options_are_one_line(tmp_path, args, msg):
    r = runner.invoke(app, ["learn-cache", "digits-dit", "--data", "digits", "-o", str(tmp_path / "o"), *args])
    assert r.exit_code == 2 and msg in r.output and not (tmp_path / "o").exists(), r.output


def _net_times(m, sampler, steps):
    """The time input of every network call of one sampling run (the sampler's own steps)."""
    seen = []
    h = m.register_forward_pre_hook(lambda mod, a, k: seen.append(float(a[1].flatten()[0])), with_kwargs=True)
    try:
        dc.sample(m, torch.randn(1, 1, 8, 8), torch.tensor([1]), sampler=sampler, steps=steps, cfg_scale=1.0,
                  feature_cache="none")
    finally:
        h.remove()
    return seen


@pytest.mark.parametrize("source,sampler", [("digits-dit", "ddim"), ("digits-dit", "ddpm"),
                                            ("digits-sit", "euler"), ("digits-sit", "sde")])
def test_learned_cache_trains_at_the_times_its_sampler_evaluates(source, sampler):
    # what training expects is what inference runs: step n's training pair is at the sampler's n-th call
    from dit_compress.train.cache import _Times
    m = dc.load_model(source)
    times = _Times(m.config, sampler, 7, "linspace")
    x0 = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    noise = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    got = [float(times.at(n, x0, noise)[1][0]) for n in range(len(times))]
    assert got == pytest.approx(_net_times(m, sampler, 7), abs=1e-6)
    if source == "digits-sit":  # the straight path at the step's time (t = 0 noise, t = 1 data)
        for n in range(len(times)):
            t = float(times.calls[n])
            assert torch.allclose(times.at(n, x0, noise)[0], t * x0 + (1 - t) * noise, atol=1e-6)  # t in float32


def test_learn_cache_pairs_are_one_ddim_step_apart_and_gates_at_or_below_the_threshold_skip():
    """One training draw, seen from outside: the full model runs at step n-1's time, its output is
    taken one DDIM (eta 0) step by a float64 re-derivation of DDIM's update, and both the target and
    the routed model run exactly there, at step n's time. The schedule is the final gates at or below
    the threshold, on cacheable steps only (gates left at exactly 0.5 with threshold 0.5: all skip)."""
    import numpy as np

    from dit_compress.data.datasets import load_data
    from dit_compress.train.cache import learn_cache

    m = dc.load_model("digits-dit")
    calls = []

    def rec(mod, args, kwargs, out):
        calls.append((args[0].detach().clone(), float(args[1].flatten()[0]), out.detach().clone()))

    m.register_forward_hook(rec, with_kwargs=True)  # the deep copy inside learn_cache keeps it
    data = load_data("digits", cfg=m.config)
    out, report = learn_cache(m, data, sampler="ddim", steps=6, iters=1, batch_size=2, seed=3, init=0.0, lr=1e-12,
                              threshold=0.5)
    assert len(calls) == 3
    (x1, t1, o1), (x2, t2, _), (x3, t3, _) = calls
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)  # DiT's linear schedule
    acp = np.cumprod(1.0 - betas)
    ddim6 = [999 - round(i * 999 / 5) for i in range(6)]  # linspace spacing, 6 calls
    assert round(t1) in ddim6 and round(t2) == ddim6[ddim6.index(round(t1)) + 1]
    a, a_next = acp[round(t1)], acp[round(t2)]
    eps = o1[:, : x1.shape[1]].double()
    x0 = (x1.double() - np.sqrt(1 - a) * eps) / np.sqrt(a)
    want = np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * eps
    assert torch.allclose(x2.double(), want, atol=1e-4) and torch.equal(x2, x3) and t3 == t2
    depth = m.config.depth
    assert all(g == 0.5 for row in report["gates"] for g in row)
    skip = out.config.cache_schedule["skip"]
    assert skip == [[n in report["cacheable_steps"]] * depth for n in range(6)]
    _, report = learn_cache(m, data, sampler="ddim", steps=6, iters=1, batch_size=2, seed=3, init=0.0, lr=1e-12,
                            threshold=0.49)
    assert report["blocks_reused_per_step"] == [0] * 6


def test_cacheable_steps_are_learning_to_cache_routers():
    # the reference trains the routers of the even indices of the respaced steps (index K-1 is the
    # first call, 0 the last), each pairing with the odd index before it in sampling order
    from dit_compress.train.cache import cacheable_steps
    for calls in (2, 5, 6, 20, 25, 50):
        ref = sorted(calls - 1 - idx for idx in range(0, calls - 1, 2))  # idx even, with a call before it
        assert cacheable_steps(calls) == ref
        assert cacheable_steps(calls, every_step=True) == list(range(1, calls))
    assert cacheable_steps(50) == list(range(1, 50, 2))


@pytest.mark.parametrize("source,sampler", [("digits-dit", "ddim"), ("digits-sit", "euler")])
def test_learned_cache_trains_where_the_sampler_goes(source, sampler):
    # a training pair's second input is the sampler's own step from the first with the full
    # model's output: record the sampler's inputs and outputs call by call and replay them
    from dit_compress.train.cache import _Times
    m = dc.load_model(source)
    seen = []
    h = m.register_forward_hook(lambda mod, a, k, out: seen.append((a[0].clone(), out.clone())), with_kwargs=True)
    try:
        dc.sample(m, torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2]),
                  sampler=sampler, steps=7, cfg_scale=1.0, feature_cache="none")
    finally:
        h.remove()
    times = _Times(m.config, sampler, 7, "linspace" if sampler == "ddim" else None)
    for n in range(len(times) - 1):
        x, out = seen[n]
        assert torch.allclose(times.advance(n, x, out), seen[n + 1][0], atol=1e-5), n


def test_a_flow_model_learns_a_cache_for_its_euler_steps(tmp_path):
    out = tmp_path / "m"
    _, report = dc.learn_cache("digits-sit", output=str(out), data="digits", steps=6, iters=40, batch_size=8,
                               sparsity=0.05, threshold=0.5, seed=0)
    m = dc.load_model(str(out))
    sched = m.config.cache_schedule
    assert sched["sampler"] == "euler" and sched["steps"] == 6 and len(sched["skip"]) == 6
    assert not any(sched["skip"][0]) and not any(sched["skip"][-1])  # nothing cached yet / never evaluated
    assert report["cacheable_steps"] == [2, 4] and not any(sched["skip"][1]) and not any(sched["skip"][3])
    assert 0 < report["skip_rate"] < 1
    calls = []
    hooks = [b.register_forward_pre_hook(lambda mod, a, i=i: calls.append(i)) for i, b in enumerate(m.blocks)]
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    dc.sample(m, noise, torch.tensor([1, 2]), sampler="euler", steps=6, cfg_scale=2.0)
    for h in hooks:
        h.remove()
    assert len(calls) == sum(m.config.depth - sum(row) for row in sched["skip"][:5])  # 5 Euler calls
    with pytest.raises(dc.UsageError, match="learned cache schedule is for euler 6 steps"):
        dc.sample(m, noise, torch.tensor([1, 2]), sampler="sde", steps=6)


@pytest.mark.parametrize("source,sampler,msg", [("digits-sit", "heun", "--sampler"),
                                                ("digits-sit --steps 2", "euler", "two network calls"),
                                                ("digits-sit", "ddim", "euler or sde sampler"),
                                                ("digits-dit", "sde", "ddpm or ddim sampler")])
def test_learn_cache_refuses_a_sampler_of_the_other_process(tmp_path, source, sampler, msg):
    r = runner.invoke(app, ["learn-cache", *source.split(), "--data", "digits", "--iters", 1, "--sampler", sampler,
                            "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and msg in r.output and not (tmp_path / "o").exists(), r.output
    assert len(r.output.strip().splitlines()) == 1
