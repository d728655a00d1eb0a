"""MAR (issue 37): parity with an independent re-implementation saved in main_mar.py's own
checkpoint layout, the token loss against a float64 re-derivation of ADM's loss on the cosine
schedule, the masked autoregressive sampler against a float64 reference sampler, the
interface's two stacks under depth pruning, round trips, and bad inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import dit_compress as dc
from dit_compress.config import DiTConfig
from dit_compress.errors import DitcError, FormatError, MissingFactError, UsageError
from dit_compress.diffusion.mar import draw, mask_from_order, token_losses, truncnorm_ratio
from reference_mar import RefMAR, adm_token_loss, args_for, official_checkpoint, ref_sample

from typer.testing import CliRunner

from dit_compress.cli import app

CLASSES = 10


class _Result:
    def __init__(self, r):
        self.returncode, self.stdout, self.stderr = r.exit_code, r.stdout, r.stderr


def run_cli(args):
    return _Result(CliRunner().invoke(app, [str(a) for a in args]))


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return RefMAR(seq_side=4, tok=4, enc=(64, 3, 4), dec=(64, 3, 4), buffer=8, classes=CLASSES, head=(2, 48)).eval()


@pytest.fixture(scope="module")
def ckpt(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("mar") / "checkpoint-last.pth"
    official_checkpoint(ref, args_for(ref, ditc_num_heads=4), path, ema_offset=0.0)
    return path


def _inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, 16, 4, generator=g)
    order = torch.argsort(torch.rand(n, 16, generator=g), 1)
    return tokens, mask_from_order(order, 11), torch.tensor([3, CLASSES, 7][:n])


def test_conditions_and_head_equal_the_reference(ref, ckpt):
    model = dc.load_model(ckpt)
    assert model.config.family == "mar" and model.config.stack_split == [3, 3]
    tokens, mask, labels = _inputs()
    z = model.conditions(tokens, mask, labels)
    z_ref = ref.decoder(ref.encoder(tokens, mask, ref.class_embedding(labels, CLASSES)), mask)
    assert torch.allclose(z, z_ref, atol=1e-5, rtol=0), (z - z_ref).abs().max()
    x, t = torch.randn(5, 4), torch.tensor([0, 5, 250, 600, 999])
    c = torch.randn(5, 64)
    assert torch.allclose(model.diffloss.net(x, t, c), ref.diffloss.net(x, t, c), atol=1e-5, rtol=0)


def test_ema_weights_are_read_and_model_on_request(ref, tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    official_checkpoint(ref, args_for(ref, ditc_num_heads=4), path, ema_offset=0.5)
    ema = dc.load_model(path)
    raw = dc.load_model(path, use_ema=False)
    w = ref.state_dict()["z_proj.weight"]
    assert torch.equal(raw.z_proj.weight, w) and torch.allclose(ema.z_proj.weight, w + 0.5)


def test_token_loss_equals_a_float64_rederivation_of_adm(ref, ckpt):
    model = dc.load_model(ckpt).train()
    for p in ("attn_dropout", "proj_dropout"):  # dropout off: the loss is compared at given draws
        setattr(model.config.mar, p, 0.0)
    for b in model.blocks:
        b.attn.attn_drop = b.attn.proj_drop = b.mlp.drop = 0.0
    g = torch.Generator().manual_seed(4)
    imgs = torch.randn(2, 4, 4, 4, generator=g).clamp(-1.2, 1.2)
    labels = torch.tensor([1, CLASSES])
    d = draw(model.config, 2, g)
    d.t[0, 0, :4] = 0  # the decoder (discretized likelihood) term too
    d.t[1, 1, :4] = 999
    ours = token_losses(model, imgs, labels, d)["loss"].detach().double().numpy()
    # the reference: official row order (token copies outermost), boolean masks, numpy ADM
    x = ref.patchify(imgs)
    n_masked = math.ceil(16 * float(d.ratio[0]))
    mask = mask_from_order(d.order, n_masked)
    with torch.no_grad():
        z = ref.decoder(ref.encoder(x, mask, ref.class_embedding(labels, CLASSES)), mask)
    mul = d.t.shape[1]
    want = []
    for b in range(2):
        rows_x = x[b].repeat(mul, 1).double().numpy()
        rows_t = d.t[b].reshape(-1).numpy()
        rows_n = d.noise[b].reshape(-1, 4).double().numpy()
        betas_ab = __import__("reference_mar").cosine_alpha_bar()[1]
        xt = np.sqrt(betas_ab[rows_t])[:, None] * rows_x + np.sqrt(1 - betas_ab[rows_t])[:, None] * rows_n
        with torch.no_grad():
            out = ref.diffloss.net(torch.from_numpy(xt).float(), torch.from_numpy(rows_t), z[b].repeat(mul, 1))
        out = out.double().numpy()
        per = adm_token_loss(rows_x, out[:, :4], out[:, 4:], rows_t, rows_n)
        w = mask[b].repeat(mul).numpy()
        want.append((per * w).sum() / w.sum())
    assert np.allclose(ours, want, rtol=1e-5, atol=1e-6), (ours, want)


def test_mask_ratio_is_the_official_truncated_normal():
    from scipy import stats

    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    r = truncnorm_ratio(u, 0.7).numpy()
    want = stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25).ppf(u.double().numpy())
    assert np.allclose(r, want, atol=1e-6) and r.min() >= 0.7 and r.max() <= 1.0


@pytest.mark.parametrize("cfg_scale,num_iter,clip", [(1.0, 4, False), (3.0, 3, False), (3.0, 3, True)])
def test_sampler_equals_a_float64_reference_sampler(ref, ckpt, cfg_scale, num_iter, clip):
    model = dc.load_model(ckpt).double()
    labels = torch.tensor([2, 5])
    gens = [torch.Generator().manual_seed(100 + i) for i in range(2)]
    got = dc.sample_mar(model, labels, num_iter=num_iter, cfg_scale=cfg_scale, temperature=0.9, generators=gens,
                        clip_denoised=clip)
    # the same draws, re-made: each sample's order, then its token positions' noise
    S = 100  # the head's num_sampling_steps
    orders, noise = [], []
    for i in range(2):
        g = torch.Generator().manual_seed(100 + i)
        orders.append(torch.argsort(torch.rand(16, generator=g)))
        noise.append(torch.randn(16, S + 1, 4, generator=g))
    want = ref_sample(ref.double(), labels, torch.stack(orders), torch.stack(noise), num_iter, cfg_scale, 0.9, CLASSES,
                      clip=clip)
    ref.float()
    assert torch.allclose(got, want, atol=1e-8, rtol=1e-8), (got - want).abs().max()


def test_a_seed_gives_the_same_samples_on_any_batch_split(ckpt):
    model = dc.load_model(ckpt).double()  # float64: a batch's size changes only the kernels' rounding
    out = dc.sample_mar(model, torch.arange(4), num_iter=4, cfg_scale=2.0, seed=7)
    a = dc.sample_mar(model, torch.arange(2), num_iter=4, cfg_scale=2.0, seed=7)
    b = dc.sample_mar(model, torch.arange(2, 4), num_iter=4, cfg_scale=2.0, seed=7, first_index=2)
    assert torch.allclose(out, torch.cat([a, b]), rtol=1e-10, atol=1e-10)
    assert not torch.equal(out, dc.sample_mar(model, torch.arange(4), num_iter=4, cfg_scale=2.0, seed=8))


def test_depth_pruning_keeps_groups_within_each_stack(ref, ckpt, tmp_path):
    with pytest.raises(UsageError, match="within one stack"):  # 2 + 2 + 2 straddles 3 + 3
        dc.prune_depth(str(ckpt), output=tmp_path / "x", method="uniform", groups="1:2,1:2,1:2")
    with pytest.raises(UsageError, match="stack of 3"):
        dc.prune_depth(str(ckpt), output=tmp_path / "x", method="uniform", pattern="1:2")
    assert not (tmp_path / "x").exists()
    pruned, report = dc.prune_depth(str(ckpt), output=tmp_path / "u", method="uniform", groups="1:3,2:3")
    assert pruned.config.kept_layers == [2, 3, 5] and pruned.config.stack_split == [1, 2]
    tokens, mask, labels = _inputs()
    full_enc, full_dec = ref.encoder_blocks, ref.decoder_blocks
    try:  # the reference with the same blocks deleted
        ref.encoder_blocks = torch.nn.ModuleList([full_enc[2]])  # uniform: each group's last block first
        ref.decoder_blocks = torch.nn.ModuleList([full_dec[0], full_dec[2]])
        want = ref.decoder(ref.encoder(tokens, mask, ref.class_embedding(labels, CLASSES)), mask)
    finally:
        ref.encoder_blocks, ref.decoder_blocks = full_enc, full_dec
    assert torch.allclose(pruned.conditions(tokens, mask, labels), want, atol=1e-5, rtol=0)
    # its own file round trip, and the official layout (loads into the reference's key set)
    dc.save_model(pruned, tmp_path / "p", format="ditc")
    back = dc.load_model(tmp_path / "p")
    assert back.config.kept_layers == [2, 3, 5] and torch.equal(back.conditions(tokens, mask, labels),
                                                               pruned.conditions(tokens, mask, labels))
    dc.save_model(pruned, tmp_path / "p.pth", format="original")
    obj = torch.load(tmp_path / "p.pth", weights_only=False)
    assert (obj["args"].encoder_depth, obj["args"].decoder_depth) == (1, 2)
    small = RefMAR(seq_side=4, tok=4, enc=(64, 1, 4), dec=(64, 2, 4), buffer=8, classes=CLASSES, head=(2, 48))
    small.load_state_dict(obj["model_ema"], strict=True)
    again = dc.load_model(tmp_path / "p.pth")
    assert again.config.kept_layers == [2, 3, 5] and again.config.mar.stack_depths == [3, 3]


def test_mar_l_shape_is_a_preset():
    cfg = DiTConfig.preset("MAR-L")
    assert cfg.describe_arch() == "MAR-L" and cfg.stack_split == [16, 16] and cfg.mar.diffloss_d == 8
    assert 4.5e8 < cfg.estimated_params() < 5.0e8  # 479M in TinyFusion's table


# ---------------------------------------------------------------------------- bad inputs
def test_state_dict_without_args_of_no_published_size_is_one_line(ref, tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(ref.state_for_official(), path)
    with pytest.raises(MissingFactError, match="training args"):
        dc.load_model(path)
    r = run_cli(["info", str(path)])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "training args" in r.stderr


def test_args_naming_another_size_are_refused(ref, tmp_path):
    path = tmp_path / "c.pth"
    official_checkpoint(ref, args_for(ref, model="mar_base"), path)
    with pytest.raises(FormatError, match="mar_base"):
        dc.load_model(path)
    official_checkpoint(ref, args_for(ref), path)
    with pytest.raises(MissingFactError, match="num_heads"):
        dc.load_model(path)
    assert dc.load_model(path, num_heads=4).config.num_heads == 4


@pytest.mark.parametrize("field,value", [("mask_ratio_min", 1.0), ("mask_ratio_min", -0.1), ("diffusion_batch_mul", 0)])
def test_training_facts_out_of_range_are_one_line(ref, tmp_path, field, value):
    path = tmp_path / "c.pth"
    official_checkpoint(ref, args_for(ref, ditc_num_heads=4, **{field: value}), path)
    with pytest.raises(DitcError, match=field):
        dc.load_model(path)


@pytest.mark.parametrize("num_iter", [0, 17])
def test_num_iter_out_of_range_is_one_line(ckpt, num_iter):
    model = dc.load_model(ckpt)
    with pytest.raises(UsageError, match="num_iter"):
        dc.sample_mar(model, torch.arange(2), num_iter=num_iter)


@pytest.mark.parametrize("command", [["add-dynamic-width"], ["add-token-router"]])
def test_dynamic_transforms_are_refused_on_mar_and_write_nothing(ckpt, tmp_path, command):
    out = tmp_path / "out"
    r = run_cli([*command, str(ckpt), "-o", str(out)])
    assert r.returncode == 2 and "mar models" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_info_and_convert_on_the_cli(ckpt, tmp_path):
    r = run_cli(["info", str(ckpt), "--json"])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["stacks"] == {"encoder": 3, "decoder": 3, "source": [3, 3]} and info["tokens"] == 16
    assert info["params"] == sum(p.numel() for p in dc.load_model(ckpt).parameters())
    r = run_cli(["convert", str(ckpt), "-o", str(tmp_path / "m")])
    assert r.returncode == 0, r.stderr
    r = run_cli(["prune-depth", str(tmp_path / "m"), "--groups", "2:3,1:3", "--method", "uniform",
                 "-o", str(tmp_path / "pr")])
    assert r.returncode == 0, r.stderr
    assert dc.load_model(tmp_path / "pr").config.stack_split == [2, 1]


def test_loop_macs_count_what_the_sampling_loop_runs(ckpt):
    """The bench's FLOPs of a MAR loop equal what the loop ran: every linear (torch's flop
    counter) plus attention scores and sums from the token counts each block saw (hooks)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dit_compress.diffusion.mar import loop_macs

    model = dc.load_model(ckpt).eval()
    for cfg_scale, num_iter in ((1.0, 4), (2.0, 3), (2.0, 16)):
        attn = []
        hooks = [b.register_forward_pre_hook(lambda mod, a: attn.append(2 * a[0].shape[0] * a[0].shape[1] ** 2
                                                                        * a[0].shape[2])) for b in model.blocks]
        with FlopCounterMode(display=False) as fc, torch.inference_mode():
            dc.sample_mar(model, torch.arange(2), num_iter=num_iter, cfg_scale=cfg_scale, seed=0)
        for h in hooks:
            h.remove()
        ran = (fc.get_total_flops() / 2 + sum(attn)) / 2  # MACs per image
        assert loop_macs(model.config, num_iter, cfg_scale) == pytest.approx(ran, rel=1e-9)


