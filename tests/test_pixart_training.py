"""Text-to-image training data and training on PixArt: captioned images encoded by the
pipeline's own tokenizer and T5 encoder (checked against PixArtAlphaPipeline.encode_prompt),
fine-tuning, distillation and every depth-pruning method on a PixArt made by diffusers, and
the bad inputs of caption data. The text encoder, tokenizer, VAE and transformer are made here
the way other tools make them (tokenizers + transformers' T5EncoderModel, diffusers'
AutoencoderKL and PixArtTransformer2DModel), with random weights, saved in their formats."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file
from typer.testing import CliRunner

import dit_compress as dc
from dit_compress.cli import app
from dit_compress.data.batches import calibration_set, condition_dropout_batch_fn
from dit_compress.data.datasets import load_data
from dit_compress.diffusion.calibration import calibration_losses
from test_pixart import diffusers_out, diffusers_pixart, inputs

runner = CliRunner()
WORDS = ["<pad>", "</s>", "<unk>"] + "a an the small big red green blue square dot on left right".split()
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_refusal(r, code=2):
    assert r.exit_code == code, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output


def make_text_encoder(root, width=32, seed=0):
    """A pipeline's text_encoder/ (T5EncoderModel from a small T5Config) and tokenizer/ (a
    word-level tokenizer with T5's </s> appended, as tokenizers builds one offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "tokenizer")
    torch.manual_seed(seed)
    T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).save_pretrained(root / "text_encoder")
    return root


def make_images(root, n=12, form="txt"):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        c = list(COLOURS)[i % 3]
        a = np.zeros((8, 8, 3), np.uint8)
        a[:, : 4 if i % 2 else 8] = COLOURS[c]
        Image.fromarray(a).save(root / f"{i:02d}.png")
        text = f"a {c} square on the {'left' if i % 2 else 'right'}"
        if form == "txt":
            (root / f"{i:02d}.txt").write_text(text)
        rows.append({"file_name": f"{i:02d}.png", "text": text})
    if form == "jsonl":
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A PixArt pipeline dir (transformer/, text_encoder/, tokenizer/), a VAE, captioned
    images and their caption shards."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("t2i")
    pipe = make_text_encoder(root / "pipe")
    diffusers_pixart(layers=4).save_pretrained(pipe / "transformer")
    torch.manual_seed(0)
    AutoencoderKL().save_pretrained(root / "vae")  # diffusers' default config: one level, 4 latent channels
    make_images(root / "imgs")
    r = run("prepare-data", root / "imgs", "--vae", root / "vae", "--image-size", 8, "--text-encoder", pipe,
            "--max-length", 8, "-o", root / "shards")
    assert r.exit_code == 0, r.output
    return root


def test_prepare_data_encodes_captions_as_pixart_alpha_pipeline_does(world, tmp_path):
    """The shards hold what PixArtAlphaPipeline.encode_prompt gives for each caption and for
    the negative prompt "" (same tokenizer, encoder, padding and length)."""
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    pipe = PixArtAlphaPipeline(tokenizer=AutoTokenizer.from_pretrained(world / "pipe" / "tokenizer"),
                               text_encoder=T5EncoderModel.from_pretrained(world / "pipe" / "text_encoder"),
                               vae=AutoencoderKL.from_pretrained(world / "vae"), scheduler=DDIMScheduler(),
                               transformer=PixArtTransformer2DModel.from_pretrained(world / "pipe" / "transformer"))
    texts = [(world / "imgs" / f"{i:02d}.txt").read_text() for i in range(12)]
    with torch.no_grad():
        emb, mask, neg, neg_mask = pipe.encode_prompt(texts, do_classifier_free_guidance=True, negative_prompt="",
                                                      clean_caption=False, max_sequence_length=8)
    d = load_file(str(world / "shards" / "shard-00000.safetensors"))
    assert d["latents"].shape == (12, 4, 8, 8)
    assert np.allclose(d["caption_emb"], emb.numpy(), atol=1e-6)
    assert np.array_equal(d["caption_mask"], mask.float().numpy())
    assert np.allclose(d["null_caption_emb"], neg[:1].numpy(), atol=1e-6)
    assert np.array_equal(d["null_caption_mask"], neg_mask[:1].float().numpy())
    assert mask[0].sum() == 7 and neg_mask[0].sum() == 1  # "a red square on the right" + </s>; "" -> </s>
    # the same captions as a metadata.jsonl give the same shards
    make_images(tmp_path / "j", form="jsonl")
    r = run("prepare-data", tmp_path / "j", "--vae", world / "vae", "--image-size", 8, "--text-encoder",
            world / "pipe", "--max-length", 8, "-o", tmp_path / "js")
    assert r.exit_code == 0, r.output
    dj = load_file(str(tmp_path / "js" / "shard-00000.safetensors"))
    assert np.array_equal(dj["caption_emb"], d["caption_emb"])
    # the library's prompt encoder is the same encoding
    caps, null = dc.encode_prompts(world / "pipe", texts[:2], max_length=8)
    assert torch.allclose(caps.emb, emb[:2], atol=1e-6) and torch.allclose(null.emb, neg[:1], atol=1e-6)


