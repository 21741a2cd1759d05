#!/usr/bin/env bash
# scaling.sh: tensor parallelism across the GPUs of one machine: parity, benches, scaling, PyTorch TP.
#
# One device command from the repository root (carry .device-deps):
#
#   bash tools/scaling.sh
#
# N = the GPUs `nvidia-smi -L` lists (SCALING_NGPU overrides). Builds tptrain as
# bench_vs_pytorch.sh does (ninja is a no-op when BUILD_DIR is up to date), then runs these stages
# in this order (quick ones first), each logging under $OUT; a failure in one does not stop the
# next, and any run with more ranks than N is skipped with a note:
#
#   parity   per-step losses of log.jsonl against tp=1, as tests/test_tp_parity.c compares them:
#            GPT-2 124M-sized (PARITY_CONFIG, micro_batch PARITY_BATCH, PARITY_STEPS steps,
#            debug.check_replicas on), fp32 and bf16, tp = 2, 4, 8 over NCCL (comm: nccl, so a
#            fallback to MPI fails instead of passing), against tp=1 with the same heads (tp=8
#            needs n_head divisible by 8: PARITY_HEADS_ALT=16 heads for it and its reference);
#            and the 2-D mesh tp=2 x dp=2 and tp=4 x dp=2 against tp=1 x dp=1 with grad_accum 2
#            (the same global batch). Max relative loss difference against 1e-5 (fp32) or 2e-2
#            (bf16) -> PASS/FAIL. These runs only check results, so they share the machine: each
#            gets its own GPUs (CUDA_VISIBLE_DEVICES) and several run at once.
#   bench    mpirun -np P tptrain --bench allreduce (P = 2, 4, 8) and --bench layer in bf16
#            (P = 1, 2, 4, 8) on GPT-2 124M's MLP at 16k tokens and the 1.3B model's at 8k.
#   kill     an N-rank training run (tp = N/2 x dp = 2 from 4 ranks up); after KILL_AFTER_STEPS
#            logged steps one rank (the last) gets SIGKILL; every other rank must be gone within
#            KILL_LIMIT (60) s. Reports how long each took and how they ended (tptrain's own error
#            or the launcher's clean-up, read from the log).
#   scaling  one run at a time on GPUs 0..tp-1, for every (model, tp) of SCALING_MODELS with tp <= N,
#            in bf16: tptrain training (SCALING_STEPS steps, the first SCALING_SKIP left out: step
#            ms median, tok/s in all and per GPU, MFU), tptrain --bench model (the communication
#            share: all-reduce ms over the sum of the phases), then tools/torch_tp_bench.py
#            under torchrun --nproc_per_node=tp (PyTorch's ColwiseParallel / RowwiseParallel,
#            loss_parallel, torch.compile, bf16; its NCCL kernel share from the profiler), and
#            the tptrain / PyTorch throughput ratio. For the models in SCALING_TORCH_PLAIN, also
#            tools/torch_gpt2_bench.py at tp=1 (plain PyTorch, whole-model compile: what
#            DTensor costs PyTorch at tp=1). Default models: gpt2-124m (micro_batch 16; tp 1, 2,
#            4: 12 heads), gpt2-350m (8; tp 1, 2, 4, 8) and configs/gpt-1.3b.yaml (8; tp 1..8).
#
# Writes results.json, results.md and summary.txt (this output) under $OUT (./scaling-out when
# OUT is unset), with every log and JSON in raw/, packed into logs.tar.gz when OUT is set (the
# device tool brings back at most 8 files). Exit 1 if the build, any run, any comparison or the
# kill test failed, or the deadline left runs out.
#
# Time: no run starts after SCALING_DEADLINE seconds (default 550; 0 = none) and runs in flight
# are stopped 30 s later, so that the tables still get written inside a 600 s device command;
# the runs left out are listed and make the exit status 1. Estimates for 8 GPUs (from one-H200
# runs: a torch_tp_bench.py run costs 30-45 s, mostly start-up and compilation; a tptrain run
# well under 10 s): build under 1 min, parity 1-2, bench about 1, kill under 1, scaling about 10
# (11 PyTorch runs, 22 tptrain runs). Everything does not fit one 600 s command on 4 or 8 GPUs;
# split it, e.g.
#   SCALING_STAGES=parity,bench,kill,scaling SCALING_ONLY=gpt2-124m bash tools/scaling.sh
#   SCALING_STAGES=scaling SCALING_ONLY="gpt2-350m gpt-1.3b" bash tools/scaling.sh
# (the second finds BUILD_DIR built when the machine is still the same one).
#
# Environment:
#   SCALING_STAGES     parity,bench,kill,scaling (any subset; always run in that order)
#   BUILD_DIR          build-gpu; SCALING_BUILD (1; 0 uses the tptrain already there), GPU_ARCH (90),
#                      MESON_ARGS (-Dcuda=enabled -Dgpu_arch=$GPU_ARCH)
#   SCALING_NGPU       GPUs to use (default: all nvidia-smi lists)
#   SCALING_DEVICE     cuda (default) or cpu: tptrain on its CPU backend over MPI and PyTorch on
#                      gloo, to check this script on a machine without GPUs (small configs only)
#   SCALING_DEADLINE   550 (see Time); SCALING_RUN_TIMEOUT 300 (seconds per run)
#   SCALING_CONCURRENT 1: parity runs share the machine on disjoint GPUs (needs bash >= 5.1)
#   PYTHON             python3 (the one with torch >= 2.3); MPIRUN (mpirun); MPIRUN_FLAGS (added)
#   parity:  PARITY_CONFIG (configs/gpt2-124m.yaml), PARITY_STEPS (20), PARITY_BATCH (4),
#            PARITY_TP ("2 4 8"), PARITY_MESH ("2x2 4x2", TPxDP), PARITY_PRECISIONS ("fp32 bf16"),
#            PARITY_MESH_PRECISIONS ("fp32"), PARITY_HEADS_ALT (16), PARITY_FP32_TOL (1e-5),
#            PARITY_BF16_TOL (2e-2), PARITY_SETS (more --set options for every parity run)
#   bench:   BENCH_RANKS ("2 4 8", all-reduce), BENCH_LAYER_RANKS ("1 2 4 8"),
#            BENCH_AR_SIZES (1K:1G:4), BENCH_LAYERS ("16384x768x3072 8192x2048x8192", MxKxN),
#            BENCH_LAYER_ITERS (10+200: TPTRAIN_BENCH_ITERS of --bench layer; "" = its own ~1 s)
#   kill:    KILL_CONFIG (configs/gpt2-350m.yaml), KILL_RANKS (N), KILL_TP (N/2 from 4 ranks,
#            else N), KILL_AFTER_STEPS (3), KILL_LIMIT (60), KILL_SETS (more --set options)
#   scaling: SCALING_MODELS (space-separated NAME|CONFIG|MICRO_BATCH|TP,TP,...[|KEY=VALUE,...],
#            the last field --set for both tools, e.g. gpt-1.3b-h32|configs/gpt-1.3b.yaml|8|1,8|
#            model.n_head=32), SCALING_ONLY (model names to keep), SCALING_STEPS (15),
#            SCALING_SKIP (5), SCALING_PRECISION (bf16), SCALING_TOOLS ("tptrain pytorch"),
#            SCALING_COMM (1: --bench model for the share), SCALING_BENCH_ITERS (2+8:
#            TPTRAIN_BENCH_ITERS of --bench model), SCALING_PROFILE_STEPS (2; 0: no profiler),
#            SCALING_TORCH_PLAIN ("gpt2-124m"; "" for none), TORCH_TP_ARGS (more options for
#            torch_tp_bench.py, e.g. "--compile-scope trunk")
#
# shellcheck disable=SC2030,SC2031,SC2317  # CUDA_VISIBLE_DEVICES is set per job in subshells on
# purpose, and run_jobs calls the job functions by name
set -u

