#!/usr/bin/env bash
# device_attention.sh: attention on the GPU machine in one device command (builds, tests, benchmarks).
#
#   bash tools/device_attention.sh            # from the repository root, .device-deps carried
#
# Stages: build build-gpu (sm_90a where the toolkit has it), the flash_attention suite, the
# attention grid against PyTorch's SDPA back ends (tools/attention_vs_sdpa.py), and --bench model
# in bf16 for GPT-2 124M's width with 12 heads of 64 and 6 heads of 128; then (stages train, torch)
# Tiny Shakespeare with heads of 128 in fp32 and bf16 (500 steps) and tp=2 against tp=1 over the MPI
# comm, and tools/bench_vs_pytorch.sh on GPT-2 124M at T 4096 (B 4) and with 6 heads of 128; rows
# (the whole step against PyTorch at each GPT-2 size); big (the largest GPT-2-shaped model tptrain
# trains on the GPU, full recomputation) and torch_big (PyTorch's largest on the same shapes, every
# block checkpointed: tools/torch_big.py); recompute (the step-time cost of recomputation). Also
# memcheck, sanitize, quick, ncu (each kernel's time under Nsight Compute, NCU_GRID), ncu_pipes (each
# kernel's issue and pipe utilisation and leading stalls, NCU_GRID), profile (one
# training step kernel by kernel, PROFILE_CONFIG, tools/kernel_table.py), attn_*
# (kernel variants; attn_env: tptrain alone with ATTN_ENV set, on ATTN_ENV_GRID), gemm (every
# product of a step alone, `--bench gemm` on GEMM_CONFIGS) and ways (`--bench model` on each of
# WAYS_CONFIGS once per WAYS setting, ';'-separated environment assignments, WAYS_ROUNDS rounds
# alternating: each phase's ms and the measured step in one line per run).
# Logs under ${OUT:-/tmp/out}. STAGES (default "build test attn model") picks stages.
set -u
out=${OUT:-/tmp/out}
mkdir -p "$out"
stages=${STAGES:-build test attn model}
build=${BUILD_DIR:-build-gpu}
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
[ -f .device-deps/setup.sh ] && . .device-deps/setup.sh >"$out/setup.log" 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv >"$out/gpu.txt" 2>&1
status=0
stage() { case " $stages " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
if stage build; then
    { [ -d "$build" ] || meson setup "$build" -Dgpu_arch="${GPU_ARCH:-90}"; } >"$out/build.log" 2>&1 &&
        ninja -C "$build" >>"$out/build.log" 2>&1 || { echo "build failed"; tail -30 "$out/build.log"; exit 1; }
    echo "build ok"
    # the Hopper kernels must be warpgroup MMA in the machine code
    lib=$(find "$build" -name 'libtpcuda_sm90.a' | head -n 1)
    [ -n "$lib" ] && echo "HGMMA instructions in the sm_90a library: $(cuobjdump --dump-sass "$lib" 2>/dev/null | grep -c HGMMA)"
fi
if stage test; then
    timeout ${TEST_TIMEOUT:-400} meson test -C "$build" ${TESTS:-flash_attention} --print-errorlogs >"$out/test.log" 2>&1 || status=1
    grep -E "^ *[0-9]+/[0-9]+ |Ok:|Fail:|Skipped:" "$out/test.log" | sort -u
    grep -h "rel err\|lse worst\|fwd+bwd\|default vs portable\|path:" "$build"/meson-logs/testlog.txt | sed 's/^.*\(B=\)/\1/' | sort -u >"$out/flash_errors.txt"
    tail -5 "$out/flash_errors.txt"
fi
if stage memcheck; then
    # every kernel path once under compute-sanitizer: warp-specialised (64, 128), cp.async padded (80),
    # portable (256)
    TPTRAIN_BENCH_ITERS=0+1 timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$build/tptrain" --bench attention 2x3x64x300 2x2x128x1000 1x2x80x200 1x2x256x130 \
        >"$out/memcheck.log" 2>&1 || status=1
    grep -E "ERROR SUMMARY|wgmma|mma.sync" "$out/memcheck.log"
fi
if stage sanitize; then
    # the GPU suites whole under memcheck (Criterion's forked workers are followed), then shared-memory
    # hazards (racecheck) and barrier misuse (synccheck) on every attention kernel path
    for t in ${SANITIZE_SUITES:-cuda_ops gemm flash_attention}; do
        exe=$(find "$build/tests" -maxdepth 1 -name "test_$t" -type f | head -n 1)
        [ -n "$exe" ] || continue
        timeout ${SANITIZE_TIMEOUT:-150} compute-sanitizer --tool memcheck --target-processes all \
            --error-exitcode 9 "$exe" -j4 >"$out/memcheck_$t.log" 2>&1
        echo "memcheck $t: exit $? $(grep -h 'ERROR SUMMARY' "$out/memcheck_$t.log" | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
    done
    for tool in racecheck synccheck; do
        TPTRAIN_BENCH_ITERS=0+1 timeout 60 compute-sanitizer --tool $tool --error-exitcode 9 \
            "$build/tptrain" --bench attention 1x2x64x300 1x2x128x260 1x1x80x200 1x1x256x130 \
            >"$out/$tool.log" 2>&1
        echo "$tool: exit $? $(grep -h 'ERROR SUMMARY\|RACECHECK SUMMARY' "$out/$tool.log" | tr '\n' ';')"
        grep -m 5 -E "Error|Warning|hazard" "$out/$tool.log"
    done
fi
if stage ncu; then
    # each attention kernel's duration and throughput at the shapes of NCU_GRID, one call each
    TPTRAIN_BENCH_ITERS=0+1 timeout 300 ncu --kernel-name regex:'f9_|fa_' --section SpeedOfLight --csv \
        "$build/tptrain" --bench attention ${NCU_GRID:-16x16x128x1024 4x16x128x4096} >"$out/ncu.csv" 2>"$out/ncu.err" || status=1
    python3 - "$out/ncu.csv" <<'PY' | tee "$out/ncu.txt"
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head, rows = rows[0], rows[1:]
ix = {k: head.index(k) for k in ("ID", "Kernel Name", "Metric Name", "Metric Value")}
for r in rows:
    if r[ix["Metric Name"]] in ("Duration", "Compute (SM) Throughput", "Memory Throughput"):
        print(r[ix["ID"]], r[ix["Kernel Name"]].split("(")[0][:40], r[ix["Metric Name"]], r[ix["Metric Value"]])
PY
fi
if stage ncu_pipes; then
    # what each attention kernel's instructions keep busy, at NCU_GRID: issue slots, the tensor pipe
    # and every other pipe (xu: the multi-function unit that computes exp2; fma, alu, ...), as a
    # share of their peak while the SM is active, with the leading stall reasons: whether the
    # head-size-64 forward is bound by its exponentials, its issue or its products
    TPTRAIN_BENCH_ITERS=0+1 timeout 300 ncu --kernel-name regex:'f9_(fwd|bwd)_ws' --launch-count ${NCU_LAUNCHES:-4} --csv \
        --metrics 'regex:^sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active$' \
        --metrics 'regex:^sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active$' \
        --metrics 'smsp__issue_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum' \
        --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
        "$build/tptrain" --bench attention ${NCU_GRID:-4x12x64x4096 4x16x128x4096} >"$out/ncu_pipes.csv" 2>"$out/ncu_pipes.err" || status=1
    python3 - "$out/ncu_pipes.csv" <<'PY' | tee "$out/ncu_pipes.txt"
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows:
    sys.exit(print("ncu_pipes: no rows"))
head, rows = rows[0], rows[1:]
I, K, M, V = (head.index(k) for k in ("ID", "Kernel Name", "Metric Name", "Metric Value"))
by = {}
for r in rows:
    d = by.setdefault(r[I], {"name": r[K].split("(")[0][:32]})
    try:
        d[r[M]] = float(r[V].replace(",", ""))
    except ValueError:
        pass
for i, d in sorted(by.items(), key=lambda x: int(x[0])):
    pipes = sorted(((v, k.split("__")[1].split(".")[0]) for k, v in d.items() if k != "name" and "pipe" in k and v >= 5), reverse=True)
    stalls = sorted(((v, k.split("issue_stalled_")[1].split("_per")[0]) for k, v in d.items() if k != "name" and "issue_stalled_" in k), reverse=True)[:4]
    print(f"{i} {d['name']} {d.get('gpu__time_duration.sum', 0) / 1e3:.1f} us, issue {d.get('smsp__issue_active.avg.pct_of_peak_sustained_active', 0):.0f}% | "
          + ", ".join(f"{k} {v:.0f}%" for v, k in pipes[:8]) + " | stalls " + ", ".join(f"{k} {v:.2f}" for v, k in stalls))
PY
fi
if stage profile; then
    # one training step kernel by kernel (debug.profile_step brackets step 3 of PROFILE_CONFIG): Nsight
    # Compute at the GPU's own clocks, caches left as the previous kernel left them, so that each
    # kernel's time is close to its time inside the step; grouped by kernel into profile.txt
    timeout 400 ncu --profile-from-start off --cache-control none --clock-control none \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum --csv \
        "$build/tptrain" ${PROFILE_CONFIG:-configs/gpt2-124m.yaml} --set train.steps=4 --set train.warmup_steps=0 \
        --set eval.every=0 --set 'data.val=""' --set log.every=1 --set debug.profile_step=3 ${PROFILE_SETS:-} \
        >"$out/profile.csv" 2>"$out/profile.err" || status=1
    python3 tools/kernel_table.py "$out/profile.csv" | tee "$out/profile.txt"
fi
if stage quick; then
    timeout 120 "$build/tptrain" --bench attention 2>&1 | tee "$out/attn_quick.log"
fi
if stage attn; then
    timeout 300 python3 tools/attention_vs_sdpa.py --tptrain "$build/tptrain" --json "$out/attn_vs_sdpa.json" \
        ${ATTN_GRID:-16x12x64x1024 4x12x64x4096 16x16x128x1024 4x16x128x4096 2x16x128x8192 configs/gpt2-124m.yaml configs/gpt-1.3b.yaml} 2>&1 | tee "$out/attn.log" || status=1
fi
if stage attn_env; then
    # tptrain alone under the environment of ATTN_ENV (e.g. TPTRAIN_ATTN_BWD_PERSIST=1) on ATTN_ENV_GRID
    echo "== --bench attention with ${ATTN_ENV:-nothing set}"
    env ${ATTN_ENV:-} timeout 120 "$build/tptrain" --bench attention ${ATTN_ENV_GRID:-} 2>&1 | tee -a "$out/attn_quick.log"
fi
if stage attn_split; then
    echo "== the Hopper backward in two kernels (TPTRAIN_ATTN_BWD=split)"
    TPTRAIN_ATTN_BWD=split timeout 120 "$build/tptrain" --bench attention 2>&1 | tee "$out/attn_split.log"
fi
if stage attn_nopp; then
    echo "== the warp-specialised forward without ping-pong (TPTRAIN_ATTN_PINGPONG=0)"
    TPTRAIN_ATTN_PINGPONG=0 timeout 120 "$build/tptrain" --bench attention 2>&1 | tee "$out/attn_nopp.log"
fi
if stage attn_nows; then
    echo "== the Hopper forward without warp specialisation (TPTRAIN_ATTN_WS=0)"
    TPTRAIN_ATTN_WS=0 timeout 120 "$build/tptrain" --bench attention 2>&1 | tee "$out/attn_nows.log"
fi
if stage model; then
    for heads in 12 6; do
        echo "== --bench model configs/bench.yaml bf16 n_head=$heads" | tee -a "$out/model.log"
        timeout 200 "$build/tptrain" --bench model configs/bench.yaml --set train.precision=bf16 \
            --set model.n_head=$heads 2>&1 | tee -a "$out/model.log" | tail -14 || status=1
    done
fi
if stage gemm; then
    # every product of a step alone against the ceiling (GEMM_CONFIGS), into model.log
    for c in ${GEMM_CONFIGS:-configs/gpt2-124m.yaml configs/gpt2-1558m.yaml}; do
        echo "== --bench gemm $c" | tee -a "$out/model.log"
        timeout 200 "$build/tptrain" --bench gemm "$c" 2>&1 | tee -a "$out/model.log" | tail -20 || status=1
    done
fi
if stage ways; then
    # one line per `--bench model` log: each phase's ms and the measured step
    phase_line() {
        grep -E '^(embedding|attention|mlp|lm head|optimizer)|^whole step \(measured' "$1" |
            sed 's/ (x[0-9]*)//; s/ (norm+adamw)//; s/lm head + loss fwd+bwd/head/' |
            awk '$1 == "whole" { printf "step %s", $4; next }
                 $1 == "head" || $1 == "optimizer" { printf "%s %s | ", $1, $2; next }
                 { printf "%s %s %s | ", $1, $2, $3 }'
    }
    IFS=';' read -r -a ways <<<"${WAYS:-X=0}"
    n=0
    for c in ${WAYS_CONFIGS:-configs/gpt2-124m.yaml}; do
        for r in $(seq "${WAYS_ROUNDS:-2}"); do
            for w in "${ways[@]}"; do
                n=$((n + 1))
                env $w timeout 200 "$build/tptrain" --bench model "$c" >"$out/ways_$n.log" 2>&1 || status=1
                echo "$(basename "$c" .yaml) r$r [$w]: $(phase_line "$out/ways_$n.log")" | tee -a "$out/ways.txt"
            done
        done
    done
fi
if stage train; then
    # Tiny Shakespeare, width 256 in 2 heads of 128
    hs128="--set model.n_embd=256 --set model.n_head=2"
    for p in fp32 bf16; do
        timeout 300 "$build/tptrain" configs/shakespeare.yaml --set train.steps=500 --set train.precision=$p \
            $hs128 --set log.jsonl="$out/shk_$p.jsonl" >"$out/shk_$p.log" 2>&1 || status=1
    done
    for np in 1 2; do
        timeout 300 mpirun -np $np --oversubscribe "$build/tptrain" configs/shakespeare.yaml --set train.steps=20 \
            --set train.precision=bf16 $hs128 --set parallel.tp=$np --set eval.every=0 --set train.warmup_steps=5 \
            --set log.jsonl="$out/tp$np.jsonl" >"$out/tp$np.log" 2>&1 || status=1
    done
    python3 - "$out" <<'PY' | tee "$out/train_summary.txt" || status=1
import json, sys
o = sys.argv[1]
def rows(name, kind):
    return [json.loads(l) for l in open(f"{o}/{name}.jsonl") if f'"kind":"{kind}"' in l]
v32, v16 = rows("shk_fp32", "val")[-1], rows("shk_bf16", "val")[-1]
d = (v16["loss"] - v32["loss"]) / v32["loss"]
print(f"heads of 128, 500 steps: val loss fp32 {v32['loss']:.4f} bf16 {v16['loss']:.4f} ({100 * d:+.2f}%, limit 2%)")
t1, t2 = rows("tp1", "train"), rows("tp2", "train")
worst = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(t1, t2))
print(f"bf16 heads of 128, 20 steps: tp=2 (MPI comm, one GPU) against tp=1: worst relative loss difference {worst:.2e} over {len(t1)} steps")
sys.exit(0 if abs(d) <= 0.02 and len(t1) == len(t2) == 20 else 1)
PY
fi
if stage torch; then
    sed 's/^  seq_len: 1024 .*/  seq_len: 4096/; s/^  micro_batch: 16 .*/  micro_batch: 4/' configs/gpt2-124m.yaml >/tmp/gpt2-124m-t4096.yaml
    sed 's/^  n_head: 12/  n_head: 6/' configs/gpt2-124m.yaml >/tmp/gpt2-124m-hs128.yaml
    for c in ${TORCH_ROWS:-t4096:4 hs128:16}; do
        OUT=/tmp/vs_${c%%:*} BENCH_BUILD=0 BUILD_DIR=$build BENCH_CONFIG=/tmp/gpt2-124m-${c%%:*}.yaml \
            BENCH_BATCHES=${c##*:} bash tools/bench_vs_pytorch.sh >"$out/vs_torch_${c%%:*}.log" 2>&1 || status=1
        echo "== gpt2-124m ${c%%:*} (B ${c##*:})"; sed -n '/^# /,$p' "$out/vs_torch_${c%%:*}.log"
    done
fi
if stage rows; then
    # the whole step against PyTorch compile at each GPT-2 size (issue table): ROWS of CONFIG:B
    for r in ${ROWS:-gpt2-124m:16 gpt2-124m:32 gpt2-350m:16 gpt2-774m:8 gpt2-1558m:8}; do
        c=${r%%:*} B=${r##*:}
        OUT=/tmp/rows_$c BENCH_BUILD=0 BUILD_DIR=$build BENCH_CONFIG=configs/$c.yaml BENCH_BATCHES=$B \
            BENCH_STEPS=${ROWS_STEPS:-25} BENCH_RUN_TIMEOUT=${ROWS_TIMEOUT:-150} \
            bash tools/bench_vs_pytorch.sh >"$out/rows_${c}_b$B.log" 2>&1 || status=1
        echo "== $c B $B" | tee -a "$out/rows.txt"; sed -n '/^# /,$p' "$out/rows_${c}_b$B.log" | tee -a "$out/rows.txt"
    done
fi
if stage big; then
    # the largest GPT-2-shaped model one GPU trains: bf16, seq 1024, micro-batch 1, full
    # recomputation; C 4096 in 32 heads of 128, BIG_LAYERS layers (44: 9.07B parameters)
    for L in ${BIG_LAYERS:-44 42}; do
        echo "== n_layer=$L n_embd=4096 n_head=32, recompute full, micro_batch 1" | tee -a "$out/big.log"
        timeout ${BIG_TIMEOUT:-150} "$build/tptrain" configs/gpt2-1558m.yaml --set model.n_layer=$L \
            --set model.n_head=32 --set model.n_embd=4096 --set train.micro_batch=1 \
            --set train.global_batch=8192 --set train.recompute=full --set train.steps=6 \
            --set train.warmup_steps=2 --set 'data.val=""' --set eval.every=0 --set log.every=1 \
            --set log.jsonl="$out/big_$L.jsonl" >>"$out/big.log" 2>&1 && { tail -4 "$out/big.log"; break; }
        tail -3 "$out/big.log"
    done
fi
if stage torch_big; then
    # PyTorch on the big stage's shapes: bf16 autocast, every block checkpointed, fused AdamW, 8
    # micro-steps of 1 x 1024 per step; each size in a process of its own, from the largest down
    # to the first that trains (16 bytes per parameter against tptrain's 18, so the list starts
    # above 38)
    timeout ${TORCH_BIG_TIMEOUT:-540} python3 tools/torch_big.py --layers ${TORCH_BIG_LAYERS:-45,44,43,42,41,40,39,38,36} \
        --n-embd 4096 --n-head 32 --seq 1024 --batch 1 --grad-accum 8 --steps 6 --skip 2 \
        --timeout ${TORCH_BIG_CHILD_TIMEOUT:-150} --json "$out/torch_big.json" 2>&1 | tee "$out/torch_big.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if stage recompute; then
    # the step-time cost of recomputation (GPT-2 1558M, micro_batch 4)
    for rc in none selective full; do
        echo "== --bench model gpt2-1558m recompute=$rc" | tee -a "$out/recompute.log"
        timeout 120 "$build/tptrain" --bench model configs/gpt2-1558m.yaml --set train.recompute=$rc \
            --set train.steps=5 --set train.warmup_steps=0 2>&1 | tee -a "$out/recompute.log" | grep -A1 "^whole step\|median" | head -3
    done
fi
# the tool brings back eight files: pack the logs
tar czf "$out/logs.tar.gz" -C "$out" --exclude logs.tar.gz . 2>/dev/null
find "$out" -maxdepth 1 -type f ! -name logs.tar.gz ! -name attn_vs_sdpa.json ! -name flash_errors.txt \
    ! -name train_summary.txt ! -name profile.txt ! -name model.log ! -name rows.txt ! -name recompute.log \
    ! -name torch_big.log -delete
exit $status
