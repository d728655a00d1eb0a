"""Evals computed once: the quickstart's base-model evals ship with the package and are
reused only when every input is the same (the report says so); a recomputation reproduces
the shipped samples; a user cache (DITC_CACHE_DIR) never serves a changed input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import dit_compress as dc
import dit_compress.evaluate.fidelity as F
from dit_compress.assets import EVALS_DIR
from dit_compress.diffusion.sampling import class_balanced_labels

QUICKSTART = dict(num_samples=500, sampler="ddim", steps=10, timestep_spacing="leading", cfg_scale=2.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_quickstart_base_evals_are_served_from_the_shipped_ones(tmp_path, seed, monkeypatch):
    def no_sampling(*a, **k):
        raise AssertionError("the shipped eval was not used")

    monkeypatch.setattr(F, "sample_shards", no_sampling)
    rep = dc.evaluate_model("digits-dit", output=tmp_path / "e", seed=seed, **QUICKSTART)
    assert str(EVALS_DIR) in rep["cached"] and rep["shards_written_now"] == 0 and rep["seed"] == seed
    saved = json.loads((tmp_path / "e" / "report.json").read_text())
    assert saved["metrics"] == rep["metrics"] and "cached" in saved
    assert np.load(tmp_path / "e" / "samples.npz")["arr_0"].shape == (500, 8, 8, 3)


@pytest.fixture(scope="module")
def held_out_captions(tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i") / "caps"
    dc.prepare_data("digits:test", output=out, text_encoder="digits-pixart", max_length=16)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_text_to_image_quickstart_base_evals_are_served_from_the_shipped_ones(tmp_path, seed, monkeypatch,
                                                                                  held_out_captions):
    """The quickstart-t2i's base evals of digits-pixart (held-out captions prepared here, in
    another folder than the shipped evals were made from) are the shipped ones."""
    def no_sampling(*a, **k):
        raise AssertionError("the shipped eval was not used")

    monkeypatch.setattr(F, "sample_shards", no_sampling)
    extra = {"loss_data": str(held_out_captions)} if seed == 0 else {}
    rep = dc.evaluate_model("digits-pixart", output=tmp_path / "e", seed=seed, prompts=str(held_out_captions),
                            **{**QUICKSTART, "cfg_scale": 3.0}, **extra)
    assert str(EVALS_DIR) in rep["cached"] and rep["seed"] == seed and rep["prompts"] == str(held_out_captions)
    assert rep["metrics"]["prompt_accuracy"] >= 0.95 and ("heldout_loss" in rep["metrics"]) == (seed == 0)


@pytest.mark.slow
def test_a_recomputation_reproduces_the_shipped_text_to_image_samples(held_out_captions):
    """The first 25 samples of the shipped digits-pixart seed-0 eval, sampled again here with
    diffusers-equivalent DDIM from the same shard noise and the prompts the eval took in turn."""
    from dit_compress.data.text import load_prompts

    entry = next(p for p in EVALS_DIR.iterdir() if p.is_dir() and
                 (r := json.loads((p / "report.json").read_text()))["seed"] == 0 and "digits-pixart" in str(r["source"]))
    shipped = np.load(entry / "samples.npz")
    m = dc.load_model("digits-pixart")
    prompts = load_prompts(str(held_out_captions), m.config)
    labels = torch.from_numpy(shipped["labels"][:25]).long()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(125, 1, 8, 8, generator=g)[:25]  # shard 0's first batch, as eval draws it
    x = dc.sample(m, noise, prompts.captions[labels], sampler="ddim", steps=10, timestep_spacing="leading",
                  cfg_scale=3.0, negative=prompts.null)
    diff = np.abs(F.to_uint8(x).astype(int) - shipped["arr_0"][:25].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001, (diff.max(), (diff > 0).mean())


def test_another_setting_or_model_is_not_served_from_the_shipped_ones(tmp_path):
    rep = dc.evaluate_model("digits-dit", output=tmp_path / "e", **{**QUICKSTART, "num_samples": 10, "steps": 2})
    assert "cached" not in rep and rep["shards_written_now"] == 1


@pytest.mark.slow
def test_a_recomputation_reproduces_the_shipped_samples():
    """The first 25 samples of the shipped seed-0 eval, sampled again here from the same shard
    noise: equal up to a rare one-level rounding difference (float summation order)."""
    entry = next(p for p in EVALS_DIR.iterdir() if p.is_dir() and json.loads((p / "report.json").read_text())["seed"] == 0
                 and json.loads((p / "report.json").read_text())["source"] == "digits-dit")
    shipped = np.load(entry / "samples.npz")["arr_0"][:25]
    m = dc.load_model("digits-dit")
    g = torch.Generator().manual_seed(0 * 1_000_003 + 0)
    noise = torch.randn(125, 1, 8, 8, generator=g)[:25]  # shard 0's first batch, as eval draws it
    y = torch.from_numpy(class_balanced_labels(25, 10)).long()
    x = dc.sample(m, noise, y, sampler="ddim", steps=10, timestep_spacing="leading", cfg_scale=2.0)
    again = F.to_uint8(x)
    diff = np.abs(again.astype(int) - shipped.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001, (diff.max(), (diff > 0).mean())


def test_the_user_cache_serves_only_identical_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("DITC_CACHE_DIR", str(tmp_path / "cache"))
    m = dc.create("custom", input_size=8, patch_size=1, in_channels=1, hidden_size=16, depth=2, num_heads=2,
                  num_classes=10, pixel=True)
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(12):
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(ref / f"{i}.png")
    args = dict(num_samples=12, steps=2, metrics="fid", ref=str(ref), shard_size=12, batch_size=12)
    first = dc.evaluate_model(m, output=tmp_path / "a", **args)
    second = dc.evaluate_model(m, output=tmp_path / "b", **args)
    assert "cached" not in first and "cached" in second and second["metrics"] == first["metrics"]
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(ref / "0.png")  # the reference changed under its path
    third = dc.evaluate_model(m, output=tmp_path / "c", **args)
    assert "cached" not in third and third["metrics"] != first["metrics"]
    assert "cached" not in dc.evaluate_model(m, output=tmp_path / "d", **{**args, "seed": 1})
    assert "cached" not in dc.evaluate_model(m, output=tmp_path / "e", cache=False, **args)
