#!/usr/bin/env bash
# gpu_train.sh: GPU training checks (CUDA against CPU, TP on one GPU, NCCL) and fp32 throughput.
#
# One device command from the repository root:
#   1. CUDA fp32 against the CPU backend, 10 steps of configs/tiny.yaml (losses, max rel diff)
#   2. TP on one GPU: mpirun -np 2 and -np 4 (ranks share the GPU: MPI comm) against tp=1
#   3. NCCL with one rank (comm: nccl)
#   4. GPT-2 124M throughput (fp32) at micro_batch 16 and 32, seq_len 1024
# Needs a built tptrain (BUILD_DIR, default build-gpu). Logs under ${OUT:-/tmp/gpu-out}.
set -u
out=${OUT:-/tmp/gpu-out}
bin=${BUILD_DIR:-build-gpu}/tptrain
steps124=${STEPS_124M:-30}
mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} NCCL_NVLS_ENABLE=0
mpirun_flags=""
mpirun --version 2>&1 | grep -q "Open MPI" && mpirun_flags="--oversubscribe --allow-run-as-root"
fail=0

compare() { # compare A.jsonl B.jsonl LABEL TOL
    python3 - "$@" <<'PY'
import json, sys
a, b, label, tol = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
L = lambda p: [json.loads(l)["loss"] for l in open(p) if '"kind":"train"' in l]
x, y = L(a), L(b)
ok = len(x) == len(y) and len(x) > 0
d = max((abs(p - q) / abs(p) for p, q in zip(x, y)), default=float("nan"))
ok = ok and d <= tol
print(f"{label}: {len(x)} vs {len(y)} steps, max rel loss diff {d:.3e} (tol {tol:g}) -> {'PASS' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
PY
}

tiny="configs/tiny.yaml --set train.steps=10 --set eval.every=0"
$bin $tiny --set parallel.device=cpu --set log.jsonl=$out/cpu.jsonl >$out/parity.log 2>&1 || fail=1
$bin $tiny --set parallel.device=cuda --set log.jsonl=$out/cuda.jsonl >>$out/parity.log 2>&1 || fail=1
compare $out/cpu.jsonl $out/cuda.jsonl "cuda fp32 vs cpu" 1e-5 | tee -a $out/summary.txt || fail=1
for np in 2 4; do
    mpirun $mpirun_flags -np $np $bin $tiny --set parallel.device=cuda --set parallel.tp=$np \
        --set log.jsonl=$out/cuda_tp$np.jsonl >>$out/parity.log 2>&1 || fail=1
    compare $out/cuda.jsonl $out/cuda_tp$np.jsonl "cuda tp=$np (mpi comm, one GPU) vs tp=1" 1e-5 | tee -a $out/summary.txt || fail=1
done
$bin $tiny --set parallel.device=cuda --set parallel.comm=nccl --set log.jsonl=$out/nccl.jsonl >>$out/parity.log 2>&1 \
    && compare $out/cuda.jsonl $out/nccl.jsonl "nccl comm, 1 rank" 0 | tee -a $out/summary.txt || { echo "nccl run FAILED" | tee -a $out/summary.txt; fail=1; }

for mb in 16 32; do
    $bin configs/gpt2-124m.yaml --set train.precision=fp32 --set train.micro_batch=$mb --set train.global_batch=$((mb * 1024)) \
        --set train.steps=$steps124 --set train.warmup_steps=$((steps124 < 20 ? steps124 : 20)) --set data.val= --set log.every=5 --set log.jsonl=$out/gpt2_124m_b$mb.jsonl \
        2>&1 | tee $out/gpt2_124m_b$mb.log | tail -4
    python3 - $out/gpt2_124m_b$mb.jsonl $mb <<'PY' | tee -a $out/summary.txt
import json, sys, statistics
r = [json.loads(l) for l in open(sys.argv[1]) if '"kind":"train"' in l]
if len(r) < 6: print(f"gpt2-124m fp32 B={sys.argv[2]}: too few steps"); sys.exit(1)
t = r[5:]  # skip warm-up steps
ms = statistics.median(x["ms"] for x in t); tok = statistics.median(x["tok_per_s"] for x in t)
print(f"gpt2-124m fp32 B={sys.argv[2]} T=1024: median step {ms:.1f} ms, {tok:.0f} tok/s, MFU {100*statistics.median(x['mfu'] for x in t):.1f}% (of 67 TFLOP/s), "
      f"loss {r[0]['loss']:.3f} -> {r[-1]['loss']:.3f}, mem {r[-1]['mem_gib']:.1f} GiB")
PY
done
echo "---- summary"; cat $out/summary.txt
exit $fail
