#!/usr/bin/env bash
# bench_vs_pytorch.sh: GPT-2 bf16 step time, tok/s and memory, tptrain against PyTorch, one GPU.
#
# One device command from the repository root (carry .device-deps):
#
#   bash tools/bench_vs_pytorch.sh
#
# Builds tptrain (meson, CUDA, sm_90), then for each micro_batch B runs tptrain on the config in
# bf16 and tools/torch_gpt2_bench.py on the same config and data (bf16 autocast, torch.compile,
# SDPA, fused AdamW), one after the other in the same session: BENCH_STEPS optimizer steps of one
# micro-step each, no validation and no checkpoints, the first BENCH_SKIP steps left out of the
# statistics. While each run goes, nvidia-smi's memory.used is polled every 100 ms; its peak minus
# the idle reading just before the run is the one memory figure measured the same way for both
# tools (each tool's own figure is shown beside it: tptrain's allocated bytes, PyTorch's
# max_memory_allocated / max_memory_reserved). MFU is the same formula for both (tptrain's:
# 6*params + 6*n_layer*n_embd*seq_len FLOP per token over the precision's dense peak, 989
# TFLOP/s for bf16 on an H100/H200).
#
# Prints a table (tool, B, median step ms, tok/s, peak GiB, MFU %) and the tptrain/PyTorch ratios;
# writes summary.txt and results.json under $OUT (./bench-out when OUT is unset), with the raw
# logs (build log, each run's stdout and JSON, the nvidia-smi samples) in raw/, packed into
# raw.tar.gz when OUT is set (the device tool brings back at most 8 files). Exit 1 if a build or
# any run failed.
#
# Environment: BENCH_STEPS (30), BENCH_SKIP (5), BENCH_BATCHES ("16 32"), BENCH_CONFIG
# (configs/gpt2-124m.yaml), BENCH_PRECISION (bf16; fp32 for a check of the script itself),
# BENCH_TOOLS ("tptrain pytorch"), BENCH_RUN_TIMEOUT (seconds per run, 400), BUILD_DIR
# (build-gpu), BENCH_BUILD (1; 0 uses the tptrain already in BUILD_DIR), GPU_ARCH (90),
# MESON_ARGS (default -Dcuda=enabled -Dgpu_arch=$GPU_ARCH), PYTHON (python3, the one with torch),
# BENCH_GPU (nvidia-smi index, 0), BENCH_TORCH_ARGS (more options for torch_gpt2_bench.py, e.g.
# "--compile-mode max-autotune-no-cudagraphs"; none by default).
set -u

out=${OUT:-./bench-out}
build=${BUILD_DIR:-build-gpu}
steps=${BENCH_STEPS:-30}
skip=${BENCH_SKIP:-5}
batches=${BENCH_BATCHES:-16 32}
config=${BENCH_CONFIG:-configs/gpt2-124m.yaml}
precision=${BENCH_PRECISION:-bf16}
tools=${BENCH_TOOLS:-tptrain pytorch}
run_timeout=${BENCH_RUN_TIMEOUT:-400}
do_build=${BENCH_BUILD:-1}
meson_args=${MESON_ARGS:--Dcuda=enabled -Dgpu_arch=${GPU_ARCH:-90}}
py=${PYTHON:-python3}
gpu=${BENCH_GPU:-0}
read -r -a torch_args <<<"${BENCH_TORCH_ARGS:-}"

if [ ! -f meson.build ] || [ ! -f tools/torch_gpt2_bench.py ]; then
    echo "bench_vs_pytorch.sh: run me from the repository root (no meson.build here: $PWD)" >&2
    exit 2
fi
if [ "$steps" -le "$skip" ]; then
    echo "bench_vs_pytorch.sh: BENCH_STEPS=$steps must exceed BENCH_SKIP=$skip" >&2
    exit 2
