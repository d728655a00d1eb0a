"""The value boundary: options of every command and keywords of every public function are
typed, range-checked and finite before anything runs (dit_compress/checks.py), and the
library raises its own errors, never a raw TypeError from deep inside."""

from __future__ import annotations

import random
import typing

import pytest
import torch
from helpers import tiny_model
from PIL import Image
from typer.main import get_command
from typer.testing import CliRunner

import dit_compress as dc
from dit_compress.cli import app
from dit_compress.formats import save_model

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vals")
    save_model(tiny_model(), root / "m")
    pix = dc.create("custom", input_size=8, patch_size=1, in_channels=1, hidden_size=16, depth=2, num_heads=2,
                    num_classes=10, pixel=True)
    save_model(pix, root / "pix")
    for c in ("a", "b"):
        (root / "imgs" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "imgs" / c / "0.png")
    return root


def base_args(root, out):
    m, pix = root / "m", root / "pix"
    return {
        "info": [m],
        "convert": [m, "-o", out],
        "create": ["custom", "-o", out, "--input-size", "8", "--in-channels", "1", "--hidden-size", "16", "--depth", "2",
                   "--num-heads", "2", "--patch-size", "1", "--num-classes", "10", "--pixel"],
        "finetune": [pix, "-o", out, "--data", "digits", "--steps", "1", "--batch-size", "2"],
        "distill": [pix, "-o", out, "--teacher", pix, "--data", "digits", "--steps", "1", "--batch-size", "2"],
        "prune-depth": [m, "-o", out, "--method", "uniform", "--pattern", "1:2"],
        "add-dynamic-width": [m, "-o", out],
        "add-token-router": [m, "-o", out],
        "eval": [pix, "-o", out, "-n", "2", "--steps", "1"],
        "bench": [m, "-o", out, "--repeats", "1", "--warmup", "0", "--batch-sizes", "1"],
        "prepare-data": [root / "imgs", "-o", out, "--vae", "none", "--image-size", "8"],
    }


BAD = {"integer": ["abc", "1.5", "-1", str(10**30)], "float": ["abc", "nan", "inf", "-inf"]}
# options naming one of a fixed set of values: any other text is refused
CHOICES = ["--to", "--dtype", "--prediction", "--numerics", "--schedule", "--mixed-precision", "--method", "--recover",
           "--influence-input", "--sort-by", "--sampler", "--timestep-spacing", "--metrics", "--rep-pairs",
           "--rep-mask-form", "--keep", "--pattern", "--groups", "--batch-sizes", "--guidance-interval", "--shape",
           "--variants"]


def _options(command: str):
    """(flag, "integer" | "float" | "text") for every option of a command that takes a value."""
    cmd = get_command(app).commands[command]
    hints = typing.get_type_hints(cmd.callback)
    for p in cmd.params:
        flags = [o for o in p.opts if o.startswith("--")]
        if getattr(p, "is_flag", False) or not flags:
            continue
        kinds = set(typing.get_args(hints.get(p.name)) or (hints.get(p.name),)) - {type(None)}
        yield flags[0], "integer" if kinds == {int} else "float" if kinds == {float} else "text"


