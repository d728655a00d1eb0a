"""PixArt-α / Σ (text-to-image DiT) through the family interface, tested on transformers made
by diffusers (small configs, random weights, save_pretrained), not by ditc."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import dit_compress as dc
from dit_compress.cli import app
from dit_compress.model.pixart import Captions

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def diffusers_pixart(seed=0, layers=4, additional=False, **kw):
    """diffusers' own tiny PixArt (its tests' config), every weight random."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    m = PixArtTransformer2DModel(sample_size=8, num_layers=layers, patch_size=2, attention_head_dim=8,
                                 num_attention_heads=3, caption_channels=32, in_channels=4, cross_attention_dim=24,
                                 out_channels=8, use_additional_conditions=additional, **kw).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def inputs(batch=2, tokens=5, seed=1, additional=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700][:batch] + [500] * max(0, batch - 2))
    emb = torch.randn(batch, tokens, 32, generator=g)
    mask = torch.ones(batch, tokens)
    mask[0, 3:] = 0  # a caption shorter than the padding
    extra = {}
    if additional:
        extra = dict(resolution=torch.tensor([[64.0, 64.0]] * batch), aspect_ratio=torch.ones(batch, 1))
    return x, t, Captions(emb, mask, **extra)


def diffusers_out(d, x, t, c: Captions):
    added = {"resolution": c.resolution, "aspect_ratio": c.aspect_ratio} if c.resolution is not None else None
    with torch.no_grad():
        return d(x, encoder_hidden_states=c.emb, timestep=t, encoder_attention_mask=c.mask,
                 added_cond_kwargs=added, return_dict=False)[0]


def test_running_only_some_blocks_is_diffusers_model_without_the_others(tmp_path):
    """What a depth mask's calibration loss (and min-loss's search) runs: the model with only
    the kept blocks equals diffusers' own model with the others deleted, and the model is whole
    again afterwards (no second stack left registered)."""
    from dit_compress.compress.depth import calibration_loss
    from dit_compress.data.batches import CalibSet
    from dit_compress.model.dit import only_blocks

    d = diffusers_pixart(layers=4)
    d.save_pretrained(tmp_path / "t")
    m = dc.load_model(str(tmp_path / "t"))
    keys = list(m.state_dict())
    x, t, c = inputs()
    d.transformer_blocks = torch.nn.ModuleList([d.transformer_blocks[i] for i in (0, 3)])
    with only_blocks(m, [0, 3]), torch.no_grad():
        ours = m(x, t, c)
    assert torch.allclose(ours, diffusers_out(d, x, t, c), atol=1e-5)
    assert list(m.state_dict()) == keys and len(m.blocks) == 4
    g = torch.Generator().manual_seed(0)
    calib = CalibSet(torch.randn(8, 4, 8, 8, generator=g), Captions(torch.randn(8, 5, 32, generator=g), torch.ones(8, 5)),
                     torch.randint(0, 1000, (8,), generator=g), torch.randn(8, 4, 8, 8, generator=g))
    losses = [calibration_loss(m, calib, k) for k in ([0, 1], [2, 3], None)]
    assert len(set(losses)) == 3, losses  # each mask is scored by its own blocks


@pytest.mark.parametrize("additional", [False, True])
def test_forward_parity_with_diffusers_including_masked_captions(tmp_path, additional):
    d = diffusers_pixart(additional=additional)
    d.save_pretrained(tmp_path / "t")
    m = dc.load_model(str(tmp_path / "t"))
    assert m.config.family == "pixart" and m.config.depth == 4 and m.config.additional_conditions == additional
    x, t, c = inputs(additional=additional)
    with torch.no_grad():
        ours = m(x, t, c)
    ref = diffusers_out(d, x, t, c)
    assert ours.shape == ref.shape == (2, 8, 8, 8)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    # the mask matters: the same captions unmasked give another output
    with torch.no_grad():
        other = m(x, t, Captions(c.emb, torch.ones_like(c.mask), c.resolution, c.aspect_ratio))
    assert not torch.allclose(other, ours, atol=1e-4)


