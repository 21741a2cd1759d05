// train.c: the loop: forward, loss, backward, DP reduce, clip, update, log, validate, checkpoint;
// and the setup --eval shares with it.
#include "train.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ckpt.h"
#include "common.h"
#include "data.h"
#include "mesh.h"
#include "model.h"
#include "optim.h"

struct trainer {
    const struct tp_config *cfg;
    struct mesh mesh;
    struct backend be;
    struct model model;
    struct optim opt;
    struct data_loader train_data, val_data;
    bool have_val;
    float *loss_sums;   // (grad_accum) backend memory: per micro-step loss sums
    FILE *jsonl;        // rank 0 only
    char log_err[2 * TP_PATH_MAX + 128]; // the first failed write to jsonl ("" while none failed)
    bool is_root;       // world rank 0 prints
    double flops_per_token, peak_flops;
    int start_step;     // optimizer steps already done (resumed runs)
    char resumed_from[2 * TP_PATH_MAX]; // checkpoint directory, "" for a fresh start
};

// ---- errors across ranks

int train_agree(const struct mesh *mesh, int status, const char *err) {
    // Ranks usually fail alike (same files, same config): one line from the lowest failed rank.
    int first;
    int worst = mesh_agree_first(mesh, status, &first);
    if (!worst) return 0;
    if (mesh->world_rank == first) {
        if (err && err[0]) fprintf(stderr, "tptrain: %s\n", err);
        else fprintf(stderr, "tptrain: rank %d failed (exit code %d)\n", first, status);
        fflush(stderr);
    }
    return worst;
}

static int agree(struct trainer *tr, int status, const char *err) { return train_agree(&tr->mesh, status, err); }

// ---- logging

// Records the first failed write to the log (a full disk, a closed pipe); the step loop ends the
// run on it, so a log is never lost silently.
static void log_check(struct trainer *tr) {
    if (tr->log_err[0] || !(ferror(tr->jsonl) || fflush(tr->jsonl) != 0)) return;
    snprintf(tr->log_err, sizeof tr->log_err, "log.jsonl: writing '%s' failed: %s", tr->cfg->log.jsonl,
             strerror(errno ? errno : EIO));
}

// A number for the log: JSON has no NaN or infinity, so those become null.
static json_t *log_num(double v) { return isfinite(v) ? json_real(v) : json_null(); }

// One JSON-lines record (steals obj): compact, reals to 9 significant digits.
static void log_json(struct trainer *tr, json_t *obj) {
    if (tr->jsonl && obj) {
        if (json_dumpf(obj, tr->jsonl, JSON_COMPACT | JSON_REAL_PRECISION(9)) == 0) fputc('\n', tr->jsonl);
        log_check(tr);
    }
    json_decref(obj);
}

// ---- preemption
//
// SIGTERM and SIGUSR1 (what Slurm sends ahead of a kill, see --signal) only set a flag; the
// ranks agree at every step boundary whether any of them got one, then save a checkpoint and exit
// with TP_EXIT_PREEMPTED. The flag is the one global: a signal handler has nowhere else to write.

static volatile sig_atomic_t stop_signal;

static void on_stop_signal(int sig) { stop_signal = sig; }

static void install_stop_handlers(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
}

enum { STEP_LOG_FAILED = 1, STEP_STOP = 2 };

// Once per step, on every rank: whether the log failed (rank 0) or any rank was told to stop.
static int step_flags(struct trainer *tr) {
    int bits = (tr->log_err[0] ? STEP_LOG_FAILED : 0) | (stop_signal ? STEP_STOP : 0);
    return mesh_any_bits(&tr->mesh, bits);
}

static void fmt_duration(double s, char *buf, size_t len) {
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, len, "%ldh%02ldm", t / 3600, (t / 60) % 60);
    else if (t >= 60) snprintf(buf, len, "%ldm%02lds", t / 60, t % 60);
    else snprintf(buf, len, "%lds", t);
}

double train_flops_per_token(const struct tp_config *cfg) {
    struct model_dims d = model_dims_make(&cfg->model, 1, 1, (struct model_options){0});
    int n;
    size_t local, global;
    free(model_param_table(&d, &n, &local, &global));
    return 6.0 * (double)global + 6.0 * d.L * (double)d.C * d.T;
}

