#!/usr/bin/env python3
"""torch_reference.py: the PyTorch reference that tptrain's parity tests compare against.

It builds GPT-2 exactly as tptrain does (tied wte / LM head, learned positions, pre-LN blocks,
causal self-attention scaled by 1/sqrt(head_dim), GELU tanh approximation, layernorm eps 1e-5),
starts from the initial weights tptrain wrote (a .safetensors file under the Hugging Face GPT-2
names, Conv1D weights stored (in, out)), reads the same llm.c token shards in the same order, and
trains with the same LR schedule, global-norm clipping and a hand-written AdamW. By default it
computes in float64 so that the reference itself carries no rounding worth mentioning.

Needs only torch (1.13 or 2.x) and numpy; safetensors files are read and written with json and
struct, so the `safetensors` package is not required.

Example:
  /usr/bin/python3 tools/torch_reference.py --init init.safetensors \\
      --data data/tinyshakespeare_train.bin --n-layer 2 --n-head 4 --n-embd 64 \\
      --vocab-size 50257 --seq-len 64 --micro-batch 4 --grad-accum 2 --steps 5 \\
      --lr 6e-4 --min-lr 6e-5 --warmup-steps 2 --schedule cosine --weight-decay 0.1 \\
      --beta1 0.9 --beta2 0.95 --eps 1e-8 --grad-clip 1.0 --out ref.json

Data order (tptrain's data module, one DP rank): sequence i is tokens [i*T, i*T + T] (inputs are
the first T, targets the last T); micro-batch k holds sequences k*B .. k*B+B-1, with k taken
modulo the micro-batches per epoch; optimizer step s uses micro-batches s*A .. s*A+A-1. With
--dp-size D the step instead averages the A*D micro-batches that D DP ranks would read.
"""
import argparse
import glob
import json
import math
import os
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256


def die(msg):
    print(f"torch_reference.py: {msg}", file=sys.stderr)
    sys.exit(2)


# ---- safetensors (json + struct)

_ST_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path):
    """Returns ({name: np.ndarray} in header order, metadata dict). BF16 is widened to float32."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        die(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        die(f"{path}: header length {n} exceeds the file")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        die(f"{path}: malformed header: {e}")
    data = memoryview(blob)[8 + n:]
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for name, info in header.items():
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if end > len(data) or begin > end:
            die(f"{path}: tensor '{name}': data_offsets [{begin}, {end}] outside the data area")
        raw = data[begin:end]
        if dtype == "BF16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype in _ST_NUMPY:
            arr = np.frombuffer(raw, dtype=np.dtype(_ST_NUMPY[dtype]).newbyteorder("<"))
        else:
            die(f"{path}: tensor '{name}': unsupported dtype {dtype}")
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            die(f"{path}: tensor '{name}': {end - begin} bytes do not match {dtype} shape {shape}")
        out[name] = arr.reshape(shape)
    return out, meta


def write_safetensors(path, tensors, metadata=None):
    """Writes {name: np.ndarray} as F32 (float arrays) in the given order."""
    header, offset, chunks = {}, 0, []
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        chunks.append(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for c in chunks:
            f.write(c)
    os.replace(tmp, path)


# ---- token shards (llm.c format)

def load_tokens(pattern):
    paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    if not paths:
        die(f"--data {pattern}: no file matches")
    parts = []
    for p in paths:
        with open(p, "rb") as f:
            head = np.frombuffer(f.read(SHARD_HEADER_INTS * 4), dtype="<i4")
            if head.size != SHARD_HEADER_INTS or head[0] != SHARD_MAGIC or head[1] != SHARD_VERSION:
                die(f"{p}: not an llm.c token shard (magic {SHARD_MAGIC}, version {SHARD_VERSION})")
            count = int(head[2])
            toks = np.frombuffer(f.read(count * 2), dtype="<u2")
            if toks.size != count:
                die(f"{p}: header promises {count} tokens, file holds {toks.size}")
        parts.append(toks)
    return np.concatenate(parts).astype(np.int64)


class Batches:
    """Micro-batches in tptrain's order (see the module docstring)."""

    def __init__(self, tokens, B, T, dp_size, vocab_size):
        if tokens.size < T + 1:
            die(f"token stream of {tokens.size} tokens is shorter than seq_len + 1 = {T + 1}")
        if int(tokens.max()) >= vocab_size:
            die(f"token {int(tokens.max())} is out of range for vocab size {vocab_size}")
        self.tokens, self.B, self.T, self.D = tokens, B, T, dp_size
        self.n_seqs = (tokens.size - 1) // T
        self.per_epoch = self.n_seqs // (B * dp_size)
        if self.per_epoch == 0:
            die(f"only {self.n_seqs} sequences; one micro-batch on {dp_size} rank(s) needs {B * dp_size}")

    def get(self, position, dp_rank):
        """Inputs and targets (B, T) of micro-batch `position` on DP rank `dp_rank`."""
        k = position % self.per_epoch
        first = (k * self.D + dp_rank) * self.B
        T = self.T
        rows = [self.tokens[(first + j) * T:(first + j) * T + T + 1] for j in range(self.B)]
        seq = torch.from_numpy(np.stack(rows))
        return seq[:, :T], seq[:, 1:]