def test_bench_times_the_mar_loop_and_prunes_both_stacks_alike(ckpt, tmp_path):
    from dit_compress.diffusion.mar import loop_macs
    from dit_compress.evaluate.bench import _structure

    cfg = _structure(DiTConfig.preset("MAR-L"), ["d16"])
    assert cfg.stack_split == [8, 8] and cfg.kept_layers == [*range(1, 16, 2), *range(17, 32, 2)]
    with pytest.raises(UsageError, match="split evenly"):
        _structure(DiTConfig.preset("MAR-L"), ["d15"])
    r = run_cli(["bench", "--loop", ckpt, f"{ckpt}+d4", "--steps", "3", "--cfg-scale", "2.0", "--batch-sizes", "2",
                 "--repeats", "1", "--warmup", "0", "--json"])
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    model = dc.load_model(ckpt)
    pruned = dc.prune_depth(model, output=tmp_path / "p", method="uniform", groups="2:3,2:3")[0]
    want = loop_macs(model.config, 3, 2.0) / loop_macs(pruned.config, 3, 2.0)
    assert rows[1]["flops_ratio"] == pytest.approx(want) and rows[0]["seconds_per_image"] > 0



@pytest.mark.parametrize("args,msg", [(["--sampler", "ddim"], "diffusion sampler"),
                                      (["--timestep-spacing", "trailing"], "timestep spacing"),
                                      (["--steps", "300"], "num_iter"),
                                      (["--loop", "--feature-cache", "fora:2"], "feature caches"),
                                      ([], "pass --loop")])