static double peak_flops(const struct trainer *tr) {
    if (tr->cfg->log.peak_tflops > 0) return tr->cfg->log.peak_tflops * 1e12;
    if (tr->mesh.device < 0) return 0.0; // no meaningful peak for the CPU backend
    // H100/H200 SXM dense: bf16 989 TFLOP/s, plain fp32 67 (TF32 is off in fp32 mode)
    return tr->cfg->train.precision == TP_PREC_BF16 ? 989e12 : 67e12;
}

// ---- setup and teardown

int train_open_mesh(const struct tp_config *cfg, struct mesh *mesh, struct backend *be) {
    char err[2048] = "";
    memset(be, 0, sizeof *be);
    mesh_init(mesh, cfg);
    int st = mesh_create_backend(mesh, cfg, be, err, sizeof err);
    if (!st) st = mesh_create_comms(mesh, cfg, *be, err, sizeof err);
    return train_agree(mesh, st, err);
}

void train_close_mesh(struct mesh *mesh, struct backend *be) {
    mesh_destroy(mesh);
    backend_destroy(be);
}

// Continues a run from a checkpoint (checkpoint.resume): weights, AdamW state, step counter and
// data position. "auto" with an empty checkpoint.dir starts fresh.
static int resume(struct trainer *tr) {
    const struct tp_config *cfg = tr->cfg;
    char err[2048] = "", dir[2 * TP_PATH_MAX] = "";
    bool is_auto = strcmp(cfg->checkpoint.resume, "auto") == 0;
    const char *ref = is_auto ? cfg->checkpoint.dir : cfg->checkpoint.resume;
    int st = 0;
    if (!is_auto || access(ref, F_OK) == 0) {
        st = ckpt_resolve(ref, dir, sizeof dir, err, sizeof err);
        if (st == 1 && !is_auto) {
            snprintf(err, sizeof err, "checkpoint.resume: '%s' holds no checkpoint (no state.json, no `latest`, no "
                     "step_N directory)", ref);
            st = TP_EXIT_USAGE;
        } else if (st == 1) {
            st = 0;
            dir[0] = '\0';
        }
    }
    if ((st = agree(tr, st, err))) return st;
    if (!dir[0]) {
        if (tr->is_root) printf("checkpoint.resume: auto: no checkpoint in '%s' yet, starting fresh\n", ref);
        return 0;
    }
    struct ckpt_state cs;
    st = ckpt_read_state(dir, &cs, err, sizeof err);
    if (!st && cs.step > cfg->train.steps) {
        snprintf(err, sizeof err, "checkpoint.resume: %s is at step %d, past train.steps=%d; raise train.steps to "
                 "continue", dir, cs.step, cfg->train.steps);
        st = TP_EXIT_USAGE;
    }
    if ((st = agree(tr, st, err))) return st;
    if ((st = ckpt_load_params(&tr->model, &tr->mesh, dir, CKPT_LOAD_EXACT, err, sizeof err)) ||
        (st = ckpt_load_optim(&tr->model, &tr->opt, &tr->mesh, dir, err, sizeof err)))
        return agree(tr, st, err);
    // what the tensors' shapes cannot show (n_head, seq_len beyond wpe) state.json does
    if ((st = agree(tr, ckpt_check_model(&cs, &cfg->model, dir, err, sizeof err), err))) return st;
    // The position counts micro-batches per DP rank; carry the sequences consumed over to this
    // run's DP size and micro-batch so that the data order continues where it stopped.
    size_t seqs = cs.data_position * (size_t)cs.dp_size * (size_t)cs.micro_batch;
    size_t per = (size_t)tr->mesh.dp_size * (size_t)cfg->train.micro_batch;
    data_seek(&tr->train_data, (seqs + per - 1) / per);
    if (seqs % per && tr->is_root)
        fprintf(stderr, "tptrain: notice: the checkpoint read %zu sequences, not a multiple of dp*micro_batch = %zu "
                "here; the data order skips %zu sequences\n", seqs, per, per - seqs % per);
    tr->start_step = cs.step;
    snprintf(tr->resumed_from, sizeof tr->resumed_from, "%s", dir);
    if (tr->is_root) {
        printf("resumed from %s: step %d, data position %zu\n", dir, cs.step, tr->train_data.position);
        fflush(stdout);
    }
    return 0;
}