# ---- model

def param_names(n_layer):
    names = ["wte.weight", "wpe.weight"]
    for l in range(n_layer):
        p = f"h.{l}."
        names += [p + "ln_1.weight", p + "ln_1.bias", p + "attn.c_attn.weight", p + "attn.c_attn.bias",
                  p + "attn.c_proj.weight", p + "attn.c_proj.bias", p + "ln_2.weight", p + "ln_2.bias",
                  p + "mlp.c_fc.weight", p + "mlp.c_fc.bias", p + "mlp.c_proj.weight", p + "mlp.c_proj.bias"]
    return names + ["ln_f.weight", "ln_f.bias"]


def expected_shapes(a):
    C, V = a.n_embd, a.vocab_size
    shapes = {"wte.weight": (V, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for l in range(a.n_layer):
        p = f"h.{l}."
        shapes.update({
            p + "ln_1.weight": (C,), p + "ln_1.bias": (C,), p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
            p + "attn.c_attn.weight": (C, 3 * C), p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
            p + "mlp.c_fc.weight": (C, 4 * C), p + "mlp.c_fc.bias": (4 * C,),
            p + "mlp.c_proj.weight": (4 * C, C), p + "mlp.c_proj.bias": (C,),
        })
    return shapes


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def forward(P, idx, targets, a):
    """Mean token cross-entropy of GPT-2 with parameters P on idx (B, T)."""
    B, T = idx.shape
    C, H = a.n_embd, a.n_head
    hs = C // H
    x = P["wte.weight"][idx] + P["wpe.weight"][:T]                          # (B, T, C)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for l in range(a.n_layer):
        p = f"h.{l}."
        h = F.layer_norm(x, (C,), P[p + "ln_1.weight"], P[p + "ln_1.bias"], 1e-5)
        qkv = h @ P[p + "attn.c_attn.weight"] + P[p + "attn.c_attn.bias"]   # (B, T, 3C): [q | k | v]
        q, k, v = qkv.split(C, dim=2)
        q = q.view(B, T, H, hs).transpose(1, 2)                              # (B, H, T, hs)
        k = k.view(B, T, H, hs).transpose(1, 2)
        v = v.view(B, T, H, hs).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))             # (B, H, T, T)
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + (y @ P[p + "attn.c_proj.weight"] + P[p + "attn.c_proj.bias"])
        h = F.layer_norm(x, (C,), P[p + "ln_2.weight"], P[p + "ln_2.bias"], 1e-5)
        h = gelu_tanh(h @ P[p + "mlp.c_fc.weight"] + P[p + "mlp.c_fc.bias"])  # (B, T, 4C)
        x = x + (h @ P[p + "mlp.c_proj.weight"] + P[p + "mlp.c_proj.bias"])
    x = F.layer_norm(x, (C,), P["ln_f.weight"], P["ln_f.bias"], 1e-5)
    logits = x @ P["wte.weight"].t()                                        # (B, T, V), tied head
    return F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T))


# ---- optimisation

def lr_at(s, a):
    if s < a.warmup_steps:
        return a.lr * (s + 1) / a.warmup_steps
    p = (s - a.warmup_steps) / max(1, a.steps - a.warmup_steps)
    if a.schedule == "cosine":
        return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1.0 + math.cos(math.pi * p))
    if a.schedule == "linear":
        return a.lr - (a.lr - a.min_lr) * p
    return a.lr


def decays(name):
    """Weight decay applies to the 2-D weights only (embeddings and linear weights)."""
    return name in ("wte.weight", "wpe.weight") or name.endswith(
        ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))


def adamw_(p, g, m, v, t, lr, a, wd):
    """One AdamW update in place (t is 1-based)."""
    m.mul_(a.beta1).add_(g, alpha=1.0 - a.beta1)
    v.mul_(a.beta2).add_(g * g, alpha=1.0 - a.beta2)
    mhat = m / (1.0 - a.beta1 ** t)
    vhat = v / (1.0 - a.beta2 ** t)
    p.sub_(lr * (mhat / (vhat.sqrt() + a.eps) + wd * p))