def test_bench_refuses_what_a_mar_loop_cannot_take_up_front(ckpt, tmp_path, args, msg):
    # a shape is refused before any process starts; a loaded MAR in its child, with the same exit 2
    for src in (["--shape", "MAR-B"], [str(ckpt)]):
        r = run_cli(["bench", *src, *args, "--batch-sizes", "1", "--repeats", "1", "--warmup", "0",
                     "-o", tmp_path / "b"])
        assert r.returncode == 2 and msg in r.stderr and not (tmp_path / "b").exists(), (src, r.stderr)
        if src[0] == "--shape":
            assert "measuring" not in r.stdout + r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def digits_mar(tmp_path_factory):
    """A small MAR made the way a user makes one (``ditc create --family mar``) on the digits' shape."""
    out = tmp_path_factory.mktemp("dm") / "m"
    r = run_cli(["create", "custom", "--family", "mar", "--input-size", "8", "--patch-size", "2", "--in-channels", "1",
                 "--hidden-size", "32", "--depth", "4", "--num-heads", "2", "--num-classes", "10", "--buffer-size", "2",
                 "--head", "1,32", "--pixel", "-o", out])
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("args,msg", [(["--buffer-size", "0"], "--buffer-size"),
                                      (["--prediction", "velocity"], "predicts eps")])
