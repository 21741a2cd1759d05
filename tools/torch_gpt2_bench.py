#!/usr/bin/env python3
"""torch_gpt2_bench.py: the PyTorch side of tools/bench_vs_pytorch.sh.

Trains the GPT-2 that tptrain trains, written the way a PyTorch user would write it fast: bf16
autocast, F.scaled_dot_product_attention(is_causal=True), torch.compile(model), AdamW(fused=True),
gradient clipping with the foreach kernels, and TF32 for the fp32 leftovers. It reads the same
config file and the same `--set section.key=value` overrides as tptrain, so one list of overrides
drives both tools:

    python3 tools/torch_gpt2_bench.py configs/gpt2-124m.yaml --set train.micro_batch=16 \\
        --set train.steps=30 --skip 5 --json out.json

The model matches tptrain's: vocabulary padded to a multiple of 128 (50304 for 50257) with the
padded rows zero and masked out of the softmax, wte tied to the LM head, learned positions, pre-LN
blocks with biases everywhere, GELU (tanh), layernorm eps 1e-5; init N(0, 0.02), the residual
projections N(0, 0.02/sqrt(2*n_layer)). AdamW takes the config's lr schedule (linear warmup, then
cosine/linear/constant decay to min_lr), betas, eps, weight decay on the 2-D tensors only, and
global-norm clipping at grad_clip. Inputs come from the config's data.train shards (llm.c format:
a 256-int32 header, then uint16 tokens) read as tptrain reads them, or random tokens when the
shards are missing or with --random-data; the output says which.

Timing. The steps run back to back with no host synchronisation inside them, as a training loop
written for speed runs: on a GPU each step is timed by CUDA events recorded between steps (GPU
time from the end of one step to the end of the next, so any gap the host leaves is counted), and
the losses and gradient norms stay on the device until the loop ends. Statistics skip the first
--skip steps (compilation happens in step 1; step_ms_first is its host time). The result is one
JSON line on stdout (and in --json): median/mean/min step ms, tok/s at the median, MFU with
tptrain's formula (6*params + 6*n_layer*n_embd*seq_len FLOP per token, params without the
vocabulary padding; peak 989 TFLOP/s for bf16 and 67 for fp32 on a GPU, or --peak-tflops),
torch.cuda.max_memory_allocated and max_memory_reserved in GiB, and the first and last loss.
--compile-mode passes a mode to torch.compile (default: torch's default).

What changed, and why, against the first version of this script (which measured PyTorch slower
than a plain script did on the same GPU):
- No host synchronisation per step. It read loss.item() and called torch.cuda.synchronize after
  every step, so the GPU idled while the host finished the step's Python and launched the next
  one; now the host runs ahead and per-step times come from CUDA events. (tptrain still reads its
  loss every step, so this makes PyTorch's figure, not tptrain's, the optimistic one.)
- Batches staged on the GPU once. Each step copied its tokens through one pinned buffer, which is
  only safe with the per-step synchronisation above; the token ids of the run (a few MB) now sit
  on the device and each step takes a view.
- The padded vocabulary masked, not sliced. The logits were cut to 50257 columns (rows no longer
  a multiple of 8 elements) and upcast to fp32 explicitly before the loss; the padded columns are
  now set to -inf in the bf16 logits, which is the same softmax, loss and gradient (the padded
  columns get exp(-inf) = 0 and a zero gradient, as in tptrain), and the loss upcasts inside the
  cross-entropy as autocast does, so torch.compile fuses the mask, the upcast and the softmax.
- Gradient clipping with foreach=True explicitly (one multi-tensor norm and one multi-tensor
  scale instead of a kernel per tensor wherever the default would differ), and no .item() of the
  norm inside the loop.

On a CPU (for checking the script itself) compile is off unless asked for, AdamW is not fused,
and PyTorch older than 2.0 falls back to a written-out causal attention.
"""
import argparse
import glob
import inspect
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256