t_start=$SECONDS
out=${OUT:-./scaling-out}
build=${BUILD_DIR:-build-gpu}
do_build=${SCALING_BUILD:-1}
meson_args=${MESON_ARGS:--Dcuda=enabled -Dgpu_arch=${GPU_ARCH:-90}}
stages=${SCALING_STAGES:-parity,bench,kill,scaling}
device=${SCALING_DEVICE:-cuda}
deadline=${SCALING_DEADLINE:-550}
run_timeout=${SCALING_RUN_TIMEOUT:-300}
concurrent=${SCALING_CONCURRENT:-1}
py=${PYTHON:-python3}
mpirun_bin=${MPIRUN:-mpirun}

parity_config=${PARITY_CONFIG:-configs/gpt2-124m.yaml}
parity_steps=${PARITY_STEPS:-20}
parity_batch=${PARITY_BATCH:-4}
parity_tps=${PARITY_TP:-2 4 8}
parity_mesh=${PARITY_MESH:-2x2 4x2}
parity_precs=${PARITY_PRECISIONS:-fp32 bf16}
parity_mesh_precs=${PARITY_MESH_PRECISIONS:-fp32}
parity_heads_alt=${PARITY_HEADS_ALT:-16}
parity_fp32_tol=${PARITY_FP32_TOL:-1e-5}
parity_bf16_tol=${PARITY_BF16_TOL:-2e-2}
read -ra parity_extra <<<"${PARITY_SETS:-}"

bench_ranks=${BENCH_RANKS:-2 4 8}
bench_layer_ranks=${BENCH_LAYER_RANKS:-1 2 4 8}
bench_ar_sizes=${BENCH_AR_SIZES:-1K:1G:4}
bench_layers=${BENCH_LAYERS:-16384x768x3072 8192x2048x8192}
bench_layer_iters=${BENCH_LAYER_ITERS:-10+200}

kill_config=${KILL_CONFIG:-configs/gpt2-350m.yaml}
kill_after=${KILL_AFTER_STEPS:-3}
kill_limit=${KILL_LIMIT:-60}
read -ra kill_extra <<<"${KILL_SETS:-}"

scaling_models=${SCALING_MODELS:-gpt2-124m|configs/gpt2-124m.yaml|16|1,2,4 gpt2-350m|configs/gpt2-350m.yaml|8|1,2,4,8 gpt-1.3b|configs/gpt-1.3b.yaml|8|1,2,4,8}
steps=${SCALING_STEPS:-15}
skip=${SCALING_SKIP:-5}
precision=${SCALING_PRECISION:-bf16}
tools=${SCALING_TOOLS:-tptrain pytorch}
do_comm=${SCALING_COMM:-1}
bench_iters=${SCALING_BENCH_ITERS:-2+8}
profile_steps=${SCALING_PROFILE_STEPS:-2}
torch_plain=${SCALING_TORCH_PLAIN-gpt2-124m}
scaling_only=${SCALING_ONLY:-}
read -ra torch_tp_args <<<"${TORCH_TP_ARGS:-}"

if [ ! -f meson.build ] || [ ! -f tools/torch_tp_bench.py ]; then
    echo "scaling.sh: run me from the repository root (no meson.build here: $PWD)" >&2
    exit 2
fi
for s in ${stages//,/ }; do
    case $s in parity | bench | kill | scaling) ;; *)
        echo "scaling.sh: SCALING_STAGES: unknown stage '$s' (parity, bench, kill, scaling)" >&2
        exit 2 ;;
    esac
done
case $device in cuda | cpu) ;; *) echo "scaling.sh: SCALING_DEVICE must be cuda or cpu" >&2; exit 2 ;; esac
if [ "$steps" -le "$skip" ]; then
    echo "scaling.sh: SCALING_STEPS=$steps must exceed SCALING_SKIP=$skip" >&2
    exit 2
fi
want() { case ",$stages," in *",$1,"*) return 0 ;; esac; return 1; }

raw=$out/raw
rm -rf "$raw"
rm -f "$out/results.json" "$out/results.md" "$out/summary.txt" "$out/logs.tar.gz"
mkdir -p "$raw"/{parity,bench,kill,scaling}
exec 3>&1 4>&2 > >(tee "$out/summary.txt") 2>&1
tee_pid=$!
notes=$raw/notes.tsv # STAGE <tab> note: skips, build failure, deadline
: >"$notes"
note() { printf '%s\t%s\n' "$1" "$2" >>"$notes"; echo "note ($1): $2"; }

# ---- environment

if [ -f .device-deps/setup.sh ]; then
    # shellcheck disable=SC1091
    . .device-deps/setup.sh >"$raw/setup.log" 2>&1 || echo "warning: .device-deps/setup.sh failed (see raw/setup.log)"
fi
# NVLink multicast stays off on shared hosts (NCCL, PyTorch, NVSHMEM)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
case ":$PATH:" in *:/usr/local/cuda/bin:*) ;; *) [ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin" ;; esac

if [ "$device" = cpu ]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    ngpu=${SCALING_NGPU:-4}
    gpu_name=cpu
    concurrent=${SCALING_CONCURRENT:-0} # ranks on a few cores: one run at a time unless asked
else
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
    ngpu_seen=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    ngpu=${SCALING_NGPU:-$ngpu_seen}
    gpu_name=$(nvidia-smi -i 0 --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    gpu_name=${gpu_name:-unknown}
fi
if ! [ "$ngpu" -ge 1 ] 2>/dev/null; then
    echo "scaling.sh: no GPU found (nvidia-smi -L lists none); SCALING_DEVICE=cpu checks the script on the CPU" >&2
    exit 2
fi
if [ "$concurrent" = 1 ] && ! ((BASH_VERSINFO[0] > 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] >= 1))); then
    concurrent=0 # wait -n -p needs bash 5.1
fi

mpi_flags=()
if "$mpirun_bin" --version 2>&1 | grep -q "Open MPI"; then
    # root, more ranks than slots, and no core binding: one process per GPU, NCCL's proxy
    # threads and the host side of two runs at once must not share one core
    mpi_flags=(--allow-run-as-root --oversubscribe --bind-to none)
    is_ompi=1
else
    is_ompi=0
fi
read -ra user_mpi_flags <<<"${MPIRUN_FLAGS:-}"

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "device mode: $device, GPUs used: $ngpu ($gpu_name)"
    echo "stages: $stages"
    echo "bash $BASH_VERSION; concurrent parity runs: $concurrent"
    "$mpirun_bin" --version 2>&1 | head -2
    "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())' 2>&1 | tail -1
    if [ "$device" = cuda ]; then
        nvidia-smi -L
        nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | sed 's/^/driver /'
        echo "---- nvidia-smi topo -m"
        nvidia-smi topo -m 2>&1
    fi
} >"$raw/env.txt" 2>&1
echo "==== scaling.sh: $ngpu x $gpu_name ($device), stages $stages"
sed -n '1,6p' "$raw/env.txt"

past_deadline() { [ "$deadline" -gt 0 ] && [ $((SECONDS - t_start)) -ge "$deadline" ]; }

run_limit() { # seconds the next run may take: SCALING_RUN_TIMEOUT, cut to the deadline + 30
    local l=$run_timeout left
    if [ "$deadline" -gt 0 ]; then
        left=$((deadline + 30 - (SECONDS - t_start)))
        [ "$left" -lt "$l" ] && l=$left
        [ "$l" -lt 5 ] && l=5
    fi
    echo "$l"
}

# launch NP CMD...: runs CMD on NP ranks (mpirun from 2 ranks up, a plain process for 1), under
# the run time limit; the caller redirects the output
launch() {
    local np=$1
    shift
    local lim
    lim=$(run_limit)
    if [ "$np" -gt 1 ]; then
        local xs=() v
        if [ $is_ompi = 1 ]; then # Open MPI passes these on explicitly
            for v in NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST NVSHMEM_DISABLE_NVLS CUDA_VISIBLE_DEVICES \
                OMP_NUM_THREADS TPTRAIN_BENCH_ITERS LD_LIBRARY_PATH NCCL_DEBUG; do
                [ -n "${!v+x}" ] && xs+=(-x "$v")
            done
        fi
        timeout -k 10 "$lim" "$mpirun_bin" "${mpi_flags[@]}" "${user_mpi_flags[@]}" "${xs[@]}" -np "$np" "$@"
    else
        timeout -k 10 "$lim" "$@"
    fi
}