def test_create_refuses_a_mar_without_buffer_tokens_or_predicting_velocity(tmp_path, args, msg):
    base = ["create", "custom", "--family", "mar", "--input-size", "8", "--patch-size", "2", "--in-channels", "1",
            "--hidden-size", "32", "--depth", "4", "--num-heads", "2", "--num-classes", "10", "--buffer-size", "2",
            "--head", "1,32", "--pixel", "-o", tmp_path / "m"]
    r = run_cli(base + args)
    assert r.returncode == 2 and msg in r.stderr and not (tmp_path / "m").exists(), r.stderr


@pytest.mark.parametrize("args,msg", [(["--no-learn-sigma"], "always learns its variance"),
                                      (["--head", "0,128"], "head needs at least one res-block")])
def test_create_refuses_what_a_mar_head_cannot_be(tmp_path, args, msg):
    base = ["create", "custom", "--family", "mar", "--input-size", "8", "--patch-size", "2", "--in-channels", "1",
            "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--num-classes", "10", "--buffer-size", "2",
            "--head", "2,32", "--pixel"]
    r = run_cli([*base, *args, "-o", tmp_path / "m"])
    assert r.returncode == 2 and msg in r.stderr and not (tmp_path / "m").exists(), r.stderr


def test_bench_refuses_guidance_without_a_loop(tmp_path):
    r = run_cli(["bench", "--shape", "DiT-S/2", "--cfg-scale", "1.5", "--batch-sizes", "1", "-o", tmp_path / "b"])
    assert r.returncode == 2 and "add --loop" in r.stderr and not (tmp_path / "b").exists(), r.stderr


def test_create_a_custom_mar_states_every_fact(digits_mar, tmp_path):
    cfg = dc.load_model(digits_mar).config
    assert cfg.stack_split == [2, 2] and cfg.mar.buffer_size == 2 and (cfg.mar.diffloss_d, cfg.mar.diffloss_w) == (1, 32)
    base = ["create", "custom", "--family", "mar", "--input-size", "8", "--patch-size", "2", "--in-channels", "1",
            "--hidden-size", "32", "--num-heads", "2", "--num-classes", "10", "--pixel"]
    for extra, msg in ((["--depth", "4", "--buffer-size", "2"], "needs --head"),
                       (["--depth", "4", "--head", "1,32"], "needs --buffer-size"),
                       (["--depth", "5", "--buffer-size", "2", "--head", "1,32"], "an even --depth"),
                       (["--depth", "4", "--buffer-size", "2", "--head", "1x32"], "res-blocks,width")):
        r = run_cli([*base, *extra, "-o", tmp_path / "x"])
        assert r.returncode == 2 and msg in r.stderr and not (tmp_path / "x").exists(), r.stderr
    r = run_cli(["create", "DiT-S/2", "--buffer-size", "4", "-o", tmp_path / "x"])
    assert r.returncode == 2 and "MAR's" in r.stderr


def test_finetune_lowers_the_held_out_token_loss(digits_mar, tmp_path):
    from dit_compress.evaluate.fidelity import heldout_loss

    before = heldout_loss(dc.load_model(digits_mar), "digits:test", repeats=1)["heldout_loss"]
    model, report = dc.finetune(str(digits_mar), output=tmp_path / "ft", data="digits:train", steps=40, batch_size=32,
                                lr=2e-3, ema=0.0)
    after = heldout_loss(dc.load_model(tmp_path / "ft"), "digits:test", repeats=1)["heldout_loss"]
    assert after < 0.8 * before, (before, after)
    assert report["history"][-1]["loss"] < report["history"][0]["loss"]


