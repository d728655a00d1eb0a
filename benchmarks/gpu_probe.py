"""One-off GPU probe (design input for the fast inference paths): where the DiT-XL/2 forward's
time goes on a GPU, and what fused qkv, fused modulate/gate, contiguous width slices, token
capacity (top-k gather/scatter) and CUDA graphs buy there. Stand-alone block functions on random
bf16 weights of the XL shape, plus the real ditc and diffusers modules. Writes JSON to argv[1]."""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_timing import timeit  # noqa: E402

dev, dt = "cuda", torch.bfloat16
D, H, L, N = 1152, 16, 28, 256
hd = D // H
res = {}
OUT = sys.argv[1]


def save():
    json.dump(res, open(OUT, "w"), indent=1)


def wall(fn, reps=20, warm=3):  # host wall clock: launch-bound cases
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - s) * 1e3)
    ts.sort()
    return round(ts[len(ts) // 2], 3)


def graphed(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def rnd(*s):
    return torch.randn(*s, device=dev, dtype=dt) * 0.02


blocks = [dict(qkv_w=rnd(3 * D, D), qkv_b=rnd(3 * D), proj_w=rnd(D, D), proj_b=rnd(D), fc1_w=rnd(4 * D, D),
               fc1_b=rnd(4 * D), fc2_w=rnd(D, 4 * D), fc2_b=rnd(D), ada_w=rnd(6 * D, D), ada_b=rnd(6 * D),
               r1_w=rnd(D // 16, D), r1_b=rnd(D // 16), r2_w=rnd(1, D // 16) * 50, r2_b=torch.zeros(1, device=dev, dtype=dt))
          for _ in range(L)]


def mods(c, W):
    return F.linear(F.silu(c), W["ada_w"], W["ada_b"]).chunk(6, dim=1)


def ln(x):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def blk_ref(x, c, W):  # today's ditc: three projections on views, modulate/gate as separate ops
    sm, cm, gm, sf, cf, gf = mods(c, W)
    B = x.shape[0]
    h = ln(x) * (1 + cm[:, None]) + sm[:, None]
    q = F.linear(h, W["qkv_w"][:D], W["qkv_b"][:D]).view(B, N, H, hd).transpose(1, 2)
    k = F.linear(h, W["qkv_w"][D:2 * D], W["qkv_b"][D:2 * D]).view(B, N, H, hd).transpose(1, 2)
    v = F.linear(h, W["qkv_w"][2 * D:], W["qkv_b"][2 * D:]).view(B, N, H, hd).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
    x = x + gm[:, None] * F.linear(o, W["proj_w"], W["proj_b"])
    h = ln(x) * (1 + cf[:, None]) + sf[:, None]
    h = F.linear(F.gelu(F.linear(h, W["fc1_w"], W["fc1_b"]), approximate="tanh"), W["fc2_w"], W["fc2_b"])
    return x + gf[:, None] * h


def blk_fused(x, c, W, n=None, ch=None, P=None):
    """one qkv GEMM (strided q/k/v into SDPA), addcmul for modulate and gated residual; with
    ``n``/``ch``: width slices (``P`` prepared contiguous weights, else views)."""
    sm, cm, gm, sf, cf, gf = mods(c, W)
    B = x.shape[0]
    h = torch.addcmul(sm[:, None], ln(x), 1 + cm[:, None])
    if n is None:
        qkv = F.linear(h, W["qkv_w"], W["qkv_b"]).view(B, N, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        a = F.linear(o, W["proj_w"], W["proj_b"])
        x = torch.addcmul(x, gm[:, None], a)
        h = torch.addcmul(sf[:, None], ln(x), 1 + cf[:, None])
        h = F.linear(F.gelu(F.linear(h, W["fc1_w"], W["fc1_b"]), approximate="tanh"), W["fc2_w"], W["fc2_b"])
        return torch.addcmul(x, gf[:, None], h)
    kh = n // hd
    if P is not None:
        qkv = F.linear(h, P["qkv_w"], P["qkv_b"]).view(B, N, 3, kh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        pw, f2 = P["proj_w"], P["fc2_w"]
    else:
        w, b = W["qkv_w"], W["qkv_b"]
        q = F.linear(h, w[:n], b[:n]).view(B, N, kh, hd).transpose(1, 2)
        k = F.linear(h, w[D:D + n], b[D:D + n]).view(B, N, kh, hd).transpose(1, 2)
        v = F.linear(h, w[2 * D:2 * D + n], b[2 * D:2 * D + n]).view(B, N, kh, hd).transpose(1, 2)
        pw, f2 = W["proj_w"][:, :n], W["fc2_w"][:, :ch]
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, n)
    x = torch.addcmul(x, gm[:, None], F.linear(o, pw, W["proj_b"]))
    h = torch.addcmul(sf[:, None], ln(x), 1 + cf[:, None])
    h = F.linear(F.gelu(F.linear(h, W["fc1_w"][:ch], W["fc1_b"][:ch]), approximate="tanh"), f2, W["fc2_b"])
    return torch.addcmul(x, gf[:, None], h)


def prepare(W, n, ch):
    w, b = W["qkv_w"], W["qkv_b"]
    return dict(qkv_w=torch.cat([w[:n], w[D:D + n], w[2 * D:2 * D + n]]).contiguous(),
                qkv_b=torch.cat([b[:n], b[D:D + n], b[2 * D:2 * D + n]]).contiguous(),
                proj_w=W["proj_w"][:, :n].contiguous(), fc2_w=W["fc2_w"][:, :ch].contiguous())


def blk_tokens(x, c, W, cap, exact=False):
    """token routing before the MLP: capacity (top-k per sample, gather, MLP, scatter-add, no
    host sync) or exact (today: nonzero over the mask, flattened)."""
    sm, cm, gm, sf, cf, gf = mods(c, W)
    B = x.shape[0]
    h = torch.addcmul(sm[:, None], ln(x), 1 + cm[:, None])
    qkv = F.linear(h, W["qkv_w"], W["qkv_b"]).view(B, N, 3, H, hd)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
    x = torch.addcmul(x, gm[:, None], F.linear(o, W["proj_w"], W["proj_b"]))
    logits = F.linear(F.relu(F.linear(x, W["r1_w"], W["r1_b"])), W["r2_w"], W["r2_b"]).squeeze(-1)
    if exact:
        tm = logits > 0
        bi, ni = tm.nonzero(as_tuple=True)
        sel = torch.addcmul(sf[bi], ln(x[bi, ni]), 1 + cf[bi])
        hh = F.linear(F.gelu(F.linear(sel, W["fc1_w"], W["fc1_b"]), approximate="tanh"), W["fc2_w"], W["fc2_b"])
        out = x.clone()
        out[bi, ni] += gf[bi] * hh
        return out
    kk = int(cap * N)
    idx = logits.topk(kk, dim=1, sorted=False).indices  # [B, k]
    ix = idx[..., None].expand(B, kk, D)
    sel = torch.gather(x, 1, ix)
    sel = torch.addcmul(sf[:, None], ln(sel), 1 + cf[:, None])
    hh = F.linear(F.gelu(F.linear(sel, W["fc1_w"], W["fc1_b"]), approximate="tanh"), W["fc2_w"], W["fc2_b"])
    return x.scatter_add_(1, ix, hh * gf[:, None])


def stack(fn, x, c, **kw):
    def run():
        h = x
        for i, W in enumerate(blocks):
            h = fn(h, c, W, **{k: (v[i] if isinstance(v, list) else v) for k, v in kw.items()})
        return h
    return run


def top_kernels(fn, n=12):
    from torch.profiler import ProfilerActivity, profile
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn(); torch.cuda.synchronize()
    rows = []
    for e in sorted(p.key_averages(), key=lambda e: -e.device_time_total)[:n]:
        rows.append((e.key[:90], e.count, round(e.device_time_total / 1e3, 3)))
    return rows


with torch.inference_mode():
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    # 1. stand-alone stacks of 28 blocks (blocks only: the embedders and final layer are small)
    for B in (1, 64):
        x, c = torch.randn(B, N, D, device=dev, dtype=dt), torch.randn(B, D, device=dev, dtype=dt)
        r = {}
        r["ref"] = timeit(stack(blk_ref, x, c))
        r["fused"] = timeit(stack(blk_fused, x, c))
        n, ch = (H // 2) * hd, 2 * D
        r["width0.5_views"] = timeit(stack(blk_fused, x, c, n=n, ch=ch))
        P = [prepare(W, n, ch) for W in blocks]
        r["width0.5_prepared"] = timeit(stack(blk_fused, x, c, n=n, ch=ch, P=P))
        r["tokens0.5_capacity"] = timeit(stack(blk_tokens, x, c, cap=0.5))
        r["tokens0.5_exact"] = timeit(stack(blk_tokens, x, c, cap=0.5, exact=True))
        r["wall_ref"] = wall(stack(blk_ref, x, c))
        for name, fn in (("fused", stack(blk_fused, x, c)), ("width0.5_prepared", stack(blk_fused, x, c, n=n, ch=ch, P=P)),
                         ("tokens0.5_capacity", stack(blk_tokens, x, c, cap=0.5))):
            r["graph_" + name] = wall(graphed(fn))
        res[f"blocks_b{B}"] = r
        print(f"blocks b{B}", r, flush=True)
        save()
        if B == 64:
            res["kernels_ref_b64"] = top_kernels(stack(blk_ref, x, c))
            res["kernels_fused_b64"] = top_kernels(stack(blk_fused, x, c))
            res["kernels_tokens_b64"] = top_kernels(stack(blk_tokens, x, c, cap=0.5))
            for k in ("kernels_ref_b64", "kernels_fused_b64", "kernels_tokens_b64"):
                print(k); [print("  ", *row) for row in res[k]]
            save()
    del blocks
    # 2. the real modules: ditc vs diffusers, eager, with profiles at b64
    import dit_compress as dc
    from diffusers import DiTTransformer2DModel
    ours = dc.create("DiT-XL/2").to(dev, dt).eval()
    peer = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                 num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
                                 norm_type="ada_norm_zero").to(dev, dt).eval()
    for B in (1, 8, 64):
        x = torch.randn(B, 4, 32, 32, device=dev, dtype=dt); t = torch.randint(0, 1000, (B,), device=dev)
        y = torch.randint(0, 1000, (B,), device=dev)
        a = wall(lambda: ours(x, t, y)); p = wall(lambda: peer(x, t, class_labels=y, return_dict=False))
        res[f"model_b{B}"] = dict(ditc=a, diffusers=p)
        print("model", B, res[f"model_b{B}"], flush=True)
        if B == 64:
            res["kernels_ditc_model_b64"] = top_kernels(lambda: ours(x, t, y))
            res["kernels_diffusers_model_b64"] = top_kernels(lambda: peer(x, t, class_labels=y, return_dict=False))
            for k in ("kernels_ditc_model_b64", "kernels_diffusers_model_b64"):
                print(k); [print("  ", *row) for row in res[k]]
        save()
    # 3. compiled (default mode) at b64: ditc's whole forward vs diffusers'
    if os.environ.get("PROBE_COMPILE", "1") == "1":
        x = torch.randn(64, 4, 32, 32, device=dev, dtype=dt); t = torch.randint(0, 1000, (64,), device=dev)
        y = torch.randint(0, 1000, (64,), device=dev)
        for name, m, call in (("ditc", ours, lambda f: f(x, t, y)),
                              ("diffusers", peer, lambda f: f(x, t, class_labels=y, return_dict=False))):
            s = time.time()
            cm = torch.compile(m)
            call(cm); torch.cuda.synchronize()
            res[f"compiled_{name}_b64"] = dict(ms=timeit(lambda: call(cm)), compile_s=round(time.time() - s, 1))
            print("compiled", name, res[f"compiled_{name}_b64"], flush=True)
            save()
print("done")