gpu_list() { # gpu_list N: 0,1,...,N-1
    local s="" g
    for ((g = 0; g < $1; g++)); do s+="${s:+,}$g"; done
    echo "$s"
}

cfg_value() { # cfg_value CONFIG KEY: the value of `  KEY:` in the config file
    awk -v k="$2" '$1 == k":" { print $2; exit }' "$1"
}

# ---- build
# shellcheck source=tools/build_tptrain.sh
. tools/build_tptrain.sh

bin=$build/tptrain
built=1
if [ "$do_build" = 1 ]; then
    echo "==== build tptrain in $build ($meson_args)"
    t0=$SECONDS
    build_tptrain "$build" "$meson_args" "$raw/build.log" || built=0
    echo "build: $((SECONDS - t0)) s"
fi
if [ $built = 0 ] || [ ! -x "$bin" ]; then
    built=0
    note build "tptrain build FAILED or $bin missing (raw/build.log); every tptrain run is skipped"
    tail -20 "$raw/build.log" 2>/dev/null
fi

dev_sets=() # the device (and comm) every tptrain run gets
[ "$device" = cpu ] && dev_sets=(--set parallel.device=cpu)
comm_sets() { # comm_sets NP: over NCCL on GPUs (fail rather than fall back to MPI)
    if [ "$device" = cuda ] && [ "$1" -gt 1 ]; then echo "--set parallel.comm=nccl"; fi
}

# ---- running jobs on disjoint GPUs