fi
raw=$out/raw
mkdir -p "$raw"
rm -f "$raw"/* "$out/results.json" "$out/summary.txt" "$out/raw.tar.gz"
runs=$raw/runs.tsv
: >"$runs"
failed=0

# ---- environment and build
# shellcheck source=tools/build_tptrain.sh
. tools/build_tptrain.sh
if [ -f .device-deps/setup.sh ]; then
    # shellcheck disable=SC1091
    . .device-deps/setup.sh >"$raw/setup.log" 2>&1 || echo "warning: .device-deps/setup.sh failed (see raw/setup.log)"
fi
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
case ":$PATH:" in *:/usr/local/cuda/bin:*) ;; *) [ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin" ;; esac

have_smi=0
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -i "$gpu" >/dev/null 2>&1 && have_smi=1
gpu_name=cpu
[ $have_smi = 1 ] && gpu_name=$(nvidia-smi -i "$gpu" --query-gpu=name --format=csv,noheader | head -1)

built=1
case " $tools " in *" tptrain "*)
    if [ "$do_build" = 1 ]; then
        echo "==== build tptrain in $build ($meson_args)"
        build_tptrain "$build" "$meson_args" "$raw/build.log" || built=0
    fi
    if [ $built = 0 ] || [ ! -x "$build/tptrain" ]; then
        built=0
        failed=1
        echo "tptrain build FAILED; the end of raw/build.log:"
        tail -20 "$raw/build.log" 2>/dev/null
    fi
    ;;
esac

# ---- peak GPU memory through nvidia-smi

smi_used() { # memory.used of the benchmark GPU in MiB
    nvidia-smi -i "$gpu" --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -dc '0-9'
}

poll_pid=""
poll_start() { # poll_start FILE: samples memory.used every 100 ms into FILE until poll_stop
    poll_pid=""
    [ $have_smi = 1 ] || return 0
    nvidia-smi -i "$gpu" --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$1" 2>/dev/null &
    poll_pid=$!
    sleep 0.3
    if ! kill -0 "$poll_pid" 2>/dev/null; then # no -lms on this nvidia-smi: one call per sample
        ( while :; do smi_used; sleep 0.1; done ) >"$1" 2>/dev/null &
        poll_pid=$!
    fi
}

poll_stop() {
    [ -n "$poll_pid" ] || return 0
    sleep 0.3 # one more sample after the run
    kill "$poll_pid" 2>/dev/null
    wait "$poll_pid" 2>/dev/null
    poll_pid=""
}

# ---- the runs

warm=$(awk '/^[ \t]+warmup_steps:/ { print $2; exit }' "$config")
warm=${warm:-0}
[ "$warm" -gt "$steps" ] && warm=$steps
# Both tools get the same overrides: one micro-step per optimizer step, no validation.
common=(--set train.grad_accum=1 --set train.global_batch=0
        --set "train.steps=$steps" --set "train.warmup_steps=$warm" --set data.val=
        --set eval.every=0 --set checkpoint.dir=)

run_one() { # run_one TOOL B
    local tool=$1 B=$2 base rc t0 log=$raw/${1}_b$2.log
    local sets=(--set "train.micro_batch=$B" "${common[@]}")
    local cmd
    if [ "$tool" = tptrain ]; then
        cmd=("$build/tptrain" "$config" "${sets[@]}" --set "train.precision=$precision"
             --set log.every=10 --set "log.jsonl=$raw/tptrain_b$B.jsonl")
    else
        cmd=("$py" tools/torch_gpt2_bench.py "$config" "${sets[@]}" --skip "$skip"
             --precision "$precision" --json "$raw/pytorch_b$B.json" "${torch_args[@]}")
    fi
    sleep 1 # let the previous run's memory go back before the idle reading
    base=""
    [ $have_smi = 1 ] && base=$(smi_used)
    echo "==== $tool B=$B: ${cmd[*]}"
    echo "${cmd[*]}" >"$log"
    poll_start "$raw/smi_${tool}_b$B.txt"
    t0=$SECONDS
    timeout "$run_timeout" "${cmd[@]}" >>"$log" 2>&1
    rc=$?
    poll_stop
    [ $rc = 0 ] || { failed=1; echo "$tool B=$B FAILED (exit $rc; log raw/${tool}_b$B.log):"; tail -8 "$log"; }
    printf '%s\t%s\t%s\t%s\t%s\n' "$tool" "$B" "$rc" "${base:-}" $((SECONDS - t0)) >>"$runs"
}

for B in $batches; do
    for tool in $tools; do
        if [ "$tool" = tptrain ] && [ $built = 0 ]; then
            printf 'tptrain\t%s\tbuild\t\t0\n' "$B" >>"$runs"
            continue
        fi
        run_one "$tool" "$B"
    done
done

# ---- table and results.json
python3 - "$raw" "$out" "$skip" "$steps" "$precision" "$config" "$gpu_name" <<'PY' | tee "$out/summary.txt"
import json, os, statistics, sys
raw, out, skip, steps, precision, config, gpu_name = sys.argv[1:]
skip, steps = int(skip), int(steps)
GIB = 1024.0  # nvidia-smi reports MiB

def smi_peak(tool, B, base):
    try:
        vals = [int(v) for v in open(f"{raw}/smi_{tool}_b{B}.txt").read().split() if v.isdigit()]
    except OSError:
        vals = []
    if not vals or base == "":
        return None, len(vals)
    return (max(vals) - int(base)) / GIB, len(vals)

def tptrain_stats(B):
    try:
        recs = [json.loads(l) for l in open(f"{raw}/tptrain_b{B}.jsonl") if '"kind":"train"' in l]
    except (OSError, ValueError):
        return None
    timed = [r for r in recs if r["step"] > skip]
    if not timed:
        return None
    med = statistics.median(r["ms"] for r in timed)
    r0 = timed[0]
    tokens = round(r0["tok_per_s"] * r0["ms"] / 1e3)  # global_batch
    tok_s = tokens / (med / 1e3)
    mfu = tok_s * r0["mfu"] / r0["tok_per_s"] if r0["mfu"] >= 0 else None  # the same formula, at the median
    return {"step_ms_median": med, "step_ms_mean": statistics.mean(r["ms"] for r in timed),
            "tok_per_s": tok_s, "mfu": mfu, "own_mem_gib": recs[-1]["mem_gib"],
            "own_mem": f"{recs[-1]['mem_gib']:.2f} alloc", "steps_logged": len(recs),
            "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"]}

def pytorch_stats(B):
    try:
        r = json.loads(open(f"{raw}/pytorch_b{B}.json").read())
    except (OSError, ValueError):
        return None
    alloc, res = r.get("max_memory_allocated_gib"), r.get("max_memory_reserved_gib")
    own = f"{alloc:.2f}/{res:.2f} alloc/resv" if alloc is not None else "-"
    return {"step_ms_median": r["step_ms_median"], "step_ms_mean": r["step_ms_mean"],
            "tok_per_s": r["tok_per_s"], "mfu": r["mfu"], "own_mem_gib": res, "own_mem": own,
            "loss_first": r["loss_first"], "loss_last": r["loss_last"], "torch": r["torch"],
            "data": r["data"], "compile": r["compile"], "fused_adamw": r["fused_adamw"],
            "attention": r["attention"]}

runs, ok_all = [], True
for line in open(f"{raw}/runs.tsv"):
    tool, B, rc, base, secs = line.rstrip("\n").split("\t")
    st = (tptrain_stats if tool == "tptrain" else pytorch_stats)(B) if rc == "0" else None
    peak, n = smi_peak(tool, B, base)
    ok = rc == "0" and st is not None
    ok_all &= ok
    runs.append({"tool": tool, "B": int(B), "exit": rc, "ok": ok, "seconds": int(secs),
                 "smi_baseline_mib": int(base) if base else None, "smi_samples": n,
                 "smi_peak_gib": peak, **(st or {})})

def fmt(v, f):  # f: a format spec with a leading width, e.g. '9.2f'
    return format(v, f) if v is not None else "-".rjust(int(f.split(".")[0] or 0))

print(f"# {gpu_name} | {config} | {precision} | {steps} steps, median over steps {skip + 1}..{steps}")
print(f"{'tool':<8} {'B':>3} {'step ms':>9} {'tok/s':>10} {'peak GiB':>9} {'MFU %':>7}  {'own mem GiB':<22} {'loss first -> last':<19} status")
for r in runs:
    mfu = r.get("mfu")
    loss = f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}" if "loss_first" in r else "-"
    status = "ok" if r["ok"] else f"FAILED (exit {r['exit']})"
    print(f"{r['tool']:<8} {r['B']:>3} {fmt(r.get('step_ms_median'), '9.2f')} {fmt(r.get('tok_per_s'), '10.0f')} "
          f"{fmt(r['smi_peak_gib'], '9.2f')} {fmt(None if mfu is None else 100 * mfu, '7.1f')}  "
          f"{r.get('own_mem', '-'):<22} {loss:<19} {status}")

ratios = []
by = {(r["tool"], r["B"]): r for r in runs if r["ok"]}
for B in sorted({r["B"] for r in runs}):
    a, b = by.get(("tptrain", B)), by.get(("pytorch", B))
    if not (a and b):
        continue
    div = lambda x, y: x / y if x is not None and y else None
    ratios.append({"B": B, "tok_per_s": div(a["tok_per_s"], b["tok_per_s"]),
                   "step_ms": div(a["step_ms_median"], b["step_ms_median"]),
                   "smi_peak_mem": div(a["smi_peak_gib"], b["smi_peak_gib"]),
                   "mfu": div(a["mfu"], b["mfu"])})
if ratios:
    print("\ntptrain / PyTorch (tok/s above 1 and step ms, memory below 1 favour tptrain):")
    print(f"{'B':>3} {'tok/s':>7} {'step ms':>8} {'peak mem':>9} {'MFU':>7}")
    for q in ratios:
        print(f"{q['B']:>3} {fmt(q['tok_per_s'], '7.3f')} {fmt(q['step_ms'], '8.3f')} "
              f"{fmt(q['smi_peak_mem'], '9.3f')} {fmt(q['mfu'], '7.3f')}")
pt = next((r for r in runs if r["tool"] == "pytorch" and r["ok"]), None)
if pt:
    print(f"\nPyTorch {pt['torch']}: compile {pt['compile']}, fused AdamW {pt['fused_adamw']}, "
          f"attention {pt['attention']}; data: {pt['data']}")
json.dump({"gpu": gpu_name, "config": config, "precision": precision, "steps": steps, "skip": skip,
           "runs": runs, "ratios": ratios, "ok": ok_all}, open(f"{out}/results.json", "w"), indent=1)
sys.exit(0 if ok_all else 1)
PY
[ "${PIPESTATUS[0]}" = 0 ] || failed=1

if [ -n "${OUT:-}" ]; then
    tar -czf "$out/raw.tar.gz" -C "$out" raw && rm -rf "$raw"
fi
echo "bench_vs_pytorch.sh: $( [ $failed = 0 ] && echo ok || echo FAILED ); results in $out/results.json"
exit $failed