def test_pipeline_dir_and_ditc_round_trip(tmp_path):
    d = diffusers_pixart()
    d.save_pretrained(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    m = dc.load_model(str(tmp_path / "pipe"))
    dc.save_model(m, tmp_path / "ditc")
    back = dc.load_model(str(tmp_path / "ditc"))
    x, t, c = inputs()
    with torch.no_grad():
        assert torch.equal(m(x, t, c), back(x, t, c))
    info = json.loads(run("info", tmp_path / "ditc", "--json").stdout)
    assert info["architecture"].startswith("PixArt(") and info["depth"] == 4


@pytest.mark.parametrize("keep", [[1, 3], [0, 2]])
def test_pruned_export_reloads_in_diffusers_and_equals_skipped_blocks(tmp_path, keep):
    """prune-depth (oracle and uniform 1:2) -> --to diffusers: the stock PixArtTransformer2DModel
    loads it with half the blocks, and equals the diffusers source with the others skipped."""
    from diffusers import PixArtTransformer2DModel

    d = diffusers_pixart()
    d.save_pretrained(tmp_path / "src")
    method = ["--method", "uniform", "--pattern", "1:2"] if keep == [1, 3] else ["--method", "oracle", "--keep", "0,2"]
    r = run("prune-depth", tmp_path / "src", *method, "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
    r = run("convert", tmp_path / "p", "--to", "diffusers", "-o", tmp_path / "pd")
    assert r.exit_code == 0, r.output
    pruned = PixArtTransformer2DModel.from_pretrained(tmp_path / "pd" / "transformer").eval()
    assert pruned.config.num_layers == 2
    x, t, c = inputs()
    ours = diffusers_out(pruned, x, t, c)
    d.transformer_blocks = torch.nn.ModuleList([d.transformer_blocks[i] for i in keep])
    assert torch.allclose(ours, diffusers_out(d, x, t, c), atol=1e-5)
    assert json.loads((tmp_path / "pd" / "transformer" / "config.json").read_text())["_ditc"]["kept_layers"] == keep


def test_the_export_samples_in_pixart_alpha_pipeline_and_ditc_sample_agrees(tmp_path):
    """A PixArtAlphaPipeline around the pruned export (a tiny VAE from a diffusers config, no
    text encoder, prompt embeddings given) samples; ditc's DDIM with the same guidance, noise
    and negative captions gives the same latents."""
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    diffusers_pixart().save_pretrained(tmp_path / "src")
    assert run("prune-depth", tmp_path / "src", "--method", "uniform", "--pattern", "1:2", "-o", tmp_path / "p").exit_code == 0
    assert run("convert", tmp_path / "p", "--to", "diffusers", "-o", tmp_path / "pd").exit_code == 0
    transformer = PixArtTransformer2DModel.from_pretrained(tmp_path / "pd" / "transformer").eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8).eval()
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                               scheduler=DDIMScheduler(clip_sample=False))
    _, _, c = inputs()
    neg = Captions(torch.zeros(1, 5, 32), torch.cat([torch.ones(1, 1), torch.zeros(1, 4)], 1))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    out = pipe(negative_prompt=None, prompt_embeds=c.emb, prompt_attention_mask=c.mask, negative_prompt_embeds=neg.emb.repeat(2, 1, 1),
               negative_prompt_attention_mask=neg.mask.repeat(2, 1), latents=noise.clone(), num_inference_steps=5,
               guidance_scale=3.0, output_type="latent", height=8 * vae_scale(pipe), width=8 * vae_scale(pipe),
               use_resolution_binning=False)
    ref = out.images
    m = dc.load_model(str(tmp_path / "p"))
    ours = dc.sample(m, noise, c, sampler="ddim", steps=5, timestep_spacing="leading", cfg_scale=3.0,
                     negative=neg)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def vae_scale(pipe) -> int:
    return pipe.vae_scale_factor


def test_bad_pixart_inputs_are_refused_in_one_line(tmp_path):
    d = diffusers_pixart()
    d.save_pretrained(tmp_path / "t")
    m = dc.load_model(str(tmp_path / "t"))
    x, t, c = inputs()
    with pytest.raises(dc.UsageError, match="caption width"):
        dc.sample(m, x, Captions(torch.randn(2, 5, 16), torch.ones(2, 5)), sampler="ddim", steps=2)
    with pytest.raises(dc.UsageError, match="needs the null caption"):
        dc.sample(m, x, c, sampler="ddim", steps=2, cfg_scale=2.0)
    with pytest.raises(dc.UsageError, match="text-to-image"):
        dc.sample(m, x, torch.tensor([1, 2]), sampler="ddim", steps=2)
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    for change, text in (({"attention_type": "gated"}, "unsupported PixArt variant (attention_type"),
                         ({"use_kv_compress": True}, "unsupported PixArt variant (config field 'use_kv_compress'"),
                         ({"cross_attention_dim": 32}, "cross_attention_dim 32")):
        (tmp_path / "v").mkdir(exist_ok=True)
        (tmp_path / "v" / "config.json").write_text(json.dumps({**cfg, **change}))
        (tmp_path / "v" / "diffusion_pytorch_model.safetensors").write_bytes(
            (tmp_path / "t" / "diffusion_pytorch_model.safetensors").read_bytes())
        r = run("info", tmp_path / "v")
        assert r.exit_code == 2 and text in r.stderr and r.stderr.count("\n") == 1, (change, r.output)
    state = {"x_embedder.proj.weight": torch.zeros(4, 4, 2, 2), "t_block.1.weight": torch.zeros(6, 4),
             "blocks.0.cross_attn.q_linear.weight": torch.zeros(4, 4)}
    torch.save(state, tmp_path / "PixArt-XL-2-512x512.pth")
    r = run("info", tmp_path / "PixArt-XL-2-512x512.pth")
    assert r.exit_code == 1 and "original PixArt checkpoint" in r.stderr and r.stderr.count("\n") == 1
    r = run("convert", tmp_path / "t", "-o", tmp_path / "o.pt", "--to", "original")
    assert r.exit_code != 0 and r.stderr.count("\n") == 1 and not (tmp_path / "o.pt").exists()