def test_captions_longer_than_the_tokenizer_length_are_truncated_with_a_note(world, tmp_path):
    imgs = make_images(tmp_path / "i", n=3)
    (imgs / "01.txt").write_text("a big red square on the left " * 4)
    r = run("prepare-data", imgs, "--vae", world / "vae", "--image-size", 8, "--text-encoder", world / "pipe",
            "--max-length", 8, "-o", tmp_path / "s", "--json")
    assert r.exit_code == 0, r.output
    assert "1 caption(s)" in r.output and "truncated" in r.output
    assert load_file(str(tmp_path / "s" / "shard-00000.safetensors"))["caption_mask"][1].sum() == 8


def _break(kind, imgs):
    if kind == "image without caption":
        (imgs / "03.txt").unlink()
    elif kind == "caption without image":
        (imgs / "03.png").unlink()
    elif kind == "captions in two forms":
        (imgs / "metadata.jsonl").write_text(json.dumps({"file_name": "00.png", "text": "a dot"}) + "\n")
    elif kind == "bad jsonl":
        for t in imgs.glob("*.txt"):
            t.unlink()
        (imgs / "metadata.jsonl").write_text('{"file_name": "00.png"}\n')


@pytest.mark.parametrize("kind", ["image without caption", "caption without image", "captions in two forms",
                                  "bad jsonl", "no text encoder", "missing text encoder"])
def test_bad_caption_folders_are_refused_in_one_line_and_write_nothing(world, tmp_path, kind):
    imgs = make_images(tmp_path / "i", n=4)
    _break(kind, imgs)
    enc = {"no text encoder": [], "missing text encoder": ["--text-encoder", tmp_path / "nope"]}.get(
        kind, ["--text-encoder", world / "pipe"])
    r = run("prepare-data", imgs, "--vae", world / "vae", "--image-size", 8, *enc, "--max-length", 8, "-o", tmp_path / "o")
    one_line_refusal(r)
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], list(tmp_path.iterdir())


