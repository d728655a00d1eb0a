"""Checkpoints made by other tools, not by ditc: original-layout files of unpublished sizes
(plain ``torch.save`` of an independent re-implementation, and training checkpoints with
``args``), DiTs freshly created in diffusers (independent per-block embedders), and the
reference respacing of the samplers re-derived in float64."""

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import Recorder
from reference_dit import reference_dit
from typer.testing import CliRunner

import dit_compress
from dit_compress.cli import app
from dit_compress.compress.depth import prune_layers
from dit_compress.compress.dynamic import add_dynamic_width
from dit_compress.errors import FormatError, MissingFactError, UsageError
from dit_compress.formats import load_model, save_model

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _xty(batch=3, ch=4, size=8, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, ch, size, size, generator=g), torch.tensor([0, 500, 999][:batch]),
            torch.randint(0, classes + 1, (batch,), generator=g))


# ----------------------------------------------------------------------------- heads are never guessed
@pytest.fixture(scope="module")
def ref64(tmp_path_factory):
    """A reference DiT with hidden 64 and 4 heads (hidden/64 would say 1), saved as others do."""
    d = tmp_path_factory.mktemp("orig")
    ref = reference_dit(hidden=64, heads=4, depth=2)
    torch.save(ref.state_dict(), d / "plain.pt")
    args = argparse.Namespace(model="DiT-custom", image_size=64, num_classes=10, vae="mse")
    torch.save({"model": ref.state_dict(), "ema": ref.state_dict(), "opt": {}, "args": args}, d / "train.pt")
    return ref, d


@pytest.mark.parametrize("name", ["plain.pt", "train.pt"])
def test_unpublished_heads_refused_then_exact(ref64, name):
    ref, d = ref64
    with pytest.raises(MissingFactError, match=r"cannot tell the number of attention heads \(hidden 64 .*give `num_heads`"):
        load_model(d / name)
    m = load_model(d / name, num_heads=4)
    x, t, y = _xty()
    with torch.no_grad():
        assert torch.allclose(m(x, t, y), ref(x, t, y), atol=1e-5)
        # what the old guess (hidden // 64 = 1 head) would have produced is clearly wrong
        assert (load_model(d / name, num_heads=1)(x, t, y) - ref(x, t, y)).abs().max() > 1e-3
    assert m.config.provenance["num_heads"].startswith("given")


def test_training_args_state_the_facts(ref64, tmp_path):
    ref, d = ref64
    m = load_model(d / "train.pt", num_heads=4)
    assert m.config.vae == "stabilityai/sd-vae-ft-mse" and m.config.prediction == "eps"
    # a preset name in args.model supplies the heads (DiT-S: 6 heads at hidden 384)
    s = reference_dit(hidden=384, heads=6, depth=1)
    torch.save({"ema": s.state_dict(), "args": argparse.Namespace(model="DiT-S/2", image_size=64)}, tmp_path / "s.pt")
    ms = load_model(tmp_path / "s.pt")
    assert ms.config.num_heads == 6 and "args.model" in ms.config.provenance["num_heads"]
    x, t, y = _xty()
    with torch.no_grad():
        assert torch.allclose(ms(x, t, y), s(x, t, y), atol=1e-5)
    # args that contradict the weights are refused, not believed
    torch.save({"ema": s.state_dict(), "args": argparse.Namespace(model="DiT-XL/2")}, tmp_path / "bad.pt")
    with pytest.raises(FormatError, match="args.model says DiT-XL/2"):
        load_model(tmp_path / "bad.pt")


def test_published_width_is_stated_on_stderr(tmp_path, capsys):
    s = reference_dit(hidden=384, heads=6, depth=1)
    torch.save(s.state_dict(), tmp_path / "s.pt")
    m = load_model(tmp_path / "s.pt")
    err = capsys.readouterr().err
    assert m.config.num_heads == 6
    assert "num_heads = 6: inferred: published DiT-S width" in err
    assert "prediction = eps: assumed" in err and "--prediction velocity" in err
    assert load_model(tmp_path / "s.pt", prediction="velocity").config.prediction == "velocity"


