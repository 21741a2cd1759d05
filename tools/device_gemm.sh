#!/usr/bin/env bash
# device_gemm.sh: tptrain's Hopper GELU products against cuBLASLt in one device command.
#
#   bash tools/device_gemm.sh            # from the repository root, .device-deps carried
#
# Builds tptrain and the gemm suite in build-gpu, runs the suite (every own-kernel case), the
# sm90 cases under compute-sanitizer memcheck, then `tptrain --bench gemm` on GEMM_CONFIGS with
# cuBLASLt (TPTRAIN_GEMM_SM90=0) and with the own kernels (128 x 128 tiles with each
# TPTRAIN_GEMM_SM90_EPILOGUE, the staged one also with TPTRAIN_GEMM_SM90_TURN=issued and with the
# plain forwards too (TPTRAIN_GEMM_SM90_PLAIN=1, both turns); the 128 x 256 tiles of
# TPTRAIN_GEMM_SM90_TILE=256 with three stages and four), GEMM_ROUNDS rounds alternating, the fc
# products across K (GEMM_SWEEP, N x IC x OC shapes: the share of the ceiling per way), and
# `--bench model` on MODEL_CONFIG the same ways and with TPTRAIN_GEMM_SM90=auto. Prints a line per run (the fc forward and the MLP projection's
# input gradient in ms per call, all products in ms per step), then (NCU=1, the default) Nsight
# Compute's view of the own kernels at 124M each way; full logs under
# ${OUT:-/tmp/out}/gemm_logs.tar.gz. Extra variables for every run (e.g.
# TPTRAIN_GEMM_SM90_CLUSTER=0) can be exported before.
set -u
out=${OUT:-/tmp/out}
build=${BUILD_DIR:-build-gpu}
mkdir -p "$out/logs"
export NCCL_NVLS_ENABLE=0
[ -f .device-deps/setup.sh ] && . .device-deps/setup.sh >"$out/logs/setup.log" 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | head -1
{ [ -d "$build" ] || meson setup "$build" -Dgpu_arch="${GPU_ARCH:-90}"; } >"$out/logs/build.log" 2>&1 &&
    ninja -C "$build" tptrain tests/test_gemm >>"$out/logs/build.log" 2>&1 || { echo "build failed"; tail -30 "$out/logs/build.log"; exit 1; }
status=0
timeout 120 "$build/tests/test_gemm" -j4 >"$out/logs/test.log" 2>&1 || status=1
echo "gemm suite: $(grep -h Synthesis "$out/logs/test.log" | tail -1)"
grep -h -B2 -A3 "Assertion\|FAIL\|CRASH" "$out/logs/test.log" | head -20
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 "$build/tests/test_gemm" --filter 'gemm/gelu_products_sm90*' \
    >"$out/logs/memcheck.log" 2>&1 || status=1
echo "memcheck of the sm90 cases: $(grep -h 'ERROR SUMMARY' "$out/logs/memcheck.log" | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
row() { grep -E '^(qkv|attn proj|fc|mlp proj|lm head) fwd|^mlp proj bwd data|^all products' "$1" |
    sed 's/^attn proj/attn_proj/; s/^mlp proj/mlp_proj/; s/^lm head/lm_head/' |
    awk '{printf "%s %s %s | ", $1, $2, ($1 == "all") ? $NF : $(NF-3)}'; }
ways=("TPTRAIN_GEMM_SM90=0" "TPTRAIN_GEMM_SM90=1 TPTRAIN_GEMM_SM90_EPILOGUE=registers" "TPTRAIN_GEMM_SM90=1 TPTRAIN_GEMM_SM90_EPILOGUE=tma"
      "TPTRAIN_GEMM_SM90=1 TPTRAIN_GEMM_SM90_EPILOGUE=tma TPTRAIN_GEMM_SM90_TURN=issued"
      "TPTRAIN_GEMM_SM90=1 TPTRAIN_GEMM_SM90_PLAIN=1" "TPTRAIN_GEMM_SM90=1 TPTRAIN_GEMM_SM90_PLAIN=1 TPTRAIN_GEMM_SM90_TURN=issued"
      "TPTRAIN_GEMM_SM90=1 TPTRAIN_GEMM_SM90_TILE=256" "TPTRAIN_GEMM_SM90=1 TPTRAIN_GEMM_SM90_TILE=256 TPTRAIN_GEMM_SM90_WIDE_STAGES=4")