def test_data_that_does_not_fit_the_model_is_refused_in_one_line(world, tmp_path):
    # caption features 32 wide for a PixArt whose caption projection takes 16
    from diffusers import PixArtTransformer2DModel

    PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
                             caption_channels=16, in_channels=4, cross_attention_dim=24,
                             out_channels=8).save_pretrained(tmp_path / "narrow")
    r = run("finetune", tmp_path / "narrow", "--data", world / "shards", "--steps", 2, "-o", tmp_path / "a")
    one_line_refusal(r)
    assert "16" in r.output and "32" in r.output
    # class labels for a text-to-image model, captions for a class-conditional one
    one_line_refusal(run("finetune", world / "pipe", "--data", "digits", "--steps", 2, "-o", tmp_path / "b"))
    one_line_refusal(run("finetune", "digits-dit", "--data", world / "shards", "--steps", 2, "-o", tmp_path / "c"))
    # a class-conditional teacher for a PixArt student
    one_line_refusal(run("distill", world / "pipe", "--teacher", "digits-dit", "--data", world / "shards",
                         "--steps", 2, "-o", tmp_path / "d"))
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_guidance_dropout_puts_the_data_null_caption_in_place(world):
    m = dc.load_model(str(world / "pipe"))
    data = load_data(str(world / "shards"), cfg=m.config)
    g = torch.Generator().manual_seed(0)
    dropped = condition_dropout_batch_fn(data, 6, m.config, p_drop=0.9999)(0, g, 0, 1)["y"]
    assert torch.equal(dropped.emb, data.null.emb.expand(6, -1, -1)) and torch.equal(dropped.mask, data.null.mask.expand(6, -1))
    kept = condition_dropout_batch_fn(data, 6, m.config, p_drop=0.0)(0, torch.Generator().manual_seed(0), 0, 1)["y"]
    idx = torch.randint(0, len(data), (6,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(kept.emb, data.y.emb[idx])
    assert m.config.class_dropout_prob == 0.1  # PixArt's caption dropout (uncond_prob 0.1)


def test_finetune_lowers_the_held_out_loss_and_exports_to_diffusers(world, tmp_path):
    from diffusers import PixArtTransformer2DModel

    src = dc.load_model(str(world / "pipe"))
    data = load_data(str(world / "shards"), cfg=src.config)
    calib = calibration_set(data, 48, seed=7)
    before = calibration_losses(src, calib)["loss"]
    tuned, report = dc.finetune(str(world / "pipe"), output=tmp_path / "ft", data=str(world / "shards"), steps=40,
                                batch_size=8, lr=1e-3, ema=0.0)
    after = calibration_losses(tuned, calib)["loss"]
    assert after < 0.9 * before, (before, after)
    assert run("convert", tmp_path / "ft", "--to", "diffusers", "-o", tmp_path / "ftd").exit_code == 0
    d = PixArtTransformer2DModel.from_pretrained(tmp_path / "ftd" / "transformer").eval()
    x, t, c = inputs()
    with torch.no_grad():
        assert torch.allclose(tuned(x, t, c), diffusers_out(d, x, t, c), atol=1e-5)


def test_block_influence_on_pixart_equals_diffusers_block_io(world):
    """ShortGPT's 1 - cos(block input, block output) per block, on clean latents with random t,
    computed with hooks on diffusers' own blocks."""
    from diffusers import PixArtTransformer2DModel

    from dit_compress.compress.depth import block_influence

    m = dc.load_model(str(world / "pipe"))
    d = PixArtTransformer2DModel.from_pretrained(world / "pipe" / "transformer").eval()
    calib = calibration_set(load_data(str(world / "shards"), cfg=m.config), 12, seed=3)
    io = []
    hooks = [b.register_forward_hook(lambda mod, args, kw, out: io.append((kw.get("hidden_states", args[0] if args else None), out)),
                                     with_kwargs=True) for b in d.transformer_blocks]
    with torch.no_grad():
        d(calib.x, encoder_hidden_states=calib.y.emb, timestep=calib.t, encoder_attention_mask=calib.y.mask)
    for h in hooks:
        h.remove()
    ref = [float((1 - torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)).mean()) for a, b in io]
    ours = block_influence(m, calib)
    assert np.allclose(ours, ref, atol=1e-5), (ours, ref)


def test_learned_prune_depth_adapts_both_attentions_and_distill_with_masked_repkd(world, tmp_path):
    import copy

    from dit_compress.compress.depth import add_lora

    m = dc.load_model(str(world / "pipe"))
    names = [n for n, _ in add_lora(copy.deepcopy(m), 4, 8).named_parameters() if "lora_A" in n]
    for part in ("attn1.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
                 "adaln_single.linear", "proj_out"):
        assert any(part in n for n in names), part
    r = run("prune-depth", world / "pipe", "--pattern", "1:2", "--data", world / "shards", "--steps", 8,
            "--batch-size", 8, "-o", tmp_path / "p", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "p" / "report.json").read_text())
    assert rep["method"] == "learned" and rep["depth_after"] == 2 and len(rep["kept_layers"]) == 2
    r = run("distill", tmp_path / "p", "--teacher", world / "pipe", "--data", world / "shards", "--kd-rep", 1,
            "--steps", 6, "--batch-size", 8, "-o", tmp_path / "s")
    assert r.exit_code == 0, r.output
    hist = json.loads((tmp_path / "s" / "report.json").read_text())["history"]
    assert all(np.isfinite(h["rep"]) and h["rep"] > 0 for h in hist if "rep" in h) and any("rep" in h for h in hist)


