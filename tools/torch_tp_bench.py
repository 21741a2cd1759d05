#!/usr/bin/env python3
"""torch_tp_bench.py: the PyTorch tensor-parallel side of tools/scaling.sh.

The GPT-2 of tools/torch_gpt2_bench.py (same blocks, init distribution, data, lr schedule,
AdamW, config parsing and `--set` overrides, imported from it), split over a 1-D device mesh of
all WORLD_SIZE GPUs with PyTorch's own tensor parallelism, one process per GPU under torchrun:

    torchrun --standalone --nproc_per_node=4 tools/torch_tp_bench.py configs/gpt2-350m.yaml \\
        --set train.micro_batch=8 --set train.grad_accum=1 --set train.global_batch=0 \\
        --set train.steps=15 --skip 5 --json out.json

Layout (torch.distributed.tensor.parallel, as tptrain splits the model):
- attention c_attn (q, k, v) and MLP c_fc: ColwiseParallel; attention and MLP output projections:
  RowwiseParallel (one all-reduce each, forward; their inputs' gradients one each, backward).
  ColwiseParallel gives each rank a contiguous block of c_attn's 3C output rows, so the rows are
  reordered at init to [q_0; k_0; v_0; q_1; ...] (q_r: rank r's H/P heads): the fused product
  stays one product and the model is the same for every tp.
- wte: vocabulary-parallel (RowwiseParallel on the embedding: Shard(0) rows, masked lookup, one
  all-reduce), tied to the LM head; the logits stay sharded over the vocabulary, padded to a
  multiple of 128*P as tptrain pads it, the padding columns masked to -inf, and the
  cross-entropy runs under loss_parallel (torch >= 2.3) without gathering them (or, with --loss
  gather or without loss_parallel, on all-gathered logits).
- wpe and the layernorms: replicated plain tensors (their gradients agree on every rank without
  communication, as in tptrain).
- bf16 autocast; F.scaled_dot_product_attention; torch.compile of each transformer block
  (regional compilation: one graph serves every block; --compile-scope trunk compiles
  embedding, blocks and final layernorm as one graph) and of the LM head and loss, compiled
  while loss_parallel is active so that its sharded ops are traced (should that compilation
  fail in the first step, the eager head takes over and the JSON says so).
- Gradient clipping as clip_grad_norm_ computes it, over the local shards: sharded gradients'
  squares summed over the mesh, replicated ones counted once. AdamW(fused=True), with the
  DTensor and the plain parameters in separate groups.
The init draws from a generator of its own and covers the real vocabulary rows only, so runs at
every tp start from the same weights and follow the same losses (up to summation order).

Timing: each step timed on the host around the whole step with a device synchronisation at its
end (rank 0's clock; the ranks move in lockstep; torch_gpt2_bench.py now times with CUDA events
and no synchronisation inside the loop, which this script has not followed yet), the first --skip
steps left out, MFU = tok/s * (6*params + 6*n_layer*n_embd*seq_len) / (peak * world size), params
without the vocabulary padding, peak 989 TFLOP/s for bf16 (67 fp32) per GPU or --peak-tflops.
With --profile-steps N, N more steps run under torch.profiler and the time of NCCL kernels per
step over the median step time is reported as the communication share (kernel time includes any
wait for a peer, as tptrain's figure does).

Rank 0 prints one JSON line on stdout (and to --json): tok/s in all and per GPU, median/mean/min
step ms, MFU, peak memory per GPU (the largest over the ranks), every step's loss, and the
communication figures. Needs torch >= 2.3 (DTensor tensor parallelism) and CUDA; --device cpu
runs it on gloo (compile off by default) to check the script itself. Without torchrun it runs as
a world of one.
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_gpt2_bench as base  # noqa: E402  (config parsing, Block, Batches, lr schedule)

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
except ImportError as exc:  # torch < 2.2
    sys.exit(f"torch {torch.__version__} has no DTensor tensor parallelism ({exc}); needs torch >= 2.3")
try:
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # torch 2.2 to 2.4 kept DTensor private
    from torch.distributed._tensor import DTensor, Replicate, Shard, distribute_tensor
try:
    from torch.distributed.tensor.parallel import loss_parallel
except ImportError:
    loss_parallel = None


# ---- model: torch_gpt2_bench's blocks, with each rank's heads local

class TPBlock(base.Block):
    def __init__(self, n_embd, n_head):
        super().__init__(n_embd, n_head)
        self.head_size = n_embd // n_head

    def attention(self, x):
        B, T, _ = x.shape
        qkv = self.c_attn(x)                      # (B, T, 3C/P): this rank's q, k, v columns
        q, k, v = qkv.split(qkv.shape[-1] // 3, dim=2)
        # (B, H/P, T, hs) each; -1 is the number of local heads
        q, k, v = (t.view(B, T, -1, self.head_size).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attn_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C) after the all-reduce


class TPGPT(nn.Module):
    def __init__(self, n_layer, n_head, n_embd, vocab_size, seq_len, tp, seed):
        super().__init__()
        self.vocab_size = vocab_size
        # tptrain pads to a multiple of 128*tp, so that every rank holds whole 128-row blocks
        self.padded_vocab = (vocab_size + 128 * tp - 1) // (128 * tp) * (128 * tp)
        self.wte = nn.Embedding(self.padded_vocab, n_embd)
        self.wpe = nn.Embedding(seq_len, n_embd)
        self.h = nn.ModuleList(TPBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)
        self.reset_parameters(n_layer, tp, seed)
        self.vocab_mask = None  # (1, Vp) DTensor, Shard(1): 0, then -inf on the padding columns
        self.loss_mode = "gather"

    @torch.no_grad()
    def reset_parameters(self, n_layer, tp, seed):
        # torch_gpt2_bench's init, drawn so that it does not depend on tp: from a generator of
        # its own (the modules' constructors drew from the global one, as many numbers as the
        # padded vocabulary has rows), and wte's draws cover the real vocabulary only
        gen = torch.Generator(self.wte.weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if name == "wte.weight":
                p[: self.vocab_size].normal_(0.0, 0.02, generator=gen)
                p[self.vocab_size:].zero_()
            elif name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith("attn_proj.weight") or name.endswith("mlp_proj.weight"):
                p.normal_(0.0, 0.02 / math.sqrt(2 * n_layer), generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        # ColwiseParallel gives rank r the r-th contiguous block of c_attn's 3C rows: reorder the
        # rows from [q; k; v] to [q_0; k_0; v_0; q_1; ...] (q_r: rank r's heads), so that each
        # rank's block holds its heads' q, k and v and the model is the tp=1 model for any tp
        for block in self.h:
            w, b = block.c_attn.weight, block.c_attn.bias  # (3C, C), (3C)
            C = w.shape[1]
            w.copy_(w.view(3, tp, C // tp, C).transpose(0, 1).reshape(3 * C, C))
            b.copy_(b.view(3, tp, C // tp).transpose(0, 1).reshape(3 * C))

    def flop_params(self):
        return base.GPT.flop_params(self)

    def trunk(self, idx):
        # (B, T) token ids -> (B, T, C), replicated on every rank
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)

    def head_loss(self, x, targets):
        # x (B, T, C) replicated -> the mean cross-entropy over the B*T targets
        B, T, C = x.shape
        w = self.wte.weight  # (Vp, C) DTensor, Shard(0): Vp/P vocabulary rows per rank
        xd = DTensor.from_local(x.reshape(B * T, C), w.device_mesh, [Replicate()], run_check=False)
        logits = F.linear(xd, w).float() + self.vocab_mask  # (B*T, Vp) DTensor, Shard(1)
        tgt = targets.reshape(B * T)
        if self.loss_mode == "parallel":
            return F.cross_entropy(logits, tgt)  # under loss_parallel: sharded log-softmax
        return F.cross_entropy(logits.full_tensor(), tgt)


def parallelize(model, mesh, loss_mode):
    for block in model.h:
        parallelize_module(block, mesh, {
            "c_attn": ColwiseParallel(),
            "attn_proj": RowwiseParallel(),
            "c_fc": ColwiseParallel(),
            "mlp_proj": RowwiseParallel(),
        })
    # vocabulary-parallel embedding: Shard(0) rows; the output all-reduced to Replicate
    parallelize_module(model, mesh, {"wte": RowwiseParallel(input_layouts=Replicate())})
    mask = torch.zeros(1, model.padded_vocab, device=mesh.device_type)
    mask[:, model.vocab_size:] = float("-inf")
    model.vocab_mask = distribute_tensor(mask, mesh, [Shard(1)])
    model.loss_mode = loss_mode


# ---- gradient clipping over shards

@torch.no_grad()
def clip_grads(params, max_norm):
    """clip_grad_norm_ over DTensor shards and replicated tensors; returns the global norm.

    Under no_grad, DTensor.to_local() is the local tensor itself, so the in-place scaling below
    reaches the gradients the optimizer reads."""
    sharded, replicated = [], []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            if any(pl.is_partial() for pl in g.placements):
                raise RuntimeError(f"a gradient is left Partial ({g.placements}): the TP plan is wrong")
            (sharded if any(pl.is_shard() for pl in g.placements) else replicated).append(g.to_local())
        else:
            replicated.append(g)
    dev = (sharded or replicated)[0].device
    sq = torch.zeros(2, device=dev, dtype=torch.float32)
    if sharded:
        sq[0] = torch.stack(torch._foreach_norm(sharded)).float().pow(2).sum()
    if replicated:
        sq[1] = torch.stack(torch._foreach_norm(replicated)).float().pow(2).sum()
    if dist.get_world_size() > 1:
        part = sq[0].clone()
        dist.all_reduce(part)  # the shards' squares over the TP group
        sq[0] = part
    norm = sq.sum().sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(sharded + replicated, coef)
    return norm


# ---- setup

def init_distributed(cuda):
    # torchrun sets these; a plain `python3 torch_tp_bench.py` is a world of one
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        try:
            dist.init_process_group("nccl", device_id=device)
        except TypeError:  # torch < 2.3: no device_id
            dist.init_process_group("nccl")
    else:  # gloo on the CPU: checks the script itself, times nothing of interest
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("tp",))
    return device, mesh, dist.get_rank(), world


def make_optimizer(model, tc, kind):
    # DTensor and plain parameters in separate groups: a fused or foreach kernel takes one kind
    groups = []
    for want_dt in (True, False):
        ps = [p for p in model.parameters() if isinstance(p, DTensor) == want_dt]
        decay = [p for p in ps if p.dim() >= 2]
        no_decay = [p for p in ps if p.dim() < 2]
        if decay:
            groups.append({"params": decay, "weight_decay": float(tc["weight_decay"])})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
    kw = {"lr": float(tc["lr"]), "betas": (float(tc["beta1"]), float(tc["beta2"])), "eps": float(tc["eps"])}
    fused = kind == "fused" and "fused" in torch.optim.AdamW.__init__.__code__.co_varnames
    if fused:
        kw["fused"] = True
    else:
        kw["foreach"] = True
    return torch.optim.AdamW(groups, **kw), fused


def raise_dynamo_limit(names, value):
    # the limit's name changed across torch versions; set whichever this one has
    cfg = torch._dynamo.config
    for name in names:
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), value))
            return


def nccl_ms_per_step(run_steps, n):
    """Runs n steps under torch.profiler; returns the NCCL kernels' device ms per step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_steps(n)
    total_us = 0.0
    for ev in prof.key_averages():
        if "nccl" in ev.key.lower():
            t = getattr(ev, "self_device_time_total", None)
            if t is None:
                t = getattr(ev, "self_cuda_time_total", 0.0)
            total_us += float(t)
    return total_us / 1e3 / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    base.add_common_args(ap)
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="torch.compile: auto = on with CUDA")
    ap.add_argument("--compile-scope", choices=["blocks", "trunk"], default="blocks",
                    help="compile each block (default; one graph for all) or embedding+blocks+ln_f as one")
    ap.add_argument("--compile-head", choices=["on", "off"], default="on",
                    help="with compile: also compile the LM head and loss, run under loss_parallel (default on)")
    ap.add_argument("--loss", choices=["auto", "parallel", "gather"], default="auto",
                    help="loss_parallel on the sharded logits (auto: where torch has it) or all-gather them")
    ap.add_argument("--adamw", choices=["fused", "foreach"], default="fused")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                    help="cpu: gloo and no GPU, for checking the script itself (default: cuda when present)")
    ap.add_argument("--random-data", action="store_true", help="random tokens instead of data.train")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="per-GPU peak for MFU (default: log.peak_tflops, else 989 bf16 / 67 fp32)")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="after the timed steps, profile N more for the NCCL share (default 0: off)")
    ap.add_argument("--json", help="also write the result line to this file (rank 0)")
    args = ap.parse_args()

    cfg, mc, tc = base.resolve_config(args)
    B, T, steps = int(tc["micro_batch"]), int(mc["seq_len"]), int(tc["steps"])
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no GPU")

    device, mesh, rank, world = init_distributed(cuda)
    root = rank == 0
    n_layer, n_head, n_embd, V = int(mc["n_layer"]), int(mc["n_head"]), int(mc["n_embd"]), int(mc["vocab_size"])
    if n_head % world or (4 * n_embd) % world:
        sys.exit(f"n_head={n_head} (and 4*n_embd={4 * n_embd}) must be divisible by the {world} ranks")
    loss_mode = args.loss
    if loss_mode == "auto":
        loss_mode = "parallel" if loss_parallel is not None else "gather"
    if loss_mode == "parallel" and loss_parallel is None:
        sys.exit(f"torch {torch.__version__} has no loss_parallel; use --loss gather")

    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    # the same full model on every rank, then each keeps its shard
    with torch.device(device):
        model = TPGPT(n_layer, n_head, n_embd, V, T, world, int(tc["seed"]))
    n_flop_params = model.flop_params()
    parallelize(model, mesh, loss_mode)

    use_compile = args.compile == "on" or (args.compile == "auto" and cuda)
    if use_compile:
        if not hasattr(torch, "compile"):
            sys.exit(f"torch {torch.__version__} has no torch.compile; use --compile off")
        # one graph serves all blocks; leave room for recompiles (DTensor guards) before any
        # block would fall back to eager
        raise_dynamo_limit(("recompile_limit", "cache_size_limit"), 8 * n_layer)
        raise_dynamo_limit(("accumulated_recompile_limit", "accumulated_cache_size_limit"), 16 * n_layer)
        if args.compile_scope == "blocks":
            for block in model.h:
                block.compile()
        else:
            model.trunk = torch.compile(model.trunk)
    # The LM head and loss compiled while loss_parallel is active, so that its sharded ops are
    # traced into the graph; should that fail at the first step, the eager head takes over.
    head = {"fn": model.head_loss, "mode": "eager", "note": None}
    if use_compile and args.compile_head == "on":
        head["fn"], head["mode"] = torch.compile(model.head_loss), "compiled"
    optimizer, fused = make_optimizer(model, tc, args.adamw)
    data = base.Batches(str(base.get(cfg, "data", "train")), B, T, V, device, args.random_data, int(tc["seed"]))
    bf16 = args.precision == "bf16"
    clip = float(tc["grad_clip"])
    params = list(model.parameters())
    n_dtensor = sum(isinstance(p, DTensor) for p in params)

    peak = args.peak_tflops or float(base.get(cfg, "log", "peak_tflops")) or (
        (989.0 if bf16 else 67.0) if cuda else 0.0)
    flops_per_token = 6.0 * n_flop_params + 6.0 * n_layer * n_embd * T
    gpu_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    if root:
        print(f"# torch {torch.__version__} on {world} x {gpu_name} | tensor parallel over {world} "
              f"ranks | {n_layer} layers, {n_head} heads ({n_head // world} per rank), width {n_embd}, "
              f"vocab {V} (padded {model.padded_vocab}), seq {T} | {n_flop_params / 1e6:.2f}M parameters "
              f"({n_dtensor} of {len(params)} tensors sharded or DTensor) | B={B} | "
              f"{args.precision}{' autocast' if bf16 else ''}, compile "
              f"{args.compile_scope if use_compile else 'off'} (head {head['mode']}), loss {loss_mode}, AdamW "
              f"{'fused' if fused else 'foreach'} | data: {data.source}", file=sys.stderr, flush=True)

    def loss_ctx():
        return loss_parallel() if loss_mode == "parallel" else contextlib.nullcontext()

    def forward_backward(idx, tgt):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            x = model.trunk(idx)
        with loss_ctx():  # loss_parallel covers the loss's forward and its backward
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = head["fn"](x, tgt)
            loss.backward()
        return loss

    def one_step(step):
        lr = base.lr_at(tc, step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        idx, tgt = data.next()
        optimizer.zero_grad(set_to_none=True)
        try:
            loss = forward_backward(idx, tgt)
        except Exception as exc:  # noqa: BLE001  (the head's compilation, forward or backward)
            if step > 0 or head["mode"] != "compiled":
                raise
            head.update(fn=model.head_loss, mode="eager",
                        note=f"compiling the head failed ({type(exc).__name__}: {str(exc)[:300]}); eager")
            if root:
                print(f"# {head['note']}", file=sys.stderr, flush=True)
            optimizer.zero_grad(set_to_none=True)
            loss = forward_backward(idx, tgt)
        norm = clip_grads(params, clip)
        optimizer.step()
        lv = loss.detach()
        if isinstance(lv, DTensor):
            lv = lv.to_local()
        return lv.item(), norm, lr  # the step's host sync, as tptrain reads its loss

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    ms, losses = [], []
    for step in range(steps):
        sync()
        t0 = time.perf_counter()
        loss_value, norm, lr = one_step(step)
        sync()
        ms.append(1e3 * (time.perf_counter() - t0))
        losses.append(loss_value)
        if root and (step == 0 or (step + 1) % 5 == 0 or step + 1 == steps):
            print(f"step {step + 1:4d}/{steps} | loss {loss_value:.6f} | lr {lr:.3e} | norm {float(norm):.4f} | "
                  f"{ms[-1]:.1f} ms", file=sys.stderr, flush=True)
        if not math.isfinite(loss_value):
            sys.exit(f"step {step + 1}: loss is {loss_value}")

    comm_ms, comm_note = None, None
    if args.profile_steps > 0:
        def run_more(n):
            for i in range(n):
                one_step(steps + i)
            sync()
        try:
            comm_ms = nccl_ms_per_step(run_more, args.profile_steps)
        except Exception as exc:  # the profiler is a diagnostic: its failure costs only this figure
            comm_note = f"profiler failed: {type(exc).__name__}: {exc}"
            if root:
                print(f"# {comm_note}", file=sys.stderr, flush=True)

    mem = torch.tensor([torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)]
                       if cuda else [0.0, 0.0], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    timed = ms[args.skip:]
    med = statistics.median(timed)
    tok_s = B * T / (med / 1e3)  # one TP group: every rank works on the same B*T tokens
    if root:
        result = {
            "tool": "pytorch-tp", "torch": torch.__version__, "device": gpu_name,
            "world_size": world, "tp": world, "config": args.config, "B": B, "T": T,
            "steps": steps, "skip": args.skip,
            "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "vocab_size": V,
            "padded_vocab": model.padded_vocab, "params": n_flop_params, "flops_per_token": flops_per_token,
            "precision": args.precision, "compile": args.compile_scope if use_compile else "off",
            "head": head["mode"], "loss": loss_mode, "fused_adamw": fused, "attention": "sdpa", "data": data.source,
            "step_ms_median": round(med, 3), "step_ms_mean": round(statistics.mean(timed), 3),
            "step_ms_min": round(min(timed), 3), "step_ms_first": round(ms[0], 3),
            "tok_per_s": round(tok_s, 1), "tok_per_s_per_gpu": round(tok_s / world, 1),
            "peak_tflops": peak,
            "mfu": round(tok_s * flops_per_token / (peak * 1e12 * world), 5) if peak > 0 else None,
            "max_memory_allocated_gib": round(float(mem[0]) / 2**30, 3) if cuda else None,
            "max_memory_reserved_gib": round(float(mem[1]) / 2**30, 3) if cuda else None,
            "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
            "profile_steps": args.profile_steps,
            "comm_ms_per_step": round(comm_ms, 3) if comm_ms is not None else None,
            "comm_share": round(comm_ms / med, 4) if comm_ms is not None else None,
        }
        if comm_note:
            result["comm_note"] = comm_note
        if head["note"]:
            result["head_note"] = head["note"]
        line = json.dumps(result)
        print(line, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                f.write(line + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
