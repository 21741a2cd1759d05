#!/usr/bin/env python3
"""torch_big.py: the PyTorch side of "the largest model that trains on one GPU".

tptrain's side is the `big` stage of tools/device_attention.sh: GPT-2-shaped models of width 4096
in 32 heads of 128, seq 1024, micro-batch 1, bf16 with fp32 master weights, full activation
recomputation, 8 micro-steps per optimizer step (global batch 8192 tokens), n_layer varied (38
layers, 7.86B parameters, trains on one H200). This script trains the same shapes the way a
PyTorch user would who wants the largest model on one GPU: the GPT-2 of tools/torch_gpt2_bench.py
(imported from it: same blocks, init, padded and masked vocabulary, tied head), bf16 autocast,
SDPA causal attention, every transformer block checkpointed
(torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False): a block keeps its input only
and runs its forward again in the backward), AdamW(fused=True) on the fp32 parameters (the fp32
master weights of AMP), global-norm clipping at 1.0 with the foreach kernels:

    python3 tools/torch_big.py --layers 44,42,40,38,36 --n-embd 4096 --n-head 32 --seq 1024 \\
        --batch 1 --grad-accum 8 --steps 6 --skip 2 --json out.json

Each layer count, in the order given, runs in a child process of its own (this script with
--child), so that an out-of-memory leaves no cached or fragmented blocks to the next size. The
child builds the model on the device in fp32 (torch >= 2.0 creates the parameters there; no host
copy), trains --steps optimizer steps of --grad-accum micro-steps (default 8, as the big stage)
on random tokens and prints one JSON line: n_layer, params (without the vocabulary padding, as
torch_gpt2_bench.py counts them for MFU), ok, error (the out-of-memory message, or a timeout),
median step ms after --skip steps (CUDA events, no host synchronisation inside the loop), tok/s,
MFU (6*params + 6*n_layer*n_embd*seq FLOP per token over 989 TFLOP/s, torch_gpt2_bench.py's
formula; the recomputed forward is not counted), torch.cuda.max_memory_allocated and
max_memory_reserved in GiB, and the first and last loss. The parent prints a table and the largest size that trained;
with --stop-at-first on (the default; the list is meant to be descending) it stops at the first
size that trains. Exit 0 if any size trained.

Two memory settings that a user at the limit reaches for (PyTorch's out-of-memory message suggests
the second):
- autocast's cast cache off (--autocast-cache off): with every block checkpointed it saves no
  cast (a recomputed block casts its weights again either way), and with gradient accumulation it
  would hold a bf16 copy of every weight (2 bytes per parameter) beside the gradients during
  each forward after the first.
- PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for the children (--expandable-segments on;
  torch >= 2.1, and only when the variable is not set already), against fragmentation near the
  limit.
What stays is 16 bytes per parameter (fp32 weights, gradients, AdamW m and v) and the activations
(one fp32 residual per layer, one block's recomputation, the logits).

--compile on wraps the model in torch.compile; it is off by default, because compiling a model of
billions of parameters (through the checkpointed blocks) can take minutes per size, and every size
compiles again in its own process. On a CPU (for checking the script itself with tiny sizes) AdamW
is not fused and clipping not foreach, as in torch_gpt2_bench.py, and PyTorch older than 2.0
builds the model on the host and falls back to a written-out causal attention:

    python3 tools/torch_big.py --device cpu --n-embd 64 --n-head 2 --layers 2,1 --seq 32 \\
        --vocab 256 --steps 3 --skip 1
"""
import argparse
import contextlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_gpt2_bench as tg  # noqa: E402  (GPT, random batches, lr schedule, AdamW, clipping)

# the options a child gets from the parent as they are
CHILD_OPTIONS = ["n_embd", "n_head", "seq", "batch", "vocab", "grad_accum", "steps", "skip", "lr",
                 "warmup", "seed", "device", "compile", "autocast_cache", "peak_tflops"]


