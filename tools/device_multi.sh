#!/usr/bin/env bash
# device_multi.sh: the runs that need several GPUs, in one device command on a machine of 2 or
# more GPUs (nvidia-h200-x2 and up), from the repository root with .device-deps carried:
#
#   MULTI_STAGES="checks overlap" bash tools/device_multi.sh
#   MULTI_STAGES="scaling" bash tools/device_multi.sh
#
# Stages (MULTI_STAGES, in this order; the first builds build-gpu through tools/scaling.sh):
#   checks    tools/scaling.sh parity, bench and kill on the machine's GPUs (tp = 2, 4, 8 up to the
#             GPU count, fp32 and bf16; the meshes tp x dp that fit), then its parity again with
#             sequence parallelism and the distributed optimizer on (MULTI_SP_MESH), every run
#             over NCCL
#   overlap   what of the communication is not hidden: tptrain --bench model at tp = 2 over NCCL
#             (MULTI_OVERLAP_MODELS, CONFIG:MICRO_BATCH) for each of MULTI_OVERLAP_RUNS
#             (SEQUENCE_PARALLEL:TPTRAIN_OVERLAP_SMS:NCCL_MAX_CTAS, - for NCCL's own), and data
#             parallelism (tp 1 x dp 2) trained for each of MULTI_DP_RUNS
#             (DP_BUCKET_MB:TPTRAIN_OVERLAP_SMS:NCCL_MAX_CTAS): the gradient buckets (25 MiB, reduced
#             during backward) against one bucket after backward (0)
#   single    tools/device_attention.sh's stages SINGLE_STAGES (test sanitize) with SINGLE_TESTS
#             (flash_attention) on GPU 0; the sanitize stage runs racecheck and synccheck, and
#             memcheck over the suites of SINGLE_MEMCHECK (none by default)
#   scaling   tools/scaling.sh scaling: tptrain and PyTorch tensor parallelism side by side
# Everything comes back under $OUT as at most eight files (summaries and logs.tar.gz).
set -u
out=${OUT:-/tmp/out}
mkdir -p "$out"
stages=${MULTI_STAGES:-checks overlap}
build=${BUILD_DIR:-build-gpu}
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
stage() { case " $stages " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
work=/tmp/multi
rm -rf "$work"
mkdir -p "$work"
[ -f .device-deps/setup.sh ] && . .device-deps/setup.sh >"$work/setup.log" 2>&1
status=0
{
    nvidia-smi -L
    nvidia-smi topo -m
    nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
} >"$work/gpus.txt" 2>&1
echo "$ngpu GPUs"

# scaling.sh into work/NAME with the given environment; its summary and logs are kept
scaling() {
    local name=$1
    shift
    env OUT="$work/$name" "$@" bash tools/scaling.sh >/dev/null 2>&1 || status=1
    sed -n '/^==== results/,$p' "$work/$name/summary.txt"
    cp "$work/$name/summary.txt" "$out/${name}_summary.txt" 2>/dev/null
}
mesh_for() { # the tp x dp meshes of at most N GPUs with dp 2
    local s="" tp
    for tp in 1 2 4; do [ $((tp * 2)) -le "$ngpu" ] && s+="${s:+ }${tp}x2"; done
    echo "$s"
}
tps_for() {
    local s="" tp
    for tp in 2 4 8; do [ "$tp" -le "$ngpu" ] && s+="${s:+ }$tp"; done
    echo "$s"
}

if stage checks; then
    scaling checks SCALING_STAGES=parity,bench,kill PARITY_TP="$(tps_for)" PARITY_MESH="$(mesh_for)" \
        BENCH_RANKS="$(tps_for)" BENCH_LAYER_RANKS="1 $(tps_for)" KILL_CONFIG=configs/gpt2-124m.yaml \
        SCALING_DEADLINE="${CHECKS_DEADLINE:-240}"
    # sequence parallelism at every tp, the distributed optimizer over dp 2 with it
    scaling sp SCALING_BUILD=0 SCALING_STAGES=parity PARITY_TP="$(tps_for)" PARITY_MESH="$(mesh_for)" \
        PARITY_MESH_PRECISIONS="fp32 bf16" SCALING_DEADLINE="${SP_DEADLINE:-120}" \
        PARITY_SETS="--set parallel.sequence_parallel=true --set parallel.distributed_optimizer=true"
fi

# NP ranks, one GPU each: "${mpi[@]}" NP CMD...
mpi=(mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH
     -x TPTRAIN_BENCH_ITERS -np)

if stage overlap; then
    [ -x "$build/tptrain" ] || { meson setup "$build" -Dgpu_arch=90 && ninja -C "$build" tptrain; } >"$work/build.log" 2>&1
    export TPTRAIN_BENCH_ITERS=${OVERLAP_ITERS:-2+10}
    # runs: SEQUENCE_PARALLEL:OVERLAP_SMS:NCCL_MAX_CTAS (- leaves NCCL its own choice)
    for mb in ${MULTI_OVERLAP_MODELS:-gpt2-124m:16 gpt-1.3b:8}; do
        c=${mb%%:*} B=${mb##*:}
        for run in ${MULTI_OVERLAP_RUNS:-false:0:- true:0:-}; do
            IFS=: read -r sp sms ctas <<<"$run"
            log=$work/overlap_${c}_sp_${sp}_sms${sms}_ctas$ctas.log
            ( export TPTRAIN_OVERLAP_SMS=$sms
              xs=(-x TPTRAIN_OVERLAP_SMS)
              [ "$ctas" = - ] || { export NCCL_MAX_CTAS=$ctas NCCL_MIN_CTAS=$ctas; xs+=(-x NCCL_MAX_CTAS -x NCCL_MIN_CTAS); }
              timeout 200 "${mpi[@]}" 2 "${xs[@]}" "$build/tptrain" --bench model "configs/$c.yaml" --set parallel.tp=2 \
                --set parallel.comm=nccl --set parallel.sequence_parallel="$sp" --set train.micro_batch="$B" \
                --set train.global_batch=0 ) >"$log" 2>&1 || status=1
            echo "== $c B $B tp 2 over NCCL, sequence_parallel $sp, TPTRAIN_OVERLAP_SMS $sms, NCCL_MAX_CTAS $ctas"
            grep -E "^  median|^  communication|^communication not hidden|^attention|^mlp" "$log"
        done
    done | tee "$out/overlap.txt"
    for run in ${MULTI_DP_RUNS:-25:0:- 0:0:-}; do
        IFS=: read -r mb sms ctas <<<"$run"
        ( export TPTRAIN_OVERLAP_SMS=$sms
          xs=(-x TPTRAIN_OVERLAP_SMS)
          [ "$ctas" = - ] || { export NCCL_MAX_CTAS=$ctas NCCL_MIN_CTAS=$ctas; xs+=(-x NCCL_MAX_CTAS -x NCCL_MIN_CTAS); }
          timeout 200 "${mpi[@]}" 2 "${xs[@]}" "$build/tptrain" configs/gpt2-124m.yaml --set parallel.dp=2 --set parallel.comm=nccl \
            --set parallel.dp_bucket_mb="$mb" --set train.micro_batch=16 --set train.grad_accum=1 \
            --set train.global_batch=0 --set train.steps=30 --set train.warmup_steps=0 --set eval.every=0 \
            --set 'data.val=""' --set checkpoint.dir= --set log.every=1 --set log.jsonl="$work/dp_$run.jsonl" \
        ) >"$work/dp_$run.log" 2>&1 || status=1
    done
    python3 - "$work" ${MULTI_DP_RUNS:-25:0:- 0:0:-} <<'PY' | tee -a "$out/overlap.txt"
import json, statistics, sys
w = sys.argv[1]
for run in sys.argv[2:]:
    mb, sms, ctas = run.split(":")
    try:
        ms = [json.loads(l)["ms"] for l in open(f"{w}/dp_{run}.jsonl") if '"kind":"train"' in l]
    except OSError:
        print(f"dp 2 {run}: no log"); continue
    print(f"gpt2-124m B 16, tp 1 x dp 2 over NCCL, dp_bucket_mb {mb}, TPTRAIN_OVERLAP_SMS {sms}, NCCL_MAX_CTAS {ctas}: "
          f"median step {statistics.median(ms[5:]):.2f} ms over steps 6..{len(ms)}")
PY
fi

if stage single; then
    # the one-GPU checks of the attention kernels (tools/device_attention.sh SINGLE_STAGES) on GPU 0
    CUDA_VISIBLE_DEVICES=0 OUT="$work/single" BUILD_DIR="$build" STAGES="${SINGLE_STAGES:-test sanitize}" \
        SANITIZE_SUITES="${SINGLE_MEMCHECK:- }" TESTS="${SINGLE_TESTS:-flash_attention}" bash tools/device_attention.sh 2>&1 | tee "$out/single.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if stage scaling; then
    scaling scale SCALING_BUILD="${SCALE_BUILD:-1}" SCALING_STAGES=scaling SCALING_DEADLINE="${SCALE_DEADLINE:-520}" \
        ${SCALING_MODELS:+SCALING_MODELS="$SCALING_MODELS"}
fi

tar czf "$out/logs.tar.gz" -C "$work" . 2>/dev/null
exit $status