# run_jobs FUNC JOBFILE: each line of JOBFILE is "NAME NP ARGS..."; FUNC NAME ARGS... runs one job.
# With SCALING_CONCURRENT, jobs start as soon as NP GPUs are free (first fit, in file order),
# each with its own GPUs in CUDA_VISIBLE_DEVICES; otherwise one at a time on GPUs 0..NP-1.
run_jobs() {
    local func=$1 jobfile=$2 name np rest i g
    local -a names=() nps=() args=() free=() todo=() left=() back=()
    local -A held=()
    while read -r name np rest; do
        [ -n "$name" ] || continue
        names+=("$name")
        nps+=("$np")
        args+=("$rest")
    done <"$jobfile"
    for ((g = 0; g < ngpu; g++)); do free+=("$g"); done
    todo=("${!names[@]}")
    while [ ${#todo[@]} -gt 0 ] || [ ${#held[@]} -gt 0 ]; do
        left=()
        for i in "${todo[@]}"; do
            if past_deadline; then
                echo "deadline" >"$(dirname "$jobfile")/${names[i]}.skipped"
                continue
            fi
            if [ "$concurrent" = 0 ]; then
                # shellcheck disable=SC2086  # args are words
                (export CUDA_VISIBLE_DEVICES; CUDA_VISIBLE_DEVICES=$(gpu_list "${nps[i]}"); "$func" "${names[i]}" ${args[i]})
            elif [ "${nps[i]}" -le ${#free[@]} ]; then
                local gpus
                gpus=$(IFS=,; echo "${free[*]:0:${nps[i]}}")
                free=("${free[@]:${nps[i]}}")
                # shellcheck disable=SC2086
                (export CUDA_VISIBLE_DEVICES=$gpus; "$func" "${names[i]}" ${args[i]}) &
                held[$!]=$gpus
            else
                left+=("$i")
            fi
        done
        todo=("${left[@]}")
        [ ${#held[@]} -gt 0 ] || continue
        local done_pid=""
        wait -n -p done_pid
        if [ -z "$done_pid" ] || [ -z "${held[$done_pid]+x}" ]; then continue; fi
        IFS=, read -ra back <<<"${held[$done_pid]}"
        free+=("${back[@]}")
        unset "held[$done_pid]"
    done
}

# run_timed LOGBASE NP CMD...: runs CMD through launch into LOGBASE.log, leaving LOGBASE.rc,
# LOGBASE.secs and LOGBASE.gpus
run_timed() {
    local base=$1 np=$2 t0 rc
    shift 2
    t0=$SECONDS
    echo "${CUDA_VISIBLE_DEVICES:-}" >"$base.gpus"
    {
        echo "# CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} np=$np"
        echo "# $*"
    } >"$base.log"
    # stdin from /dev/null: mpirun forwards stdin to rank 0, and the callers read job lists
    launch "$np" "$@" >>"$base.log" 2>&1 </dev/null
    rc=$?
    echo "$rc" >"$base.rc"
    echo $((SECONDS - t0)) >"$base.secs"
    return $rc
}

# ---- stage: parity

parity_warm=$(cfg_value "$parity_config" warmup_steps)
parity_warm=${parity_warm:-0}
[ "$parity_warm" -gt "$parity_steps" ] && parity_warm=$parity_steps

# parity_run NAME PREC TP DP HEADS ACCUM
parity_run() {
    local name=$1 prec=$2 tp=$3 dp=$4 heads=$5 accum=$6 np
    np=$((tp * dp))
    local sets=(--set "train.precision=$prec" --set "model.n_head=$heads" --set "parallel.tp=$tp"
                --set "parallel.dp=$dp" --set "train.micro_batch=$parity_batch" --set "train.grad_accum=$accum"
                --set train.global_batch=0 --set "train.steps=$parity_steps" --set "train.warmup_steps=$parity_warm"
                --set data.val= --set eval.every=0 --set checkpoint.dir= --set log.every=5
                --set debug.check_replicas=true --set "log.jsonl=$raw/parity/$name.jsonl")
    # shellcheck disable=SC2046  # comm_sets prints words
    run_timed "$raw/parity/$name" "$np" "$bin" "$parity_config" "${parity_extra[@]}" "${dev_sets[@]}" \
        $(comm_sets "$np") "${sets[@]}"
    local rc=$?
    echo "parity $name: exit $rc in $(cat "$raw/parity/$name.secs") s on GPUs ${CUDA_VISIBLE_DEVICES:-}"
}

stage_parity() {
    echo "==== parity: ${parity_steps} steps of $parity_config (micro_batch $parity_batch), tp in {$parity_tps}, mesh {$parity_mesh}, against tp=1"
    local base_heads prec tp dp mesh heads jobs=$raw/parity/jobs.tsv cmp=$raw/parity/compare.tsv
    base_heads=$(cfg_value "$parity_config" n_head)
    local s
    for s in "${parity_extra[@]}"; do
        case $s in model.n_head=*) base_heads=${s#model.n_head=} ;; esac
    done
    : >"$jobs"
    : >"$cmp" # NAME REF PREC TP DP HEADS TOL
    local -A refs=()
    heads_for() { # heads_for TP: the model's heads, or PARITY_HEADS_ALT where TP does not divide them
        if [ $((base_heads % $1)) = 0 ]; then echo "$base_heads"
        elif [ $((parity_heads_alt % $1)) = 0 ]; then echo "$parity_heads_alt"
        else echo ""; fi
    }
    add_case() { # add_case PREC TP DP
        local prec=$1 tp=$2 dp=$3 heads accum name ref tol
        heads=$(heads_for "$tp")
        name="${prec}_tp${tp}_dp${dp}"
        if [ -z "$heads" ]; then
            note parity "$name: tp=$tp divides neither n_head=$base_heads nor PARITY_HEADS_ALT=$parity_heads_alt; skipped"
            return
        fi
        if [ $((tp * dp)) -gt "$ngpu" ]; then
            note parity "$name: needs $((tp * dp)) GPUs, this machine has $ngpu; skipped"
            return
        fi
        accum=$dp # tp=1 x dp=1 reads the same global batch as grad_accum dp micro-steps
        ref="${prec}_ref_h${heads}_a${accum}"
        [ "$prec" = fp32 ] && tol=$parity_fp32_tol || tol=$parity_bf16_tol
        if [ -z "${refs[$ref]+x}" ]; then
            refs[$ref]=1
            echo "$ref 1 $prec 1 1 $heads $accum" >>"$jobs"
        fi
        echo "$name $((tp * dp)) $prec $tp $dp $heads 1" >>"$jobs"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$ref" "$prec" "$tp" "$dp" "$heads" "$tol" >>"$cmp"
    }
    for prec in $parity_precs; do
        for tp in $parity_tps; do add_case "$prec" "$tp" 1; done
    done
    for prec in $parity_mesh_precs; do
        for mesh in $parity_mesh; do add_case "$prec" "${mesh%x*}" "${mesh#*x}"; done
    done
    if [ $built = 0 ]; then
        note parity "no tptrain: nothing ran"
        return
    fi
    # largest first, so the small runs fill the gaps
    sort -k2,2nr -s "$jobs" -o "$jobs"
    run_jobs parity_run "$jobs"
}

# ---- stage: bench

stage_bench() {
    echo "==== bench: --bench allreduce $bench_ar_sizes at {$bench_ranks} ranks, --bench layer {$bench_layers} (bf16) at {$bench_layer_ranks}"
    local np shape jobs=$raw/bench/jobs.tsv
    : >"$jobs"
    for np in $bench_ranks; do
        if [ "$np" -gt "$ngpu" ]; then note bench "allreduce at $np ranks needs $np GPUs; skipped"; continue; fi
        echo "allreduce_np$np allreduce $np -" >>"$jobs"
    done
    for np in $bench_layer_ranks; do
        for shape in $bench_layers; do
            if [ "$np" -gt "$ngpu" ]; then note bench "layer $shape at $np ranks needs $np GPUs; skipped"; continue; fi
            echo "layer_${shape}_np$np layer $np $shape" >>"$jobs"
        done
    done
    [ $built = 1 ] || { note bench "no tptrain: nothing ran"; return; }
    local name kind dims
    while read -r name kind np shape; do
        if past_deadline; then echo deadline >"$raw/bench/$name.skipped"; continue; fi
        local args=(--bench "$kind")
        if [ "$kind" = allreduce ]; then
            args+=("$bench_ar_sizes")
        else
            IFS=x read -ra dims <<<"$shape"
            args+=("${dims[@]}" --set "train.precision=$precision")
        fi
        local iters=""
        [ "$kind" = layer ] && iters=$bench_layer_iters
        # shellcheck disable=SC2046
        CUDA_VISIBLE_DEVICES=$(gpu_list "$np") TPTRAIN_BENCH_ITERS=$iters run_timed "$raw/bench/$name" "$np" \
            "$bin" "${args[@]}" "${dev_sets[@]}" $(comm_sets "$np") --json "$raw/bench/$name.json"
        echo "bench $name: exit $(cat "$raw/bench/$name.rc") in $(cat "$raw/bench/$name.secs") s"
    done <"$jobs"
}

# ---- stage: kill

stage_kill() {
    local np=${KILL_RANKS:-$ngpu} tp dir=$raw/kill
    if [ "$np" -gt "$ngpu" ]; then note kill "KILL_RANKS=$np > $ngpu GPUs; using $ngpu"; np=$ngpu; fi
    if [ "$np" -lt 2 ]; then note kill "needs 2 ranks at least; skipped"; echo "status=skipped" >"$dir/result.txt"; return; fi
    if [ "$np" -ge 4 ]; then tp=${KILL_TP:-$((np / 2))}; else tp=${KILL_TP:-$np}; fi
    local victim=$((np - 1))
    echo "==== kill: $np ranks (tp=$tp x dp=$((np / tp))) on $kill_config; SIGKILL to rank $victim after $kill_after steps"
    {
        echo "ranks=$np"
        echo "tp=$tp"
        echo "victim=$victim"
        echo "limit=$kill_limit"
    } >"$dir/result.txt"
    [ $built = 1 ] || { note kill "no tptrain: nothing ran"; echo "status=not run" >>"$dir/result.txt"; return; }
    if past_deadline; then echo "status=deadline" >>"$dir/result.txt"; return; fi
    rm -f "$dir"/pid.* "$dir/train.jsonl"
    local sets=(--set "parallel.tp=$tp" --set train.grad_accum=1 --set train.global_batch=0
                --set train.steps=100000 --set train.warmup_steps=10 --set data.val= --set eval.every=0
                --set checkpoint.dir= --set log.every=1 --set "log.jsonl=$dir/train.jsonl")
    # Each rank writes its pid, then becomes tptrain: the pids are the ranks' own.
    # shellcheck disable=SC2016  # expanded by each rank's sh
    local wrap='r=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${PMIX_RANK:-x}}}; echo $$ >"$KILL_DIR/pid.$r"; exec "$@"'
    # shellcheck disable=SC2046
    (export CUDA_VISIBLE_DEVICES KILL_DIR=$dir; CUDA_VISIBLE_DEVICES=$(gpu_list "$np")
     exec timeout -k 10 $((kill_limit + 240)) "$mpirun_bin" "${mpi_flags[@]}" "${user_mpi_flags[@]}" \
        $([ $is_ompi = 1 ] && echo "-x NCCL_NVLS_ENABLE -x CUDA_VISIBLE_DEVICES -x KILL_DIR -x OMP_NUM_THREADS") \
        -np "$np" sh -c "$wrap" sh "$bin" "$kill_config" "${kill_extra[@]}" "${dev_sets[@]}" \
        $(comm_sets "$np") "${sets[@]}") >"$dir/run.log" 2>&1 </dev/null &
    local launcher=$! t0 n=0 waited=0 ticks=1800
    # wait for the steps (start-up included): up to 180 s, or what the deadline leaves
    if [ "$deadline" -gt 0 ] && [ $(((deadline - (SECONDS - t_start)) * 10)) -lt $ticks ]; then
        ticks=$(((deadline - (SECONDS - t_start)) * 10))
    fi
    while [ $waited -lt $ticks ]; do
        n=$(grep -c '"kind":"train"' "$dir/train.jsonl" 2>/dev/null)
        n=${n:-0}
        [ "$n" -ge "$kill_after" ] && break
        kill -0 $launcher 2>/dev/null || break
        sleep 0.1
        waited=$((waited + 1))
    done
    local pids=() r p
    for ((r = 0; r < np; r++)); do
        p=$(cat "$dir/pid.$r" 2>/dev/null)
        pids+=("${p:-}")
    done
    if [ "$n" -lt "$kill_after" ] || [ -z "${pids[$victim]}" ]; then
        echo "status=no_start" >>"$dir/result.txt"
        echo "steps_before_kill=$n" >>"$dir/result.txt"
        echo "kill: the run did not reach $kill_after steps (or a pid is missing); see raw/kill/run.log"
        kill -0 $launcher 2>/dev/null && kill $launcher 2>/dev/null
        wait $launcher 2>/dev/null
        return
    fi
    echo "steps_before_kill=$n" >>"$dir/result.txt"
    kill -9 "${pids[$victim]}"
    t0=$EPOCHREALTIME
    local -A gone=()
    local alive now dt
    while :; do
        alive=0
        now=$EPOCHREALTIME
        for ((r = 0; r < np; r++)); do
            [ "$r" = "$victim" ] && continue
            [ -n "${gone[$r]+x}" ] && continue
            if [ -n "${pids[$r]}" ] && kill -0 "${pids[$r]}" 2>/dev/null && ! grep -q '^State:.*Z' "/proc/${pids[$r]}/status" 2>/dev/null; then
                alive=$((alive + 1))
            else
                dt=$(awk -v a="$t0" -v b="$now" 'BEGIN { printf "%.2f", b - a }')
                gone[$r]=$dt
                echo "rank_${r}_gone_s=$dt" >>"$dir/result.txt"
            fi
        done
        [ $alive = 0 ] && break
        dt=$(awk -v a="$t0" -v b="$now" 'BEGIN { printf "%d", b - a }')
        if [ "$dt" -ge $((kill_limit + 30)) ]; then
            for ((r = 0; r < np; r++)); do
                [ "$r" = "$victim" ] || [ -n "${gone[$r]+x}" ] || kill -9 "${pids[$r]}" 2>/dev/null
            done
            echo "survivors_killed_after_s=$dt" >>"$dir/result.txt"
            break
        fi
        sleep 0.1
    done
    # the launcher gets 30 s more to notice and exit (it is timeout, which passes a TERM on)
    for ((waited = 0; waited < 300; waited++)); do
        kill -0 $launcher 2>/dev/null || break
        sleep 0.1
    done
    kill -0 $launcher 2>/dev/null && { echo "launcher_stopped_by_script=1" >>"$dir/result.txt"; kill $launcher; }
    wait $launcher
    local rc=$?
    now=$EPOCHREALTIME
    {
        echo "launcher_exit=$rc"
        echo "launcher_gone_s=$(awk -v a="$t0" -v b="$now" 'BEGIN { printf "%.2f", b - a }')"
        echo "status=ran"
    } >>"$dir/result.txt"
    echo "kill: launcher exit $rc; $(grep -c '_gone_s=' "$dir/result.txt") ranks gone"
}

# ---- stage: scaling

scaling_one() { # scaling_one MODEL CONFIG B TP TOOL EXTRA_SETS(k=v,k=v or -)
    local model=$1 config=$2 B=$3 tp=$4 tool=$5 extra=$6 warm name
    name="${model}_tp${tp}_${tool}"
    if past_deadline; then echo deadline >"$raw/scaling/$name.skipped"; return; fi
    warm=$(cfg_value "$config" warmup_steps)
    warm=${warm:-0}
    [ "$warm" -gt "$steps" ] && warm=$steps
    local sets=(--set "train.micro_batch=$B" --set train.grad_accum=1 --set train.global_batch=0) kv
    if [ "$extra" != - ]; then
        for kv in ${extra//,/ }; do sets+=(--set "$kv"); done
    fi
    local run=(--set "train.steps=$steps" --set "train.warmup_steps=$warm" --set data.val= --set eval.every=0
               --set checkpoint.dir=)
    local base=$raw/scaling/$name gpus
    gpus=$(gpu_list "$tp")
    case $tool in
    tptrain)
        # shellcheck disable=SC2046
        CUDA_VISIBLE_DEVICES=$gpus run_timed "$base" "$tp" "$bin" "$config" "${sets[@]}" "${run[@]}" "${dev_sets[@]}" $(comm_sets "$tp") \
            --set "train.precision=$precision" --set "parallel.tp=$tp" --set log.every=5 --set "log.jsonl=$base.jsonl"
        ;;
    tpbench)
        # shellcheck disable=SC2046
        CUDA_VISIBLE_DEVICES=$gpus TPTRAIN_BENCH_ITERS=$bench_iters run_timed "$base" "$tp" "$bin" --bench model "$config" "${sets[@]}" \
            "${dev_sets[@]}" $(comm_sets "$tp") --set "train.precision=$precision" --json "$base.json"
        ;;
    pytorch)
        local dev=()
        [ "$device" = cpu ] && dev=(--device cpu --compile off)
        CUDA_VISIBLE_DEVICES=$gpus run_timed "$base" 1 "$py" -m torch.distributed.run --standalone --nproc_per_node="$tp" \
            tools/torch_tp_bench.py "$config" "${sets[@]}" "${run[@]}" --skip "$skip" --precision "$precision" \
            --profile-steps "$profile_steps" "${dev[@]}" "${torch_tp_args[@]}" --json "$base.json"
        ;;
    pytorch-plain)
        local dev=()
        [ "$device" = cpu ] && dev=(--device cpu)
        CUDA_VISIBLE_DEVICES=$gpus run_timed "$base" 1 "$py" tools/torch_gpt2_bench.py "$config" "${sets[@]}" "${run[@]}" --skip "$skip" \
            --precision "$precision" "${dev[@]}" --json "$base.json"
        ;;
    esac
    echo "scaling $name: exit $(cat "$base.rc") in $(cat "$base.secs") s"
}

stage_scaling() {
    echo "==== scaling: $precision, $steps steps (first $skip left out), tools {$tools}"
    local spec model config B tps extra tp jobs=$raw/scaling/jobs.tsv tool
    : >"$jobs"
    for spec in $scaling_models; do
        IFS='|' read -r model config B tps extra <<<"$spec"
        extra=${extra:--}
        if [ -n "$scaling_only" ]; then
            case " $scaling_only " in *" $model "*) ;; *) continue ;; esac
        fi
        if [ ! -f "$config" ]; then note scaling "$model: no config $config; skipped"; continue; fi
        for tp in ${tps//,/ }; do
            if [ "$tp" -gt "$ngpu" ]; then note scaling "$model tp=$tp needs $tp GPUs, this machine has $ngpu; skipped"; continue; fi
            for tool in $tools; do
                case $tool in
                tptrain)
                    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$model" "$config" "$B" "$tp" tptrain "$extra" >>"$jobs"
                    [ "$do_comm" = 1 ] && printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$model" "$config" "$B" "$tp" tpbench "$extra" >>"$jobs"
                    ;;
                pytorch)
                    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$model" "$config" "$B" "$tp" pytorch "$extra" >>"$jobs"
                    case " $torch_plain " in *" $model "*)
                        [ "$tp" = 1 ] && printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$model" "$config" "$B" 1 pytorch-plain "$extra" >>"$jobs" ;;
                    esac
                    ;;
                *) note scaling "unknown tool '$tool' in SCALING_TOOLS; skipped" ;;
                esac
            done
        done
    done
    while IFS=$'\t' read -r model config B tp tool extra; do
        case $tool in tptrain | tpbench)
            if [ $built = 0 ]; then echo "no tptrain" >"$raw/scaling/${model}_tp${tp}_${tool}.skipped"; continue; fi ;;
        esac
        scaling_one "$model" "$config" "$B" "$tp" "$tool" "$extra"
    done <"$jobs"
}