def test_learned_depth_search_prunes_within_each_stack_and_says_which(digits_mar, tmp_path):
    pruned, report = dc.prune_depth(str(digits_mar), output=tmp_path / "p", pattern="1:2", method="learned",
                                    data="digits:train", steps=8, batch_size=16, measure_cost=False)
    keep = report["kept_layers"]
    assert len(keep) == 2 and keep[0] in (0, 1) and keep[1] in (2, 3)  # one of each stack's pair
    assert sorted(report["kept_by_stack"]) == ["decoder_blocks", "encoder_blocks"]
    assert pruned.config.stack_split == [1, 1] and report["calib_loss_chosen"] > 0


def test_eval_samples_by_the_masked_ar_loop(digits_mar, tmp_path):
    r = run_cli(["eval", digits_mar, "--num-samples", "20", "--steps", "3", "--cfg-scale", "2.0", "--batch-size", "7",
                 "--metrics", "fid", "--loss-data", "none", "--no-cache", "-o", tmp_path / "e", "--json"])
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["sampler"] == "mar" and rep["steps"] == 3 and 0 <= rep["metrics"]["class_accuracy"] <= 1
    # the same seed gives the same images whatever the batch size
    r = run_cli(["eval", digits_mar, "--num-samples", "20", "--steps", "3", "--cfg-scale", "2.0", "--batch-size", "20",
                 "--metrics", "fid", "--loss-data", "none", "--no-cache", "-o", tmp_path / "e2"])
    assert r.returncode == 0, r.stderr
    a, b = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("e", "e2"))
    assert np.array_equal(a, b)
    for extra, msg in ((["--sampler", "ddim"], "masked autoregressive"), (["--steps", "17"], "num_iter"),
                       (["--feature-cache", "fora:2"], "feature-cache"), (["--cfg-channels", "1"], "cfg-channels")):
        r = run_cli(["eval", digits_mar, "--num-samples", "4", *extra, "-o", tmp_path / "bad"])
        assert r.returncode == 2 and msg in r.stderr and not (tmp_path / "bad").exists(), r.stderr


def test_block_influence_reads_every_block_and_keeps_each_stacks_share(digits_mar, tmp_path):
    """Block influence by hooks on both stacks: 1 - cos(input, output) of each block over the
    tokens it sees, computed here independently on the same calibration draws."""
    from dit_compress.data.batches import calibration_set
    from dit_compress.data.datasets import load_data
    from dit_compress.diffusion import objective_for

    model = dc.load_model(digits_mar)
    pruned, report = dc.prune_depth(str(digits_mar), output=tmp_path / "bi", groups="1:2,1:2",
                                    method="block-influence", data="digits", calib_samples=32)
    scores = report["block_influence"]
    obj = objective_for(model.config)
    data = load_data("digits", cfg=model.config)
    calib = calibration_set(data, 32, seed=12345, draws=obj.draws)
    b = calib.batch(slice(0, 32))
    d = b["draws"]
    assert len(set(d.ratio.tolist())) > 1  # a calibration set averages over mask ratios, not one
    nb = len(model.blocks)
    sums, counts = torch.zeros(nb, dtype=torch.float64), torch.zeros(nb, dtype=torch.float64)
    for i in range(32):  # one row at a time, its own mask from its own ratio and order
        tok = b["x"][i:i + 1].reshape(1, 1, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, 4)
        n = math.ceil(16 * float(d.ratio[i]))
        mask = torch.zeros(1, 16)
        mask[0, d.order[i, :n]] = 1.0
        seen = []
        hooks = [blk.register_forward_hook(lambda m, a, o: seen.append((a[0], o))) for blk in model.blocks]
        with torch.no_grad():
            model.conditions(tok, mask, b["y"][i:i + 1])
        for h in hooks:
            h.remove()
        for j, (inp, out) in enumerate(seen):
            cos = torch.nn.functional.cosine_similarity(inp.double(), out.double(), dim=-1)
            sums[j] += float((1 - cos).sum())
            counts[j] += cos.numel()
    want = (sums / counts).tolist()
    assert scores == pytest.approx(want, rel=1e-5)
    # each stack of two keeps its last block (never the last one removed), whatever the scores
    assert report["kept_layers"] == [1, 3] and pruned.config.stack_split == [1, 1]


def test_embedded_digits_mar_samples_the_digits_asked_for():
    """The shipped MAR testbed at its documented sampling (8 steps, CFG 4.0 on the linear
    schedule, temperature 1.0): the held-out digits classifier reads the class asked for."""
    from dit_compress.evaluate.features import class_accuracy

    model = dc.load_model("digits-mar")
    cfg = model.config
    assert cfg.family == "mar" and cfg.stack_split == [4, 4] and cfg.patch_size == 2 and cfg.latent_scale is None
    assert cfg.lineage[0]["op"] == "create" and cfg.lineage[-1]["op"] == "convert"
    y = torch.arange(60) % 10
    x = dc.sample_mar(model, y, num_iter=8, cfg_scale=4.0, seed=0)
    assert x.shape == (60, 1, 8, 8) and x.abs().max() <= 1.0
    assert class_accuracy(x, y) >= 0.9