def test_cli_num_heads_everywhere_and_recorded_once(ref64, tmp_path):
    _, d = ref64
    for cmd in (["info"], ["prune-depth", "--method", "uniform", "--pattern", "1:2", "-o", tmp_path / "p"],
                ["add-dynamic-width", "-o", tmp_path / "w"], ["add-token-router", "-o", tmp_path / "k"],
                ["finetune", "--data", "digits", "-o", tmp_path / "f"]):
        r = run(cmd[0], d / "plain.pt", *cmd[1:])
        assert r.exit_code == 2, (cmd, r.output)
        lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("note:")]
        assert len(lines) == 1 and "give --num-heads" in lines[0], r.stderr
        assert not (tmp_path / "p").exists()
    r = run("info", d / "plain.pt", "--num-heads", "3")
    assert r.exit_code == 2 and "--num-heads 3 does not divide the hidden size 64" in r.stderr
    assert run("convert", d / "plain.pt", "--num-heads", "4", "-o", tmp_path / "c").exit_code == 0
    r = run("info", tmp_path / "c", "--json")  # the ditc checkpoint states it now
    assert r.exit_code == 0 and json.loads(r.stdout)["num_heads"] == 4
    r = run("info", tmp_path / "c", "--num-heads", "2")
    assert r.exit_code == 2 and "contradicts" in r.stderr
    r = run("add-dynamic-width", d / "plain.pt", "--num-heads", "4", "-o", tmp_path / "w2")
    assert r.exit_code == 0, r.output