def make_clip(root):
    """A tiny CLIP (transformers' CLIPModel from a small config) with a word-level tokenizer and
    CLIP's image processor, saved as a local model dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(root)
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    clip = CLIPModel(CLIPConfig(text_config=dict(vocab_size=len(WORDS), max_position_embeddings=32, eos_token_id=2, **small),  # 2: pooled at the highest id
                                vision_config=dict(image_size=16, patch_size=8, **small), projection_dim=16))
    with torch.no_grad():  # a direction both towers share, so image-text similarities are positive and differ
        shared = (torch.randn(32) * 0.2) + 0.6  # by pairing (random towers give negative ones, which the score clamps to 0)
        clip.text_model.final_layer_norm.bias.copy_(shared)
        clip.vision_model.post_layernorm.bias.copy_(shared)
        clip.visual_projection.weight.copy_(clip.text_projection.weight)
        for lin in (clip.vision_model.embeddings.patch_embedding, *[layer.mlp.fc1 for layer in clip.vision_model.encoder.layers]):
            lin.weight.mul_(50.0)  # image features that depend on the image (small random towers barely do)
    clip.save_pretrained(root)
    return root


def test_eval_on_pixart_samples_the_prompts_with_fid_and_clip_score(world, tmp_path, monkeypatch):
    """`ditc eval` of a PixArt: caption shards or a prompt file (encoded by the pipeline's own
    text encoder) sampled in turn with guidance by the null caption, FID against images, and
    the CLIP score equal to CLIP's own features of the written images and their prompts (and
    not to those of the images paired with other prompts)."""
    monkeypatch.setenv("DITC_CACHE_DIR", str(tmp_path / "cache"))  # evals are stored: a served one would show
    from PIL import Image as PILImage
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    r = run("eval", world / "pipe", "--prompts", world / "shards", "-n", 6, "--steps", 3, "--cfg-scale", 4.5,
            "--ref", world / "imgs", "--vae", world / "vae", "--extractor", "digits-cnn", "--metrics", "fid",
            "-o", tmp_path / "e1", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "e1" / "report.json").read_text())
    assert np.isfinite(rep["metrics"]["frechet_inception_distance"]) and rep["prompts"].endswith("shards")
    prompts = tmp_path / "prompts.txt"
    texts = ["a red square on the left", "a blue dot", "a big green square"]
    prompts.write_text("\n".join(texts) + "\n\n")
    clip = make_clip(tmp_path / "clip")
    r = run("eval", world / "pipe", "--prompts", prompts, "-n", 5, "--steps", 3, "--cfg-scale", 4.5,
            "--ref", world / "imgs", "--vae", world / "vae", "--extractor", "digits-cnn", "--metrics", "fid",
            "--clip", clip, "-o", tmp_path / "e2", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "e2" / "report.json").read_text())
    d = np.load(tmp_path / "e2" / "samples.npz")
    assert d["arr_0"].shape == (5, 8, 8, 3) and d["labels"].tolist() == [0, 1, 2, 0, 1]
    model, tok, proc = (CLIPModel.from_pretrained(clip).eval(), AutoTokenizer.from_pretrained(clip),
                        AutoImageProcessor.from_pretrained(clip))
    with torch.no_grad():
        pix = proc(images=[PILImage.fromarray(a) for a in d["arr_0"]], return_tensors="pt")["pixel_values"]
        t = tok([texts[k] for k in d["labels"]], padding=True, return_tensors="pt")
        img = model.get_image_features(pixel_values=pix)
        txt = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        img = img if torch.is_tensor(img) else img.pooler_output
        txt = txt if torch.is_tensor(txt) else txt.pooler_output
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        ref = float((100 * cos.clamp(min=0)).mean())
        wrong = float((100 * torch.nn.functional.cosine_similarity(img, txt.roll(1, 0), dim=-1).clamp(min=0)).mean())
    assert (cos > 0).all() and abs(ref - wrong) > 1e-2  # the check can tell the right pairing from another
    assert abs(rep["metrics"]["clip_score"] - ref) < 1e-4
    # the same prompt file again: served from the cache; the file changed at the same path: computed
    same = ["eval", world / "pipe", "--prompts", prompts, "-n", 5, "--steps", 3, "--cfg-scale", 4.5, "--ref",
            world / "imgs", "--vae", world / "vae", "--extractor", "digits-cnn", "--metrics", "fid", "--clip", clip,
            "--json"]
    r = run(*same, "-o", tmp_path / "e3")
    assert r.exit_code == 0 and "cached" in json.loads(r.stdout), r.output
    prompts.write_text("a blue dot\na red square on the left\na big green square\n")
    r = run(*same, "-o", tmp_path / "e4")
    assert r.exit_code == 0 and "cached" not in json.loads(r.stdout) and json.loads(r.stdout)["shards_written_now"] == 1


def make_fake_clip(d):
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


@pytest.mark.parametrize("case", ["no prompts", "empty prompt file", "missing clip", "clip dir without a model",
                                  "clip for a DiT", "prompts for a DiT", "missing prompts"])
def test_bad_eval_inputs_on_pixart_are_refused_in_one_line(world, tmp_path, case):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    src, extra = world / "pipe", {
        "no prompts": [], "empty prompt file": ["--prompts", empty],
        "missing clip": ["--prompts", world / "shards", "--clip", tmp_path / "no-clip"],
        "clip dir without a model": ["--prompts", world / "shards", "--clip", tmp_path],
        "clip for a DiT": ["--clip", make_fake_clip(tmp_path / "fake-clip")],
        "prompts for a DiT": ["--prompts", world / "shards"], "missing prompts": ["--prompts", tmp_path / "nope.txt"],
    }[case]
    if case in ("prompts for a DiT", "clip for a DiT"):
        src = "digits-dit"
    r = run("eval", src, *extra, "-n", 2, "--steps", 2, "--ref", world / "imgs", "--vae", world / "vae",
            "--extractor", "digits-cnn", "--metrics", "fid", "-o", tmp_path / "o")
    one_line_refusal(r)
    if case == "clip for a DiT":
        assert "text-to-image" in r.output, r.output
    assert not (tmp_path / "o").exists()