# tptrain's defaults (README.md, "Config keys") for the keys this script uses.
DEFAULTS = {
    "model": {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "seq_len": 1024},
    "train": {"micro_batch": 4, "global_batch": 0, "grad_accum": 0, "steps": 100, "lr": 6e-4,
              "min_lr": 6e-5, "warmup_steps": 0, "schedule": "cosine", "weight_decay": 0.1,
              "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "grad_clip": 1.0, "seed": 1337,
              "precision": "fp32"},
    "data": {"train": "data/tinyshakespeare_train.bin"},
    "log": {"peak_tflops": 0.0},
}


# ---- config: the two-level YAML subset the shipped configs use, plus --set overrides

def parse_scalar(text):
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def strip_comment(line):
    # A '#' starts a comment at the line start or after whitespace, outside quotes.
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def read_config(path):
    cfg = {}
    section = None
    with open(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = strip_comment(raw).rstrip()
            if not line.strip():
                continue
            indented = line[0] in " \t"
            key, sep, value = line.strip().partition(":")
            if not sep:
                sys.exit(f"{path}:{lineno}: expected 'key: value'")
            if not indented:
                if value.strip():
                    sys.exit(f"{path}:{lineno}: top-level '{key}' must be a section")
                section = cfg.setdefault(key.strip(), {})
            elif section is None:
                sys.exit(f"{path}:{lineno}: key '{key.strip()}' outside a section")
            else:
                section[key.strip()] = parse_scalar(value)
    return cfg


def apply_set(cfg, assignment):
    key, sep, value = assignment.partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or not name:
        sys.exit(f"--set {assignment}: expected section.key=value")
    cfg.setdefault(section, {})[name] = parse_scalar(value)


def get(cfg, section, key):
    return cfg.get(section, {}).get(key, DEFAULTS[section][key])


# ---- model

class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.attn_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd)

    def attention(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if hasattr(F, "scaled_dot_product_attention"):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # PyTorch < 2.0 (CPU checks only)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = att @ v
        return self.attn_proj(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x):
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, n_layer, n_head, n_embd, vocab_size, seq_len):
        super().__init__()
        self.vocab_size = vocab_size
        self.padded_vocab = (vocab_size + 127) // 128 * 128  # tptrain's padding at tp=1
        self.wte = nn.Embedding(self.padded_vocab, n_embd)
        self.wpe = nn.Embedding(seq_len, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)
        # -inf on the padded columns of the logits: out of the softmax, the loss and the gradient
        pad = torch.zeros(self.padded_vocab)
        pad[vocab_size:] = float("-inf")
        self.register_buffer("vocab_mask", pad, persistent=False)
        self.reset_parameters(n_layer)

    @torch.no_grad()
    def reset_parameters(self, n_layer):
        for name, p in self.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith("attn_proj.weight") or name.endswith("mlp_proj.weight"):
                p.normal_(0.0, 0.02 / math.sqrt(2 * n_layer))
            else:
                p.normal_(0.0, 0.02)
        self.wte.weight[self.vocab_size:].zero_()

    def forward(self, idx, targets):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied LM head, (B, T, padded_vocab)
        # The padded columns are masked out of the softmax, as in tptrain; rows keep their aligned
        # length, and the cross-entropy computes in fp32 (autocast) on the bf16 logits.
        if self.padded_vocab != self.vocab_size:
            logits = logits + self.vocab_mask.to(logits.dtype)
        return F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T))

    def flop_params(self):
        # Parameters as tptrain counts them for MFU: the vocabulary padding rows excluded.
        n = sum(p.numel() for p in self.parameters())
        return n - (self.padded_vocab - self.vocab_size) * self.wte.weight.shape[1]


# ---- data