class Checkpointed(nn.Module):
    """A block that keeps only its input for the backward and recomputes the rest there."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


def param_count(n_layer, n_embd, vocab, seq):
    # what tg.GPT.flop_params() counts: blocks, wte without its padding rows, wpe, ln_f
    return n_layer * (12 * n_embd * n_embd + 13 * n_embd) + (vocab + seq + 2) * n_embd


def torch_at_least(major, minor):
    return tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2]) >= (major, minor)


def fmt_params(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


# ---- child: one size

def train(args, device, res):
    """Builds and trains one size, filling res as it goes (so that an error leaves what was known)."""
    cuda = device.type == "cuda"
    L, C, T, B, V, accum = args.layers[0], args.n_embd, args.seq, args.batch, args.vocab, args.grad_accum
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(args.seed)
    on_device = hasattr(torch.device, "__enter__")  # torch >= 2.0: modules made under it live there
    t0 = time.perf_counter()
    with device if on_device else contextlib.nullcontext():
        model = tg.GPT(L, args.n_head, C, V, T)
    model = model.to(device)
    model.h = nn.ModuleList(Checkpointed(block) for block in model.h)
    if cuda:
        torch.cuda.synchronize(device)
    res["build_s"] = round(time.perf_counter() - t0, 2)
    assert model.flop_params() == res["params"], (model.flop_params(), res["params"])

    tc = dict(tg.DEFAULTS["train"], lr=args.lr, min_lr=args.lr / 10, steps=args.steps,
              warmup_steps=min(args.warmup, args.steps), schedule="cosine")
    optimizer, fused = tg.make_optimizer(model, tc, cuda)
    clip, foreach = tg.make_clip(cuda)
    params = list(model.parameters())
    use_compile = args.compile == "on"
    if use_compile and not hasattr(torch, "compile"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.compile; use --compile off")
    step_model = torch.compile(model) if use_compile else model
    data = tg.Batches(None, B, T, V, device, True, args.seed, n_batches=args.steps * accum)
    cache = args.autocast_cache == "on"
    res.update(fused_adamw=fused, foreach_clip=foreach, compile=use_compile, autocast_cache=cache)
    print(f"# torch {torch.__version__} on {res['device']} | {L} layers, {args.n_head} heads, width {C}, "
          f"vocab {V} (padded {model.padded_vocab}), seq {T} | {fmt_params(res['params'])} parameters | "
          f"B={B} x {accum} micro-steps | bf16 autocast (cast cache {'on' if cache else 'off'}), every block "
          f"checkpointed, compile {'on' if use_compile else 'off'}, AdamW {'fused' if fused else 'unfused'}, "
          f"clipping {'foreach' if foreach else 'per tensor'} | alloc conf "
          f"{os.environ.get('PYTORCH_CUDA_ALLOC_CONF') or 'default'} | built in {res['build_s']} s",
          file=sys.stderr, flush=True)

    # Step k ends where events[k + 1] is recorded; the host runs ahead, losses stay on the device.
    steps = args.steps
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if cuda else []
    host_ends, losses_dev = [], []
    t_start = time.perf_counter()
    if cuda:
        events[0].record()
    for step in range(steps):
        res["failed_in_step"] = step + 1
        lr = tg.lr_at(tc, step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        total = None
        for _ in range(accum):
            idx, tgt = data.next()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache):
                loss = step_model(idx, tgt)
            (loss / accum).backward()
            total = loss.detach() if total is None else total + loss.detach()
        clip(params, 1.0)
        optimizer.step()
        losses_dev.append(total / accum)
        if cuda:
            events[step + 1].record()
        else:
            host_ends.append(time.perf_counter())
    if cuda:
        torch.cuda.synchronize(device)
    del res["failed_in_step"]
    if cuda:
        ms = [events[k].elapsed_time(events[k + 1]) for k in range(steps)]
    else:
        ms = [1e3 * (host_ends[k] - (host_ends[k - 1] if k else t_start)) for k in range(steps)]
    losses = [float(v) for v in losses_dev]
    for k in range(steps):
        print(f"step {k + 1:4d}/{steps} | loss {losses[k]:.6f} | lr {tg.lr_at(tc, k):.3e} | {ms[k]:.1f} ms",
              file=sys.stderr, flush=True)

    timed = ms[args.skip:]
    med = statistics.median(timed)
    tok_s = accum * B * T / (med / 1e3)
    flops_per_token = 6.0 * res["params"] + 6.0 * L * C * T
    peak = args.peak_tflops or (989.0 if cuda else 0.0)
    bad = [k + 1 for k, v in enumerate(losses) if not math.isfinite(v)]
    res.update(ok=not bad, step_ms_median=round(med, 3), step_ms_min=round(min(timed), 3),
               step_ms_first=round(ms[0], 3), tok_per_s=round(tok_s, 1), flops_per_token=flops_per_token,
               peak_tflops=peak, mfu=round(tok_s * flops_per_token / (peak * 1e12), 5) if peak > 0 else None,
               loss_first=losses[0], loss_last=losses[-1], losses=losses)
    if bad:
        res["error"] = f"loss not finite at step {bad[0]}"


def child(args):
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    cuda = device.type == "cuda"
    L = args.layers[0]
    res = {"tool": "pytorch", "torch": torch.__version__,
           "device": torch.cuda.get_device_name(device) if cuda else "cpu",
           "n_layer": L, "n_embd": args.n_embd, "n_head": args.n_head, "seq": args.seq, "batch": args.batch,
           "grad_accum": args.grad_accum, "vocab_size": args.vocab, "steps": args.steps, "skip": args.skip,
           "params": param_count(L, args.n_embd, args.vocab, args.seq), "ok": False,
           "checkpoint": "every block, use_reentrant=False",
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") if cuda else None}
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    try:
        train(args, device, res)
    except oom as e:
        res["ok"] = False
        res["error"] = "out of memory: " + str(e).strip().split("\n")[0]
    except Exception as e:  # anything else: reported the same way, with its traceback on stderr
        if "out of memory" in str(e):  # torch without OutOfMemoryError
            res["error"] = "out of memory: " + str(e).strip().split("\n")[0]
        else:
            import traceback
            traceback.print_exc()
            res["error"] = f"{type(e).__name__}: {e}"
        res["ok"] = False
    if cuda:
        res["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        res["max_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
        res["device_total_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 3)
    print(json.dumps(res), flush=True)
    return 0 if res["ok"] else 1


# ---- parent: the sizes one after the other

def run_size(args, L, env):
    """Runs one size in a child process of its own; returns its result (or why there is none)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--layers", str(L)]
    for name in CHILD_OPTIONS:
        cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    base = {"n_layer": L, "params": param_count(L, args.n_embd, args.vocab, args.seq), "ok": False}
    t0 = time.perf_counter()
    # a session of its own, so that a timeout ends the child and anything it started (compile workers)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        out = None
    finally:  # a timeout, or this process stopped (SIGTERM, Ctrl-C) with the child running
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    if out is None:
        res = dict(base, error=f"timeout after {args.timeout:g} s")
    else:
        lines = [line for line in out.splitlines() if line.startswith("{")]
        res = json.loads(lines[-1]) if lines else dict(
            base, error=f"child exited with status {proc.returncode} and no result")
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def parent(args):
    # SIGTERM (timeout(1) around this script) unwinds like Ctrl-C, so that the running child ends too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = dict(os.environ)
    if args.expandable_segments == "on" and args.device != "cpu" and torch_at_least(2, 1) \
            and "PYTORCH_CUDA_ALLOC_CONF" not in env:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    runs = []
    for L in args.layers:
        print(f"== n_layer={L} n_embd={args.n_embd} n_head={args.n_head} seq {args.seq}, micro-batch "
              f"{args.batch} x {args.grad_accum}, {fmt_params(param_count(L, args.n_embd, args.vocab, args.seq))} "
              f"parameters", file=sys.stderr, flush=True)
        res = run_size(args, L, env)
        runs.append(res)
        print(json.dumps(res), flush=True)
        if res["ok"] and args.stop_at_first == "on":
            break

    def gib(v):
        return f"{v:.2f}" if v is not None else "-"

    print(f"{'n_layer':>7} {'params':>8} {'ok':>3} {'step ms':>9} {'tok/s':>9} {'MFU':>6} "
          f"{'alloc GiB':>9} {'resv GiB':>9}  loss first -> last / error")
    for r in runs:
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else f"{'-':>6}"
        timing = f"{r['step_ms_median']:9.1f} {r['tok_per_s']:9.1f} {mfu}" \
            if r.get("step_ms_median") is not None else f"{'-':>9} {'-':>9} {'-':>6}"
        note = f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}" if r.get("loss_first") is not None else ""
        if r.get("error"):
            note = (note + " | " if note else "") + r["error"][:120]
        print(f"{r['n_layer']:7d} {fmt_params(r['params']):>8} {'yes' if r['ok'] else 'no':>3} {timing} "
              f"{gib(r.get('max_memory_allocated_gib')):>9} {gib(r.get('max_memory_reserved_gib')):>9}  {note}")
    trained = [r for r in runs if r["ok"]]
    best = max(trained, key=lambda r: r["params"]) if trained else None
    if best:
        mfu = f"MFU {100 * best['mfu']:.1f}%" if best.get("mfu") is not None else "MFU -"
        print(f"largest that trains: {best['n_layer']} layers, {fmt_params(best['params'])} params, "
              f"{best['tok_per_s']:.1f} tok/s, {mfu}")
    else:
        print(f"largest that trains: none of {', '.join(str(L) for L in args.layers)} layers")
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps({"tool": "pytorch", "runs": runs,
                                "largest": best["n_layer"] if best else None}) + "\n")
    return 0 if best else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="38,36,34,32,30",
                    help="layer counts to try, in order, comma separated (default 38,36,34,32,30)")
    ap.add_argument("--n-embd", type=int, default=4096)
    ap.add_argument("--n-head", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1, help="micro-batch (default 1)")
    ap.add_argument("--grad-accum", type=int, default=8,
                    help="micro-steps per optimizer step (default 8: the big stage's 8192 tokens at B 1, T 1024)")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps (default 6)")
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the statistics (default 2)")
    ap.add_argument("--lr", type=float, default=2e-4, help="peak lr, cosine to a tenth (default 2e-4, gpt2-1558m's)")
    ap.add_argument("--warmup", type=int, default=2, help="linear warm-up steps (default 2, as the big stage)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--compile", choices=["on", "off"], default="off",
                    help="torch.compile(model) (default off: minutes per size at billions of parameters)")
    ap.add_argument("--autocast-cache", choices=["on", "off"], default="off",
                    help="autocast's cache of bf16 weight casts (default off; see the top of the script)")
    ap.add_argument("--expandable-segments", choices=["on", "off"], default="on",
                    help="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for the children (torch >= 2.1)")
    ap.add_argument("--stop-at-first", choices=["on", "off"], default="on",
                    help="stop at the first layer count that trains (default on)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per size (default 240)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="peak for MFU (default 989 on a GPU)")
    ap.add_argument("--json", help="also write every size's result and the largest to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        args.layers = [int(v) for v in args.layers.replace(" ", ",").split(",") if v]
    except ValueError:
        ap.error(f"--layers {args.layers}: expected comma-separated integers")
    if not args.layers or min(args.layers) < 1:
        ap.error("--layers: at least one layer count, each at least 1")
    if args.n_embd % args.n_head:
        ap.error(f"--n-embd {args.n_embd} is not a multiple of --n-head {args.n_head}")
    if args.steps <= args.skip:
        ap.error(f"--steps {args.steps} must exceed --skip {args.skip}")
    if min(args.batch, args.grad_accum, args.seq, args.vocab) < 1:
        ap.error("--batch, --grad-accum, --seq and --vocab must be positive")
    sys.exit(child(args) if args.child else parent(args))


if __name__ == "__main__":
    main()