def test_refusals_added_after_review(digits_mar, tmp_path):
    """A keep that empties a stack, diffusers output, the diffusion sampler, unequal mask rows:
    one line each, nothing written."""
    model = dc.load_model(digits_mar)
    with pytest.raises(UsageError, match="every block of a stack"):
        dc.prune_depth(str(digits_mar), output=tmp_path / "o", method="oracle", keep="0,1")
    assert not (tmp_path / "o").exists()
    r = run_cli(["convert", digits_mar, "--to", "diffusers", "-o", tmp_path / "d"])
    assert r.returncode == 2 and "no MAR" in r.stderr and not (tmp_path / "d").exists()
    with pytest.raises(UsageError, match="sample_mar"):
        dc.sample(model, torch.randn(1, 1, 8, 8), torch.tensor([1]))
    mask = torch.zeros(2, 16)
    mask[0, :5], mask[1, :9] = 1, 1
    with pytest.raises(UsageError, match="same number of tokens"):
        model.conditions(torch.zeros(2, 16, 4), mask, torch.tensor([1, 2]))
    assert dc.sample_mar(model, [3], seed=0).shape == (1, 1, 8, 8)  # default num_iter: one step per token here


def test_a_latent_mar_stays_latent_through_the_original_format(ref, ckpt, tmp_path):
    model = dc.load_model(ckpt)
    model.config.latent_scale, model.config.vae = 0.18215, "stabilityai/sd-vae-ft-ema"
    dc.save_model(model, tmp_path / "l.pth", format="original")
    back = dc.load_model(tmp_path / "l.pth").config
    assert (back.latent_scale, back.vae) == (0.18215, "stabilityai/sd-vae-ft-ema")
    pix = dc.load_model("digits-mar")
    dc.save_model(pix, tmp_path / "p.pth", format="original")
    assert dc.load_model(tmp_path / "p.pth").config.latent_scale is None


# ---------------------------------------------------------------------------- distillation
def _ref_student(ref, enc_keep, dec_keep):
    """The reference with only the kept blocks of each stack (an independent pruned student)."""
    import copy

    s = copy.deepcopy(ref)
    s.encoder_blocks = torch.nn.ModuleList([s.encoder_blocks[i] for i in enc_keep])
    s.decoder_blocks = torch.nn.ModuleList([s.decoder_blocks[i] for i in dec_keep])
    return s


def _ref_run(r, imgs, labels, mask):
    """(z, encoder block outputs, decoder block outputs) of a reference MAR, float64."""
    feats = []
    hooks = [b.register_forward_hook(lambda m, a, o: feats.append(o)) for b in [*r.encoder_blocks, *r.decoder_blocks]]
    with torch.no_grad():
        z = r.decoder(r.encoder(r.patchify(imgs), mask, r.class_embedding(labels, CLASSES)), mask)
    for h in hooks:
        h.remove()
    return z, feats


def test_mar_distillation_losses_equal_a_float64_rederivation(ref, ckpt):
    """Output KD on the head (eps MSE + the KL between the teacher's and the student's learned
    Gaussians, in bits, over the masked token copies) and RepKD pairs within each stack, against
    the independent reference pruned by hand."""
    from dit_compress.compress.depth import prune_layers
    from dit_compress.diffusion import objective_for
    from dit_compress.train.losses import combined_loss, layer_map
    from reference_mar import cosine_alpha_bar

    teacher = dc.load_model(ckpt).double().eval()
    student = prune_layers(dc.load_model(ckpt), [1, 3, 5]).double().eval()  # encoder block 1, decoder 0 and 2
    # paper: (i + 1) * T // S - 1 within each stack (encoder 1 of 3, decoder 2 of 3, from 3)
    assert layer_map(student.config, teacher.config, "paper") == [2, 3, 5]
    # kept: up to the next kept block of the same stack (3 stands for 3..4), else the stack's last block
    assert layer_map(student.config, teacher.config, "kept") == [2, 4, 5]
    obj = objective_for(student.config)
    g = torch.Generator().manual_seed(3)
    imgs, labels = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64), torch.tensor([4, CLASSES])
    d = draw(student.config, 2, g)
    batch = {"x": imgs, "y": labels, "draws": d, "t": d, "noise": None}
    out_fn, _ = combined_loss(obj, student, teacher, {"out": 1.0, "plain": 0.0, "rep": 0.0}, 10)
    rep_fn, _ = combined_loss(obj, student, teacher, {"out": 0.0, "plain": 0.0, "rep": 1.0, "k_sigma": None}, 10)
    mrep_fn, _ = combined_loss(obj, student, teacher, {"out": 0.0, "plain": 0.0, "rep": 1.0, "k_sigma": 1.0}, 10)
    with torch.no_grad():
        got_out, got_rep = float(out_fn(student, batch, 0)["loss"]), float(rep_fn(student, batch, 0)["loss"])
        got_mrep = float(mrep_fn(student, batch, 0)["loss"])

    import copy

    r_t = copy.deepcopy(ref).double()
    r_s = _ref_student(r_t, [1], [0, 2])
    n = math.ceil(16 * float(d.ratio[0]))
    mask = mask_from_order(d.order, n).double()
    z_t, f_t = _ref_run(r_t, imgs, labels, mask)
    z_s, f_s = _ref_run(r_s, imgs, labels, mask)
    betas, ab = cosine_alpha_bar()
    ab_prev = np.append(1.0, ab[:-1])
    pvar = betas * (1 - ab_prev) / (1 - ab)
    x = r_t.patchify(imgs).numpy()
    kd_eps, kl = [], []
    for b in range(2):
        for k in range(d.t.shape[1]):
            for pos in mask[b].nonzero().flatten().tolist():
                i, e0 = int(d.t[b, k, pos]), d.noise[b, k, pos].double().numpy()
                xt = math.sqrt(ab[i]) * x[b, pos] + math.sqrt(1 - ab[i]) * e0
                outs = []
                for r, z in ((r_s, z_s), (r_t, z_t)):
                    with torch.no_grad():
                        o = r.diffloss.net(torch.from_numpy(xt)[None], torch.tensor([i]), z[b, pos][None])[0].numpy()
                    eps, v = o[:4], o[4:]
                    min_log = math.log(pvar[1]) if i == 0 else math.log(pvar[i])
                    log_var = (v + 1) / 2 * math.log(betas[i]) + (1 - (v + 1) / 2) * min_log
                    x0_hat = xt / math.sqrt(ab[i]) - math.sqrt(1 / ab[i] - 1) * eps
                    mean = (betas[i] * math.sqrt(ab_prev[i]) * x0_hat
                            + (1 - ab_prev[i]) * math.sqrt(1 - betas[i]) * xt) / (1 - ab[i])
                    outs.append((eps, mean, log_var))
                (es, ms, ls), (et, mt, lt) = outs
                kd_eps.append(np.mean((es - et) ** 2))
                kl.append(np.mean(0.5 * (-1 + ls - lt + np.exp(lt - ls) + (mt - ms) ** 2 * np.exp(-ls))) / math.log(2))
    assert got_out == pytest.approx(np.mean(kd_eps) + np.mean(kl), rel=1e-7)
    pairs = [(0, 2), (1, 3), (2, 5)]  # paper pairs within each stack
    want_rep = np.mean([float(((f_s[i] - f_t[j]) ** 2).mean()) for i, j in pairs])
    assert got_rep == pytest.approx(want_rep, rel=1e-9)

    def kept(h, k):  # TinyFusion's mask: elements within k sigma of the sample's mean (tokens and channels)
        h = h.numpy()
        mu = h.reshape(len(h), -1).mean(1)[:, None, None]
        sd = h.reshape(len(h), -1).std(1, ddof=1)[:, None, None]
        return h * (np.abs(h - mu) < k * sd)

    want_mrep = np.mean([np.mean((kept(f_s[i], 1.0) - kept(f_t[j], 1.0)) ** 2) for i, j in pairs])
    assert got_mrep == pytest.approx(want_mrep, rel=1e-9) and got_mrep < got_rep