# ---- main

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", required=True, help="initial weights (.safetensors, or a checkpoint dir)")
    ap.add_argument("--data", required=True, help="token shard, or a glob of shards (sorted)")
    ap.add_argument("--n-layer", type=int, required=True)
    ap.add_argument("--n-head", type=int, required=True)
    ap.add_argument("--n-embd", type=int, required=True)
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--seq-len", type=int, required=True, help="T")
    ap.add_argument("--micro-batch", type=int, required=True, help="B, sequences per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=1, help="A, micro-batches per step")
    ap.add_argument("--dp-size", type=int, default=1,
                    help="D: reproduce a run on D DP ranks (each step averages A*D micro-batches)")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--min-lr", type=float, default=0.0)
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--grad-clip", type=float, default=1.0, help="global L2 norm clip; 0 disables")
    ap.add_argument("--out", required=True, help="JSON results")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--save", help="also write the final weights here (.safetensors, F32)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    a = ap.parse_args(argv)
    for key in ("n_layer", "n_head", "n_embd", "vocab_size", "seq_len", "micro_batch", "grad_accum",
                "dp_size", "steps"):
        if getattr(a, key) <= 0:
            die(f"--{key.replace('_', '-')} must be positive, got {getattr(a, key)}")
    if a.n_embd % a.n_head:
        die(f"--n-embd {a.n_embd} is not divisible by --n-head {a.n_head}")
    if a.warmup_steps < 0:
        die("--warmup-steps must be >= 0")
    return a


def load_params(a, dtype):
    path = os.path.join(a.init, "model.safetensors") if os.path.isdir(a.init) else a.init
    arrays, _ = read_safetensors(path)
    shapes = expected_shapes(a)
    P = {}
    for name in param_names(a.n_layer):
        if name == "wpe.weight":
            arr = arrays.get(name)
            if arr is None or arr.ndim != 2 or arr.shape[0] < a.seq_len or arr.shape[1] != a.n_embd:
                die(f"{path}: wpe.weight must be ({a.seq_len}, {a.n_embd}), found "
                    f"{None if arr is None else tuple(arr.shape)}")
        else:
            arr = arrays.get(name)
            if arr is None:
                die(f"{path}: tensor '{name}' is missing")
            if tuple(arr.shape) != shapes[name]:
                die(f"{path}: tensor '{name}' has shape {tuple(arr.shape)}, expected {shapes[name]}")
        P[name] = torch.from_numpy(np.array(arr, dtype=np.float64)).to(dtype).requires_grad_(True)
    extra = [n for n in arrays if n not in P]
    if extra:
        print(f"note: ignoring {len(extra)} tensor(s) not in the model: {', '.join(extra[:5])}"
              f"{' ...' if len(extra) > 5 else ''}")
    return P, path


def main(argv):
    a = parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    dtype = torch.float64 if a.dtype == "float64" else torch.float32
    P, init_path = load_params(a, dtype)
    batches = Batches(load_tokens(a.data), a.micro_batch, a.seq_len, a.dp_size, a.vocab_size)
    names = list(P.keys())
    m = {n: torch.zeros_like(P[n], requires_grad=False) for n in names}
    v = {n: torch.zeros_like(P[n], requires_grad=False) for n in names}
    n_params = sum(p.numel() for p in P.values())
    print(f"reference: {n_params} parameters, {a.dtype}, init {init_path}, torch {torch.__version__}")

    losses, norms, lrs, grad_norms_step0 = [], [], [], {}
    micro = a.grad_accum * a.dp_size
    for s in range(a.steps):
        t0 = time.time()
        for p in P.values():
            p.grad = None
        loss_sum = 0.0
        for i in range(a.grad_accum):
            for d in range(a.dp_size):
                x, y = batches.get(s * a.grad_accum + i, d)
                loss = forward(P, x, y, a)
                (loss / micro).backward()
                loss_sum += loss.item()
        step_loss = loss_sum / micro
        with torch.no_grad():
            sq = {n: float((P[n].grad.double() ** 2).sum()) for n in names}
            norm = math.sqrt(sum(sq.values()))
            if s == 0:
                grad_norms_step0 = {n: math.sqrt(sq[n]) for n in names}
            scale = a.grad_clip / norm if a.grad_clip > 0 and norm > a.grad_clip else 1.0
            lr = lr_at(s, a)
            for n in names:
                g = P[n].grad * scale
                adamw_(P[n], g, m[n], v[n], s + 1, lr, a, a.weight_decay if decays(n) else 0.0)
        losses.append(step_loss)
        norms.append(norm)
        lrs.append(lr)
        print(f"step {s + 1:4d}/{a.steps} | loss {step_loss:.6f} | lr {lr:.4e} | norm {norm:.4f} "
              f"| {1000 * (time.time() - t0):.0f} ms", flush=True)

    result = {
        "args": vars(a),
        "torch": torch.__version__,
        "losses": losses,
        "grad_norm": norms,
        "lr": lrs,
        "grad_norms_step0": grad_norms_step0,
        "param_norms_final": {n: float(P[n].detach().double().norm()) for n in names},
    }
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, a.out)
    if a.save:
        write_safetensors(a.save, {n: P[n].detach().double().numpy() for n in names},
                          {"format": "pt", "source": "torch_reference.py", "steps": str(a.steps)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
