"""ditc eval / bench: metric plumbing on the digits extractor, resumable sharded sampling,
multi-process equality, bad inputs, bench rows."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import tiny_config
from typer.testing import CliRunner

from dit_compress.cli import app
from dit_compress.errors import DitcError, UsageError
from dit_compress.evaluate import fidelity as F
from dit_compress.evaluate.features import register
from dit_compress.formats import save_model
from dit_compress.model import DiT

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory):
    torch.manual_seed(0)
    m = DiT(tiny_config(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                        latent_scale=None, name="px"))
    path = tmp_path_factory.mktemp("px") / "m"
    save_model(m, path)
    return m, path


def test_fid_zero_on_itself_and_grows_with_noise():
    ex = {"feature_extractor": register()}
    ref = F.digits_reference("train")
    assert abs(F.compute_metrics(ref, "array", ref, ["fid"], ex)["frechet_inception_distance"]) < 1e-3
    rng = np.random.RandomState(0)
    fids = []
    for sigma in (10, 40, 100):
        noisy = np.clip(ref.astype(float) + rng.randn(*ref.shape) * sigma, 0, 255).astype(np.uint8)
        fids.append(F.compute_metrics(noisy, "array", ref, ["fid"], ex)["frechet_inception_distance"])
    assert 0 < fids[0] < fids[1] < fids[2], fids


def test_precision_recall_and_stats_reference(tmp_path):
    ex = {"feature_extractor": register()}
    ref = F.digits_reference("train")
    m = F.compute_metrics(ref[:300], "array", ref, ["prc", "isc"], ex)
    assert 0.5 < m["precision"] <= 1 and 0 < m["recall"] <= 1 and m["inception_score_mean"] > 5
    # ADM-style reference statistics (mu / sigma) give the same FID as the images they came from
    from dit_compress.evaluate.features import load_digits_net, images_to_input

    with torch.no_grad():
        feats = load_digits_net().features(images_to_input(torch.from_numpy(ref).permute(0, 3, 1, 2))).double().numpy()
    np.savez(tmp_path / "ref.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    kind, stats = F.resolve_reference(str(tmp_path / "ref.npz"), tiny_config())
    a = F.compute_metrics(ref[:500], kind, stats, ["fid"], ex)["frechet_inception_distance"]
    b = F.compute_metrics(ref[:500], "array", ref, ["fid"], ex)["frechet_inception_distance"]
    assert a == pytest.approx(b, rel=1e-3)


def test_inception_weights_path_is_passed(monkeypatch, tmp_path):
    import torch_fidelity

    w = tmp_path / "inception.pth"
    torch.save({"conv.weight": torch.zeros(1)}, w)
    seen = {}

    def fake(**kw):
        seen.update(kw)
        return {"frechet_inception_distance": 1.0}

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", fake)
    ex = F.choose_extractor(tiny_config(), str(w), "inception-v3-compat")
    ref = F.digits_reference("test")
    F.compute_metrics(ref, "array", ref, ["fid"], ex)
    assert seen["feature_extractor"] == "inception-v3-compat" and seen["feature_extractor_weights_path"] == str(w)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DitcError, match="do not load"):
        F.choose_extractor(tiny_config(), str(tmp_path / "bad.pth"), "inception-v3-compat")
    with pytest.raises(UsageError, match="`inception_weights`"):
        F.choose_extractor(tiny_config(), None, "inception-v3-compat")


def test_eval_resume_does_not_redo_shards(pixel_model, tmp_path, monkeypatch):
    m, path = pixel_model
    args = ["eval", path, "-n", "40", "--shard-size", "10", "--batch-size", "10", "--steps", "3", "--metrics", "fid",
            "--json", "-o"]
    orig = F.sample_shards
    r = run(*args, tmp_path / "e")
    assert r.exit_code == 0, r.output
    first = np.load(tmp_path / "e" / "samples.npz")["arr_0"]
    assert first.shape == (40, 8, 8, 3)
    rep = json.loads(r.stdout)
    assert rep["shards_written_now"] == 4 and "warning" in rep and "class_accuracy" in rep["metrics"]
    # a killed run: interrupted while sampling shard 2; its finished shards wait in the work dir
    real, calls = F.sample, []

    def killed_at_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(F, "sample", killed_at_third)
    assert run(*args, tmp_path / "k").exit_code == 130
    monkeypatch.setattr(F, "sample", real)
    assert not (tmp_path / "k").exists() and len(list((tmp_path / ".k.ditc-work" / "samples").glob("*.npz"))) == 2
    r = run(*args, tmp_path / "k")
    assert json.loads(r.stdout)["shards_written_now"] == 2
    assert np.array_equal(np.load(tmp_path / "k" / "samples.npz")["arr_0"], first)
    assert not (tmp_path / ".k.ditc-work").exists()
    assert F.sample_shards is orig


def test_eval_bad_inputs(pixel_model, tmp_path):
    m, path = pixel_model
    base = ["eval", path, "-n", "10", "--steps", "2", "--shard-size", "10"]
    r = run(*base, "-o", tmp_path / "a", "--ref", tmp_path / "missing")
    assert r.exit_code == 1 and "does not exist" in r.stderr
    from PIL import Image

    (tmp_path / "refdir").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "refdir" / "a.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "refdir" / "b.png")
    r = run(*base, "-o", tmp_path / "b", "--ref", tmp_path / "refdir")
    assert r.exit_code == 1 and "16x16" in r.stderr
    (tmp_path / "refdir" / "b.png").unlink()
    Image.new("RGB", (16, 16)).save(tmp_path / "refdir" / "b.png")
    for p in (tmp_path / "refdir").iterdir():
        Image.new("RGB", (16, 16)).save(p)
    r = run(*base, "-o", tmp_path / "c", "--ref", tmp_path / "refdir")
    assert r.exit_code == 1 and "reference images are 16x16 but samples are 8x8" in r.stderr
    r = run(*base, "-o", tmp_path / "d", "--metrics", "kid", "--kid-subset-size", "50")
    assert r.exit_code == 2 and "smaller than the KID subset" in r.stderr
    r = run(*base, "-o", tmp_path / "e", "--metrics", "fid,lpips")
    assert r.exit_code == 2 and "unknown metric 'lpips'" in r.stderr


@pytest.mark.slow
def test_two_process_eval_equals_one_process(pixel_model, tmp_path):
    m, path = pixel_model
    env = dict(os.environ, DITC_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    common = ["-m", "dit_compress.cli", "eval", str(path), "-n", "40", "--shard-size", "10", "--batch-size", "10",
              "--steps", "3", "--sampler", "ddpm", "--metrics", "fid"]
    one = subprocess.run([sys.executable, *common, "-o", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
                          "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", *common, "-o", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    a = np.load(tmp_path / "one" / "samples.npz")["arr_0"]
    b = np.load(tmp_path / "two" / "samples.npz")["arr_0"]
    assert np.array_equal(a, b)
    assert json.loads((tmp_path / "two" / "report.json").read_text())["processes"] == 2


def test_bench_rows_and_report(pixel_model, tmp_path):
    m, path = pixel_model
    r = run("bench", path, f"{path}+d1", "--batch-sizes", "1,4", "--repeats", "2", "--warmup", "1", "-o", tmp_path / "b", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    rows = rep["rows"]
    assert len(rows) == 4 and {row["batch"] for row in rows} == {1, 4}
    d1 = [row for row in rows if row["model"].endswith("+d1")]
    assert all(row["flops_ratio"] > 1.2 and row["latency_ms"] > 0 and row["peak_rss_mb"] > 0 for row in d1)
    assert (tmp_path / "b" / "speed_vs_flops.png").exists() and (tmp_path / "b" / "report.md").exists()
    r = run("bench", path, f"{path}+x9")
    assert r.exit_code == 2 and "unknown bench variant" in r.stderr


def test_bench_loop_mode_agrees_with_info_flops(tmp_path):
    """--loop times the whole sampler; for a dynamic model its FLOPs per image over the loop
    equal what `ditc info --sampler` reports for the same sampler (times the calls)."""
    from dit_compress.compress.dynamic import add_dynamic_width, set_static_width
    from dit_compress.evaluate.describe import describe
    from dit_compress.formats import load_model, save_model

    m = add_dynamic_width(load_model("digits-dit"), 0.5)
    set_static_width(m, 0.5, 0.75)
    save_model(m, tmp_path / "dyn")
    r = runner.invoke(app, ["bench", "--loop", "--sampler", "ddim", "--steps", "4", "--cfg-scale", "2",
                            "digits-dit", str(tmp_path / "dyn"), "--batch-sizes", "2", "--repeats", "1",
                            "--warmup", "0", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    base, dyn = d["rows"]
    assert d["mode"] == "sampling loop" and dyn["seconds_per_image"] > 0
    info = describe(load_model(tmp_path / "dyn"), "ddim", 4)
    assert dyn["gflops"] == pytest.approx(info["inference_gflops"] * 4 * 2, rel=1e-6)  # 4 calls, CFG doubles
    assert dyn["flops_ratio"] == pytest.approx(base["gflops"] / dyn["gflops"], rel=1e-9)
    assert 1.4 < dyn["flops_ratio"] < 1.7