def test_distill_a_pruned_mar_on_the_cli_and_refusals(digits_mar, tmp_path):
    p = tmp_path / "p"
    assert run_cli(["prune-depth", digits_mar, "--pattern", "1:2", "--method", "uniform", "-o", p]).returncode == 0
    r = run_cli(["distill", p, "--teacher", digits_mar, "--data", "digits", "--steps", 6, "--batch-size", 8,
                 "--kd-rep", "1.0", "-o", tmp_path / "d"])
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "d" / "report.json").read_text())
    assert rep["op"] == "distill" and all(np.isfinite(h["rep"]) and np.isfinite(h["kd_eps"]) for h in rep["history"])
    written, before = dc.load_model(tmp_path / "d"), dc.load_model(p)
    assert written.config.stack_split == [1, 1] and written.config.lineage[-1]["op"] == "distill"
    assert any(not torch.equal(a, b) for a, b in zip(written.state_dict().values(), before.state_dict().values()))
    # a teacher of another width cannot pair block outputs: one line, nothing written
    wide = tmp_path / "w"
    assert run_cli(["create", "custom", "--family", "mar", "--input-size", "8", "--patch-size", "2", "--in-channels",
                    "1", "--hidden-size", "48", "--depth", "4", "--num-heads", "2", "--num-classes", "10",
                    "--buffer-size", "2", "--head", "1,32", "--pixel", "-o", wide]).returncode == 0
    r = run_cli(["distill", p, "--teacher", wide, "--data", "digits", "--steps", 2, "--kd-rep", "1.0",
                 "-o", tmp_path / "d2"])
    assert r.returncode == 2 and "widths" in r.stderr and not (tmp_path / "d2").exists(), r.stderr
    # a DiT teacher for a MAR student: refused by family
    r = run_cli(["distill", p, "--teacher", "digits-dit", "--data", "digits", "--steps", 2, "-o", tmp_path / "d3"])
    assert r.returncode == 2 and "teacher takes" in r.stderr and not (tmp_path / "d3").exists(), r.stderr
    # a MAR teacher with other tokens: the heads cannot compare token by token
    other = tmp_path / "o"
    assert run_cli(["create", "custom", "--family", "mar", "--input-size", "8", "--patch-size", "4", "--in-channels",
                    "1", "--hidden-size", "32", "--depth", "4", "--num-heads", "2", "--num-classes", "10",
                    "--buffer-size", "2", "--head", "1,32", "--pixel", "-o", other]).returncode == 0
    r = run_cli(["distill", p, "--teacher", other, "--data", "digits", "--steps", 2, "-o", tmp_path / "d4"])
    assert r.returncode == 2 and "4x4 tokens" in r.stderr and not (tmp_path / "d4").exists(), r.stderr