def test_every_command_refuses_wrong_typed_and_out_of_range_options(files, tmp_path, monkeypatch):
    """Property-style: every typed option of every command, fed values of the wrong type and
    out of range (text, fractions, negatives, 10^30, NaN, inf) and every choice option fed
    garbage, exits 2 with one line, no traceback, and writes nothing."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    rng = random.Random(0)
    tried = 0
    for command, args in base_args(files, out).items():
        for flag, kind in _options(command):
            values = list(BAD.get(kind, []))
            if flag in CHOICES:
                values.append(rng.choice(["zz%9", "1:0", "nope", "-", ",,", "DiT-Q/3"]))
            for value in values:
                before = listing(tmp_path)
                r = run(command, *args, flag, value)
                tried += 1
                where = (command, flag, value, r.output[-300:])
                assert r.exit_code == 2, where
                assert "Traceback" not in r.output and r.stderr.count("\n") == 1, where
                assert listing(tmp_path) == before and not out.exists(), where
    assert tried > 250


@pytest.mark.parametrize("args,text", [
    (["eval", "{pix}", "-o", "{out}", "-n", "2", "--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
    (["bench", "{m}", "--loop", "--cfg-scale", "inf"], "--cfg-scale must be a finite number"),
    (["info", "{m}", "--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
    (["eval", "{pix}", "-o", "{out}", "-n", "2", "--sampler", "dpm-solver", "--steps", "1000"], "at most 999"),
    (["eval", "{pix}", "-o", "{out}", "-n", "2", "--sampler", "ddim", "--steps", "1001"], "at most 1000"),
    (["create", "custom", "-o", "{out}", "--input-size", "8", "--in-channels", "1", "--hidden-size", "16",
      "--depth", "0", "--num-heads", "2", "--patch-size", "1"], "--depth must be at least 1"),
    (["create", "custom", "-o", "{out}", "--input-size", "0", "--in-channels", "1", "--hidden-size", "16",
      "--depth", "2", "--num-heads", "2", "--patch-size", "1"], "--input-size must be at least 1"),
    (["create", "custom", "-o", "{out}", "--input-size", "8", "--in-channels", "1", "--hidden-size", "16",
      "--depth", "2", "--num-heads", "2", "--patch-size", "1", "--num-classes", "0"], "--num-classes must be at least 1"),
    (["create", "custom", "-o", "{out}", "--input-size", "100000", "--in-channels", "1", "--hidden-size", "16",
      "--depth", "2", "--num-heads", "2", "--patch-size", "1"], "--input-size must be at most 65536"),
    (["create", "DiT-XL/2", "-o", "{out}", "--depth", "1000"], "GiB"),
    (["bench", "{m}", "--batch-sizes", "0"], "--batch-sizes must be at least 1"),
    (["bench", "{m}", "--batch-sizes", ""], "--batch-sizes lists nothing"),
    (["bench", "{m}", "--repeats", "0"], "--repeats must be at least 1"),
    (["bench", "{m}", "--dtype", "int8"], "unknown --dtype 'int8'"),
    (["finetune", "{pix}", "-o", "{out}", "--data", "digits", "--lr", "nan"], "--lr must be a finite number"),
    (["finetune", "{pix}", "-o", "{out}", "--data", "digits", "--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["eval", "{pix}", "-o", "{out}", "-n", "2", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["eval", "{pix}", "-o", "{out}", "-n", "2", "--shard-size", "0"], "--shard-size must be at least 1"),
    (["distill", "{pix}", "-o", "{out}", "--teacher", "{pix}", "--data", "digits", "--kd-out", "0", "--kd-plain", "0"],
     "every loss weight is 0"),
    (["distill", "{pix}", "-o", "{out}", "--teacher", "{pix}", "--data", "digits", "--k-sigma", "3"],
     "--k-sigma shapes masked RepKD, which is off (--kd-rep 0)"),
    (["distill", "{pix}", "-o", "{out}", "--teacher", "{pix}", "--data", "digits", "--kd-rep", "0.01", "--no-rep-mask",
      "--k-sigma", "3"],
     "--k-sigma shapes the RepKD mask and --no-rep-mask drops it"),
    (["distill", "{pix}", "-o", "{out}", "--teacher", "{pix}", "--data", "digits", "--kd-rep", "0.01", "--no-rep-mask",
      "--rep-mask-form", "joint"], "--rep-mask-form shapes the RepKD mask"),
])
def test_named_bad_values_are_refused_in_one_line(files, tmp_path, args, text):
    """Items 5, 8 and 10 (options): NaN/inf guidance, dpm-solver at 1000 steps, degenerate
    models, empty or zero batch sizes, zero repeats, unknown dtypes, NaN learning rates."""
    out = tmp_path / "out"
    args = [str(a).format(m=files / "m", pix=files / "pix", out=out) for a in args]
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert text in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.output, r.stderr
    assert not out.exists()


def test_non_finite_samples_stop_the_run(files, tmp_path):
    """Item 5: a model whose samples are NaN never reaches a metric: eval fails, writes nothing."""
    m = dc.load_model(str(files / "pix"))
    with torch.no_grad():
        m.final_layer.linear.bias.fill_(3e38)
        m.final_layer.adaLN_modulation[-1].bias.fill_(3e38)
    with pytest.raises(dc.DitcError, match="NaN or inf"):
        dc.sample(m, torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), sampler="ddim", steps=2)
    with pytest.raises(dc.DitcError, match="NaN or inf"):
        dc.evaluate_model(m, output=tmp_path / "e", num_samples=2, steps=2)
    assert list(tmp_path.iterdir()) == []


def test_public_functions_raise_the_library_errors(files):
    """Item 12: wrong types reach the library's own errors (UsageError is exported), never a
    raw TypeError/AttributeError/IndexError; bench takes one source given as a name."""
    assert issubclass(dc.UsageError, dc.DitcError) and dc.FormatError and dc.MissingFactError
    m = dc.load_model(str(files / "pix"))
    noise, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    calls = [
        lambda: dc.sample(m, noise, y, sampler="ddim", steps="5"),
        lambda: dc.sample(m, noise, y, sampler="ddim", steps=5, cfg_scale=float("nan")),
        lambda: dc.sample(m, noise[:, :, :4], y, sampler="ddim", steps=5),
        lambda: dc.sample(m, noise, torch.tensor([1.5, 2.0]), sampler="ddim", steps=5),
        lambda: dc.sample(m, noise, torch.tensor([1, 11]), sampler="ddim", steps=5),
        lambda: dc.sample(m, noise, y, sampler=3, steps=5),
        lambda: dc.load_model(str(files / "m"), num_heads="4"),
        lambda: dc.load_model(12),
        lambda: dc.load_model(str(files / "m"), prediction="x0"),
        lambda: dc.prune_depth(str(files / "m"), output=files / "never", pattern=12, method="uniform"),
        lambda: dc.prune_depth(str(files / "m"), output=files / "never", pattern="1:2", method="uniform", steps="9"),
        lambda: dc.finetune(str(files / "m"), output=files / "never", data="digits", lr="0.1"),
        lambda: dc.evaluate_model(str(files / "pix"), output=files / "never", num_samples=2.5),
        lambda: dc.create("custom", input_size=8, patch_size=1, in_channels=1, hidden_size="16", depth=2, num_heads=2),
        lambda: dc.training_losses(m, noise, torch.tensor([-1, 5]), y),
        lambda: dc.training_losses(m, noise, torch.tensor([0.5, 0.2]), y),
        lambda: dc.bench(["digits-dit"], batch_sizes=[0]),
        lambda: dc.info(str(files / "m"), steps="50"),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(dc.UsageError):
            call()
    assert not (files / "never").exists()
    from dit_compress.commands.evaluation import bench_specs

    assert bench_specs("digits-dit") == ["digits-dit"]