want parity && stage_parity
want bench && stage_bench
want kill && stage_kill
want scaling && stage_scaling

# ---- tables, results.json, results.md

echo "==== results ($((SECONDS - t_start)) s so far)"
"$py" - "$raw" "$out" "$stages" "$device" "$ngpu" "$gpu_name" "$parity_steps" "$steps" "$skip" "$precision" <<'PY'
import json, os, re, statistics, sys

raw, out, stages, device, ngpu, gpu_name, parity_steps, steps, skip, precision = sys.argv[1:]
ngpu, parity_steps, steps, skip = int(ngpu), int(parity_steps), int(steps), int(skip)
stages = [s for s in ("parity", "bench", "kill", "scaling") if s in stages.split(",")]
md = []  # results.md lines


def read(path, default=None):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def load_json(path):
    try:
        with open(path) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def train_records(path):
    recs = []
    for line in (read(path, "") or "").splitlines():
        if '"kind":"train"' in line:
            try:
                recs.append(json.loads(line))
            except ValueError:
                pass
    return recs


def run_state(base):
    """(rc or None, seconds or None, skipped reason or None) of one run."""
    rc = read(base + ".rc")
    secs = read(base + ".secs")
    skipped = read(base + ".skipped")
    return (int(rc) if rc and rc.strip().lstrip("-").isdigit() else None,
            int(secs) if secs and secs.strip().isdigit() else None,
            skipped.strip() if skipped else None)


def header(log):
    # tptrain's first line: "tptrain V | cuda backend, comm nccl | mesh dp=1 x tp=2 (2 ranks)"
    for line in (read(log, "") or "").splitlines():
        if line.startswith("tptrain ") and "| mesh" in line:
            return line.strip()
    return None


