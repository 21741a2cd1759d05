#!/usr/bin/env bash
# gpu_bf16.sh: the bf16 fast path's checks and figures (loss against fp32, benches, PyTorch), one GPU.
#
# One device command from the repository root after a CUDA build (tools/gpu_check.sh builds
# build-gpu; carry .device-deps):
#
#   bash tools/gpu_bf16.sh
#
# 1. Tiny Shakespeare, configs/shakespeare.yaml for 500 steps in fp32 and in bf16, with the
#    model's 4 heads of 32 (attention through the fallback) and with 2 heads of 64 (the fused
#    attention): validation loss at step 500 and the bf16/fp32 difference (must be within 2%).
# 2. --bench layer in bf16: GPT-2 124M's MLP at 16k tokens, and a large layer (16384 x 4096 x
#    16384) for the share of the matrix-rate ceiling.
# 3. --bench model configs/gpt2-124m.yaml in bf16: one step by phase.
# 4. tools/bench_vs_pytorch.sh (tptrain against PyTorch at micro_batch 16 and 32).
# Logs go to ${OUT:-/tmp/gpu-out}/bf16; the summary is printed. Exit 1 if anything failed.
set -u
out=${OUT:-/tmp/gpu-out}/bf16
build=${BUILD_DIR:-build-gpu}
bin=$build/tptrain
mkdir -p "$out"
[ -f .device-deps/setup.sh ] && . .device-deps/setup.sh >/dev/null 2>&1
export NCCL_NVLS_ENABLE=0
fail=0

echo "---- tinyshakespeare, 500 steps: validation loss, bf16 against fp32" | tee "$out/summary.txt"
for h in 4 2; do
    for p in fp32 bf16; do
        timeout 300 "$bin" configs/shakespeare.yaml --set train.steps=500 --set train.precision=$p \
            --set model.n_head=$h --set log.jsonl="$out/shk_${p}_h$h.jsonl" >"$out/shk_${p}_h$h.log" 2>&1 || fail=1
    done
    python3 - "$out/shk_fp32_h$h.jsonl" "$out/shk_bf16_h$h.jsonl" "$h" <<'PY' | tee -a "$out/summary.txt" || fail=1
import json, sys
def last_val(path):
    v = [json.loads(l) for l in open(path) if '"kind":"val"' in l]
    return v[-1]["step"], v[-1]["loss"]
(s32, f32), (s16, b16) = last_val(sys.argv[1]), last_val(sys.argv[2])
d = (b16 - f32) / f32
print(f"n_head={sys.argv[3]} (head size {128 // int(sys.argv[3])}): val loss at step {s32}: fp32 {f32:.6f}, "
      f"bf16 {b16:.6f} (step {s16}), difference {100 * d:+.2f}% -> {'ok' if abs(d) <= 0.02 else 'FAIL'}")
sys.exit(0 if abs(d) <= 0.02 and s16 == s32 else 1)
PY
done

{
    echo "---- bench layer, bf16, GPT-2 124M MLP at 16k tokens"
    "$bin" --bench layer 16384 768 3072 --set train.precision=bf16 --json "$out/bench_layer_124m.json"
    echo "---- bench layer, bf16, large: 16384 x 4096 x 16384"
    "$bin" --bench layer 16384 4096 16384 --set train.precision=bf16 --json "$out/bench_layer_large.json"
    echo "---- bench model gpt2-124m, bf16"
    "$bin" --bench model configs/gpt2-124m.yaml --set train.precision=bf16 --json "$out/bench_model.json"
} >"$out/bench.out" 2>&1 || fail=1
grep -E "^----|^phase|fwd|bwd|whole step|median|sum of" "$out/bench.out" | tee -a "$out/summary.txt"

OUT=$out/vs_pytorch BENCH_BUILD=0 BUILD_DIR=$build bash tools/bench_vs_pytorch.sh >"$out/vs_pytorch.out" 2>&1 || fail=1
sed -n '/^# /,$p' "$out/vs_pytorch.out" | tee -a "$out/summary.txt"
echo "gpu_bf16.sh: $([ $fail = 0 ] && echo ok || echo FAILED)" | tee -a "$out/summary.txt"
exit $fail