# ---------------------------------------------------------------------------- MAR's KL-16 VAE
from reference_ldm_vae import RefKLVAE, randomized  # noqa: E402

from dit_compress.data.vae import decode, load_vae  # noqa: E402


@pytest.fixture(scope="module")
def latent_mar(ckpt, tmp_path_factory):
    """The reference MAR stated as a latent model of MAR's KL-16 (as main_mar.py's own files are)."""
    model = dc.load_model(ckpt)
    model.config.latent_scale, model.config.vae = 0.2325, "mar-kl16"
    out = tmp_path_factory.mktemp("latent") / "m"
    dc.save_model(model, out)
    return out


@pytest.mark.parametrize("shape", [dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, embed_dim=4, enc_attn_levels=(2,)),
                                   dict(ch=32, ch_mult=(1, 2), num_res_blocks=2, embed_dim=4, enc_attn_levels=(0, 1),
                                        dec_attn_levels=(1,))])
def test_kl_vae_in_mars_layout_loads_exactly_as_diffusers_autoencoder(tmp_path, shape):
    ref = randomized(RefKLVAE(**shape), seed=3).eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "kl16.ckpt")
    for source in (tmp_path / "kl16.ckpt", tmp_path):  # the file, or the folder holding kl16.ckpt
        vae = load_vae(str(source))
        assert vae.config.scaling_factor == 0.2325
        g = torch.Generator().manual_seed(0)
        x, z = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 4, 4, 4, generator=g)
        with torch.no_grad():
            mean, std = ref.moments(x)
            post = vae.encode(x).latent_dist
            torch.testing.assert_close(post.mean, mean, rtol=0, atol=1e-5)
            torch.testing.assert_close(post.std, std, rtol=0, atol=1e-5)
            torch.testing.assert_close(vae.decode(z).sample, ref.decode(z), rtol=0, atol=1e-5)


def test_the_published_kl16_layout_loads_and_decodes_mar_latents(latent_mar, tmp_path):
    """KL-16's own shape (128 channels, (1, 1, 2, 2, 4), attention at the encoder's deepest level),
    decoding a MAR's token latents divided by its 0.2325, as engine_mar.py does."""
    ref = randomized(RefKLVAE(), seed=4).eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "kl16.ckpt")
    vae = load_vae(str(tmp_path / "kl16.ckpt"))
    assert list(vae.config.down_block_types) == ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"]
    model = dc.load_model(latent_mar)
    assert (model.config.latent_scale, model.config.vae) == (0.2325, "mar-kl16")
    tokens = torch.randn(1, 4, 2, 2)
    lat = torch.cat([tokens, tokens, tokens, tokens], 1)  # 16 channels: KL-16's latent width
    model.config.in_channels = 16  # decode reads only the scale; the shape is the VAE's
    with torch.no_grad():
        torch.testing.assert_close(decode(model, lat, vae), ref.decode(lat / 0.2325), rtol=0, atol=1e-5)


def test_kl16_missing_or_foreign_is_one_line(latent_mar, tmp_path):
    ev = ["eval", latent_mar, "--num-samples", "2", "--steps", "2", "--loss-data", "none", "--ref", "digits",
          "--extractor", "digits-cnn"]
    r = run_cli([*ev, "-o", tmp_path / "e"])
    assert r.returncode == 2 and "--vae" in r.stderr and "kl16.ckpt" in r.stderr and not (tmp_path / "e").exists()
    torch.save({"model": {"encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)}}, tmp_path / "other.ckpt")
    (tmp_path / "cut.ckpt").write_bytes(b"PK\x03\x04 truncated")
    ref = RefKLVAE(32, (1, 2), 1, 4, enc_attn_levels=())
    sd = ref.state_dict()
    sd["decoder.up.0.extra.weight"] = torch.zeros(3)
    torch.save({"model": sd}, tmp_path / "extra.ckpt")
    for name, msg in (("other.ckpt", "no encoder.conv_out.weight"), ("cut.ckpt", "not a readable PyTorch checkpoint"),
                      ("extra.ckpt", "no place")):
        with pytest.raises(FormatError, match=msg):
            load_vae(str(tmp_path / name))
        r = run_cli([*ev, "--vae", tmp_path / name, "-o", tmp_path / "e"])
        assert r.returncode == 1 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "e").exists()


def test_latent_shards_of_another_scale_are_refused(latent_mar, tmp_path):
    """Shards scaled by SD's 0.18215 would train a MAR (0.2325) on the wrong data silently."""
    from safetensors.numpy import save_file

    d = tmp_path / "shards"
    d.mkdir()
    save_file({"latents": np.zeros((4, 2, 4, 4, 4), np.float32), "labels": np.arange(4, dtype=np.int64)},
              str(d / "shard-00000.safetensors"))
    (d / "manifest.json").write_text(json.dumps({"count": 4, "scale": 0.18215, "shards": 1, "flipped": True}))
    from dit_compress.data.datasets import load_data

    with pytest.raises(UsageError, match="scaled by 0.18215 but this model's are scaled by 0.2325"):
        load_data(str(d), cfg=dc.load_model(latent_mar).config)
