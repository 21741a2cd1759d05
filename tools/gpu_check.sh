#!/usr/bin/env bash
# gpu_check.sh: the GPU build and test check: CUDA build, every suite, compute-sanitizer, a short run.
#
# One device command from the repository root on the GPU machine (with .device-deps carried; see
# ../shared/device/README.md):
#
#   bash tools/gpu_check.sh
#
# Stages: load the carried dependencies, configure build-gpu with CUDA (sm_90 by default), build,
# run every meson test suite, run the CUDA op tests under compute-sanitizer (memcheck, then
# racecheck for the shared-memory reductions), then a short training run. A failing stage does not stop the later ones (each says what it could); the
# summary table at the end lists every stage, and the exit status is 1 if any stage failed.
# Logs go to ${OUT:-/tmp/gpu-out}: setup.log, build.log (configure and build), test.log,
# testlog.txt (meson's full log), memcheck.log, racecheck.log, train.log and summary.txt; eight
# files at most, so the device tool brings them all back.
#
# Environment: OUT (log folder), BUILD_DIR (default build-gpu), GPU_ARCH (default 90),
# TRAIN_STEPS (default 20; 0 skips the training run), SANITIZER_TIMEOUT (seconds, default 1200).
set -u
set -o pipefail

out=${OUT:-/tmp/gpu-out}
build=${BUILD_DIR:-build-gpu}
arch=${GPU_ARCH:-90}
train_steps=${TRAIN_STEPS:-20}
sanitizer_timeout=${SANITIZER_TIMEOUT:-1200}
mkdir -p "$out"
for f in setup.log build.log test.log testlog.txt memcheck.log racecheck.log train.log summary.txt; do
    rm -f "$out/$f"
done

if [ ! -f meson.build ] || [ ! -d cuda ]; then
    echo "gpu_check.sh: run me from the repository root (no meson.build/cuda here: $PWD)" >&2
    exit 2
fi

names=()
results=()
times=()
notes=()
failed=0

# record NAME RESULT SECONDS NOTE
record() {
    names+=("$1")
    results+=("$2")
    times+=("$3")
    notes+=("$4")
    [ "$2" = FAIL ] && failed=1
    printf '==== %-10s %s (%ss) %s\n' "$1" "$2" "$3" "$4"
}

# stage NAME LOG COMMAND...: runs COMMAND with its output on the terminal and appended to $out/LOG
stage() {
    local name=$1 log=$2
    shift 2
    local t0=$SECONDS rc
    echo "==== $name: $*" | tee -a "$out/$log"
    "$@" 2>&1 | tee -a "$out/$log"
    rc=$?
    if [ $rc -eq 0 ]; then
        record "$name" PASS $((SECONDS - t0)) "log: $log"
    else
        record "$name" FAIL $((SECONDS - t0)) "exit $rc; log: $log"
    fi
    return $rc
}

# ---- dependencies (sourced: its exports must reach the later stages)
t0=$SECONDS
{
    echo "==== machine"
    uname -a
    command -v nvidia-smi >/dev/null && nvidia-smi
    command -v nvcc >/dev/null && nvcc --version
} >"$out/setup.log" 2>&1
if [ -f .device-deps/setup.sh ]; then
    # shellcheck disable=SC1091
    if . .device-deps/setup.sh >>"$out/setup.log" 2>&1; then
        record deps PASS $((SECONDS - t0)) "log: setup.log"
    else
        record deps FAIL $((SECONDS - t0)) "setup.sh failed; log: setup.log"
    fi
else
    echo "no .device-deps/setup.sh: run sh ../shared/device/prepare.sh here first and carry" \
         ".device-deps" >>"$out/setup.log"
    record deps SKIP $((SECONDS - t0)) "no .device-deps: using the libyaml and Criterion installed on this machine"
fi
# multicast off on the shared hosts, whatever setup.sh did
export NCCL_NVLS_ENABLE=0
case ":$PATH:" in *:/usr/local/cuda/bin:*) ;; *) export PATH="$PATH:/usr/local/cuda/bin" ;; esac

# ---- configure and build
# shellcheck disable=SC2317  # called through stage
configure() {
    if [ -f "$build/build.ninja" ]; then
        meson setup --reconfigure "$build" -Dcuda=enabled -Dgpu_arch="$arch" ||
            meson setup --wipe "$build" -Dcuda=enabled -Dgpu_arch="$arch"
    else
        rm -rf "$build"
        meson setup "$build" -Dcuda=enabled -Dgpu_arch="$arch"
    fi
}
built=0
if stage configure build.log configure; then
    stage build build.log ninja -C "$build" && built=1
else
    record build SKIP 0 "configure failed"
fi

# ---- tests
if [ $built -eq 1 ]; then
    stage test test.log meson test -C "$build" --print-errorlogs
    [ -f "$build/meson-logs/testlog.txt" ] && cp "$build/meson-logs/testlog.txt" "$out/testlog.txt"
else
    record test SKIP 0 "not built"
fi

# ---- compute-sanitizer over the CUDA op tests
sanitizer=$(command -v compute-sanitizer || true)
[ -z "$sanitizer" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] &&
    sanitizer=/usr/local/cuda/bin/compute-sanitizer
if [ $built -eq 0 ] || [ ! -x "$build/tests/test_cuda_ops" ]; then
    record memcheck SKIP 0 "no $build/tests/test_cuda_ops"
    record racecheck SKIP 0 "no $build/tests/test_cuda_ops"
elif [ -z "$sanitizer" ]; then
    record memcheck SKIP 0 "compute-sanitizer not found"
    record racecheck SKIP 0 "compute-sanitizer not found"
else
    # Criterion runs each test in a child process: follow them all. --error-exitcode turns any
    # report into a failure even when the tests themselves pass. Only the op groups (fp32 and
    # bf16) of the suite: NCCL's initialisation probes kernel images for other GPUs, and the
    # sanitizer reports each of those deliberate, handled API errors (the NCCL case runs in the
    # test stage above).
    for tool in memcheck racecheck; do
        for group in cuda_ops cuda_bf16; do
            stage "$tool" "$tool.log" env OMP_NUM_THREADS=4 timeout "$sanitizer_timeout" \
                "$sanitizer" --tool "$tool" --target-processes all --error-exitcode 3 \
                "$build/tests/test_cuda_ops" --jobs 1 --verbose --filter "$group/*"
        done
    done
fi

# ---- a short training run, if the binary can shorten one
if [ "$train_steps" = 0 ]; then
    record train SKIP 0 "TRAIN_STEPS=0"
elif [ $built -eq 0 ] || [ ! -x "$build/tptrain" ]; then
    record train SKIP 0 "no $build/tptrain"
elif ! "$build/tptrain" --help 2>&1 | grep -q -- '--set'; then
    record train SKIP 0 "tptrain has no --set option yet"
else
    stage train train.log "$build/tptrain" configs/gpt2-124m.yaml --set train.steps="$train_steps"
fi

# ---- summary
{
    echo
    echo "gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), build $build, sm_$arch)"
    printf '%-10s  %-6s  %7s  %s\n' stage result seconds note
    printf '%-10s  %-6s  %7s  %s\n' ---------- ------ ------- ----
    for i in "${!names[@]}"; do
        printf '%-10s  %-6s  %7s  %s\n' "${names[$i]}" "${results[$i]}" "${times[$i]}" "${notes[$i]}"
    done
    if [ $failed -eq 0 ]; then echo "overall: PASS"; else echo "overall: FAIL"; fi
    echo "logs: $out"
} | tee "$out/summary.txt"
exit $failed