def test_pixart_shapes_have_analytic_flops_and_bench(tmp_path):
    """`--shape PixArt-XL/2-512` needs no weights: FLOPs with cross-attention to 120 caption
    tokens; a reduced-depth shape benchmarks its whole DDIM loop with CFG."""
    info = dc.info("PixArt-XL/2-512", arch=True)
    assert info["architecture"] == "PixArt-XL/2" and info["gflops"] == pytest.approx(618.0, rel=0.01)
    from dit_compress.evaluate.bench import build

    small = build("shape:PixArt-XL/2-256+d2")
    assert small.config.family == "pixart" and small.config.depth == 2


def test_class_label_data_for_a_pixart_is_refused_in_one_line(tmp_path):
    diffusers_pixart().save_pretrained(tmp_path / "t")
    for args in (["finetune", tmp_path / "t", "--data", "digits", "-o", tmp_path / "o"],
                 ["prune-depth", tmp_path / "t", "--pattern", "1:2", "--data", "digits", "-o", tmp_path / "o"]):
        r = run(*args)
        assert r.exit_code == 2 and "holds class labels; a text-to-image model" in r.stderr, (args, r.output)
        assert r.stderr.count("\n") == 1 and not (tmp_path / "o").exists()


# the transformer/config.json of PixArt-alpha/PixArt-XL-2-512x512 on the hub (diffusers 0.22,
# written by Transformer2DModel), the sizes replaced by the tiny test model's
HUB_512_CONFIG = {
    "_class_name": "Transformer2DModel", "_diffusers_version": "0.22.0.dev0", "activation_fn": "gelu-approximate",
    "attention_bias": True, "attention_head_dim": 8, "attention_type": "default", "caption_channels": 32,
    "cross_attention_dim": 24, "double_self_attention": False, "dropout": 0.0, "in_channels": 4,
    "norm_elementwise_affine": False, "norm_eps": 1e-06, "norm_num_groups": 32, "norm_type": "ada_norm_single",
    "num_attention_heads": 3, "num_embeds_ada_norm": 1000, "num_layers": 4, "num_vector_embeds": None,
    "only_cross_attention": False, "out_channels": 8, "patch_size": 2, "sample_size": 8, "upcast_attention": False,
    "use_linear_projection": False,
}


def test_the_hub_transformer2dmodel_config_loads_with_parity(tmp_path):
    d = diffusers_pixart()
    d.save_pretrained(tmp_path / "t")
    (tmp_path / "t" / "config.json").write_text(json.dumps(HUB_512_CONFIG))
    m = dc.load_model(str(tmp_path / "t"))
    x, t, c = inputs()
    with torch.no_grad():
        assert torch.allclose(m(x, t, c), diffusers_out(d, x, t, c), atol=1e-5)
    for key, bad in (("double_self_attention", True), ("only_cross_attention", True), ("num_vector_embeds", 16)):
        (tmp_path / "t" / "config.json").write_text(json.dumps({**HUB_512_CONFIG, key: bad}))
        r = run("info", tmp_path / "t")
        assert r.exit_code == 2 and "unsupported PixArt variant" in r.stderr and key in r.stderr, r.output