static int trainer_setup(struct trainer *tr, const struct tp_config *cfg) {
    char err[2048] = "";
    memset(tr, 0, sizeof *tr);
    tr->cfg = cfg;
    int st = train_open_mesh(cfg, &tr->mesh, &tr->be);
    tr->is_root = tr->mesh.world_rank == 0;
    if (st) return st;

    const struct tp_train_config *tc = &cfg->train;
    struct model_dims d = model_dims_make(&cfg->model, tc->micro_batch, tr->mesh.tp.size, model_options_of(cfg));
    st = data_open(&tr->train_data, cfg->data.train, d.B, d.T, tr->mesh.dp_rank, tr->mesh.dp_size,
                   d.V, err, sizeof err);
    if (!st && cfg->data.val[0]) {
        st = data_open(&tr->val_data, cfg->data.val, d.B, d.T, tr->mesh.dp_rank, tr->mesh.dp_size, d.V,
                       err, sizeof err);
        tr->have_val = st == 0;
    }
    // a checkpoint directory that cannot be written is found now, not at the first save
    if (!st && tr->is_root && cfg->checkpoint.dir[0]) st = ckpt_check_dir(cfg->checkpoint.dir, err, sizeof err);
    if ((st = agree(tr, st, err))) return st;

    model_alloc(&tr->model, &d, tr->be, &tr->mesh.tp);
    optim_create_dp(&tr->opt, &tr->model, tc->weight_decay, &tr->mesh.dp, &cfg->parallel);
    tr->loss_sums = tr->be.iface->alloc(tr->be.ctx, (size_t)tc->grad_accum * sizeof(float));
    tr->flops_per_token = train_flops_per_token(cfg);
    tr->peak_flops = peak_flops(tr);

    if (cfg->checkpoint.resume[0]) {
        if ((st = resume(tr))) return st;
    }
    if (!tr->resumed_from[0] && cfg->init.from[0]) {
        st = ckpt_load_params(&tr->model, &tr->mesh, cfg->init.from, CKPT_LOAD_INIT, err, sizeof err);
        if (st) {
            char msg[2300];
            snprintf(msg, sizeof msg, "init.from: %s", err);
            return agree(tr, st, err[0] ? msg : NULL);
        }
        if (tr->is_root) printf("init.from: loaded weights from %s\n", cfg->init.from);
    }
    // A checkpoint or init.from supplies every weight; only a fresh start draws them.
    if (!tr->resumed_from[0] && !cfg->init.from[0]) model_init_params(&tr->model, tc->seed);

    if (tr->is_root && cfg->log.jsonl[0]) {
        // A resumed run continues its log rather than replacing it.
        tr->jsonl = fopen(cfg->log.jsonl, tr->resumed_from[0] ? "a" : "w");
        if (!tr->jsonl) snprintf(err, sizeof err, "log.jsonl: cannot create '%s': %s", cfg->log.jsonl, strerror(errno));
        st = tr->jsonl ? 0 : TP_EXIT_USAGE;
    }
    if ((st = agree(tr, st, err))) return st;
    if (tr->resumed_from[0])
        log_json(tr, json_pack("{s:s, s:i, s:s}", "kind", "resume", "step", tr->start_step, "from",
                               tr->resumed_from));
    if (cfg->debug.dump_init[0]) {
        st = ckpt_export_safetensors(&tr->model, &tr->mesh, tr->model.params, cfg->debug.dump_init, err, sizeof err);
        if ((st = agree(tr, st, tr->is_root ? err : NULL))) return st;
    }
    optim_adopt_weights(&tr->opt, &tr->model); // the weights are final: the optimizer may shard them
    return 0;
}

static void trainer_teardown(struct trainer *tr) {
    if (tr->jsonl) fclose(tr->jsonl);
    if (tr->model.be.iface) {
        tr->be.iface->free(tr->be.ctx, tr->loss_sums);
        optim_destroy(&tr->opt, &tr->model);
        model_destroy(&tr->model);
    }
    data_close(&tr->train_data);
    if (tr->have_val) data_close(&tr->val_data);
    train_close_mesh(&tr->mesh, &tr->be);
}

// ---- one step

// Reads the next micro-batch; any rank's bad data ends every rank.
static int next_batch(struct trainer *tr, struct data_loader *dl) {
    char err[2048] = "";
    int st = data_next(dl, err, sizeof err);
    return agree(tr, st, err);
}