class Batches:
    """B consecutive sequences of T+1 tokens overlapping by one, as tptrain's loader cuts them.

    The first n_batches batches (default: up to 64), or the whole epoch when it is shorter, are
    cut once and staged on the device; next() hands out views of them in order and wraps around,
    so a step copies nothing and a host running ahead of the GPU overwrites no buffer in use."""

    def __init__(self, pattern, B, T, vocab_size, device, force_random, seed, n_batches=None):
        self.B, self.T, self.k = B, T, 0
        files = sorted(glob.glob(pattern)) if pattern and not force_random else []
        if files:
            parts = []
            for path in files:
                header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
                if header.size < SHARD_HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
                    sys.exit(f"{path}: not an llm.c token shard (magic {SHARD_MAGIC}, version {SHARD_VERSION})")
                toks = np.memmap(path, dtype=np.uint16, mode="r", offset=SHARD_HEADER_INTS * 4)
                if toks.size != int(header[2]):
                    sys.exit(f"{path}: header says {int(header[2])} tokens, file holds {toks.size}")
                parts.append(np.asarray(toks))
            stream = np.concatenate(parts).astype(np.int64)
            if stream.size and int(stream.max()) >= vocab_size:
                sys.exit(f"{pattern}: token {int(stream.max())} is out of range for vocab_size {vocab_size}")
            self.source = f"shards {pattern} ({len(files)} file(s), {stream.size} tokens)"
        else:
            # Enough random tokens for a few distinct batches, cycled.
            why = "--random-data" if force_random else f"no file matches '{pattern}'"
            gen = np.random.default_rng(seed)
            stream = gen.integers(0, vocab_size, size=4 * B * T + 1, dtype=np.int64)
            self.source = f"random tokens ({why})"
        self.per_epoch = ((stream.size - 1) // T) // B
        if self.per_epoch == 0:
            sys.exit(f"{self.source}: fewer than {B} sequences of {T}+1 tokens")
        self.n = min(self.per_epoch, n_batches if n_batches else 64)
        x = np.empty((self.n, B * T), dtype=np.int64)
        y = np.empty((self.n, B * T), dtype=np.int64)
        for k in range(self.n):
            start = k * B * T
            x[k] = stream[start : start + B * T]
            y[k] = stream[start + 1 : start + B * T + 1]
        self.x = torch.from_numpy(x).view(self.n, B, T).to(device)
        self.y = torch.from_numpy(y).view(self.n, B, T).to(device)

    def next(self):
        k = self.k % self.n
        self.k += 1
        return self.x[k], self.y[k]


# ---- training

def lr_at(tc, step):
    lr, min_lr, warm, steps = tc["lr"], tc["min_lr"], tc["warmup_steps"], tc["steps"]
    if step < warm:
        return lr * (step + 1) / warm
    p = min(1.0, (step - warm) / max(steps - warm, 1))
    if tc["schedule"] == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * p))
    if tc["schedule"] == "linear":
        return lr - (lr - min_lr) * p
    return lr


