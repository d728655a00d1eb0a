"""Every command's library function, called directly as a Python user would (the CLI and
the recipe runner are shells over these): results, written outputs, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dit_compress as dc
from dit_compress.commands import COMMANDS
from dit_compress.errors import UsageError

TINY = dict(input_size=8, patch_size=1, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10,
            pixel=True, name="api-tiny")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "tiny"
    model = dc.create("custom", output=out, seed=3, **TINY)
    return model, out


def test_every_cli_command_has_a_library_function():
    from typer.main import get_command

    from dit_compress.cli import app

    cli = set(get_command(app).commands) - {"run", "recipes"}
    assert cli == set(COMMANDS)
    for name, fn in COMMANDS.items():
        assert getattr(dc, fn.__name__) is fn, name


def test_create_convert_info(tiny, tmp_path):
    model, out = tiny
    assert dc.load_model(str(out)).config.hidden_size == 32
    again = dc.create("custom", seed=3, **TINY)  # same seed, no output: the same weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(UsageError, match="custom architecture needs `depth`"):
        dc.create("custom", input_size=8, patch_size=1, in_channels=1, hidden_size=32, num_heads=2)
    dc.convert(str(out), output=tmp_path / "fp16", dtype="fp16")
    half = dc.load_model(str(tmp_path / "fp16"))
    assert half.config.lineage[-1]["op"] == "convert"
    d = dc.info(str(tmp_path / "fp16"))
    assert d["depth"] == 4 and d["params"] == model.num_params() and d["lineage"][-1]["dtype"] == "fp16"
    assert dc.info("DiT-XL/2", arch=True)["gflops"] == pytest.approx(118.6, abs=0.1)


def test_prune_and_route_accept_a_model_or_a_path(tiny, tmp_path):
    model, out = tiny
    pruned, rep = dc.prune_depth(model, output=tmp_path / "p", pattern="1:2", method="uniform")
    assert rep["kept_layers"] == [1, 3] and pruned.config.depth == 2
    assert dc.load_model(str(tmp_path / "p")).config.kept_layers == [1, 3]
    dyn, rep = dc.add_dynamic_width(str(tmp_path / "p"), output=tmp_path / "w", target_flops=0.6)
    assert dyn.config.width.target_flops == 0.6 and rep["op"] == "add-dynamic-width"
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():  # routers start all-on: the function is unchanged
        torch.testing.assert_close(dyn(x, t, y), pruned(x, t, y), atol=1e-5, rtol=1e-5)
    tok, _ = dc.add_token_router(dyn, output=tmp_path / "wt")
    assert tok.config.tokens is not None and (tmp_path / "wt" / "report.json").exists()
    with pytest.raises(UsageError, match="already exists"):
        dc.prune_depth(model, output=tmp_path / "p", pattern="1:2", method="uniform")


def test_finetune_and_distill_write_their_checkpoints(tiny, tmp_path):
    model, out = tiny
    ft, rep = dc.finetune(str(out), output=tmp_path / "ft", data="digits", steps=3, batch_size=8, ema=0.0)
    assert rep["steps"] == 3 and len(rep["history"]) == 1 and np.isfinite(rep["final_loss"])
    assert dc.load_model(str(tmp_path / "ft")).config.lineage[-1]["op"] == "finetune"
    assert not any(ft.state_dict()[k].equal(v) for k, v in model.state_dict().items() if k.endswith("qkv.weight"))
    pruned, _ = dc.prune_depth(model, output=tmp_path / "p", pattern="1:2", method="uniform")
    st, rep = dc.distill(pruned, output=tmp_path / "kd", teacher=str(out), data="digits", steps=2, batch_size=8,
                         kd_rep=0.01, ema=0.0)
    assert rep["teacher"] == str(out) and rep["kd"]["rep"] == 0.01 and st.config.lineage[-1]["op"] == "distill"
    with pytest.raises(UsageError, match="`steps` must be at least 1"):
        dc.finetune(str(out), output=tmp_path / "bad", data="digits", steps=0)
    assert not (tmp_path / "bad").exists()


def test_evaluate_model_and_bench(tiny, tmp_path):
    model, out = tiny
    from dit_compress.commands.evaluation import held_out_data

    # the default held-out data comes from the model's lineage, not its 8x8 pixel shape
    assert held_out_data(model.config) is None
    assert held_out_data(dc.load_model("digits-dit").config) == "digits:test"
    assert held_out_data(dc.load_model("digits-sit").config) == "digits:test"
    rep = dc.evaluate_model(str(out), output=tmp_path / "ev", num_samples=20, steps=5, metrics="prc",
                            batch_size=10, shard_size=10, loss_data="digits:test")
    written = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert written["source"] == str(out) and written["num_samples"] == 20 == rep["num_samples"]
    assert 0.0 <= rep["metrics"]["class_accuracy"] <= 1.0 and "heldout_loss" in rep["metrics"]
    assert (tmp_path / "ev" / "samples.png").exists()
    b = dc.bench([str(out)], batch_sizes="1", repeats=1, warmup=0, output=tmp_path / "b")
    assert b["rows"][0]["speedup"] == 1.0 and (tmp_path / "b" / "report.json").exists()
    with pytest.raises(UsageError, match="nothing to benchmark"):
        dc.bench([])


def test_prepare_data_pixels(tmp_path):
    from PIL import Image

    rng = np.random.RandomState(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.randint(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    info = dc.prepare_data(tmp_path / "imgs", output=tmp_path / "px", vae=None, image_size=8)
    assert info["count"] == 4 and info["classes"] == ["a", "b"] and info["shards_written_now"] == 1
