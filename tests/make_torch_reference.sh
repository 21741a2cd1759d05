#!/usr/bin/env bash
# make_torch_reference.sh: regenerates the PyTorch parity vectors that tests/test_torch_parity.c
# reads. Run from anywhere, after building tptrain:
#
#   tests/make_torch_reference.sh [BUILD_DIR]      (default: build)
#
# 1. writes tests/data/torch_parity_train.bin, a small deterministic token shard;
# 2. runs tptrain on tests/data/torch_parity.yaml, dumping the initial weights;
# 3. runs tools/torch_reference.py (float64) from those weights with the hyperparameters that
#    tptrain resolved from the same config (read back from --dry-run);
# 4. writes tests/data/torch_reference.json: the reference losses, global gradient norms and
#    per-tensor gradient norms of the first step, plus the settings they were made with.
# Needs a python with torch and numpy (PYTHON, default /usr/bin/python3).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
build=${1:-build}
bin=$build/tptrain
py=${PYTHON:-/usr/bin/python3}
config=tests/data/torch_parity.yaml
shard=tests/data/torch_parity_train.bin
out=tests/data/torch_reference.json
[ -x "$bin" ] || { echo "make_torch_reference.sh: no $bin; build first (meson setup $build && ninja -C $build)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# ---- 1. the shard: mostly a fixed successor function over 61 tokens, sometimes a random token
# below 64, rarely any token of the vocabulary (the generator of tests/test_tp_parity.c)
"$py" - "$shard" 500 4096 <<'PY'
import struct, sys
path, vocab, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mask = (1 << 64) - 1
x, prev, toks = 0x2545F4914F6CDD1D, 1, []
for _ in range(n):
    x = (x * 6364136223846793005 + 1442695040888963407) & mask
    r = x >> 33
    if r % 8:
        t = (prev * 7 + 3) % 61
    elif r % 64 == 0:
        t = (r >> 6) % vocab
    else:
        t = (r >> 6) % 64
    toks.append(t)
    prev = t
header = [20240520, 1, n] + [0] * 253
with open(path, "wb") as f:
    f.write(struct.pack("<256i", *header))
    f.write(struct.pack(f"<{n}H", *toks))
PY

# ---- 2. tptrain: initial weights and its own log (kept for the summary below)
OMP_NUM_THREADS=1 "$bin" "$config" --set parallel.device=cpu --set debug.dump_init="$tmp/init.safetensors" \
    --set debug.grad_norms=true --set log.jsonl="$tmp/tptrain.jsonl" >"$tmp/tptrain.log"

# ---- 3. the reference, with every hyperparameter taken from tptrain's resolved config
"$bin" "$config" --dry-run >"$tmp/resolved.txt"
args=$("$py" - "$tmp/resolved.txt" <<'PY'
import sys
cfg, section = {}, None
for line in open(sys.argv[1]):
    if line.startswith("#") or not line.strip():
        continue
    if not line.startswith(" "):
        section = line.strip().rstrip(":")
        continue
    key, _, value = line.strip().partition(": ")
    cfg[f"{section}.{key}"] = value.strip('"')
if cfg["parallel.dp"] != "1" or cfg["parallel.tp"] != "1":
    sys.exit("make_torch_reference.sh: the config must be tp=1, dp=1")
keys = {"model.n_layer": "--n-layer", "model.n_head": "--n-head", "model.n_embd": "--n-embd",
        "model.vocab_size": "--vocab-size", "model.seq_len": "--seq-len",
        "train.micro_batch": "--micro-batch", "train.grad_accum": "--grad-accum",
        "train.steps": "--steps", "train.lr": "--lr", "train.min_lr": "--min-lr",
        "train.warmup_steps": "--warmup-steps", "train.schedule": "--schedule",
        "train.weight_decay": "--weight-decay", "train.beta1": "--beta1", "train.beta2": "--beta2",
        "train.eps": "--eps", "train.grad_clip": "--grad-clip", "data.train": "--data"}
print(" ".join(f"{flag} {cfg[k]}" for k, flag in keys.items()))
PY
)
# shellcheck disable=SC2086  # args is a list of flags and plain values
"$py" tools/torch_reference.py --init "$tmp/init.safetensors" $args --dtype float64 --threads 1 \
    --out "$tmp/reference.json" >"$tmp/reference.log"

# ---- 4. the committed vectors, and how far tptrain is from them today
"$py" - "$tmp/reference.json" "$tmp/tptrain.jsonl" "$out" "$config" <<'PY'
import json, sys
ref_path, log_path, out_path, config = sys.argv[1:5]
ref = json.load(open(ref_path))
a = dict(ref["args"])
for k in ("init", "out", "save", "threads", "data"):
    a.pop(k, None)
result = {
    "about": "float64 PyTorch reference for tests/test_torch_parity.c; remake with tests/make_torch_reference.sh",
    "config": config,
    "torch": ref["torch"],
    "args": a,
    "losses": ref["losses"],
    "grad_norm": ref["grad_norm"],
    "lr": ref["lr"],
    "grad_norms_step0": ref["grad_norms_step0"],
}
with open(out_path, "w") as f:
    json.dump(result, f, indent=1)
    f.write("\n")
recs = [json.loads(l) for l in open(log_path)]
losses = [r["loss"] for r in recs if r["kind"] == "train"]
norms = next(r["norms"] for r in recs if r["kind"] == "grad_norms")
rel = lambda x, y: abs(x - y) / max(abs(x), abs(y), 1e-30)
print(f"wrote {out_path}: {len(ref['losses'])} steps, torch {ref['torch']}")
print(f"tptrain vs reference: step-1 loss rel {rel(losses[0], ref['losses'][0]):.2e}, "
      f"max loss rel {max(rel(x, y) for x, y in zip(losses, ref['losses'])):.2e}, "
      f"max per-tensor grad norm rel "
      f"{max(rel(norms[n], v) for n, v in ref['grad_norms_step0'].items()):.2e}")
PY