def make_optimizer(model, tc, cuda):
    """AdamW with the train keys' lr, betas and eps, weight decay on the 2-D tensors only, fused on a
    GPU where torch has it: returns (optimizer, fused)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": float(tc["weight_decay"])},
              {"params": no_decay, "weight_decay": 0.0}]
    opt_kw = {"lr": float(tc["lr"]), "betas": (float(tc["beta1"]), float(tc["beta2"])), "eps": float(tc["eps"])}
    fused = cuda and "fused" in torch.optim.AdamW.__init__.__code__.co_varnames
    if fused:
        opt_kw["fused"] = True
    return torch.optim.AdamW(groups, **opt_kw), fused


def make_clip(cuda):
    """Global-norm clipping, one multi-tensor norm and scale on a GPU (the argument exists from
    torch 2.0): returns (clip(params, max_norm) -> norm, foreach)."""
    foreach = cuda and "foreach" in inspect.signature(torch.nn.utils.clip_grad_norm_).parameters

    def clip(ps, max_norm):
        if foreach:
            return torch.nn.utils.clip_grad_norm_(ps, max_norm, foreach=True)
        return torch.nn.utils.clip_grad_norm_(ps, max_norm)

    return clip, foreach


def add_common_args(ap):
    """The options this script shares with torch_tp_bench.py (config, overrides, batch, steps)."""
    ap.add_argument("config", nargs="?", default="configs/gpt2-124m.yaml", help="tptrain config file")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one config key (repeatable), as tptrain's --set")
    ap.add_argument("--batch", type=int, help="micro_batch (same as --set train.micro_batch=N)")
    ap.add_argument("--steps", type=int, help="steps in all, skipped ones included (train.steps)")
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of the statistics (default 5)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                    help="bf16 autocast (default) or plain fp32")


def resolve_config(args):
    """The config with the overrides applied, checked for a timed single-micro-step run: returns
    (cfg, model keys, train keys), warmup_steps clamped to the steps."""
    cfg = read_config(args.config)
    for s in args.set:
        apply_set(cfg, s)
    if args.batch is not None:
        apply_set(cfg, f"train.micro_batch={args.batch}")
    if args.steps is not None:
        apply_set(cfg, f"train.steps={args.steps}")
    mc = {k: get(cfg, "model", k) for k in DEFAULTS["model"]}
    tc = {k: get(cfg, "train", k) for k in DEFAULTS["train"]}
    B, T, steps = int(tc["micro_batch"]), int(mc["seq_len"]), int(tc["steps"])
    accum = int(tc["grad_accum"]) or (int(tc["global_batch"]) // (B * T) if tc["global_batch"] else 1)
    if accum != 1:
        sys.exit(f"grad_accum {accum}: this benchmark times single micro-step optimizer steps; "
                 "set train.grad_accum=1 (or train.global_batch=0)")
    if steps <= args.skip:
        sys.exit(f"train.steps={steps} must exceed --skip {args.skip}")
    if tc["warmup_steps"] > steps:
        tc["warmup_steps"] = steps
    return cfg, mc, tc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="torch.compile(model): auto = on with CUDA")
    ap.add_argument("--compile-mode", default="default",
                    choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                    help="torch.compile's mode (default: torch's default)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--random-data", action="store_true", help="random tokens instead of data.train")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="peak for MFU (default: log.peak_tflops, else 989 bf16 / 67 fp32 on a GPU)")
    ap.add_argument("--json", help="also write the result line to this file")
    args = ap.parse_args()

    cfg, mc, tc = resolve_config(args)
    B, T, steps = int(tc["micro_batch"]), int(mc["seq_len"]), int(tc["steps"])

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    cuda = device.type == "cuda"
    use_compile = args.compile == "on" or (args.compile == "auto" and cuda)
    if use_compile and not hasattr(torch, "compile"):
        sys.exit(f"torch {torch.__version__} has no torch.compile; use --compile off")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")

    torch.manual_seed(int(tc["seed"]))
    model = GPT(int(mc["n_layer"]), int(mc["n_head"]), int(mc["n_embd"]), int(mc["vocab_size"]), T).to(device)
    optimizer, fused = make_optimizer(model, tc, cuda)
    compile_kw = {} if args.compile_mode == "default" else {"mode": args.compile_mode}
    step_model = torch.compile(model, **compile_kw) if use_compile else model
    data = Batches(str(get(cfg, "data", "train")), B, T, int(mc["vocab_size"]), device,
                   args.random_data, int(tc["seed"]), n_batches=steps)
    bf16 = args.precision == "bf16"
    clip_max = float(tc["grad_clip"])
    params = list(model.parameters())
    clip, foreach = make_clip(cuda)

    peak = args.peak_tflops or float(get(cfg, "log", "peak_tflops")) or (
        (989.0 if bf16 else 67.0) if cuda else 0.0)
    n_flop_params = model.flop_params()
    flops_per_token = 6.0 * n_flop_params + 6.0 * mc["n_layer"] * mc["n_embd"] * T
    print(f"# torch {torch.__version__} on {torch.cuda.get_device_name(device) if cuda else 'cpu'} | "
          f"{mc['n_layer']} layers, {mc['n_head']} heads, width {mc['n_embd']}, vocab {mc['vocab_size']} "
          f"(padded {model.padded_vocab}), seq {T} | {n_flop_params / 1e6:.2f}M parameters | B={B} | "
          f"{args.precision}{' autocast' if bf16 else ''}, compile "
          f"{('on (' + args.compile_mode + ')') if use_compile else 'off'}, AdamW {'fused' if fused else 'unfused'}, "
          f"clipping {'foreach' if foreach else 'per tensor'} | data: {data.source}", file=sys.stderr, flush=True)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    # Step k ends where events[k + 1] is recorded; no host synchronisation inside the loop but the
    # one after the first step (its host time is the compilation).
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if cuda else []
    host_ends = []
    losses_dev, norms_dev, lrs = [], [], []
    sync()
    t_first = time.perf_counter()
    if cuda:
        events[0].record()
    for step in range(steps):
        lr = lr_at(tc, step)
        lrs.append(lr)
        for g in optimizer.param_groups:
            g["lr"] = lr
        idx, tgt = data.next()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = step_model(idx, tgt)
        loss.backward()
        norm = clip(params, clip_max) if clip_max > 0 else None
        optimizer.step()
        losses_dev.append(loss.detach())
        norms_dev.append(norm.detach() if norm is not None else None)
        if cuda:
            events[step + 1].record()
        else:
            host_ends.append(time.perf_counter())
        if step == 0:
            sync()
            first_ms = 1e3 * (time.perf_counter() - t_first)
            print(f"step    1/{steps} | loss {losses_dev[0].item():.6f} | {first_ms:.1f} ms (compilation)",
                  file=sys.stderr, flush=True)
    sync()
    if cuda:
        ms = [events[k].elapsed_time(events[k + 1]) for k in range(steps)]
    else:
        ms = [1e3 * (host_ends[k] - (host_ends[k - 1] if k else t_first)) for k in range(steps)]
    ms[0] = first_ms
    losses = [float(v) for v in losses_dev]
    for step in range(steps):
        if step == 0 or (step + 1) % 10 == 0 or step + 1 == steps:
            norm = norms_dev[step]
            print(f"step {step + 1:4d}/{steps} | loss {losses[step]:.6f} | lr {lrs[step]:.3e} | "
                  f"norm {float(norm) if norm is not None else float('nan'):.4f} | {ms[step]:.1f} ms",
                  file=sys.stderr, flush=True)
    for step, loss_value in enumerate(losses):
        if not math.isfinite(loss_value):
            sys.exit(f"step {step + 1}: loss is {loss_value}")

    timed = ms[args.skip:]
    med = statistics.median(timed)
    tok_s = B * T / (med / 1e3)
    result = {
        "tool": "pytorch", "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "config": args.config, "B": B, "T": T, "steps": steps, "skip": args.skip,
        "n_layer": mc["n_layer"], "n_head": mc["n_head"], "n_embd": mc["n_embd"],
        "vocab_size": mc["vocab_size"], "padded_vocab": model.padded_vocab,
        "params": n_flop_params, "flops_per_token": flops_per_token,
        "precision": args.precision, "compile": use_compile,
        "compile_mode": args.compile_mode if use_compile else None, "fused_adamw": fused,
        "foreach_clip": foreach, "timing": "cuda events, no host sync in the loop" if cuda else "host clock",
        "attention": "sdpa" if hasattr(F, "scaled_dot_product_attention") else "manual",
        "data": data.source,
        "step_ms_median": round(med, 3), "step_ms_mean": round(statistics.mean(timed), 3),
        "step_ms_min": round(min(timed), 3), "step_ms_first": round(ms[0], 3),
        "tok_per_s": round(tok_s, 1),
        "peak_tflops": peak,
        "mfu": round(tok_s * flops_per_token / (peak * 1e12), 5) if peak > 0 else None,
        "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if cuda else None,
        "max_memory_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3) if cuda else None,
        "loss_first": losses[0], "loss_last": losses[-1],
    }
    line = json.dumps(result)
    print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