// Mean loss per token over `count` per-micro-step loss sums (backend memory), averaged over DP.
static double mean_loss_of(struct model *m, struct mesh *mesh, float *sums, int count) {
    struct backend_i const *b = m->be.iface;
    comm_all_reduce(&mesh->dp, sums, (size_t)count, COMM_AVG);
    float h[1024];
    double total = 0.0;
    for (int off = 0; off < count; off += 1024) {
        int n = count - off < 1024 ? count - off : 1024;
        b->copy_to_host(m->be.ctx, h, sums + off, (size_t)n * sizeof(float));
        for (int i = 0; i < n; i++) total += h[i];
    }
    return total / ((double)count * (double)m->d.N);
}

static double mean_loss(struct trainer *tr, int count) {
    return mean_loss_of(&tr->model, &tr->mesh, tr->loss_sums, count);
}

struct step_result {
    double loss, lr, ms;
    float norm;
};

static int train_step(struct trainer *tr, int step, struct step_result *res) {
    const struct tp_train_config *tc = &tr->cfg->train;
    struct model *m = &tr->model;
    struct mesh *mesh = &tr->mesh;
    const struct backend_i *b = tr->be.iface;
    double t0 = tp_now();
    b->zero(tr->be.ctx, m->grads, m->n_params_local * sizeof(float));
    float dloss = 1.0f / ((float)m->d.N * (float)tc->grad_accum);
    for (int micro = 0; micro < tc->grad_accum; micro++) {
        int st = next_batch(tr, &tr->train_data);
        if (st) return st;
        // the last backward reduces each DP bucket over the group as soon as it is final; with
        // sequence parallelism the gradients summed over this rank's rows (layernorms', row-parallel
        // biases') are complete only after the TP reduction below, so every bucket starts after it
        if (micro + 1 == tc->grad_accum && !m->d.sp) optim_reduce_begin(&tr->opt);
        model_forward_backward(m, &mesh->tp, tr->train_data.inputs, tr->train_data.targets, tr->loss_sums + micro,
                               dloss);
    }
    model_reduce_sequence_parallel_grads(m, &mesh->tp);
    optim_reduce_end(&tr->opt);
    if (step == 0 && tr->cfg->debug.grad_norms) {
        double *norms = tp_malloc((size_t)m->n_tensors * sizeof(double));
        optim_tensor_norms(&tr->opt, m, &mesh->tp, norms);
        if (tr->jsonl) {
            json_t *by_name = json_object();
            for (int i = 0; i < m->n_tensors; i++)
                json_object_set_new(by_name, m->tensors[i].name, log_num(norms[i]));
            log_json(tr, json_pack("{s:s, s:i, s:o}", "kind", "grad_norms", "step", 1, "norms", by_name));
        }
        free(norms);
    }
    // Norm, clipping and update stay on the device; the host waits once, for the log's figures.
    optim_grad_norm_enqueue(&tr->opt, m, &mesh->tp);
    res->lr = optim_lr(tc, step);
    optim_step(&tr->opt, m, tc, (float)res->lr);
    comm_synchronize(&mesh->dp); // a failed DP peer ends the run here rather than hanging it
    res->norm = optim_grad_norm_read(&tr->opt, m, &mesh->tp);
    res->loss = mean_loss(tr, tc->grad_accum);
    res->ms = 1e3 * (tp_now() - t0);
    return 0;
}

int train_val_loss(struct model *m, struct mesh *mesh, struct data_loader *dl, int batches, double *loss) {
    float *sums = m->be.iface->alloc(m->be.ctx, (size_t)batches * sizeof(float)); // (batches)
    data_seek(dl, 0);
    int st = 0;
    char err[2048] = "";
    for (int i = 0; i < batches && !st; i++) {
        st = train_agree(mesh, data_next(dl, err, sizeof err), err);
        if (!st) model_forward(m, &mesh->tp, dl->inputs, dl->targets, sums + i);
    }
    if (!st) *loss = mean_loss_of(m, mesh, sums, batches);
    m->be.iface->free(m->be.ctx, sums);
    return st;
}

static int evaluate(struct trainer *tr, double *loss) {
    return train_val_loss(&tr->model, &tr->mesh, &tr->val_data, tr->cfg->eval.batches, loss);
}

// ---- replica check

