#!/usr/bin/env bash
# device_attention.sh: attention on the GPU machine in one device command (builds, tests, benchmarks).
#
#   bash tools/device_attention.sh            # from the repository root, .device-deps carried
#
# Stages: build build-gpu (sm_90a where the toolkit has it), the flash_attention suite, the
# attention grid against PyTorch's SDPA back ends (tools/attention_vs_sdpa.py), and --bench model
# in bf16 for GPT-2 124M's width with 12 heads of 64 and 6 heads of 128. Logs under ${OUT:-/tmp/out}.
# STAGES (default "build test attn model") picks stages.
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
    timeout 400 meson test -C "$build" ${TESTS:-flash_attention} --print-errorlogs >"$out/test.log" 2>&1 || status=1
    grep -E "^ *[0-9]+/[0-9]+ |Ok:|Fail:|Skipped:" "$out/test.log"
    grep -h "rel err\|lse worst\|fwd+bwd" "$build"/meson-logs/testlog.txt | sed 's/^.*\(B=\)/\1/' | sort -u >"$out/flash_errors.txt"
    tail -5 "$out/flash_errors.txt"
fi
if stage attn; then
    timeout 300 python3 tools/attention_vs_sdpa.py --tptrain "$build/tptrain" --json "$out/attn_vs_sdpa.json" \
        ${ATTN_GRID:-16x12x64x1024 4x12x64x4096 16x16x128x1024 4x16x128x4096 2x16x128x8192 configs/gpt2-124m.yaml configs/gpt-1.3b.yaml} 2>&1 | tee "$out/attn.log" || status=1
fi
if stage model; then
    for heads in 12 6; do
        echo "== --bench model configs/bench.yaml bf16 n_head=$heads" | tee -a "$out/model.log"
        timeout 200 "$build/tptrain" --bench model configs/bench.yaml --set train.precision=bf16 \
            --set model.n_head=$heads 2>&1 | tee -a "$out/model.log" | tail -14 || status=1
    done
fi
exit $status
