#!/usr/bin/env python3
"""fuzz.py: mutation fuzzing of tptrain's inputs against a sanitizer build (Python standard library only).

    python3 tests/fuzz/fuzz.py --tptrain build-asan/tptrain [--seconds 180] [--seed 1] [--out DIR]

Four categories, each given an equal share of the time: config files (--dry-run FILE), command lines,
checkpoints (--eval of a mutated copy: state.json, config.yaml, the safetensors headers and bodies) and
token shards (one training step on a mutated shard). Seeds: tests/fuzz/corpus/ (configs, command lines);
the checkpoint and the shard are made at the start from a small model and data/tinyshakespeare_val.bin.

Every input must end in exit 0 or 2 within the time limit, with no sanitizer report. Anything else (a
signal, another exit code, a timeout, "AddressSanitizer" / "runtime error:" in the output) is a failure:
the input is saved under --out with the command that reproduces it, and the script exits 1. The last
lines say how many inputs each category tried and how many crashes, hangs and reports it saw.
"""
import argparse
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# a small model so that a step or an --eval takes well under a second even with sanitizers
SMALL = ["--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=16",
         "--set", "model.vocab_size=512", "--set", "model.seq_len=16", "--set", "train.micro_batch=2",
         "--set", "train.warmup_steps=0", "--set", "parallel.device=cpu", "--set", "eval.batches=1"]
INTERESTING = ["", "0", "-1", "1", "2", "3", "7", "2147483647", "2147483648", "-2147483649",
               "4294967296", "9223372036854775808", "1e309", "-1e309", "nan", "inf", "-inf", "0x7fffffff",
               "1.5", "true", "null", "~", "[", "{", "]", "'", '"', "&a", "*a", "!!str", "---", "...", "#",
               "=", "--set", "x=y", "model.n_head=0", "A" * 3000, "\u00e9", "\udcff"]


class Verdict:
    def __init__(self):
        self.tried = 0
        self.crashes = 0
        self.hangs = 0
        self.reports = 0
        self.bad_exit = 0


def run(args, timeout, env, cwd=ROOT):
    """(exit code or None on timeout, combined output)"""
    try:
        p = subprocess.run(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout)
        return p.returncode, p.stdout.decode("utf-8", "replace")
    except subprocess.TimeoutExpired as e:
        return None, (e.stdout or b"").decode("utf-8", "replace")


def judge(cat, verdict, rc, out, args, saved, outdir, files=()):
    """Counts the run; on a failure keeps the input and returns False."""
    verdict.tried += 1
    report = "AddressSanitizer" in out or "runtime error:" in out or "LeakSanitizer" in out \
        or rc in (86, 87)
    if rc is None:
        kind = "hang"
        verdict.hangs += 1
    elif report:
        kind = "sanitizer report"
        verdict.reports += 1
    elif rc < 0 or rc >= 128:
        kind = "crash (signal %d)" % (-rc if rc < 0 else rc - 128)
        verdict.crashes += 1
    elif rc not in (0, 2):
        kind = "exit %d" % rc
        verdict.bad_exit += 1
    else:
        return True
    case = os.path.join(outdir, "%s-%d" % (cat, verdict.tried))
    os.makedirs(case, exist_ok=True)
    for f in files:
        dst = os.path.join(case, os.path.basename(f.rstrip("/")))
        if os.path.isdir(f):
            shutil.copytree(f, dst, dirs_exist_ok=True)
        elif os.path.exists(f):
            shutil.copy(f, dst)
    with open(os.path.join(case, "command.txt"), "w") as fh:
        fh.write(" ".join(repr(a) for a in args) + "\n")
    with open(os.path.join(case, "output.txt"), "w") as fh:
        fh.write(out)
    print("fuzz: %s: %s on %s (kept in %s)\n%s" % (cat, kind, saved, case, out[-2000:]), file=sys.stderr)
    return False


# ---- mutations