// Replicated parameters must stay bitwise identical across the TP group; drift means some rank
// computed a different gradient for them. Returns TP_EXIT_RUNTIME on mismatch (all ranks agree).
static int check_replicas(struct trainer *tr, int step) {
    struct model *m = &tr->model;
    int P = tr->mesh.tp.size, bad = -1;
    uint64_t *all = tp_malloc((size_t)P * sizeof(uint64_t));
    for (int i = 0; i < m->n_tensors && bad < 0; i++) {
        const struct param_tensor *t = &m->tensors[i];
        if (t->spec.layout.kind != LAYOUT_REPLICATE) continue;
        float *h = tp_malloc(t->numel * sizeof(float));
        size_t n = t->numel; // the master weights: whole, or the part of them this DP rank holds
        if (m->params || m->params_lo) model_master_to_host(m, i, h);
        else n = optim_master_part(&tr->opt, m, i, h);
        uint64_t mine = tp_fnv1a(h, n * sizeof(float));
        free(h);
        comm_host_all_gather(&tr->mesh.tp, all, &mine, 1, COMM_U64);
        for (int r = 1; r < P; r++)
            if (all[r] != all[0]) bad = i;
        if (bad >= 0 && tr->mesh.tp.rank == 0)
            fprintf(stderr, "tptrain: debug.check_replicas: replicated tensor '%s' differs across the TP group "
                            "(dp rank %d) after step %d\n", t->name, tr->mesh.dp_rank, step);
    }
    free(all);
    return mesh_agree(&tr->mesh, bad >= 0 ? TP_EXIT_RUNTIME : 0);
}

// ---- the loop

static void print_header(const struct trainer *tr) {
    const struct tp_config *cfg = tr->cfg;
    const struct model *m = &tr->model;
    printf("tptrain %s | %s backend, comm %s | mesh dp=%d x tp=%d (%d ranks)\n", TP_VERSION,
           tr->be.iface->name(tr->be.ctx), tr->mesh.tp.iface->name(tr->mesh.tp.ctx), tr->mesh.dp_size,
           tr->mesh.tp.size, tr->mesh.world_size);
    printf("model: %d layers, %d heads, width %d, vocab %d (padded %d), seq %d | %.2fM parameters | %s\n",
           cfg->model.n_layer, cfg->model.n_head, cfg->model.n_embd, cfg->model.vocab_size, m->d.Vp,
           cfg->model.seq_len, (double)m->n_params_global / 1e6, config_precision_name(cfg->train.precision));
    printf("batch: %d x %d tokens per rank, grad_accum %d, global %ld tokens | %d steps | rank memory %.2f GiB\n",
           cfg->train.micro_batch, cfg->model.seq_len, cfg->train.grad_accum, cfg->train.global_batch,
           cfg->train.steps, (double)m->bytes_allocated / (1u << 30));
    fflush(stdout);
}

// What the backend holds, measured (its own allocations; zeros where it cannot say).
static struct backend_memory measured_memory(const struct trainer *tr) {
    struct backend_memory bm = {0};
    if (tr->be.iface->memory_stats) tr->be.iface->memory_stats(tr->be.ctx, &bm);
    return bm;
}

// The model's plan with the optimizer's own share for this DP size (the distributed optimizer
// keeps AdamW's state, and in bf16 the fp32 masters, for its slices only).
static struct model_memory memory_plan(const struct model_dims *d, struct backend be, int dp,
                                       const struct tp_parallel_config *pc) {
    struct model_memory mm = model_memory_plan(d, be);
    struct optim_memory om = optim_memory_plan(mm.param_floats, be.iface->dtype(be.ctx), dp, pc);
    mm.total_bytes = mm.total_bytes - mm.optim_bytes - om.released_param_bytes + om.state_bytes;
    mm.optim_bytes = om.state_bytes;
    mm.param_bytes -= om.released_param_bytes;
    return mm;
}

// After the run's first step: how long the process took to reach it (configuration, MPI, device,
// allocation, initialisation or checkpoint load) and the step itself, which is slower than the
// rest by the choices made on first use (cuBLASLt's algorithms are timed per shape).
static void log_startup(struct trainer *tr, double setup_s, double first_ms) {
    log_json(tr, json_pack("{s:s, s:o, s:o}", "kind", "startup", "setup_s", log_num(setup_s), "first_step_s",
                           log_num(first_ms / 1e3)));
    if (!tr->is_root || setup_s < 0) return;
    printf("startup: step 1 began %.2f s after launch and took %.2f s (algorithm choice on first use "
           "included): %.2f s to the end of the first step\n", setup_s, first_ms / 1e3, setup_s + first_ms / 1e3);
    fflush(stdout);
}

