"""Nothing stale: every resumable artefact records what produced it, and a rerun with other
inputs refuses in one line (or, with --force, recomputes), never mixes old and new."""

from __future__ import annotations

import json

import numpy as np
from helpers import randomize
from PIL import Image
from typer.testing import CliRunner

import dit_compress as dc
import dit_compress.data.images as images
import dit_compress.evaluate.fidelity as F
from dit_compress.cli import app
from dit_compress.train import trainer as T

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def pixel_model(path, seed):
    m = dc.create("custom", input_size=8, patch_size=1, in_channels=1, hidden_size=16, depth=2, num_heads=2,
                  num_classes=10, pixel=True, seed=seed)
    dc.save_model(randomize(m, seed), path)  # non-zero adaLN and output layers: models that differ
    return path


def interrupt_after(monkeypatch, module, name, calls_before):
    real, n = getattr(module, name), []

    def wrapper(*a, **k):
        n.append(1)
        if len(n) > calls_before:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapper)
    return lambda: monkeypatch.setattr(module, name, real)


def test_eval_never_reports_another_models_samples(tmp_path, monkeypatch):
    """`ditc eval A -o e/` then `ditc eval B -o e/ --cfg-scale 4` reported A's samples and FID as B's."""
    a, b = pixel_model(tmp_path / "a", 0), pixel_model(tmp_path / "b", 1)
    args = ["-n", "20", "--shard-size", "10", "--batch-size", "10", "--steps", "2", "--metrics", "fid", "--json"]
    assert run("eval", a, "-o", tmp_path / "e", *args).exit_code == 0
    first = np.load(tmp_path / "e" / "samples.npz")["arr_0"]
    r = run("eval", b, "-o", tmp_path / "e", "--cfg-scale", "4", *args)
    assert r.exit_code == 2 and "already exists" in r.stderr
    r = run("eval", b, "-o", tmp_path / "e", "--cfg-scale", "4", "--force", *args)
    assert r.exit_code == 0 and json.loads(r.stdout)["shards_written_now"] == 2
    assert not np.array_equal(np.load(tmp_path / "e" / "samples.npz")["arr_0"], first)
    # an interrupted eval of A: its finished shard is never reused for B or for other settings
    restore = interrupt_after(monkeypatch, F, "sample", 1)
    assert run("eval", a, "-o", tmp_path / "k", *args).exit_code == 130
    restore()
    for other in (["eval", b, "-o", tmp_path / "k", *args], ["eval", a, "-o", tmp_path / "k", "--cfg-scale", "2", *args],
                  ["eval", a, "-o", tmp_path / "k", *args[:-1], "--seed", "3"]):
        r = run(*other)
        assert r.exit_code == 2 and "unfinished eval made with other settings" in r.stderr, r.output
    r = run("eval", a, "-o", tmp_path / "k", *args)  # the same settings resume
    assert r.exit_code == 0 and json.loads(r.stdout)["shards_written_now"] == 1
    r = run("eval", b, "-o", tmp_path / "k2", *args)
    restore = interrupt_after(monkeypatch, F, "sample", 1)
    assert run("eval", b, "-o", tmp_path / "k3", *args).exit_code == 130
    restore()
    r = run("eval", a, "-o", tmp_path / "k3", "--force", *args)  # --force starts over: both shards are A's
    assert r.exit_code == 0 and json.loads(r.stdout)["shards_written_now"] == 2
    assert np.array_equal(np.load(tmp_path / "k3" / "samples.npz")["arr_0"], np.load(tmp_path / "k" / "samples.npz")["arr_0"])


def test_prepare_data_never_mixes_shards_of_other_inputs(tmp_path, monkeypatch):
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    args = ["prepare-data", tmp_path / "imgs", "-o", tmp_path / "lat", "--vae", "none", "--shard-size", "2"]
    restore = interrupt_after(monkeypatch, images, "save_file", 1)
    assert run(*args, "--image-size", "16").exit_code == 130
    restore()
    r = run(*args, "--image-size", "8")
    assert r.exit_code == 2 and "image_size: 16 then, 8 now" in r.stderr, r.output
    (tmp_path / "imgs" / "a" / "3.png").write_bytes((tmp_path / "imgs" / "a" / "0.png").read_bytes())
    r = run(*args, "--image-size", "16")
    assert r.exit_code == 2 and "made with other settings" in r.stderr  # the image folder changed
    r = run(*args, "--image-size", "16", "--force", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["shards_written_now"] == 4 and json.loads(r.stdout)["count"] == 7


def test_resume_refuses_a_changed_option_model_or_data(tmp_path, monkeypatch):
    a, b = pixel_model(tmp_path / "a", 0), pixel_model(tmp_path / "b", 1)
    args = ["--data", "digits", "--steps", "4", "--batch-size", "4", "-o", tmp_path / "o"]
    real = T.Trainer._checkpoint

    def stop_at_2(self, run_, step):
        if step == 2:
            self._stop_signal = 2
        return real(self, run_, step)

    monkeypatch.setattr(T.Trainer, "_checkpoint", stop_at_2)
    assert run("finetune", a, *args).exit_code == 130
    monkeypatch.setattr(T.Trainer, "_checkpoint", real)
    cases = [(["finetune", a, *args, "--lr", "3e-4"], "lr was 0.0001 in the interrupted run but is 0.0003 now"),
             (["finetune", a, *args, "--ema", "0.5"], "ema was 0.0 in the interrupted run but is 0.5 now"),
             (["finetune", a, *args, "--schedule", "cosine"], "schedule was constant"),
             (["finetune", a, *args[:3], "400", *args[4:]], "the default EMA is scaled to the steps: 4 then, 400 now"),
             (["finetune", b, *args], "the model being trained differs"),
             (["finetune", a, *args[:1], "digits:test", *args[2:]], "the data differs")]
    for cmd, text in cases:
        r = run(*cmd, "--resume")
        assert r.exit_code != 0 and text in r.stderr and r.stderr.count("\n") == 1, (cmd, r.output)
    r = run("finetune", a, *args, "--resume", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["resumed_from"] == 2
