#!/usr/bin/env python3
"""activation_memory.py: per-layer activation bytes per rank, measured, against docs/memory.md.

For each TP size, sequence parallelism off and on, and each recompute mode, trains the model for
one step with two layer counts (--layers A,B) and reads the run's memory record (logged after step
1): the backend's measured peak. One layer's activations per rank are then

    (peak(B) - peak(A) - what the plan's parameters, gradients, AdamW state and tokens differ by) / (B - A)

printed beside the per-layer formula of docs/memory.md and the plan's own figure, with the ratio to
tp=1 without sequence parallelism. With a CUDA build (--device cuda) it also prints the whole
device's growth per layer (cudaMemGetInfo), which includes what the backend does not allocate
itself. Synthetic tokens (a shard written to a temporary directory), so any vocabulary works.

  python3 tools/activation_memory.py                          # GPT-2 124M's layer shape on the CPU
  python3 tools/activation_memory.py --device cuda --set train.precision=bf16 --set train.micro_batch=4

Options: --tptrain PATH (default build/tptrain), --mpiexec PATH (default mpiexec), --tp 1,2,4,
--layers 2,4, --recompute none,selective,full, --sp 0,1, --device cpu|cuda, --set KEY=VALUE
(repeatable; applied to every run). The model defaults to n_embd 768, 12 heads, seq_len 1024,
micro_batch 1, vocabulary 1024. Exits 1 when a measured figure is more than 10% off the formula.
"""
import argparse
import json
import os
import re
import struct
import subprocess
import sys
import tempfile

DEFAULTS = ["model.n_embd=768", "model.n_head=12", "model.seq_len=1024", "model.vocab_size=1024",
            "train.micro_batch=1", "train.grad_accum=1", "train.steps=1", "train.warmup_steps=0",
            "data.val=\"\"", "eval.every=0", "log.every=1"]


def write_shard(path, n_tokens, vocab):
    """An llm.c token shard: 256 int32 header (magic, version, count), then uint16 tokens."""
    header = [20240520, 1, n_tokens] + [0] * 253
    x = 0x2545F4914F6CDD1D
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", *header))
        toks = []
        for _ in range(n_tokens):
            x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
            toks.append((x >> 33) % vocab)
        f.write(struct.pack("<%dH" % n_tokens, *toks))