// After the run's first step, when every buffer exists: the plan beside what was measured, the
// largest figure over all ranks (every rank plans the same).
static void log_memory(struct trainer *tr, int step) {
    struct model_memory mm = memory_plan(&tr->model.d, tr->be, tr->mesh.dp_size, &tr->cfg->parallel);
    struct backend_memory bm = measured_memory(tr);
    double v[2] = {(double)bm.peak, (double)bm.device_used}; // bytes, exact in a double below 2^53
    comm_host_all_reduce(&tr->mesh.tp, v, 2, COMM_F64, COMM_MAX);
    comm_host_all_reduce(&tr->mesh.dp, v, 2, COMM_F64, COMM_MAX);
    const double GiB = 1024.0 * 1024.0 * 1024.0;
    log_json(tr, json_pack("{s:s, s:i, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "kind", "memory", "step", step,
                           "plan_bytes", (json_int_t)mm.total_bytes, "plan_params_bytes",
                           (json_int_t)(mm.param_bytes + mm.param_compute_bytes), "plan_grads_bytes",
                           (json_int_t)mm.grad_bytes, "plan_optim_bytes", (json_int_t)mm.optim_bytes,
                           "plan_activations_bytes", (json_int_t)mm.act_bytes, "peak_bytes", (json_int_t)v[0],
                           "device_used_bytes", (json_int_t)v[1]));
    if (!tr->is_root) return;
    printf("memory after step %d: plan %.3f GiB per rank (parameters %.3f, gradients %.3f, AdamW %.3f, activations "
           "%.3f) | measured peak %.3f GiB (largest rank, the backend's own allocations)", step,
           (double)mm.total_bytes / GiB, (double)(mm.param_bytes + mm.param_compute_bytes) / GiB,
           (double)mm.grad_bytes / GiB, (double)mm.optim_bytes / GiB, (double)mm.act_bytes / GiB, v[0] / GiB);
    if (bm.device_total) printf(" | device in use %.3f of %.3f GiB", v[1] / GiB, (double)bm.device_total / GiB);
    printf("\n");
    fflush(stdout);
}

static void log_step(struct trainer *tr, int step, const struct step_result *r, double elapsed) {
    const struct tp_config *cfg = tr->cfg;
    double tok_s = (double)cfg->train.global_batch / (r->ms / 1e3);
    double mfu = tr->peak_flops > 0 ? tok_s * tr->flops_per_token / (tr->peak_flops * tr->mesh.world_size) : -1.0;
    double mem = (double)tr->model.bytes_allocated / (1u << 30);
    double peak = (double)measured_memory(tr).peak / (1u << 30);
    double eta = elapsed / (step + 1 - tr->start_step) * (cfg->train.steps - step - 1);
    log_json(tr, json_pack("{s:s, s:i, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o}", "kind", "train", "step", step + 1,
                           "loss", log_num(r->loss), "lr", log_num(r->lr), "grad_norm", log_num((double)r->norm),
                           "ms", log_num(r->ms), "tok_per_s", log_num(tok_s), "mfu", log_num(mfu), "mem_gib",
                           log_num(mem), "peak_mem_gib", log_num(peak)));
    bool last = step + 1 == cfg->train.steps;
    if (!tr->is_root || (!last && (step + 1) % cfg->log.every != 0 && step != tr->start_step)) return;
    char eta_s[32], mfu_s[32];
    fmt_duration(eta, eta_s, sizeof eta_s);
    if (mfu >= 0) snprintf(mfu_s, sizeof mfu_s, "%.1f%%", 100.0 * mfu);
    else snprintf(mfu_s, sizeof mfu_s, "-");
    printf("step %5d/%d | loss %.6f | lr %.3e | norm %.4f | %.1f ms | %.0f tok/s | MFU %s | mem %.2f GiB | ETA %s\n",
           step + 1, cfg->train.steps, r->loss, r->lr, (double)r->norm, r->ms, tok_s, mfu_s, mem, eta_s);
    fflush(stdout);
}

static int validate_and_log(struct trainer *tr, int step, double *out) {
    double loss;
    int st = evaluate(tr, &loss);
    if (st) return st;
    log_json(tr, json_pack("{s:s, s:i, s:o, s:I}", "kind", "val", "step", step, "loss", log_num(loss), "tokens",
                           (json_int_t)((size_t)tr->cfg->eval.batches * tr->model.d.N * (size_t)tr->mesh.dp_size)));
    if (tr->is_root) {
        printf("val   %5d | loss %.6f | perplexity %.2f\n", step, loss, exp(loss));
        fflush(stdout);
    }
    *out = loss;
    return 0;
}