# GEMM_WAYS (';'-separated environment settings) replaces the list above, e.g.
# GEMM_WAYS="TPTRAIN_GEMM_SM90=0;TPTRAIN_GEMM_SM90=1 TPTRAIN_GEMM_SM90_PLAIN=1"
[ -n "${GEMM_WAYS:-}" ] && IFS=';' read -r -a ways <<<"$GEMM_WAYS"
n=0
for c in ${GEMM_CONFIGS:-configs/gpt2-124m.yaml configs/gpt2-1558m.yaml}; do
    for r in $(seq "${GEMM_ROUNDS:-2}"); do
        for w in "${ways[@]}"; do
            n=$((n + 1))
            env $w timeout 90 "$build/tptrain" --bench gemm "$c" >"$out/logs/gemm_$n.log" 2>&1 || status=1
            echo "$(basename "$c" .yaml) round $r, $w: $(row "$out/logs/gemm_$n.log")"
        done
    done
done
# the forward (GELU, and bias alone) and the GELU' input gradient across K (IC) at GPT-2 124M's fc
# rows and width: how far each way's share of the ceiling depends on the tile's length (per-tile
# costs) and on the epilogue rather than on its mainloop
sweep=${GEMM_SWEEP:-16384x768x3072 16384x1536x3072 16384x3072x3072 16384x6144x3072}
for w in "${ways[@]}"; do
    n=$((n + 1))
    env $w timeout 120 "$build/tptrain" --bench gemm configs/gpt2-124m.yaml $sweep >"$out/logs/sweep_$n.log" 2>&1 || status=1
    echo "sweep, $w: $(grep -E '^[0-9]+x[0-9]+x[0-9]+ (fwd|bwd data)' "$out/logs/sweep_$n.log" |
        awk '{printf "%s %s %s ms %s | ", $1, ($2 == "bwd") ? "dgelu" : ($3 == "bias") ? "bias" : "gelu", $(NF-3), $(NF-1)}')"
done
for w in "${ways[@]}" "TPTRAIN_GEMM_SM90=auto" "TPTRAIN_GEMM_SM90=auto TPTRAIN_GEMM_SM90_TILE=256"; do
    n=$((n + 1))
    env $w timeout 120 "$build/tptrain" --bench model "${MODEL_CONFIG:-configs/gpt2-124m.yaml}" >"$out/logs/model_$n.log" 2>&1 || status=1
    echo "--bench model, $w: $(grep -A1 '^whole step (model' "$out/logs/model_$n.log" | tail -1 | cut -c1-90)"
done
if [ "${NCU:-1}" = 1 ]; then
    # the own kernels' first launches at 124M under Nsight Compute (fc forward, then the input
    # gradient), each epilogue: time, throughputs, issue and the leading stall reasons
    for e in registers tma wide wide4; do
        tile=128 stages=3 epi=$e
        case $e in wide) tile=256 epi=tma ;; wide4) tile=256 stages=4 epi=tma ;; esac
        TPTRAIN_GEMM_SM90=1 TPTRAIN_GEMM_SM90_EPILOGUE=$epi TPTRAIN_GEMM_SM90_TILE=$tile \
            TPTRAIN_GEMM_SM90_WIDE_STAGES=$stages TPTRAIN_BENCH_ITERS=1+1 \
            timeout 120 ncu --kernel-name 'regex:g[sw]_kernel' \
            --launch-count 4 --section SpeedOfLight --section WarpStateStats --section SchedulerStats --csv \
            --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
            "$build/tptrain" --bench gemm configs/gpt2-124m.yaml >"$out/logs/ncu_$e.csv" 2>"$out/logs/ncu_$e.err" || status=1
        python3 - "$out/logs/ncu_$e.csv" "$e" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows:
    sys.exit(print(f"ncu {sys.argv[2]}: no rows"))
head, rows = rows[0], rows[1:]
I, K, M, V = (head.index(k) for k in ("ID", "Kernel Name", "Metric Name", "Metric Value"))
keep = ("Duration", "Compute (SM) Throughput", "L2 Cache Throughput", "DRAM Throughput", "Issue Slots Busy",
        "Eligible Warps Per Scheduler", "Warp Cycles Per Issued Instruction")
by = {}
for r in rows:
    if len(r) <= V:
        continue
    d = by.setdefault(r[I], {"name": r[K].split("(")[0][:40]})
    if r[M] in keep:
        d[r[M]] = r[V]
    elif "issue_stalled_" in r[M]:  # cycles stalled per issued instruction, by reason
        d["stall " + r[M].split("issue_stalled_")[1].split("_per_issue")[0]] = r[V]
for i, d in sorted(by.items(), key=lambda x: int(x[0])):
    if int(i) % 2 == 0:
        continue  # the warm-up launch of each product
    stalls = sorted(((float(v.replace(",", "")), k) for k, v in d.items() if k.startswith("stall ")), reverse=True)[:4]
    print(f"ncu {sys.argv[2]} launch {i} {d['name']}: " + ", ".join(f"{k} {d.get(k, '?')}" for k in keep)
          + " | " + ", ".join(f"{k[6:]} {v:.2f}" for v, k in stalls))
PY
    done
fi
tar czf "$out/gemm_logs.tar.gz" -C "$out" logs && rm -rf "$out/logs"
exit $status