def resolved_config(args, sets):
    """The config --dry-run resolves, as {section: {key: text}}."""
    out = subprocess.run([args.tptrain, "--dry-run"] + sum([["--set", s] for s in sets], []),
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit("tptrain --dry-run failed:\n" + out.stderr)
    cfg, section = {}, None
    for line in out.stdout.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^(\w+):$", line)
        if m:
            section = cfg.setdefault(m.group(1), {})
            continue
        m = re.match(r"^  (\w+): (.*)$", line)
        if m and section is not None:
            section[m.group(1)] = m.group(2)
    return cfg


def formula(cfg, tp, sp, recompute, device):
    """Bytes one layer keeps per rank, as docs/memory.md writes them."""
    m, t = cfg["model"], cfg["train"]
    s, b, h, a = int(m["seq_len"]), int(t["micro_batch"]), int(m["n_embd"]), int(m["n_head"])
    bf16 = t["precision"] == "bf16"
    e = 2 if bf16 else 4
    sb = s * b
    r = sb / tp if sp else sb  # token rows of the sequence-parallel regions
    ln = r * h * e + 8 * r     # output and two fp32 statistics
    res = r * h * e
    qkv, atty, fc = 3 * sb * h / tp * e, sb * h / tp * e, 4 * sb * h / tp * e
    hs = h // a
    flash = device == "cuda" and bf16 and hs % 8 == 0 and hs <= 256
    saved = 4 * b * (a / tp) * s * (1 if flash else s)  # log-sum-exp, or the (T, T) probabilities
    if recompute == "full":
        return res
    if recompute == "selective":
        return 2 * ln + qkv + 2 * res + fc
    return 2 * ln + qkv + atty + saved + 2 * res + 2 * fc


def memory_record(args, np_, sets, tmp, tag):
    log = os.path.join(tmp, tag + ".jsonl")
    cmd = [args.tptrain] + sum([["--set", s] for s in sets + ["log.jsonl=" + log]], [])
    if np_ > 1:
        cmd = [args.mpiexec, "-np", str(np_)] + cmd
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), NCCL_NVLS_ENABLE="0")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit("run failed (%s):\n%s%s" % (" ".join(cmd), out.stdout[-3000:], out.stderr[-3000:]))
    with open(log) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") == "memory":
                return rec
    sys.exit("no memory record in " + log)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tptrain", default="build/tptrain")
    ap.add_argument("--mpiexec", default="mpiexec")
    ap.add_argument("--tp", default="1,2,4")
    ap.add_argument("--layers", default="2,4")
    ap.add_argument("--recompute", default="none,selective,full")
    ap.add_argument("--sp", default="0,1")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    la, lb = (int(x) for x in args.layers.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        base = DEFAULTS + ["parallel.device=" + args.device] + args.set
        cfg = resolved_config(args, base)
        shard = os.path.join(tmp, "train.bin")
        write_shard(shard, 4 * int(cfg["model"]["seq_len"]) * int(cfg["train"]["micro_batch"]) + 16,
                    int(cfg["model"]["vocab_size"]))
        base = base + ["data.train=" + shard]
        MiB = 1024.0 * 1024.0
        print("# %s, %s: n_embd %s, n_head %s, seq_len %s, micro_batch %s; one layer per rank, MiB" % (
            args.device, cfg["train"]["precision"], cfg["model"]["n_embd"], cfg["model"]["n_head"],
            cfg["model"]["seq_len"], cfg["train"]["micro_batch"]))
        print("%-10s %3s %3s %12s %12s %12s %8s %10s %14s" % ("recompute", "tp", "sp", "measured", "formula", "plan",
                                                             "diff", "vs tp=1", "device/layer"))
        worst = 0.0
        for rc in args.recompute.split(","):
            ref = None
            for sp in (int(x) for x in args.sp.split(",")):
                for tp in (int(x) for x in args.tp.split(",")):
                    sets = base + ["parallel.tp=%d" % tp, "parallel.sequence_parallel=%s" % ("true" if sp else "false"),
                                   "train.recompute=" + rc]
                    recs = [memory_record(args, tp, sets + ["model.n_layer=%d" % n], tmp, "%s-%d-%d-%d" % (rc, sp, tp, n))
                            for n in (la, lb)]
                    other = [r["plan_bytes"] - r["plan_activations_bytes"] for r in recs]
                    measured = ((recs[1]["peak_bytes"] - recs[0]["peak_bytes"]) - (other[1] - other[0])) / (lb - la)
                    plan = (recs[1]["plan_activations_bytes"] - recs[0]["plan_activations_bytes"]) / (lb - la)
                    dev = (recs[1]["device_used_bytes"] - recs[0]["device_used_bytes"] - (other[1] - other[0])) / (lb - la)
                    f = formula(cfg, tp, sp, rc, args.device)
                    if ref is None and tp == 1 and not sp:
                        ref = measured
                    diff = (measured - f) / f
                    worst = max(worst, abs(diff))
                    print("%-10s %3d %3d %12.3f %12.3f %12.3f %+7.2f%% %10s %14s" % (
                        rc, tp, sp, measured / MiB, f / MiB, plan / MiB, 100 * diff,
                        "%.3f" % (measured / ref) if ref else "-",
                        "%.3f" % (dev / MiB) if args.device == "cuda" else "-"))
                    sys.stdout.flush()
        print("# largest difference from the formula: %.2f%%" % (100 * worst))
        return 1 if worst > 0.10 else 0


if __name__ == "__main__":
    sys.exit(main())