// ---- checkpoints

static int save_checkpoint(struct trainer *tr, int steps_done, bool has_val, double val_loss) {
    const struct tp_config *cfg = tr->cfg;
    struct ckpt_state cs = {
        .step = steps_done,
        .data_position = tr->train_data.position,
        .dp_size = tr->mesh.dp_size,
        .micro_batch = cfg->train.micro_batch,
        .optim_t = tr->opt.t,
        .seed = cfg->train.seed,
        .has_val = has_val,
        .val_loss = val_loss,
    };
    char err[2048] = "", path[2 * TP_PATH_MAX] = "";
    double t0 = tp_now();
    int st = ckpt_save(&tr->model, &tr->opt, &tr->mesh, cfg, &cs, path, sizeof path, err, sizeof err);
    if (st) return agree(tr, st, err);
    double s = tp_now() - t0;
    log_json(tr, json_pack("{s:s, s:i, s:o}", "kind", "checkpoint", "step", steps_done, "seconds", log_num(s)));
    if (tr->is_root) {
        printf("checkpoint %5d | saved %s in %.2f s\n", steps_done, path, s);
        fflush(stdout);
    }
    return 0;
}

// A run resumed at its last step trains nothing; it still writes the final checkpoint when that
// lands somewhere new (which also reshards a checkpoint into another directory).
static bool final_checkpoint_missing(const struct trainer *tr) {
    char want[2 * TP_PATH_MAX + 32], a[PATH_MAX], b[PATH_MAX];
    snprintf(want, sizeof want, "%s/step_%08d", tr->cfg->checkpoint.dir, tr->start_step);
    if (!realpath(want, a) || !realpath(tr->resumed_from, b)) return true;
    return strcmp(a, b) != 0;
}

int train_run(const struct tp_config *cfg) {
    struct trainer tr;
    install_stop_handlers();
    int st = trainer_setup(&tr, cfg);
    if (!st && tr.is_root) print_header(&tr);
    bool ckpt = cfg->checkpoint.dir[0] != '\0';
    if (!st && tr.start_step == cfg->train.steps) {
        if (tr.is_root) printf("the checkpoint is at train.steps=%d: nothing left to train\n", cfg->train.steps);
        if (ckpt && final_checkpoint_missing(&tr)) st = save_checkpoint(&tr, tr.start_step, false, 0.0);
    }
    double start = tp_now(), launch_to_loop = tp_process_age();
    for (int step = tr.start_step; !st && step < cfg->train.steps; step++) {
        struct step_result r;
        bool profiled = cfg->debug.profile_step == step - tr.start_step + 1 && tr.be.iface->profile;
        if (profiled) tr.be.iface->profile(tr.be.ctx, true);
        st = train_step(&tr, step, &r);
        if (profiled) tr.be.iface->profile(tr.be.ctx, false);
        if (st) break;
        if (!isfinite(r.loss)) {
            if (tr.is_root) fprintf(stderr, "tptrain: loss became %g at step %d; lower train.lr or check the data\n", r.loss, step + 1);
            st = TP_EXIT_RUNTIME;
            break;
        }
        log_step(&tr, step, &r, tp_now() - start);
        if (step == tr.start_step) {
            log_startup(&tr, launch_to_loop, r.ms);
            log_memory(&tr, step + 1);
        }
        if (cfg->debug.check_replicas) st = check_replicas(&tr, step + 1);
        bool last = step + 1 == cfg->train.steps;
        bool has_val = false;
        double val_loss = 0.0;
        if (!st && tr.have_val && (last || (cfg->eval.every > 0 && (step + 1) % cfg->eval.every == 0))) {
            st = validate_and_log(&tr, step + 1, &val_loss);
            has_val = st == 0;
        }
        bool saved = false;
        if (!st && ckpt && (last || (cfg->checkpoint.every > 0 && (step + 1) % cfg->checkpoint.every == 0))) {
            st = save_checkpoint(&tr, step + 1, has_val, val_loss);
            saved = st == 0;
        }
        int flags = st ? 0 : step_flags(&tr);
        if (flags & STEP_LOG_FAILED) {
            if (tr.is_root) fprintf(stderr, "tptrain: %s\n", tr.log_err);
            st = TP_EXIT_RUNTIME;
        } else if ((flags & STEP_STOP) && !last) {
            if (ckpt && !saved) st = save_checkpoint(&tr, step + 1, has_val, val_loss);
            if (!st) {
                if (tr.is_root) {
                    printf("stopped by a signal after step %d: %s; resume with --set "
                           "checkpoint.resume=auto\n",
                           step + 1, ckpt ? "checkpoint saved" : "nothing saved (no checkpoint.dir)");
                    fflush(stdout);
                }
                st = TP_EXIT_PREEMPTED;
            }
        }
    }
    // the log's last lines reach the disk before the run reports success
    if (tr.jsonl) {
        log_check(&tr);
        if (fclose(tr.jsonl) != 0 && !tr.log_err[0])
            snprintf(tr.log_err, sizeof tr.log_err, "log.jsonl: closing '%s' failed: %s", cfg->log.jsonl,
                     strerror(errno));
        tr.jsonl = NULL;
    }
    if (!st) { // every rank is here: setup and the loop agree on their errors
        st = mesh_agree(&tr.mesh, tr.log_err[0] ? TP_EXIT_RUNTIME : 0);
        if (st && tr.is_root) fprintf(stderr, "tptrain: %s\n", tr.log_err);
    }
    trainer_teardown(&tr);
    return st;
}