def tail(log, n=6):
    lines = [l for l in (read(log, "") or "").splitlines() if l.strip()]
    return lines[-n:]


def pcts(v):  # a share as "12.3%", or "-"
    return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "-"


def fmt(v, spec, none="-"):
    # spec: a format spec, optionally with a width ("8.2f"), which the placeholder keeps too
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, spec)
    width = re.match(r"\d*", spec).group()
    return none.rjust(int(width)) if width else none


notes = {}
for line in (read(f"{raw}/notes.tsv", "") or "").splitlines():
    st, _, text = line.partition("\t")
    notes.setdefault(st, []).append(text)
results = {"gpu": gpu_name, "gpus": ngpu, "device_mode": device, "stages": {}, "notes": notes,
           "env": read(f"{raw}/env.txt", "")}
ok_all = not any("FAILED" in n for n in notes.get("build", []))
print(f"# {ngpu} x {gpu_name} ({device})")
md.append(f"# tptrain tensor-parallel scaling: {ngpu} x {gpu_name}\n")
md.append("Produced by `tools/scaling.sh`; raw logs in `logs.tar.gz` (or `raw/`).\n")
for st, ns in notes.items():
    for n in ns:
        md.append(f"- note ({st}): {n}")
if notes:
    md.append("")

# ---- parity
if "parity" in stages:
    rows, ok = [], True
    for line in (read(f"{raw}/parity/compare.tsv", "") or "").splitlines():
        name, ref, prec, tp, dp, heads, tol = line.split("\t")
        tp, dp, tol = int(tp), int(dp), float(tol)
        row = {"name": name, "reference": ref, "precision": prec, "tp": tp, "dp": dp, "n_head": int(heads),
               "tol": tol}
        problems = []
        for who, base in (("run", f"{raw}/parity/{name}"), ("reference", f"{raw}/parity/{ref}")):
            rc, secs, skipped = run_state(base)
            row[f"{who}_exit"], row[f"{who}_seconds"] = rc, secs
            if skipped:
                problems.append(f"{who} skipped ({skipped})")
            elif rc is None:
                problems.append(f"{who} did not run")
            elif rc != 0:
                problems.append(f"{who} exit {rc}: " + " / ".join(tail(base + ".log", 3)))
        hdr = header(f"{raw}/parity/{name}.log")
        row["header"] = hdr
        if device == "cuda" and tp > 1 and hdr and "comm nccl" not in hdr:
            problems.append("not over NCCL: " + hdr)
        a = train_records(f"{raw}/parity/{ref}.jsonl")
        b = train_records(f"{raw}/parity/{name}.jsonl")
        row["steps"] = [len(a), len(b)]
        if not problems and (len(a) != parity_steps or len(b) != parity_steps):
            problems.append(f"logged {len(b)} steps, reference {len(a)}, expected {parity_steps}")
        d = dn = None
        if a and b and len(a) == len(b):
            rel = [abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b)]
            d = max(rel)
            row["worst_step"] = rel.index(d) + 1
            dn = max(abs(x["grad_norm"] - y["grad_norm"]) / abs(x["grad_norm"]) for x, y in zip(a, b)
                     if x["grad_norm"])
            row["loss_first_last"] = [a[0]["loss"], a[-1]["loss"]]
            if d > tol:
                problems.append(f"max rel loss diff {d:.3e} > {tol:g} (step {row['worst_step']})")
        row["max_rel_loss_diff"], row["max_rel_grad_norm_diff"] = d, dn
        row["status"] = "PASS" if not problems else "FAIL"
        row["problems"] = problems
        ok &= not problems
        rows.append(row)
    # no comparison at all: every case was skipped for the machine's size (noted above)
    status = ("PASS" if ok else "FAIL") if rows else "SKIPPED"
    results["stages"]["parity"] = {"status": status, "steps": parity_steps, "rows": rows}
    ok_all &= ok
    print(f"\n## parity ({parity_steps} steps, per-step loss against tp=1): {status}")
    print(f"{'run':<16} {'ref':<18} {'heads':>5} {'max rel loss':>13} {'tol':>7} {'step':>4} {'max rel norm':>13} {'s':>4}  status")
    md.append(f"## Parity: {status}\n")
    md.append(f"Per-step training loss of `log.jsonl` against the tp=1 run ({parity_steps} steps, "
              "`debug.check_replicas` on); 2-D meshes against tp=1 with grad_accum = dp.\n")
    md.append("| run | precision | tp x dp | heads | max rel loss diff | tol | grad-norm max rel diff | status |")
    md.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"{r['name']:<16} {r['reference']:<18} {r['n_head']:>5} {fmt(r['max_rel_loss_diff'], '13.3e'):>13} "
              f"{r['tol']:>7.0e} {r.get('worst_step', '-'):>4} {fmt(r['max_rel_grad_norm_diff'], '13.3e'):>13} "
              f"{fmt(r['run_seconds'], '4d'):>4}  {r['status']}" + (f"  ({'; '.join(r['problems'])})" if r['problems'] else ""))
        md.append(f"| {r['name']} | {r['precision']} | {r['tp']} x {r['dp']} | {r['n_head']} | "
                  f"{fmt(r['max_rel_loss_diff'], '.3e')} | {r['tol']:g} | {fmt(r['max_rel_grad_norm_diff'], '.3e')} | "
                  f"{r['status']}{' (' + '; '.join(r['problems']) + ')' if r['problems'] else ''} |")
    md.append("")

# ---- bench
if "bench" in stages:
    ar_rows, layer_rows, ok = [], [], True
    for line in (read(f"{raw}/bench/jobs.tsv", "") or "").splitlines():
        name, kind, np_, shape = line.split()
        base = f"{raw}/bench/{name}"
        rc, secs, skipped = run_state(base)
        j = load_json(base + ".json") if rc == 0 else None
        problem = (f"skipped ({skipped})" if skipped else "did not run" if rc is None else
                   f"exit {rc}: " + " / ".join(tail(base + ".log", 3)) if rc != 0 else
                   "no JSON" if j is None else None)
        ok &= problem is None
        if kind == "allreduce":
            row = {"ranks": int(np_), "problem": problem}
            if j:
                big = max(j["rows"], key=lambda x: x["size"])
                row.update({"comm": j.get("comm"), "avg_busbw_gbs": j.get("avg_busbw_gbs"),
                            "largest_bytes": big["size"], "largest_busbw_gbs": big.get("busbw_gbs"),
                            "largest_time_us": big.get("time_us"),
                            "wrong": sum(int(x.get("wrong") or 0) for x in j["rows"]), "rows": j["rows"]})
                ok &= row["wrong"] == 0
            ar_rows.append(row)
        else:
            row = {"ranks": int(np_), "shape": shape, "problem": problem}
            if j:
                row.update({"comm": j.get("comm"), "phases": j["phases"]})
            layer_rows.append(row)
    status = "PASS" if ok else "FAIL"
    if not ar_rows and not layer_rows:
        status = "SKIPPED"
    results["stages"]["bench"] = {"status": status, "allreduce": ar_rows, "layer": layer_rows}
    ok_all &= ok
    print(f"\n## bench: {status}")
    md.append(f"## Benchmarks: {status}\n")
    if ar_rows:
        print(f"{'ranks':>5} {'comm':<6} {'avg busbw GB/s':>15} {'largest B':>12} {'its busbw GB/s':>15} {'wrong':>6}")
        md.append("`tptrain --bench allreduce` (fp32 sum, in place; nccl-tests' bus bandwidth):\n")
        md.append("| ranks | comm | avg busbw GB/s | largest size | its busbw GB/s | its time us | wrong |")
        md.append("| --- | --- | --- | --- | --- | --- | --- |")
        for r in ar_rows:
            if r["problem"]:
                print(f"{r['ranks']:>5} {r['problem']}")
                md.append(f"| {r['ranks']} | {r['problem']} | | | | | |")
                continue
            print(f"{r['ranks']:>5} {str(r['comm']):<6} {fmt(r['avg_busbw_gbs'], '15.1f')} {r['largest_bytes']:>12} "
                  f"{fmt(r['largest_busbw_gbs'], '15.1f')} {r['wrong']:>6}")
            md.append(f"| {r['ranks']} | {r['comm']} | {fmt(r['avg_busbw_gbs'], '.1f')} | {r['largest_bytes']} | "
                      f"{fmt(r['largest_busbw_gbs'], '.1f')} | {fmt(r['largest_time_us'], '.1f')} | {r['wrong']} |")
        md.append("")
    if layer_rows:
        print(f"{'ranks':>5} {'M x K x N':<18} {'phase':<12} {'median ms':>10} {'TFLOP/s/GPU':>12} {'comm %':>7}")
        md.append(f"`tptrain --bench layer M K N --set train.precision={precision}` (column-, row-parallel linear "
                  "and the MLP, forward + backward):\n")
        md.append("| ranks | M x K x N | phase | median ms | TFLOP/s per GPU | comm share |")
        md.append("| --- | --- | --- | --- | --- | --- |")
        for r in layer_rows:
            if r["problem"]:
                print(f"{r['ranks']:>5} {r['shape']:<18} {r['problem']}")
                md.append(f"| {r['ranks']} | {r['shape']} | {r['problem']} | | | |")
                continue
            for ph in r["phases"]:
                share = ph.get("comm_share")
                print(f"{r['ranks']:>5} {r['shape']:<18} {ph['name']:<12} {fmt(ph.get('ms_median'), '10.4f')} "
                      f"{fmt(ph.get('tflops'), '12.1f')} {fmt(None if share is None else 100 * share, '7.1f')}")
                md.append(f"| {r['ranks']} | {r['shape']} | {ph['name']} | {fmt(ph.get('ms_median'), '.4f')} | "
                          f"{fmt(ph.get('tflops'), '.1f')} | {pcts(share)} |")
        md.append("")