def test_forward_parity_at_1024_px_settings(tmp_path):
    """sample_size 128: diffusers' rules give interpolation_scale 2 and size conditions on."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    d = PixArtTransformer2DModel(sample_size=128, num_layers=2, patch_size=8, attention_head_dim=8,
                                 num_attention_heads=3, caption_channels=32, in_channels=4, cross_attention_dim=24,
                                 out_channels=8).eval()
    d.save_pretrained(tmp_path / "t")
    m = dc.load_model(str(tmp_path / "t"))
    assert m.config.interpolation_scale == 2.0 and m.config.additional_conditions
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 128, 128, generator=g)
    c = Captions(torch.randn(2, 5, 32, generator=g), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).float(),
                 resolution=torch.tensor([[1024.0, 1024.0]] * 2), aspect_ratio=torch.ones(2, 1))
    t = torch.tensor([3, 900])
    with torch.no_grad():
        assert torch.allclose(m(x, t, c), diffusers_out(d, x, t, c), atol=1e-5)


def test_pipeline_dirs_state_their_vae_and_caption_length(tmp_path):
    """A PixArt-Σ pipeline dir (SDXL VAE, scaling_factor 0.13025; 300 caption tokens) is read as
    it says; a bare transformer dir says its VAE is not stated."""
    diffusers_pixart().save_pretrained(tmp_path / "sigma" / "transformer")
    (tmp_path / "sigma" / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    (tmp_path / "sigma" / "vae").mkdir()
    (tmp_path / "sigma" / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL",
                                                                          "scaling_factor": 0.13025}))
    m = dc.load_model(str(tmp_path / "sigma"))
    assert m.config.latent_scale == 0.13025 and m.config.caption_length == 300
    assert m.config.vae == str((tmp_path / "sigma" / "vae").resolve())
    diffusers_pixart().save_pretrained(tmp_path / "bare")
    bare = dc.load_model(str(tmp_path / "bare"))
    assert bare.config.latent_scale == 0.18215 and "not stated" in bare.config.provenance["vae"]
    assert bare.config.caption_length is None


@pytest.mark.parametrize("change,text", [
    ({"num_attention_heads": "3"}, "num_attention_heads"), ({"num_attention_heads": 3.7}, "num_attention_heads"),
    ({"caption_channels": 32.5}, "caption_channels"), ({"num_attention_heads": None}, "num_attention_heads"),
    ({"sample_size": [8, 8]}, "sample_size"), ({"patch_size": 0}, "patch_size"),
    ({"interpolation_scale": "abc"}, "interpolation_scale"), ({"dropout": False}, "dropout"),
    ({"attention_bias": 1}, "attention_bias"), ({"use_additional_conditions": "no"}, "use_additional_conditions"),
])
def test_pixart_config_values_of_the_wrong_type_are_refused_not_coerced(tmp_path, change, text):
    diffusers_pixart().save_pretrained(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    (tmp_path / "t" / "config.json").write_text(json.dumps({**cfg, **change}))
    r = run("info", tmp_path / "t")
    assert r.exit_code != 0 and text in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.output, r.output


def test_an_edited_export_config_is_refused_not_read_from_its_ditc_record(tmp_path):
    diffusers_pixart().save_pretrained(tmp_path / "src")
    assert run("convert", tmp_path / "src", "--to", "diffusers", "-o", tmp_path / "d").exit_code == 0
    cfile = tmp_path / "d" / "transformer" / "config.json"
    cfg = json.loads(cfile.read_text())
    for change, text in (({"num_layers": 2}, "says depth 2"), ({"num_attention_heads": 6, "attention_head_dim": 4},
                                                                "says num_heads 6"),
                         ({"norm_type": "layer_norm"}, "unsupported PixArt variant")):
        cfile.write_text(json.dumps({**cfg, **change}))
        r = run("info", tmp_path / "d")
        assert r.exit_code != 0 and text in r.stderr and r.stderr.count("\n") == 1, (change, r.output)


def test_captions_that_do_not_fit_are_refused_in_one_line(tmp_path):
    d = diffusers_pixart(additional=True)
    d.save_pretrained(tmp_path / "t")
    m = dc.load_model(str(tmp_path / "t"))
    x = torch.randn(2, 4, 8, 8)
    emb, ok = torch.randn(2, 5, 32), torch.ones(2, 5)
    size = dict(resolution=torch.tensor([[64.0, 64.0]] * 2), aspect_ratio=torch.ones(2, 1))
    for c, text in ((Captions(emb, ok * 5, **size), r"0 \(padding\) and 1"),
                    (Captions(emb[:, :0], ok[:, :0], **size), "no tokens"),
                    (Captions(emb, ok, torch.ones(2, 3), torch.ones(2, 1)), r"resolution must be a tensor \[2, 2\]"),
                    (Captions(emb, ok, [[64, 64]] * 2, torch.ones(2, 1)), "resolution must be a tensor")):
        with pytest.raises(dc.UsageError, match=text):
            dc.sample(m, x, c, sampler="ddim", steps=2)
    with pytest.raises(dc.UsageError, match="must be Captions"):
        dc.sample(m, x, Captions(emb, ok, **size), sampler="ddim", steps=2, cfg_scale=2.0, negative=5)
    with pytest.raises(dc.UsageError, match="negative"):
        dc.sample(dc.load_model("digits-dit"), torch.randn(1, 1, 8, 8), torch.tensor([1]), sampler="ddim", steps=2,
                  negative=Captions(emb[:1], ok[:1]))