// ---- --dry-run

int train_dry_run(const struct tp_config *cfg, int world_size) {
    int P = cfg->parallel.tp, dp = world_size / P;
    config_print(cfg, stdout);
    printf("\n# mesh: %d ranks = dp %d x tp %d (row-major, tp fastest)\n", world_size, dp, P);
    // the first ranks and the last: the pattern is plain from a few, and a large mesh stays short
    enum { SHOWN = 16 };
    for (int r = 0; r < world_size; r++) {
        if (world_size > SHOWN && r == SHOWN / 2) {
            printf("#   ... (%d ranks more)\n", world_size - SHOWN);
            r = world_size - SHOWN / 2;
        }
        printf("#   rank %d -> (dp %d, tp %d)\n", r, r / P, r % P);
    }
    struct model_dims d = model_dims_make(&cfg->model, cfg->train.micro_batch, P, model_options_of(cfg));
    int n;
    size_t local, global;
    struct param_tensor *t = model_param_table(&d, &n, &local, &global);
    printf("\n# parameters (%.2fM; vocab %d padded to %d = %d rows per rank)\n", (double)global / 1e6,
           d.V, d.Vp, d.Vl);
    printf("# %-28s %-18s %-10s %-18s\n", "tensor", "global", "layout", "per rank");
    for (int i = 0; i < n; i++) {
        // blocks repeat: show layer 0 as h.*
        if (strncmp(t[i].name, "h.", 2) == 0 && strncmp(t[i].name, "h.0.", 4) != 0) continue;
        char name[64], gs[64], ls[64], lay[32];
        size_t lshape[LAYOUT_MAX_DIMS];
        layout_local_shape(&t[i].spec, P, lshape);
        if (strncmp(t[i].name, "h.0.", 4) == 0) snprintf(name, sizeof name, "h.*.%s", t[i].name + 4);
        else snprintf(name, sizeof name, "%s", t[i].name);
        printf("#   %-28s %-18s %-10s %-18s\n", name, layout_shape_str(t[i].spec.global_shape, t[i].spec.ndim, gs, sizeof gs),
               layout_describe(t[i].spec.layout, lay, sizeof lay), layout_shape_str(lshape, t[i].spec.ndim, ls, sizeof ls));
    }
    free(t);
    // Size with the backend the run would use on this machine (attention buffers differ).
    struct backend be;
    char err[256] = "";
    enum tp_dtype dt = mesh_compute_dtype(cfg);
    bool cuda = cfg->parallel.device != TP_DEVICE_CPU && backend_cuda_available() && backend_cuda_device_count() > 0;
    if (!cuda || !backend_cuda_create(&be, 0, dt, err, sizeof err)) be = backend_cpu_create(dt);
    struct model_memory mm = memory_plan(&d, be, dp, &cfg->parallel);
    char what[96];
    snprintf(what, sizeof what, "%s backend, %s; every rank the same", be.iface->name(be.ctx), tp_dtype_name(dt));
    printf("\n");
    model_memory_print(stdout, &d, &mm, what);
    int fwd, bwd;
    model_count_collectives(&d, &fwd, &bwd);
    printf("# collectives per micro-batch on the TP group: %d forward, %d backward\n", P > 1 ? fwd : 0, P > 1 ? bwd : 0);
    backend_destroy(&be);
    return 0;
}
