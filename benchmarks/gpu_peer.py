"""The base forward against diffusers' own modules of the same shapes, on a GPU, in one process:
DiT-XL/2 (``DiTTransformer2DModel``) at b1/b8/b64 and PixArt-XL/2-512 (``PixArtTransformer2DModel``)
at b1/b8, bf16, random weights, eager (CUDA graphs off, as diffusers runs) and ``torch.compile``d
(default mode) at b64, with the compiled forward's share of the chip's bf16 matrix rate; then
the compiled DiT-XL/2 width0.5 and tokens0.5 variants at b64 for their compiled speedups.
Every figure is the median of CUDA-event timings after warm-up. Writes JSON to argv[1] after each
figure (a run cut short keeps what it measured). ``PEER_SKIP_COMPILE=1`` leaves the compiled part out."""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_timing import timeit  # noqa: E402

from dit_compress.evaluate.bench import build
from dit_compress.model.compile import compile_model
from dit_compress.model.dit import width_cache
from dit_compress.model.flops import static_macs
from dit_compress.model.pixart import Captions
from dit_compress.model.run import RunContext

dev, dt = torch.device("cuda"), torch.bfloat16
BF16_TFLOPS = float(os.environ.get("PEER_TFLOPS", 790))  # measured on this workplace's H200s (8192^3 bf16 matmul)
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "bf16_tflops_ceiling": BF16_TFLOPS}
OUT = sys.argv[1]


def save():
    with open(OUT, "w") as f:
        json.dump(res, f, indent=1)


def dit_inputs(b):
    g = torch.Generator(device=dev).manual_seed(b)
    return (torch.randn(b, 4, 32, 32, device=dev, dtype=dt, generator=g), torch.randint(0, 1000, (b,), device=dev, generator=g),
            torch.randint(0, 1000, (b,), device=dev, generator=g))


def pixart_inputs(b):
    g = torch.Generator(device=dev).manual_seed(b)
    return (torch.randn(b, 4, 64, 64, device=dev, dtype=dt, generator=g), torch.randint(0, 1000, (b,), device=dev, generator=g),
            torch.randn(b, 120, 4096, device=dev, dtype=dt, generator=g), torch.ones(b, 120, device=dev))


def record(key, ours, theirs):
    res[key] = dict(ditc_ms=round(ours, 3), diffusers_ms=round(theirs, 3), ratio=round(theirs / ours, 3))
    print(key, res[key], flush=True)
    save()


with torch.inference_mode():
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    ours = build("shape:DiT-XL/2", device=dev, dtype=dt)
    with torch.device(dev):
        peer = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                     num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
                                     norm_type="ada_norm_zero").to(dt).eval()
    for b in (1, 8, 64):
        x, t, y = dit_inputs(b)
        record(f"dit_xl_b{b}", timeit(lambda: ours(x, t, y)), timeit(lambda: peer(x, t, class_labels=y, return_dict=False)))
    ours_p = build("shape:PixArt-XL/2-512", device=dev, dtype=dt)
    with torch.device(dev):
        peer_p = PixArtTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                          num_layers=28, sample_size=64, patch_size=2, caption_channels=4096,
                                          norm_type="ada_norm_single", interpolation_scale=1).to(dt).eval()
    for b in (1, 8):
        x, t, emb, mask = pixart_inputs(b)
        cap = Captions(emb, mask)
        record(f"pixart_512_b{b}", timeit(lambda: ours_p(x, t, cap)),
               timeit(lambda: peer_p(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t,
                                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)))
    del ours_p, peer_p
    torch.cuda.empty_cache()
    if os.environ.get("PEER_SKIP_COMPILE") != "1":
        x, t, y = dit_inputs(64)
        flops = 2 * static_macs(ours.config)["total"] * 64
        s = time.time()
        cpeer = torch.compile(peer)
        theirs = timeit(lambda: cpeer(x, t, class_labels=y, return_dict=False))
        res["compile_s_diffusers"] = round(time.time() - s, 1)
        s = time.time()
        cours = torch.compile(ours)
        mine = timeit(lambda: cours(x, t, y))
        res["compile_s_ditc"] = round(time.time() - s, 1)
        record("dit_xl_b64_compiled", mine, theirs)
        res["dit_xl_b64_compiled"]["share_of_bf16_limit"] = round(flops / (mine / 1e3) / (BF16_TFLOPS * 1e12), 3)
        res["dit_xl_b64_compiled"]["diffusers_share_of_bf16_limit"] = round(flops / (theirs / 1e3) / (BF16_TFLOPS * 1e12), 3)
        save()
        del peer, cpeer
        t500, run = torch.full((64,), 500, device=dev), RunContext(t=500)  # one timestep: the widths resolved on the host
        for v in ("width0.5", "tokens0.5"):
            m = build(f"shape:DiT-XL/2+{v}", device=dev, dtype=dt)
            with width_cache(m, [500]):
                eager = timeit(lambda: m(x, t500, y, run=run))
                compile_model(m)  # each routed block compiled (dynamic=True: one graph for every width)
                s = time.time()
                comp = timeit(lambda: m(x, t500, y, run=run))
            res[f"{v}_b64"] = dict(eager_ms=round(eager, 3), compiled_ms=round(comp, 3), compile_s=round(time.time() - s, 1),
                                   compiled_speedup_vs_compiled_base=round(mine / comp, 3))
            print(v, res[f"{v}_b64"], flush=True)
            save()
            del m
print("done", flush=True)
