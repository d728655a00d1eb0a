"""The text-to-image testbed: ``create --family pixart`` (PixArt-α's training initialisation,
written as a whole diffusers pipeline with the testbed's text encoder), prompt-following
accuracy in eval (the held-out classifier reads the digit each prompt asks for), and the
shipped ``digits-pixart``: diffusers' own PixArtAlphaPipeline and ``dit_compress.sample``
draw the same images from the same noise, and it follows seen and held-out prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import dit_compress as dc
from dit_compress.assets import EMBEDDED
from dit_compress.cli import app
from dit_compress.data import digit_captions as D

PIXART = ["--family", "pixart", "--caption-channels", "64", "--caption-length", "16", "--input-size", "8",
          "--patch-size", "1", "--in-channels", "1", "--hidden-size", "32", "--depth", "2", "--num-heads", "2",
          "--pixel"]
SHIPPED = EMBEDDED["digits-pixart"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_refusal(r, text=None):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
    if text is not None:
        assert text in r.stderr, r.stderr


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    r = run("create", "custom", *PIXART, "--text-encoder", "digits-t5", "--seed", "3", "-o", root / "pipe")
    assert r.exit_code == 0, r.output
    return root / "pipe"


def test_create_pixart_is_pixart_alphas_initialisation_in_a_whole_pipeline(pipe, tmp_path):
    from diffusers import PixArtAlphaPipeline

    assert sorted(p.name for p in pipe.iterdir()) == ["model_index.json", "scheduler", "text_encoder", "tokenizer",
                                                       "transformer"]
    m = dc.load_model(pipe)
    sd = m.state_dict()
    # PixArt-α's initialize_weights: zero cross-attention outputs and final linear, N(0, 0.02) embedders
    for k in ("proj_out.weight", "proj_out.bias", "transformer_blocks.0.attn2.to_out.0.weight"):
        assert torch.count_nonzero(sd[k]) == 0, k
    for k in ("adaln_single.linear.weight", "caption_projection.linear_1.weight",
              "adaln_single.emb.timestep_embedder.linear_1.weight"):
        assert abs(sd[k].std().item() - 0.02) < 0.004, (k, sd[k].std())
    w = sd["transformer_blocks.0.attn1.to_q.weight"]  # xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= (6 / 64) ** 0.5 and w.abs().max() > 0.8 * (6 / 64) ** 0.5
    assert m.config.caption_length == 16 and m.config.vae is None and m.config.family == "pixart"
    # the same seed is the same model; the text encoder is the testbed's, built from its seed
    again = run("create", "custom", *PIXART, "--seed", "3", "-o", tmp_path / "ditc")
    assert again.exit_code == 0, again.output
    assert all(torch.equal(a, b) for a, b in zip(sd.values(), dc.load_model(tmp_path / "ditc").state_dict().values()))
    D.build_text_encoder(tmp_path / "enc")
    from safetensors.torch import load_file
    ref, got = (load_file(d / "text_encoder" / "model.safetensors") for d in (tmp_path / "enc", pipe))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    # diffusers' own pipeline loads it (no VAE: pixel space, output_type="latent")
    p = PixArtAlphaPipeline.from_pretrained(str(pipe), vae=None)
    assert type(p.scheduler).__name__ == "DDIMScheduler"
    out = p("a thick seven", height=64, width=64, num_inference_steps=2, output_type="latent", max_sequence_length=16,
            clean_caption=False, use_resolution_binning=False).images
    assert out.shape == (1, 1, 8, 8) and torch.isfinite(out).all()


def test_a_pipeline_with_a_sharded_encoder_is_copied_whole_with_its_tokenizer_class(pipe, tmp_path):
    """PixArt-alpha's own pipeline keeps its T5-XXL in weight shards with an index and names a
    SentencePiece tokenizer class: both survive `create --text-encoder` (the shards and index
    copied, the class as the source pipeline names it); a tokenizer dir with only spiece.model
    is a T5Tokenizer; one with neither tokenizer file is refused in one line."""
    import shutil

    from transformers import T5EncoderModel

    src = tmp_path / "src"
    shutil.copytree(pipe, src)
    enc = T5EncoderModel.from_pretrained(src / "text_encoder")
    shutil.rmtree(src / "text_encoder")
    enc.save_pretrained(src / "text_encoder", max_shard_size="100KB")
    assert (src / "text_encoder" / "model.safetensors.index.json").exists()
    index = json.loads((src / "model_index.json").read_text())
    (src / "model_index.json").write_text(json.dumps({**index, "tokenizer": ["transformers", "T5TokenizerFast"]}))
    r = run("create", "custom", *PIXART, "--text-encoder", src, "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    got = sorted(p.name for p in (tmp_path / "o" / "text_encoder").iterdir())
    assert got == sorted(p.name for p in (src / "text_encoder").iterdir()) and len(got) > 3, got
    assert json.loads((tmp_path / "o" / "model_index.json").read_text())["tokenizer"] == ["transformers",
                                                                                          "T5TokenizerFast"]
    again = T5EncoderModel.from_pretrained(tmp_path / "o" / "text_encoder").state_dict()
    assert all(torch.equal(v, again[k]) for k, v in enc.state_dict().items())
    from transformers import AutoTokenizer

    theirs, ours = (AutoTokenizer.from_pretrained(d / "tokenizer") for d in (pipe, tmp_path / "o"))
    assert ours("a thick seven").input_ids == theirs("a thick seven").input_ids  # the tokenizer came whole
    # an encoder dir with a SentencePiece tokenizer only
    sp = tmp_path / "sp"
    shutil.copytree(pipe / "text_encoder", sp)
    (sp / "spiece.model").write_bytes(b"sentencepiece model bytes")
    r = run("create", "custom", *PIXART, "--text-encoder", sp, "-o", tmp_path / "o2")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o2" / "model_index.json").read_text())["tokenizer"][1] == "T5Tokenizer"
    assert (tmp_path / "o2" / "tokenizer" / "spiece.model").exists()
    (sp / "spiece.model").unlink()
    one_line_refusal(run("create", "custom", *PIXART, "--text-encoder", sp, "-o", tmp_path / "o3"), "holds no tokenizer")
    # weights outside the folder, or a truncated weights file: refused before anything is written
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    index_file = bad / "text_encoder" / "model.safetensors.index.json"
    idx = json.loads(index_file.read_text())
    first = next(iter(idx["weight_map"]))
    index_file.write_text(json.dumps({**idx, "weight_map": {**idx["weight_map"], first: "../outside.safetensors"}}))
    one_line_refusal(run("create", "custom", *PIXART, "--text-encoder", bad, "-o", tmp_path / "o3"), "outside its folder")
    index_file.write_text(json.dumps(idx))
    shard = bad / "text_encoder" / idx["weight_map"][first]
    shard.write_bytes(shard.read_bytes()[:100])
    one_line_refusal(run("create", "custom", *PIXART, "--text-encoder", bad, "-o", tmp_path / "o3"),
                     "not a readable safetensors file")
    assert not (tmp_path / "o3").exists()
    # convert takes the testbed's encoder by name, as create does
    r = run("convert", pipe, "--to", "diffusers", "--text-encoder", "digits-t5", "-o", tmp_path / "o4")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o4" / "text_encoder" / "model.safetensors").exists()


def test_a_latent_pixart_pipeline_gets_the_source_pipelines_vae(pipe, tmp_path):
    """A latent-space PixArt written as a pipeline needs a VAE to decode: the source
    pipeline's vae/ is copied and named in the index (diffusers' pipeline loads and decodes
    with it); an encoder dir, which has none, is refused in one line and nothing is written."""
    import shutil

    from diffusers import AutoencoderKL, PixArtAlphaPipeline

    latent = [a for a in PIXART if a != "--pixel"]
    latent[latent.index("--in-channels") + 1] = "4"
    one_line_refusal(run("create", "custom", *latent, "--text-encoder", pipe / "text_encoder", "-o", tmp_path / "o"),
                     "has no vae/")
    assert not (tmp_path / "o").exists()
    src = tmp_path / "src"
    shutil.copytree(pipe, src)
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, latent_channels=4,
                  layers_per_block=1).save_pretrained(src / "vae")
    # the encoder dir of that pipeline is still an encoder dir (its sibling vae/ is not taken)
    one_line_refusal(run("create", "custom", *latent, "--text-encoder", src / "text_encoder", "-o", tmp_path / "o"),
                     "has no vae/")
    one_line_refusal(run("create", "custom", *latent, "--text-encoder", "digits-t5", "-o", tmp_path / "o"),
                     "needs a VAE too")
    wide = tmp_path / "wide"  # a VAE making 8-channel latents for a 4-channel model
    shutil.copytree(src, wide)
    vcfg = json.loads((wide / "vae" / "config.json").read_text())
    (wide / "vae" / "config.json").write_text(json.dumps({**vcfg, "latent_channels": 8}))
    one_line_refusal(run("create", "custom", *latent, "--text-encoder", wide, "-o", tmp_path / "o"), "8-channel latents")
    assert not (tmp_path / "o").exists()
    r = run("create", "custom", *latent, "--text-encoder", src, "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    p = PixArtAlphaPipeline.from_pretrained(str(tmp_path / "o"))
    img = p("a thick seven", height=64, width=64, num_inference_steps=1, output_type="pt", max_sequence_length=16,
            clean_caption=False, use_resolution_binning=False).images
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()


def test_a_local_folder_named_like_a_built_in_model_is_refused_and_dot_slash_reads_it(pipe, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(pipe, tmp_path / "digits-pixart")  # the user's own model, named like the built-in one
    one_line_refusal(run("info", "digits-pixart"), "pass ./digits-pixart for the local one")
    one_line_refusal(run("prepare-data", "digits:test", "--text-encoder", "digits-pixart", "-o", "c"), "./digits-pixart")
    assert not (tmp_path / "c").exists()
    r = run("prepare-data", "digits:test", "--text-encoder", "./digits-pixart", "--max-length", 16, "-o", "c")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["text_encoder"] == "digits-pixart"  # the local one
    r = run("info", "./digits-pixart", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["params"] == dc.load_model(pipe).num_params(), r.output


@pytest.mark.parametrize("case", ["captions on a DiT", "text encoder on a DiT", "no caption width",
                                  "heads do not divide", "text encoder without output"])
def test_bad_create_options_are_refused_in_one_line(tmp_path, case):
    dit = ["--input-size", "8", "--patch-size", "1", "--in-channels", "1", "--hidden-size", "32", "--depth", "2",
           "--num-heads", "2", "--num-classes", "10", "--pixel"]
    args = {"captions on a DiT": dit + ["--caption-channels", "64"],
            "text encoder on a DiT": dit + ["--text-encoder", "digits-t5"],
            "no caption width": [a for a in PIXART if a not in ("--caption-channels", "64")],
            "heads do not divide": [("3" if a == "2" and i == PIXART.index("--num-heads") + 1 else a)
                                    for i, a in enumerate(PIXART)],
            }.get(case)
    if case == "text encoder without output":
        with pytest.raises(dc.UsageError, match="give `output`"):
            dc.create("custom", family="pixart", caption_channels=64, input_size=8, patch_size=1, in_channels=1,
                      hidden_size=32, depth=2, num_heads=2, pixel=True, text_encoder="digits-t5")
        return
    r = run("create", "custom", *args, "-o", tmp_path / "o")
    one_line_refusal(r)
    assert not (tmp_path / "o").exists()


def test_prepare_data_of_the_bundled_digits_refuses_a_vae_or_size(pipe, tmp_path):
    for extra in (["--vae", "./my-vae"], ["--image-size", "32"]):
        r = run("prepare-data", "digits:test", "--text-encoder", pipe, "--max-length", 16, *extra, "-o", tmp_path / "o")
        one_line_refusal(r, "do not apply")
    assert not (tmp_path / "o").exists()


def test_the_same_captions_prepared_elsewhere_are_the_same_eval_input(pipe, tmp_path, monkeypatch):
    """Caption shards are identified by what they hold, not by their folder or file times: the
    eval of the same prompts prepared in another folder (or copied, or touched) is served from
    the cache, so the quickstart's shipped base evals serve any user's run; a shard whose images
    changed, or captions encoded by another encoder, are another input."""
    import os
    import shutil

    from safetensors.numpy import load_file, save_file

    monkeypatch.setenv("DITC_CACHE_DIR", str(tmp_path / "cache"))
    for d in ("a", "b"):
        assert run("prepare-data", "digits:test", "--text-encoder", pipe, "--max-length", 16,
                   "-o", tmp_path / d).exit_code == 0
    args = ["-n", 10, "--sampler", "ddim", "--steps", 2, "--metrics", "fid", "--json"]

    def ev(d, name):
        r = run("eval", pipe, "--prompts", tmp_path / d, *args, "-o", tmp_path / name)
        assert r.exit_code == 0, r.output
        return json.loads((tmp_path / name / "report.json").read_text())

    first, second = ev("a", "ev-a"), ev("b", "ev-b")
    assert "cached" not in first and "cached" in second
    assert second["metrics"] == first["metrics"] and 0 <= first["metrics"]["prompt_accuracy"] <= 1
    assert second["prompts"] == str(tmp_path / "b")  # the served report names this run's prompts
    shutil.copytree(tmp_path / "b", tmp_path / "c")  # a copy, its files touched later
    later = (tmp_path / "c" / "manifest.json").stat().st_mtime_ns + 10**9
    os.utime(tmp_path / "c" / "shard-00000.safetensors", ns=(later, later))
    assert "cached" in ev("c", "ev-c")
    shard = tmp_path / "c" / "shard-00000.safetensors"
    arrays = load_file(str(shard))
    for key, edit in (("latents", lambda a: a[:1].__imul__(-1)), ("caption_emb", lambda a: a.__imul__(-1))):
        changed = {k: v.copy() for k, v in arrays.items()}
        edit(changed[key])  # one image, or every caption's features, changed
        save_file(changed, str(shard))
        assert "cached" not in ev("c", f"ev-c-{key}"), key
    # a manifest from before encoders were identified by contents: its shards go by path
    save_file(arrays, str(shard))
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    m["producer"]["text_encoder"] = "8d8e2a6303ac2ea86196"
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    assert "cached" not in ev("c", "ev-c-old")
    # another text encoder (the same shapes, other weights): another input
    other = tmp_path / "other"
    shutil.copytree(pipe, other)
    w = load_file(str(other / "text_encoder" / "model.safetensors"))
    k = next(iter(w))
    w[k] = w[k] * 1.5
    save_file(w, str(other / "text_encoder" / "model.safetensors"))
    assert run("prepare-data", "digits:test", "--text-encoder", other, "--max-length", 16,
               "-o", tmp_path / "d").exit_code == 0
    assert "cached" not in ev("d", "ev-d")


def test_classes_the_digits_classifier_does_not_have_are_not_scored(pipe, tmp_path):
    from safetensors.numpy import load_file, save_file

    assert run("prepare-data", "digits:test", "--text-encoder", pipe, "--max-length", 16, "-o", tmp_path / "c").exit_code == 0
    shard = tmp_path / "c" / "shard-00000.safetensors"
    arrays = load_file(str(shard))
    save_file({**arrays, "labels": arrays["labels"] + 100}, str(shard))
    r = run("eval", pipe, "--prompts", tmp_path / "c", "-n", 4, "--sampler", "ddim", "--steps", 1, "--metrics", "fid",
            "--no-cache", "-o", tmp_path / "ev")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert "prompt_accuracy" not in rep["metrics"] and "not scored" in rep["warning"] and "class 10" in rep["warning"]


@pytest.mark.slow
def test_eval_reports_prompt_following_accuracy_from_the_held_out_classifier(pipe, tmp_path):
    """The accuracy in the report is the share of samples the digits classifier reads as the
    digit named in their prompt's text (re-derived here from the samples and the captions)."""
    from dit_compress.evaluate.features import load_digits_net

    r = run("prepare-data", "digits:test", "--text-encoder", pipe, "--max-length", 16, "-o", tmp_path / "caps")
    assert r.exit_code == 0, r.output
    r = run("eval", pipe, "--prompts", tmp_path / "caps", "-n", 30, "--sampler", "ddim", "--steps", 2,
            "--metrics", "fid", "-o", tmp_path / "ev", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    texts = json.loads((tmp_path / "caps" / "manifest.json").read_text())["texts"]
    got = np.load(tmp_path / "ev" / "samples.npz")
    asked = torch.tensor([D.digit_of(texts[k]) for k in got["labels"]])
    x = torch.from_numpy(got["arr_0"]).float().mean(-1, keepdim=True).permute(0, 3, 1, 2) / 127.5 - 1
    ref = (load_digits_net()(x).argmax(1) == asked).float().mean().item()
    assert rep["metrics"]["prompt_accuracy"] == pytest.approx(ref)
    assert "class_accuracy" not in rep["metrics"]


@pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(), reason="digits-pixart is not shipped in this tree")
def test_shipped_digits_pixart_samples_the_same_through_diffusers_and_dit_compress():
    from diffusers import PixArtAlphaPipeline

    prompts = ["a thick seven", "the digit 3", "a thin slanted two", "digit nine"]
    noise = torch.randn(len(prompts), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    p = PixArtAlphaPipeline.from_pretrained(str(SHIPPED), vae=None, dtype=torch.float32)
    with torch.no_grad():
        theirs = p(prompts, height=64, width=64, num_inference_steps=10, guidance_scale=3.0, latents=noise.clone(),
                   output_type="latent", max_sequence_length=16, clean_caption=False, use_resolution_binning=False,
                   negative_prompt="").images
    model = dc.load_model("digits-pixart")
    caps, null = dc.encode_prompts(SHIPPED, prompts, max_length=16)
    ours = dc.sample(model, noise.clone(), caps, sampler="ddim", steps=10, cfg_scale=3.0, timestep_spacing="leading",
                     negative=null)
    assert theirs.shape == ours.shape
    assert ours.abs().max() > 0.5  # real images (pixels in [-1, 1]), not a zero prediction
    assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_static_width_on_pixart_reaches_its_target_with_cross_attention_counted_whole(target):
    """Static width pruning keeps its promise on the block FLOPs, with PixArt's cross-attention
    (no router scales it) counted whole: re-derived from the kept heads and channels of each
    block (float64, from the shapes: self-attn 4ND^2 + 2N^2D per head share, MLP 2ND*4D per
    channel share, cross-attn 2ND^2 + 2LD^2 + 2NLD fixed)."""
    from dit_compress.compress.dynamic import add_dynamic_width
    from dit_compress.diffusion.measure import inference_flops
    from dit_compress.diffusion.measure import width_profile

    m = dc.create("custom", family="pixart", caption_channels=64, caption_length=16, input_size=8, patch_size=1,
                  in_channels=1, hidden_size=64, depth=8, num_heads=4, pixel=True)
    s = add_dynamic_width(m, target_flops=target, static=True, sort_by="none")
    N, D, L = 64.0, 64.0, 16.0
    attn, mlp, cross = 4 * N * D * D + 2 * N * N * D, 2 * N * D * 4 * D, 2 * N * D * D + 2 * L * D * D + 2 * N * L * D
    prof = width_profile(s, [500])
    ratio = np.mean([(cross + attn * h[0] + mlp * c[0]) / (cross + attn + mlp)
                     for h, c in zip(prof["heads"], prof["channels"])])
    assert abs(ratio - target) <= 0.5 * (attn + mlp) / (cross + attn + mlp) / 32 + 1e-9  # half a head of 32
    assert inference_flops(s, "ddim", 4)["block_flops_ratio"] == pytest.approx(ratio)
    with pytest.raises(dc.UsageError, match="below what static width can reach"):
        add_dynamic_width(m, target_flops=0.2, static=True, sort_by="none")
    fixed = cross / (cross + attn + mlp)  # no router scales it: a dynamic target at or below it cannot be met
    with pytest.raises(dc.UsageError, match="width routing cannot reach it"):
        add_dynamic_width(m, target_flops=fixed - 0.01, sort_by="none")
    assert add_dynamic_width(m, target_flops=fixed + 0.01, sort_by="none").config.width.target_flops == fixed + 0.01