# ---- kill
if "kill" in stages:
    kv = {}
    for line in (read(f"{raw}/kill/result.txt", "") or "").splitlines():
        k, _, v = line.partition("=")
        kv[k.strip()] = v.strip()
    gone = {int(k[5:-7]): float(v) for k, v in kv.items() if k.startswith("rank_") and k.endswith("_gone_s")}
    limit = float(kv.get("limit", 60))
    n = int(kv.get("ranks", 0) or 0)
    log = read(f"{raw}/kill/run.log", "") or ""
    how = []
    if "NCCL error" in log:
        how.append("tptrain reported an NCCL error")
    if "tptrain:" in log:
        how.append("tptrain printed an error")
    if "noticed that process rank" in log or "exited on signal" in log:
        how.append("mpirun noticed the killed rank and ended the job")
    if "BAD TERMINATION" in log or "EXIT STRING" in log:
        how.append("the launcher reported a bad termination")
    worst = max(gone.values()) if gone else None
    st = kv.get("status", "not run")
    problems = []
    if st != "ran":
        problems.append({"no_start": f"the run did not reach the kill point (steps logged: {kv.get('steps_before_kill', '?')})",
                         "deadline": "skipped (deadline)", "skipped": "skipped (fewer than 2 GPUs)"}.get(st, st))
    else:
        if len(gone) != n - 1:
            problems.append(f"{n - 1 - len(gone)} ranks did not exit")
        if "survivors_killed_after_s" in kv:
            problems.append(f"survivors still alive after {kv['survivors_killed_after_s']} s (killed by the script)")
        if worst is not None and worst > limit:
            problems.append(f"slowest rank exited after {worst:.1f} s > {limit:g} s")
        if kv.get("launcher_exit") == "0":
            problems.append("the launcher exited 0 after a rank was killed")
    status = "PASS" if not problems else ("SKIPPED" if st == "skipped" else "FAIL")
    ok_all &= status != "FAIL"
    results["stages"]["kill"] = {"status": status, "ranks": n, "tp": kv.get("tp"), "victim": kv.get("victim"),
                                 "steps_before_kill": kv.get("steps_before_kill"), "rank_exit_s": gone,
                                 "slowest_s": worst, "launcher_exit": kv.get("launcher_exit"),
                                 "launcher_gone_s": kv.get("launcher_gone_s"), "how": how, "problems": problems,
                                 "log_tail": tail(f"{raw}/kill/run.log", 12)}
    print(f"\n## kill: {status}")
    if st == "ran":
        line = (f"{n} ranks (tp={kv.get('tp')}), rank {kv.get('victim')} killed after {kv.get('steps_before_kill')} "
                f"steps; the others gone after {fmt(min(gone.values()) if gone else None, '.2f')} to "
                f"{fmt(worst, '.2f')} s (limit {limit:g} s); launcher exit {kv.get('launcher_exit')} after "
                f"{kv.get('launcher_gone_s')} s; {'; '.join(how) or 'no message recognised'}")
    else:
        line = f"{n} ranks (tp={kv.get('tp')}): not run to the end"
    print(line + (f" ({'; '.join(problems)})" if problems else ""))
    md.append(f"## Kill one rank: {status}\n")
    md.append(line + (f". Problems: {'; '.join(problems)}" if problems else "") + "\n")

