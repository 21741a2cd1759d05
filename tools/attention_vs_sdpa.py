#!/usr/bin/env python3
"""attention_vs_sdpa.py: tptrain's fused attention against PyTorch's SDPA back ends, same shapes, same GPU.

Runs `tptrain --bench attention SHAPES... --json F`, then times torch.nn.functional.scaled_dot_product_attention
(bf16, is_causal=True) on every row with the flash and the cuDNN back ends, and prints one table with the
ratios. q, k and v come from one (B, T, 3, H, HS) tensor viewed as (B, H, T, HS), as a GPT block feeds them,
which is also tptrain's layout, and from three dense (B, H, T, HS) tensors; the faster of the two counts.
PyTorch is timed over back-to-back calls (mean), so its launch overhead hides behind the GPU work.
TFLOP/s are counted causal as tptrain counts them: forward 2*B*H*T*T*HS, backward 2.5x that.

    python3 tools/attention_vs_sdpa.py --tptrain build-gpu/tptrain [SHAPE | CONFIG.yaml ...]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile


def time_sdpa(torch, backend, B, H, HS, T, warmup, iters, layout):
    """Mean forward and forward+backward ms of causal bf16 SDPA on one back end over iters back-to-back
    calls (no host synchronisation between them, so launch overhead hides behind the GPU work);
    None if the back end refuses the shape. layout "model": q, k, v are views of one (B, T, 3, H, HS)
    tensor, as a GPT block produces them; "dense": three contiguous (B, H, T, HS) tensors."""
    from torch.nn.attention import sdpa_kernel
    F = torch.nn.functional
    gen = torch.Generator(device="cuda").manual_seed(T * 131 + HS)
    if layout == "model":
        qkv = torch.randn(B, T, 3, H, HS, device="cuda", dtype=torch.bfloat16, generator=gen)
        qkv.requires_grad_(True)
        q, k, v = (x.transpose(1, 2) for x in qkv.unbind(2))
        leaves = (qkv,)
    else:
        q, k, v = (torch.randn(B, H, T, HS, device="cuda", dtype=torch.bfloat16, generator=gen)
                   .requires_grad_(True) for _ in range(3))
        leaves = (q, k, v)
    dout = torch.randn(B, H, T, HS, device="cuda", dtype=torch.bfloat16, generator=gen)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def fwd():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        y = fwd()
        torch.autograd.grad(y, leaves, dout)

    out = []
    try:
        with sdpa_kernel([backend]):
            for fn in (fwd, fwd_bwd):
                for _ in range(warmup):
                    fn()
                torch.cuda.synchronize()
                e0.record()
                for _ in range(iters):
                    fn()
                e1.record()
                torch.cuda.synchronize()
                out.append(e0.elapsed_time(e1) / iters)
    except RuntimeError as e:  # the back end does not take this shape
        print(f"# {backend} ({layout}): B={B} H={H} HS={HS} T={T}: {str(e).splitlines()[0][:120]}",
              file=sys.stderr)
        return None
    return tuple(out)


def best(a, b):
    """The faster of two (fwd, fwd+bwd) timings, each figure on its own; None where both are."""
    if a is None or b is None:
        return a or b
    return (min(a[0], b[0]), min(a[1], b[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tptrain", default="build/tptrain", help="the tptrain binary")
    ap.add_argument("--json", help="also write the combined rows here")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("grid", nargs="*", help="shapes BxHxHSxT or config files (tptrain's --bench attention arguments)")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "attn.json")
        env = dict(os.environ, TPTRAIN_BENCH_ITERS=f"{a.warmup}+{a.iters}")
        subprocess.run([a.tptrain, "--bench", "attention", *a.grid, "--json", out], check=True, env=env)
        with open(out) as f:
            ours = json.load(f)["rows"]

    import torch
    from torch.nn.attention import SDPBackend
    name = torch.cuda.get_device_name()
    print(f"\n# {name}, torch {torch.__version__}; ratio = tptrain time / back end time inverted "
          f"(>1: tptrain faster)")
    hdr = (f"{'B':>3} {'H':>3} {'HS':>4} {'T':>5}  {'tptrain fwd/fb TF':>18}  {'cuDNN fwd/fb TF':>16}  "
           f"{'flash fwd/fb TF':>16}  {'vs cuDNN fwd/fb':>16}  {'vs flash fwd/fb':>16}")
    print(hdr)
    rows = []
    for r in ours:
        B, H, HS, T = r["B"], r["H"], r["HS"], r["T"]
        fl = 2.0 * B * H * T * T * HS
        res = {"tptrain": (r["fwd_ms"], r["fwd_bwd_ms"])}
        for key, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            # the faster of the model's strided layout and dense tensors: the reference at its best
            res[key] = best(time_sdpa(torch, be, B, H, HS, T, a.warmup, a.iters, "model"),
                            time_sdpa(torch, be, B, H, HS, T, a.warmup, a.iters, "dense"))
            torch.cuda.empty_cache()

        def tf(t):
            return "     n/a/n/a    " if t is None else f"{fl / t[0] / 1e9:7.1f}/{3.5 * fl / t[1] / 1e9:<7.1f}"

        def ratio(t):
            if t is None:
                return "       n/a      "
            return f"{t[0] / res['tptrain'][0]:7.2f}/{t[1] / res['tptrain'][1]:<7.2f}"

        print(f"{B:>3} {H:>3} {HS:>4} {T:>5}  {tf(res['tptrain']):>18}  {tf(res['cudnn']):>16}  "
              f"{tf(res['flash']):>16}  {ratio(res['cudnn']):>16}  {ratio(res['flash']):>16}  {r['path']}")
        rows.append({"B": B, "H": H, "HS": HS, "T": T, "path": r["path"], "ms": res})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