def mutate_bytes(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if not data:
            data += bytes([rng.randrange(256)])
            continue
        i = rng.randrange(len(data))
        if op == 0:
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[i] = rng.choice([0, 0xFF, 0x7F, 0x80, ord("9"), ord("-"), ord("["), ord(":"), ord("\n")])
        elif op == 2:
            del data[i:i + rng.randint(1, 16)]
        elif op == 3:
            data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 4:  # duplicate a slice (repetition finds nesting and length bugs)
            j = rng.randrange(len(data))
            a, b = min(i, j), max(i, j)
            data[i:i] = data[a:b + 1][:4096]
        else:  # an interesting token where a number was
            k = i
            while k > 0 and chr(data[k - 1]).isalnum():
                k -= 1
            e = i
            while e < len(data) and chr(data[e]).isalnum():
                e += 1
            data[k:e] = rng.choice(INTERESTING).encode("utf-8", "surrogatepass")
    return bytes(data)


def mutate_args(rng, args):
    args = list(args)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(5)
        if op == 0 and args:
            del args[rng.randrange(len(args))]
        elif op == 1 and args:
            i = rng.randrange(len(args))
            args.insert(i, args[rng.randrange(len(args))])
        elif op == 2 and args:
            args[rng.randrange(len(args))] = rng.choice(INTERESTING)
        elif op == 3 and args:
            i = rng.randrange(len(args))
            args[i] = mutate_bytes(rng, args[i].encode("utf-8", "surrogateescape")).decode("utf-8", "replace")
        else:
            args.insert(rng.randrange(len(args) + 1),
                        rng.choice(["--set", "--dry-run", "--eval", "--bench", "--json", "--data", "--batches",
                                    "--generate", "--temperature", "--top-k", "--seed", "--prompt-tokens",
                                    "--prompt", "--format", "--encode", "--tokenizer", "--help", "-x", "--",
                                    "model.seq_len=8"]))
    return [a.replace("\x00", "") for a in args]


def clamp_work(args):
    """Keeps mutated command lines from asking for long but legitimate work (a timeout there is no hang)."""
    out = list(args)
    for i, a in enumerate(out[:-1]):
        nxt = out[i + 1]
        if a in ("--generate", "--batches") and nxt.isdigit() and 8 < int(nxt) < 2 ** 31:
            out[i + 1] = "8"
    if "layer" in out:  # --bench layer sizes: large but allowed ones are minutes of work, not a hang
        for i, a in enumerate(out):
            if a.isdigit() and 4096 < int(a) < 2 ** 31:
                out[i] = "64"
    # --bench attention with no shape times the H200 reference grid: hours on a CPU, not a hang. A
    # shape elsewhere may be another option's value (--data 1x2x16x8), so one goes right after it.
    if "attention" in out:
        k = out.index("attention") + 1
        if k == len(out) or not (re.fullmatch(r"\d+x\d+x\d+x\d+", out[k]) or out[k].endswith(".yaml")):
            out.insert(k, "1x2x16x8")
    if not {"--eval", "--bench", "--help", "--encode"} & set(out):
        out.append("--dry-run")
    return out


# ---- categories

def fuzz_configs(rng, deadline, exe, env, tmp, outdir, v):
    cdir = os.path.join(ROOT, "tests", "fuzz", "corpus", "configs")
    seeds = [open(os.path.join(cdir, f), "rb").read() for f in sorted(os.listdir(cdir))]
    path = os.path.join(tmp, "fuzz.yaml")
    ok = True
    while time.time() < deadline:
        data = mutate_bytes(rng, rng.choice(seeds))
        with open(path, "wb") as fh:
            fh.write(data)
        args = [exe, "--dry-run", path]
        rc, out = run(args, 20, env)
        ok &= judge("config", v, rc, out, args, path, outdir, [path])
    return ok


def fuzz_cmdlines(rng, deadline, exe, env, ckpt, tmp, outdir, v):
    seeds = [l.split() for l in open(os.path.join(ROOT, "tests", "fuzz", "corpus", "cmdlines", "seeds.txt"))
             if l.strip()]
    # A mutated command line may name any relative path as a file to write (--json configs/tiny.yaml),
    # so these run in a scratch copy of configs/ and data/, never in the source tree.
    work = os.path.join(tmp, "cmdline_cwd")
    for d in ("configs", "data"):
        shutil.copytree(os.path.join(ROOT, d), os.path.join(work, d))
    ok = True
    while time.time() < deadline:
        args = [a.replace("CKPT", ckpt) for a in mutate_args(rng, rng.choice(seeds))]
        args = [exe] + clamp_work(args) + SMALL
        rc, out = run(args, 30, env, cwd=work)
        ok &= judge("cmdline", v, rc, out, args, " ".join(args[1:])[:200], outdir)
    return ok


def fuzz_checkpoints(rng, deadline, exe, env, ckpt, tmp, outdir, v):
    files = ["state.json", "config.yaml", "model.safetensors", "optimizer.safetensors"]
    ok = True
    while time.time() < deadline:
        case = os.path.join(tmp, "ck")
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(ckpt, case)
        name = rng.choice(files)
        p = os.path.join(case, name)
        data = open(p, "rb").read()
        if name.endswith(".safetensors") and rng.random() < 0.7:
            # the header: its length word and its JSON, where the checks live
            n = struct.unpack("<Q", data[:8])[0]
            head = mutate_bytes(rng, data[:8 + n]) if rng.random() < 0.8 else data[:8 + n]
            data = head + (data[8 + n:] if rng.random() < 0.8 else mutate_bytes(rng, data[8 + n:8 + n + 64]))
        else:
            data = mutate_bytes(rng, data)
        with open(p, "wb") as fh:
            fh.write(data)
        args = [exe, "--eval", case, "--batches", "1"]
        rc, out = run(args, 30, env)
        ok &= judge("checkpoint", v, rc, out, args, name, outdir, [case])
    return ok


def fuzz_shards(rng, deadline, exe, env, shard, tmp, outdir, v):
    seed = open(shard, "rb").read()
    path = os.path.join(tmp, "fuzz_shard.bin")
    ok = True
    while time.time() < deadline:
        data = bytearray(seed)
        if rng.random() < 0.6:  # the header: magic, version, token count
            i = rng.randrange(0, 16)
            data[i] ^= 1 << rng.randrange(8)
            if rng.random() < 0.3:
                struct.pack_into("<i", data, 4 * rng.randrange(4), rng.choice([0, -1, 1, 2 ** 31 - 1, 20240520, 7]))
        else:
            data = bytearray(mutate_bytes(rng, bytes(data)))
        with open(path, "wb") as fh:
            fh.write(data)
        args = [exe, "configs/tiny.yaml", "--set", "data.train=" + path, "--set", "data.val=" + path,
                "--set", "train.steps=1"] + SMALL
        rc, out = run(args, 30, env)
        ok &= judge("shard", v, rc, out, args, "shard", outdir, [path])
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tptrain", required=True, help="the sanitizer build's tptrain")
    ap.add_argument("--seconds", type=float, default=180.0, help="total time, split over the categories")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None, help="where failing inputs are kept (default: a temporary folder)")
    a = ap.parse_args()
    exe = os.path.abspath(a.tptrain)
    env = dict(os.environ, OMP_NUM_THREADS="1", TPTRAIN_BENCH_ITERS="1+2",
               ASAN_OPTIONS="exitcode=86:abort_on_error=0:detect_leaks=1:allocator_may_return_null=1",
               UBSAN_OPTIONS="halt_on_error=1:exitcode=87:print_stacktrace=1",
               LSAN_OPTIONS="suppressions=" + os.path.join(ROOT, "tests", "fuzz", "lsan.supp"))
    rng = random.Random(a.seed)
    tmp = tempfile.mkdtemp(prefix="tptrain-fuzz-")
    outdir = a.out or os.path.join(tmp, "failures")
    os.makedirs(outdir, exist_ok=True)

    # seeds made here: a small shard and a checkpoint of the small model
    shard = os.path.join(tmp, "seed_shard.bin")
    with open(os.path.join(ROOT, "data", "tinyshakespeare_val.bin"), "rb") as fh:
        head = bytearray(fh.read(1024))
        body = fh.read(2 * 600)
    struct.pack_into("<i", head, 8, len(body) // 2)
    # the small model's vocabulary is 512: fold the tokens into it
    toks = [t % 512 for t in struct.unpack("<%dH" % (len(body) // 2), body)]
    with open(shard, "wb") as fh:
        fh.write(bytes(head) + struct.pack("<%dH" % len(toks), *toks))
    ckdir = os.path.join(tmp, "seed_ck")
    rc, out = run([exe, "configs/tiny.yaml", "--set", "train.steps=2", "--set", "checkpoint.dir=" + ckdir,
                   "--set", "data.train=" + shard, "--set", "data.val=" + shard] + SMALL, 120, env)
    if rc != 0:
        print("fuzz: could not make the seed checkpoint (exit %s):\n%s" % (rc, out), file=sys.stderr)
        return 1
    ckpt = os.path.join(ckdir, "step_00000002")

    share = a.seconds / 4.0
    verdicts = {c: Verdict() for c in ("config", "cmdline", "checkpoint", "shard")}
    ok = True
    t = time.time()
    ok &= fuzz_configs(rng, t + share, exe, env, tmp, outdir, verdicts["config"])
    ok &= fuzz_cmdlines(rng, time.time() + share, exe, env, ckpt, tmp, outdir, verdicts["cmdline"])
    ok &= fuzz_checkpoints(rng, time.time() + share, exe, env, ckpt, tmp, outdir, verdicts["checkpoint"])
    ok &= fuzz_shards(rng, time.time() + share, exe, env, shard, tmp, outdir, verdicts["shard"])
    print("%-11s %7s %8s %6s %8s %9s" % ("category", "inputs", "crashes", "hangs", "reports", "bad exit"))
    for c, v in verdicts.items():
        print("%-11s %7d %8d %6d %8d %9d" % (c, v.tried, v.crashes, v.hangs, v.reports, v.bad_exit))
    print("fuzz: %s (seed %d, %.0f s)" % ("ok" if ok else "FAILED; inputs kept in " + outdir, a.seed,
                                         time.time() - t))
    if ok:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
