#!/usr/bin/env bash
# device_all.sh: every GPU check and measurement (gpu_check, gpu_train, gpu_bf16, benches) at once.
#
# One device command from the repository root (carry .device-deps; see ../shared/device/README.md):
#   bash tools/device_all.sh
# 1. tools/gpu_check.sh: build, every test suite, compute-sanitizer over the CUDA op tests
# 2. tools/gpu_train.sh: CUDA vs CPU parity, one-GPU TP, NCCL, GPT-2 124M fp32 throughput
# 3. tools/gpu_bf16.sh: bf16 against fp32 on Tiny Shakespeare, bf16 layer and model benches,
#    tptrain against PyTorch (tools/bench_vs_pytorch.sh)
# 4. --bench: a GPT-2-sized MLP layer (fp32), the all-reduce at 1 and 2 ranks, one 124M step by
#    phase in fp32
# 5. --dry-run memory figure beside the run's own
# All logs end up in $OUT/logs.tar.gz (the device tool brings back at most 8 files); the
# summary is printed last.
set -u
out=${OUT:-/tmp/gpu-out}
logs=$out/logs
mkdir -p "$logs"
build=${BUILD_DIR:-build-gpu}
mpirun_flags=""
mpirun --version 2>&1 | grep -q "Open MPI" && mpirun_flags="--oversubscribe --allow-run-as-root"

OUT=$logs TRAIN_STEPS=0 SANITIZER_TIMEOUT=${SANITIZER_TIMEOUT:-240} bash tools/gpu_check.sh > "$logs/gpu_check.out" 2>&1
echo "gpu_check.sh exit $?" | tee "$out/summary.txt"
tail -15 "$logs/gpu_check.out" | tee -a "$out/summary.txt"
. .device-deps/setup.sh >/dev/null 2>&1

OUT=$logs/train BUILD_DIR=$build bash tools/gpu_train.sh > "$logs/gpu_train.out" 2>&1
echo "gpu_train.sh exit $?" | tee -a "$out/summary.txt"
sed -n '/---- summary/,$p' "$logs/gpu_train.out" | tee -a "$out/summary.txt"

OUT=$logs BUILD_DIR=$build bash tools/gpu_bf16.sh > "$logs/gpu_bf16.out" 2>&1
echo "gpu_bf16.sh exit $?" | tee -a "$out/summary.txt"
cat "$logs/bf16/summary.txt" >> "$out/summary.txt"

export NCCL_NVLS_ENABLE=0
{
    echo "---- bench layer (fp32, GPT-2 124M MLP at 16k tokens)"
    $build/tptrain --bench layer 16384 768 3072 --json "$logs/bench_layer.json"
    echo "---- bench allreduce, 1 rank"
    $build/tptrain --bench allreduce 1K:256M:16
    echo "---- bench allreduce, 2 ranks sharing the GPU (MPI comm)"
    mpirun $mpirun_flags -np 2 $build/tptrain --bench allreduce 1K:64M:16
    echo "---- bench layer, 2 ranks sharing the GPU (MPI comm)"
    mpirun $mpirun_flags -np 2 $build/tptrain --bench layer 4096 768 3072
    echo "---- bench model gpt2-124m, fp32"
    $build/tptrain --bench model configs/gpt2-124m.yaml --set train.precision=fp32 --json "$logs/bench_model.json"
    echo "---- transformers loads a checkpoint: same val loss and greedy text"
    r=/tmp/hf; rm -rf $r
    $build/tptrain configs/tiny.yaml --set model.seq_len=64 --set train.steps=30 --set checkpoint.dir=$r >/dev/null 2>&1
    $build/tptrain --eval $r --batches 4 | tail -1
    python3 tools/hf_check.py $r/step_00000030 data/tinyshakespeare_val.bin 4 64 4 $r/hf_gen.txt 40 2>&1 | grep -v Warning | tail -2
    echo "---- dry-run memory vs run"
    $build/tptrain --dry-run configs/gpt2-124m.yaml --set train.precision=fp32 | grep "memory per rank"
    grep -h "rank memory" "$logs/train/gpt2_124m_b16.log" || true
} > "$logs/bench.out" 2>&1
echo "bench exit $?" | tee -a "$out/summary.txt"
grep -E "^----|^phase|fwd|bwd|avg|Avg|memory|tok/s|MFU|# one rank|val loss" "$logs/bench.out" | head -80 | tee -a "$out/summary.txt"
tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$logs"