def test_recipe_accepts_num_heads(ref64, tmp_path):
    _, d = ref64
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nsteps:\n  - name: conv\n    command: convert\n"
                      f"    args: {{source: '{d / 'plain.pt'}', num_heads: 4}}\n")
    r = run("run", recipe, "-o", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert load_model(tmp_path / "run" / "conv").config.num_heads == 4


# ----------------------------------------------------------------------------- every diffusers DiT
def _fresh_diffusers(seed=0, layers=4):
    """A DiTTransformer2DModel as diffusers creates it: every block owns its embedders."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    d = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=2,
                              num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return d


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    d = _fresh_diffusers()
    path = tmp_path_factory.mktemp("fresh") / "transformer"
    d.save_pretrained(path)
    return d, path


def _ref(d, x, t, y):
    with torch.no_grad():
        return d(x, timestep=t, class_labels=y).sample


class _Skip(nn.Module):
    """A removed diffusers block: passes hidden states through, keeps its norm1.emb (diffusers
    conditions the final layer through transformer_blocks[0].norm1.emb)."""

    def __init__(self, block):
        super().__init__()
        self.norm1 = block.norm1

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def test_fresh_diffusers_parity_at_default_numerics(fresh, capsys):
    d, path = fresh
    m = load_model(path)
    assert m.config.block_embedders and m.config.numerics == "diffusers"
    assert "numerics = diffusers: inferred" in capsys.readouterr().err
    x, t, y = _xty(ch=1)
    assert torch.allclose(m(x, t, y), _ref(d, x, t, y), atol=1e-5)
    # the other numerics are a different function, not rounding
    assert (load_model(path, numerics="original")(x, t, y) - _ref(d, x, t, y)).abs().max() > 1e-3


def test_fresh_diffusers_round_trips_exact(fresh, tmp_path):
    from safetensors.torch import load_file

    d, path = fresh
    m = load_model(path)
    save_model(m, tmp_path / "out", format="diffusers")
    back = load_file(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors")
    ref = d.state_dict()
    assert set(back) == set(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)
    save_model(m, tmp_path / "ditc")
    again = load_model(tmp_path / "ditc")
    assert again.config.block_embedders and again.config.numerics == "diffusers"
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))
    with pytest.raises(FormatError, match="original layout.*per-block"):
        save_model(m, tmp_path / "o.pt", format="original")
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("keep", [[1, 3], [0, 2]])
def test_pruned_fresh_diffusers_equals_skipped_blocks(fresh, keep, tmp_path):
    d, path = fresh
    p = prune_layers(load_model(path), keep)
    x, t, y = _xty(ch=1)
    import copy

    skipped = copy.deepcopy(d)
    skipped.transformer_blocks = nn.ModuleList(
        [b if i in keep else _Skip(b) for i, b in enumerate(skipped.transformer_blocks)])
    assert torch.allclose(p(x, t, y), _ref(skipped, x, t, y), atol=1e-5)
    if keep[0] == 0:  # diffusers' layout can hold it: exact export
        from diffusers import DiTTransformer2DModel

        save_model(p, tmp_path / "e", format="diffusers")
        e = DiTTransformer2DModel.from_pretrained(tmp_path / "e" / "transformer").eval()
        assert torch.allclose(_ref(e, x, t, y), p(x, t, y), atol=1e-5)
    else:  # the final layer's embedders are no block's any more
        with pytest.raises(FormatError, match="block 0"):
            save_model(p, tmp_path / "e", format="diffusers")
        assert not (tmp_path / "e").exists()


def test_dynamic_width_and_training_on_fresh_diffusers(fresh):
    _, path = fresh
    m = load_model(path)
    dyn = add_dynamic_width(m, 0.5)
    x, t, y = _xty(ch=1)
    with torch.no_grad():
        assert torch.allclose(dyn(x, t, y), m(x, t, y), atol=1e-5)  # all-on routers keep the function
    dyn.train()
    out = dyn(x, t, y)
    out.square().mean().backward()
    assert dyn.blocks[2].t_embedder.mlp[0].weight.grad is not None


def test_cli_transforms_on_fresh_diffusers(fresh, tmp_path):
    _, path = fresh
    r = run("prune-depth", path, "--method", "uniform", "--pattern", "1:2", "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
    r = run("finetune", tmp_path / "p", "--data", "digits", "--steps", "2", "--batch-size", "8", "-o", tmp_path / "f")
    assert r.exit_code == 0, r.output
    r = run("eval", tmp_path / "f", "-o", tmp_path / "ev", "-n", "20", "--steps", "3", "--metrics", "prc",
            "--loss-data", "none", "--json")
    assert r.exit_code == 0, r.output
    r = run("bench", path, tmp_path / "p", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"][1]["flops_ratio"] > 1.5
    info = json.loads(run("info", tmp_path / "f", "--json").stdout)
    assert info["embedders"].startswith("per block") and info["numerics"] == "diffusers"


# ----------------------------------------------------------------------------- reference respacing
def _adm_respacing(T, n):
    """ADM/DiT space_timesteps(T, str(n)): n steps over [0, T-1], cumulative float stride."""
    frac = 1 if n <= 1 else (T - 1) / (n - 1)
    cur, out = 0.0, []
    for _ in range(n):
        out.append(round(cur))
        cur += frac
    return sorted(set(out))


def _reference_loop(model, noise, y, n, ddim, gen=None):
    """float64 DDIM (eta 0) / DDPM (learned range) over the respaced process, recording x_t, t."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    acp_full = np.cumprod(1 - betas)
    use = _adm_respacing(1000, n)
    acp = acp_full[use]
    b = 1 - acp / np.append(1.0, acp[:-1])
    acp_prev = np.append(1.0, acp[:-1])
    post_var = b * (1 - acp_prev) / (1 - acp)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    c1, c2 = b * np.sqrt(acp_prev) / (1 - acp), (1 - acp_prev) * np.sqrt(1 - b) / (1 - acp)
    x = noise.double()
    seen = []
    for i in reversed(range(len(use))):
        seen.append((x.clone(), use[i]))
        with torch.no_grad():
            out = model(x.float(), torch.full((x.shape[0],), use[i]), y).double()
        eps, v = out[:, :1], out[:, 1:]
        x0 = np.sqrt(1 / acp[i]) * x - np.sqrt(1 / acp[i] - 1) * eps
        if ddim:
            eps = (np.sqrt(1 / acp[i]) * x - x0) / np.sqrt(1 / acp[i] - 1)
            x = x0 * np.sqrt(acp_prev[i]) + np.sqrt(1 - acp_prev[i]) * eps
        else:
            frac = (v + 1) / 2
            logvar = frac * np.log(b[i]) + (1 - frac) * post_logvar[i]
            mean = c1[i] * x0 + c2[i] * x
            z = torch.randn(x.shape, generator=gen).double()
            x = mean + (i != 0) * torch.exp(0.5 * logvar) * z
    return x, seen


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_linspace_trajectory_matches_reference_respacing(sampler):
    m = load_model("digits-dit")
    noise, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 3, 7, 10])
    rec = Recorder(m)
    ours = dit_compress.sample(rec, noise, y, sampler=sampler, steps=10, generator=torch.Generator().manual_seed(9))
    ref, seen = _reference_loop(m, noise, y, 10, sampler == "ddim", torch.Generator().manual_seed(9))
    assert [int(t[0]) for _, t in rec.calls] == [t for _, t in seen] == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    for (xa, _), (xb, _) in zip(rec.calls, seen):
        assert torch.allclose(xa.double(), xb, atol=1e-4, rtol=1e-4)
    assert torch.allclose(ours.double(), ref, atol=1e-4, rtol=1e-4)


def test_spacings_and_bad_spacing(tmp_path):
    from dit_compress.diffusion.sampling import sampler_timesteps

    assert sampler_timesteps("ddim", 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert sampler_timesteps("ddim", 10, "leading") == list(range(0, 1000, 100))
    assert sampler_timesteps("ddpm", 10, "trailing") == list(range(99, 1000, 100))
    assert sampler_timesteps("ddpm", 250) == _adm_respacing(1000, 250)
    with pytest.raises(UsageError, match="unknown timestep spacing"):
        sampler_timesteps("ddim", 10, "even")
    r = run("eval", "digits-dit", "-o", tmp_path / "ev", "--timestep-spacing", "even")
    assert r.exit_code == 2 and "unknown timestep spacing" in r.stderr
    assert not (tmp_path / "ev").exists()