# ---- scaling
if "scaling" in stages:
    ok = True
    cells = {}  # (model, tp, tool) -> dict
    order = []
    for line in (read(f"{raw}/scaling/jobs.tsv", "") or "").splitlines():
        model, config, B, tp, tool, extra = line.split("\t")
        tp, B = int(tp), int(B)
        if (model, tp) not in order:
            order.append((model, tp))
        base = f"{raw}/scaling/{model}_tp{tp}_{tool}"
        rc, secs, skipped = run_state(base)
        c = {"model": model, "config": config, "B": B, "tp": tp, "tool": tool, "exit": rc, "seconds": secs,
             "extra_sets": None if extra == "-" else extra}
        problem = (f"skipped ({skipped})" if skipped else "did not run" if rc is None else
                   f"exit {rc}: " + " / ".join(tail(base + ".log", 2)) if rc != 0 else None)
        if problem is None and tool == "tptrain":
            recs = train_records(base + ".jsonl")
            timed = [r for r in recs if r["step"] > skip]
            if not timed:
                problem = f"logged {len(recs)} steps"
            else:
                med = statistics.median(r["ms"] for r in timed)
                r0 = timed[0]
                tokens = round(r0["tok_per_s"] * r0["ms"] / 1e3)  # global_batch
                tok_s = tokens / (med / 1e3)
                c.update({"step_ms_median": med, "tok_per_s": tok_s, "tok_per_s_per_gpu": tok_s / tp,
                          "mfu": tok_s * r0["mfu"] / r0["tok_per_s"] if r0["mfu"] >= 0 else None,
                          "mem_gib": recs[-1]["mem_gib"], "loss_first": recs[0]["loss"],
                          "loss_last": recs[-1]["loss"], "header": header(base + ".log")})
                if device == "cuda" and tp > 1 and c["header"] and "comm nccl" not in c["header"]:
                    problem = "not over NCCL: " + c["header"]
        elif problem is None and tool == "tpbench":
            j = load_json(base + ".json")
            if not j:
                problem = "no JSON"
            else:
                c.update({"bench_step_ms": j["step"]["ms_median"], "comm_ms": j.get("communication_ms"),
                          "sum_ms": j.get("sum_ms"),
                          "comm_share": (j["communication_ms"] / j["sum_ms"]) if j.get("sum_ms") else None})
        elif problem is None:
            j = load_json(base + ".json")
            if not j:
                problem = "no JSON"
            else:
                keep = ("step_ms_median", "step_ms_first", "tok_per_s", "mfu", "max_memory_allocated_gib",
                        "max_memory_reserved_gib", "loss_first", "loss_last", "torch", "compile", "head", "head_note",
                        "loss", "fused_adamw", "comm_share", "comm_ms_per_step", "comm_note", "padded_vocab", "params")
                c.update({k: j.get(k) for k in keep if k in j})
                c["tok_per_s_per_gpu"] = j["tok_per_s"] / tp
        c["problem"] = problem
        ok &= problem is None
        cells[(model, tp, tool)] = c
    table = []
    base_ms = {}
    for model, tp in order:
        t, b, p, q = (cells.get((model, tp, k)) for k in ("tptrain", "tpbench", "pytorch", "pytorch-plain"))
        row = {"model": model, "tp": tp, "tptrain": t, "tptrain_bench_model": b, "pytorch": p, "pytorch_plain": q}
        good = lambda c, k: c.get(k) if c and not c["problem"] else None
        tt, pt = good(t, "tok_per_s"), good(p, "tok_per_s")
        row["ratio_tok_s"] = tt / pt if tt and pt else None
        for tool, c in (("tptrain", t), ("pytorch", p)):
            ms = good(c, "step_ms_median")
            if tp == 1 and ms:
                base_ms[(model, tool)] = ms
            b1 = base_ms.get((model, tool))
            # strong scaling: the same batch on tp GPUs; 1.0 = tp times faster than tp=1
            row[f"{tool}_speedup"] = b1 / ms if ms and b1 else None
            row[f"{tool}_efficiency"] = b1 / ms / tp if ms and b1 else None
        table.append(row)
    status = "PASS" if ok else "FAIL"
    if not cells:
        status = "SKIPPED"
    ok_all &= ok
    results["stages"]["scaling"] = {"status": status, "precision": precision, "steps": steps, "skip": skip,
                                    "rows": table}
    print(f"\n## scaling ({precision}, median of steps {skip + 1}..{steps}; tok/s per GPU = tok/s / tp; "
          f"comm: tptrain --bench model all-reduce share, PyTorch NCCL kernel share): {status}")
    hdr = (f"{'model':<10} {'tp':>2} | {'tpt ms':>8} {'tok/s/GPU':>10} {'MFU%':>5} {'comm%':>6} {'eff':>5} | "
           f"{'torch ms':>8} {'tok/s/GPU':>10} {'MFU%':>5} {'comm%':>6} {'eff':>5} | {'ratio':>5} | "
           f"{'mem GiB tpt/torch':>17}")
    print(hdr)
    md.append(f"## Scaling: {status}\n")
    md.append(f"{precision}, one TP group (dp = 1) on tp GPUs, median of steps {skip + 1}..{steps}. tok/s per GPU "
              "is the group's tok/s over tp; MFU = tok/s x (6N + 6LCT) / (989 TFLOP/s x tp); eff = step time at "
              "tp=1 / (tp x step time at tp) for the same batch; comm: tptrain's all-reduce share of its "
              "`--bench model` phases, PyTorch's NCCL-kernel time per step (profiler) over its step time. "
              "ratio = tptrain tok/s / PyTorch tok/s.\n")
    md.append("| model | tp | tptrain ms | tok/s/GPU | MFU | comm | eff | PyTorch TP ms | tok/s/GPU | MFU | comm | eff "
              "| ratio | memory GiB tptrain / PyTorch |")
    md.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    pct = lambda v: None if v is None else 100 * v
    for r in table:
        t, b, p = r["tptrain"] or {}, r["tptrain_bench_model"] or {}, r["pytorch"] or {}
        g = lambda c, k: c.get(k) if c and not c.get("problem") else None
        mem = f"{fmt(g(t, 'mem_gib'), '.1f')}/{fmt(g(p, 'max_memory_allocated_gib'), '.1f')}"
        print(f"{r['model']:<10} {r['tp']:>2} | {fmt(g(t, 'step_ms_median'), '8.2f')} {fmt(g(t, 'tok_per_s_per_gpu'), '10.0f')} "
              f"{fmt(pct(g(t, 'mfu')), '5.1f')} {fmt(pct(g(b, 'comm_share')), '6.1f')} {fmt(r['tptrain_efficiency'], '5.2f')} | "
              f"{fmt(g(p, 'step_ms_median'), '8.2f')} {fmt(g(p, 'tok_per_s_per_gpu'), '10.0f')} {fmt(pct(g(p, 'mfu')), '5.1f')} "
              f"{fmt(pct(g(p, 'comm_share')), '6.1f')} {fmt(r['pytorch_efficiency'], '5.2f')} | {fmt(r['ratio_tok_s'], '5.2f')} | "
              f"{mem:>17}")
        md.append(f"| {r['model']} | {r['tp']} | {fmt(g(t, 'step_ms_median'), '.2f')} | {fmt(g(t, 'tok_per_s_per_gpu'), '.0f')} | "
                  f"{pcts(g(t, 'mfu'))} | {pcts(g(b, 'comm_share'))} | {fmt(r['tptrain_efficiency'], '.2f')} | "
                  f"{fmt(g(p, 'step_ms_median'), '.2f')} | {fmt(g(p, 'tok_per_s_per_gpu'), '.0f')} | {pcts(g(p, 'mfu'))} | "
                  f"{pcts(g(p, 'comm_share'))} | {fmt(r['pytorch_efficiency'], '.2f')} | {fmt(r['ratio_tok_s'], '.3f')} | {mem} |")
    md.append("")
    plain = [r for r in table if r["pytorch_plain"]]
    for r in plain:
        q = r["pytorch_plain"]
        if q.get("problem"):
            line = f"plain PyTorch (torch_gpt2_bench.py, tp=1) {r['model']}: {q['problem']}"
        else:
            line = (f"plain PyTorch (torch_gpt2_bench.py, compile {q.get('compile')}, tp=1) {r['model']}: "
                    f"{fmt(q.get('step_ms_median'), '.2f')} ms, {fmt(q.get('tok_per_s'), '.0f')} tok/s, "
                    f"MFU {pcts(q.get('mfu'))}"
                    + (f", {fmt(r['tptrain']['tok_per_s'] / q['tok_per_s'], '.3f')}x for tptrain"
                       if r["tptrain"] and r["tptrain"].get("tok_per_s") and q.get("tok_per_s") else ""))
        print(line)
        md.append(f"- {line}")
    problems = [f"{c['model']} tp={c['tp']} {c['tool']}: {c['problem']}" for c in cells.values() if c["problem"]]
    for pr in problems:
        print("  " + pr)
        md.append(f"- {pr}")
    pt = next((c for c in cells.values() if c["tool"] == "pytorch" and not c["problem"]), None)
    if pt:
        line = (f"PyTorch {pt.get('torch')}: compile {pt.get('compile')} (LM head and loss: {pt.get('head')}), "
                f"loss {pt.get('loss')}, fused AdamW {pt.get('fused_adamw')}")
        heads = sorted({c.get("head_note") for c in cells.values() if c.get("head_note")})
        for h in heads:
            line += f"\n  {h}"
        print(line)
        md.append(f"\n{line}")
    md.append("")

results["ok"] = bool(ok_all)
with open(f"{out}/results.json", "w") as f:
    json.dump(results, f, indent=1)
with open(f"{out}/results.md", "w") as f:
    f.write("\n".join(md) + "\n")
print(f"\nstages: " + ", ".join(f"{s} {results['stages'].get(s, {}).get('status', 'n/a')}" for s in stages)
      + f" | overall {'ok' if ok_all else 'FAILED'}")
sys.exit(0 if ok_all else 1)
PY
failed=$?
[ $built = 1 ] || failed=1

echo "scaling.sh: $([ $failed = 0 ] && echo ok || echo FAILED) in $((SECONDS - t_start)) s; results in $out/results.json and $out/results.md"
if [ -n "${OUT:-}" ]; then
    tar -czf "$out/logs.tar.gz" -C "$out" raw && rm -rf "$raw"
fi
# let tee write the last lines before the command returns
exec 1>&3 2>&4 3>&- 4>&-
wait "$tee_pid" 2>/dev/null
exit $failed
