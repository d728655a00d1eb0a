"""The training engine: loss falls, exact resume, accelerate multi-process, KD losses, data."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import randomize, tiny_config
from typer.testing import CliRunner

from dit_compress.cli import app
from dit_compress.errors import DitcError
from dit_compress.formats import load_model, save_model
from dit_compress.model import DiT
from dit_compress.train import losses as L
from dit_compress.train import trainer as T
from dit_compress.train.api import train_model
from dit_compress.data.datasets import load_data

runner = CliRunner()


def small_digits(depth=2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=depth, num_heads=2,
                      latent_scale=None, name="small", **kw)
    return DiT(cfg)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_finetune_lowers_loss(tmp_path):
    m = small_digits()
    res = train_model(m, load_data("digits"), T.TrainConfig(steps=60, batch_size=32, lr=2e-3, ema=0, log_every=10),
                      tmp_path / "w")
    losses = [h["loss"] for h in res.history]
    assert np.mean(losses[-2:]) < 0.6 * losses[0], losses


def _fresh_run(tmp, steps, interrupt_at=None, monkeypatch=None):
    m = small_digits(seed=1)
    cfg = T.TrainConfig(steps=steps, batch_size=8, lr=1e-3, ema=0.99, seed=5, log_every=1)
    if interrupt_at is not None:
        orig = T.ema_update
        calls = {"n": 0}

        def hook(ema, model, decay):
            orig(ema, model, decay)
            calls["n"] += 1
            if calls["n"] == interrupt_at:
                os.kill(os.getpid(), signal.SIGTERM)

        monkeypatch.setattr(T, "ema_update", hook)
    return train_model(m, load_data("digits"), cfg, tmp)


def test_interrupt_and_resume_gives_identical_weights(tmp_path, monkeypatch):
    full = _fresh_run(tmp_path / "a", 6)
    with pytest.raises(T.TrainingInterrupted, match="step 2"):
        _fresh_run(tmp_path / "b", 6, interrupt_at=2, monkeypatch=monkeypatch)
    monkeypatch.undo()
    assert (tmp_path / "b" / "train_state" / "state.json").exists()
    m = small_digits(seed=1)
    resumed = train_model(m, load_data("digits"), T.TrainConfig(steps=6, batch_size=8, lr=1e-3, ema=0.99, seed=5, log_every=1),
                          tmp_path / "b", resume=True)
    assert resumed.resumed_from == 2
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_with_mismatching_config(tmp_path, monkeypatch):
    with pytest.raises(T.TrainingInterrupted):
        _fresh_run(tmp_path / "b", 4, interrupt_at=1, monkeypatch=monkeypatch)
    monkeypatch.undo()
    with pytest.raises(DitcError, match="batch_size was 8 .* is 16"):
        train_model(small_digits(seed=1), load_data("digits"), T.TrainConfig(steps=4, batch_size=16, lr=1e-3, seed=5),
                    tmp_path / "b", resume=True)
    with pytest.raises(DitcError, match="does not fit this model"):
        train_model(small_digits(depth=3, seed=1), load_data("digits"),
                    T.TrainConfig(steps=4, batch_size=8, lr=1e-3, ema=0.99, seed=5), tmp_path / "b", resume=True)
    with pytest.raises(DitcError, match="no training state"):
        train_model(small_digits(), load_data("digits"), T.TrainConfig(steps=2, batch_size=8), tmp_path / "none", resume=True)
    # a longer run is a plain continuation only under a constant learning rate
    (tmp_path / "b" / "train_state" / "state.json").write_text(
        (tmp_path / "b" / "train_state" / "state.json").read_text().replace('"schedule": "constant"', '"schedule": "cosine"'))
    with pytest.raises(DitcError, match="steps was 4 .* is 8 now, and the cosine learning-rate schedule"):
        train_model(small_digits(seed=1), load_data("digits"),
                    T.TrainConfig(steps=8, batch_size=8, lr=1e-3, ema=0.99, seed=5, schedule="cosine"), tmp_path / "b",
                    resume=True)


def test_nan_loss_stops_cleanly(tmp_path):
    m = small_digits()
    with torch.no_grad():
        m.final_layer.linear.bias.fill_(float("nan"))
    with pytest.raises(DitcError, match="loss is nan at step 0"):
        train_model(m, load_data("digits"), T.TrainConfig(steps=3, batch_size=4), tmp_path / "w")


def test_masked_repkd_is_finite_where_unmasked_is_not():
    torch.manual_seed(0)
    ht = torch.randn(2, 16, 32)
    hs = ht + 0.1 * torch.randn(2, 16, 32)
    ht[0, 3, 7] = 3e20  # a planted massive activation, as in large DiTs
    hs[0, 3, 7] = -3e20
    plain = L.masked_rep_loss(hs, ht, None)
    masked = L.masked_rep_loss(hs, ht, 2.0)
    assert not torch.isfinite(plain)
    assert torch.isfinite(masked) and 0 < masked < 0.05


def test_layer_map_from_kept_layers():
    t = tiny_config(depth=28)
    s = tiny_config(depth=14, kept_layers=list(range(0, 28, 2)))
    assert L.layer_map(s, t) == [2 * i + 1 for i in range(14)]
    assert L.layer_map(s, t, "kept") == [2 * i + 1 for i in range(14)]
    s = tiny_config(depth=3, kept_layers=[1, 2, 7])
    assert L.layer_map(s, tiny_config(depth=8), "kept") == [1, 6, 7]
    # TinyFusion's fixed pairs by depth ratio, whichever layers were kept
    assert L.layer_map(s, tiny_config(depth=8)) == [1, 4, 7]


def test_masked_rep_loss_forms_match_their_definitions():
    import numpy as np

    g = torch.Generator().manual_seed(3)
    hs, ht = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    ht[1, 2, 3] = 40.0
    a, b = hs.numpy().astype(np.float64), ht.numpy().astype(np.float64)

    def keep(h):  # per sample over tokens x channels, unbiased std as torch.std
        f = h.reshape(h.shape[0], -1)
        mu, sd = f.mean(1)[:, None, None], f.std(1, ddof=1)[:, None, None]
        return np.abs(h - mu) < 2 * sd

    ms, mt = keep(a), keep(b)
    assert not mt[1, 2, 3]
    paper = np.mean((a * ms - b * mt) ** 2)
    joint = ((a - b) ** 2 * (ms & mt)).sum() / (ms & mt).sum()
    assert abs(float(L.masked_rep_loss(hs, ht, 2.0)) - paper) < 1e-5
    assert abs(float(L.masked_rep_loss(hs, ht, 2.0, "joint")) - joint) < 1e-5


def test_distill_cli_with_masked_repkd(tmp_path):
    teacher = randomize(small_digits(depth=4, seed=2), 2)
    save_model(teacher, tmp_path / "t")
    from dit_compress.compress.depth import prune_layers

    save_model(prune_layers(teacher, [1, 3]), tmp_path / "s")
    r = run("distill", tmp_path / "s", "--teacher", tmp_path / "t", "--data", "digits", "--steps", "6", "--batch-size", "8",
            "--kd-rep", "0.01", "--ema", "0", "-o", tmp_path / "kd", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "kd" / "report.json").read_text())
    assert all(np.isfinite(h["rep"]) and np.isfinite(h["kd_eps"]) for h in rep["history"])
    assert load_model(tmp_path / "kd").config.lineage[-1]["op"] == "distill"
    # a teacher with another latent size is refused
    save_model(DiT(tiny_config(input_size=16, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2)), tmp_path / "big")
    r = run("distill", tmp_path / "s", "--teacher", tmp_path / "big", "--data", "digits", "--steps", "2", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "teacher takes 1x16x16" in r.stderr
    assert not (tmp_path / "x").exists()


def test_finetune_cli_writes_checkpoint_and_report(tmp_path):
    save_model(small_digits(), tmp_path / "m")
    r = run("finetune", tmp_path / "m", "--data", "digits", "--steps", "5", "--batch-size", "8", "-o", tmp_path / "ft")
    assert r.exit_code == 0, r.output
    assert {"model.safetensors", "config.json", "report.json", "report.md", "README.md", "loss.png"} <= {
        p.name for p in (tmp_path / "ft").iterdir()}
    assert not any(p.name.endswith("ditc-work") for p in tmp_path.iterdir())


def _write_npy_latents(root, n=6, shape=(1, 8, 8), flip=False, label_of=lambda i: i % 10):
    (root / "imagenet256_features").mkdir(parents=True)
    (root / "imagenet256_labels").mkdir(parents=True)
    for i in range(n):
        a = np.random.randn(1, *((2,) if flip else ()), *shape).astype(np.float32)
        np.save(root / "imagenet256_features" / f"{i}.npy", a)
        np.save(root / "imagenet256_labels" / f"{i}.npy", np.array([label_of(i)]))


def test_npy_latents_layout_with_flips(tmp_path):
    _write_npy_latents(tmp_path / "lat", flip=True)
    d = load_data(str(tmp_path / "lat"), 10)
    assert len(d) == 6 and d.sample_shape == (1, 8, 8)
    x, y = d.get(torch.tensor([0, 5]))
    assert x.shape == (2, 1, 8, 8) and y.tolist() == [0, 5]
    save_model(small_digits(), tmp_path / "m")
    r = run("finetune", tmp_path / "m", "--data", tmp_path / "lat", "--steps", "2", "--batch-size", "4", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output


def test_safetensors_shards_layout(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "sh").mkdir()
    save_file({"latents": np.random.randn(5, 1, 8, 8).astype(np.float32), "labels": np.arange(5)},
              str(tmp_path / "sh" / "shard-00000.safetensors"))
    d = load_data(str(tmp_path / "sh"), 10)
    assert len(d) == 5 and d.sample_shape == (1, 8, 8)


def test_bad_data(tmp_path):
    save_model(small_digits(), tmp_path / "m")
    (tmp_path / "empty").mkdir()
    _write_npy_latents(tmp_path / "wrong", shape=(4, 32, 32))
    _write_npy_latents(tmp_path / "mislabelled", label_of=lambda i: 50)
    cases = [(tmp_path / "empty", "empty or holds no known data"), (tmp_path / "nope", "does not exist"),
             (tmp_path / "wrong", "shape (4, 32, 32) but the model takes (1, 8, 8)"),
             (tmp_path / "mislabelled", "label 50 of sample 0 is outside 0..9")]
    for data, msg in cases:
        r = run("finetune", tmp_path / "m", "--data", data, "--steps", "2", "-o", tmp_path / "o")
        assert r.exit_code == 1 and msg in r.stderr, (data, r.stderr)
        assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_process_accelerate_launch(tmp_path):
    save_model(small_digits(), tmp_path / "m")
    env = dict(os.environ, DITC_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "dit_compress.cli", "finetune", str(tmp_path / "m"), "--data", "digits", "--steps", "4",
           "--batch-size", "4", "-o", str(tmp_path / "o")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = load_model(tmp_path / "o")
    assert m.config.lineage[-1]["op"] == "finetune"
    assert json.loads((tmp_path / "o" / "report.json").read_text())["processes"] == 2


def _image_folder(root, n_per_class=3, size=20):
    from PIL import Image

    rng = np.random.RandomState(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.randint(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_prepare_data_with_local_vae_and_resume(tmp_path):
    from diffusers import AutoencoderKL

    _image_folder(tmp_path / "imgs")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,),
                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).save_pretrained(tmp_path / "vae")
    args = ["prepare-data", tmp_path / "imgs", "-o", tmp_path / "lat", "--vae", tmp_path / "vae", "--image-size", "16",
            "--shard-size", "4", "--json"]
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["shards_written_now"] == 2
    d = load_data(str(tmp_path / "lat"), 2)
    assert len(d) == 6 and d.sample_shape == (4, 16, 16) and d.y.tolist() == [0, 0, 0, 1, 1, 1]
    first = (tmp_path / "lat" / "shard-00000.safetensors").read_bytes()
    # a finished output is complete: a rerun is refused, not mixed into it
    r = run(*args)
    assert r.exit_code == 2 and "already exists" in r.stderr
    # an interrupted run resumes from its work dir: the finished shard is kept, the rest redone
    import dit_compress.data.images as images

    real_save, calls = images.save_file, []

    def fail_second(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(tensors, path)

    images.save_file = fail_second
    try:
        assert run(*args[:3], tmp_path / "lat2", *args[4:]).exit_code != 0
    finally:
        images.save_file = real_save
    assert not (tmp_path / "lat2").exists() and (tmp_path / ".lat2.ditc-work" / "shard-00000.safetensors").exists()
    r = run(*args[:3], tmp_path / "lat2", *args[4:])
    assert r.exit_code == 0 and json.loads(r.stdout)["shards_written_now"] == 1, r.output
    assert (tmp_path / "lat2" / "shard-00000.safetensors").read_bytes() == first
    assert not (tmp_path / ".lat2.ditc-work").exists()


def test_image_folder_on_the_fly_for_pixel_models(tmp_path):
    _image_folder(tmp_path / "imgs")
    m = small_digits()
    d = load_data(str(tmp_path / "imgs"), 10, m.config)
    x, y = d.get(torch.tensor([0, 4]))
    assert x.shape == (2, 1, 8, 8) and x.min() >= -1 and x.max() <= 1 and y.tolist() == [0, 1]
