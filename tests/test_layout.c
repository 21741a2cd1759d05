// test_layout.c: placements (Replicate, Shard(dim)) against brute-force expectations, the GPT-2
// parameter table at tp = 1, 2, 4, and TP-invariant initialisation.
#include <criterion/criterion.h>

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "config.h"
#include "layout.h"
#include "model.h"

// ---- helpers

static struct dtensor_spec spec_make(int ndim, const size_t *shape, struct layout l) {
    struct dtensor_spec t;
    memset(&t, 0, sizeof t);
    t.ndim = ndim;
    for (int d = 0; d < ndim; d++) t.global_shape[d] = shape[d];
    t.layout = l;
    return t;
}

// Row-major unravel of a flat index over `shape`.
static void unravel(size_t flat, const size_t *shape, int ndim, size_t *coord) {
    for (int d = ndim - 1; d >= 0; d--) {
        coord[d] = flat % shape[d];
        flat /= shape[d];
    }
}

static size_t ravel(const size_t *coord, const size_t *shape, int ndim) {
    size_t f = 0;
    for (int d = 0; d < ndim; d++) f = f * shape[d] + coord[d];
    return f;
}

// Checks every layout function against a brute-force model of the placement: for Shard(dim) the
// global element at coordinate c lives on rank c[dim] / block at local coordinate c with
// c[dim] % block; every global element is held exactly once across the group. For Replicate
// every rank holds every element at the same flat index.
static void check_layout(int ndim, const size_t *shape, struct layout l, int nranks) {
    struct dtensor_spec t = spec_make(ndim, shape, l);
    size_t gnumel = 1;
    for (int d = 0; d < ndim; d++) gnumel *= shape[d];
    cr_assert_eq(layout_global_numel(&t), gnumel);

    bool shard = l.kind == LAYOUT_SHARD;
    size_t block = shard ? shape[l.dim] / (size_t)nranks : 0;
    size_t expect_local[LAYOUT_MAX_DIMS], lshape[LAYOUT_MAX_DIMS];
    size_t lnumel = 1;
    for (int d = 0; d < ndim; d++) {
        expect_local[d] = shard && d == l.dim ? block : shape[d];
        lnumel *= expect_local[d];
    }
    layout_local_shape(&t, nranks, lshape);
    for (int d = 0; d < ndim; d++)
        cr_assert_eq(lshape[d], expect_local[d], "ndim %d dim %d: local %zu, expected %zu (P=%d)",
                     ndim, d, lshape[d], expect_local[d], nranks);
    cr_assert_eq(layout_local_numel(&t, nranks), lnumel);
    cr_assert(layout_divisible(&t, nranks));

    unsigned char *seen = calloc(gnumel, 1);
    cr_assert_not_null(seen);
    for (int r = 0; r < nranks; r++) {
        size_t b, e;
        layout_shard_range(&t, r, nranks, &b, &e);
        if (shard) {
            cr_assert_eq(b, (size_t)r * block, "rank %d begin %zu", r, b);
            cr_assert_eq(e, (size_t)(r + 1) * block, "rank %d end %zu", r, e);
        } else {
            cr_assert_eq(b, 0);
            cr_assert_eq(e, shape[0]);
        }
        for (size_t i = 0; i < lnumel; i++) {
            size_t lc[LAYOUT_MAX_DIMS], gc[LAYOUT_MAX_DIMS];
            unravel(i, expect_local, ndim, lc);
            memcpy(gc, lc, sizeof gc);
            if (shard) gc[l.dim] += (size_t)r * block;
            size_t want = ravel(gc, shape, ndim);
            size_t got = layout_global_index(&t, r, nranks, i);
            cr_assert_eq(got, want, "rank %d of %d, local %zu: global %zu, expected %zu", r, nranks,
                         i, got, want);
            if (shard) {
                cr_assert_eq(seen[want], 0, "global %zu held twice", want);
                // the owner of a global coordinate is its sharded coordinate's block
                cr_assert_eq(gc[l.dim] / block, (size_t)r);
            }
            seen[want] = 1;
        }
    }
    for (size_t g = 0; g < gnumel; g++) cr_assert_eq(seen[g], 1, "global %zu held by no rank", g);
    free(seen);
}

// ---- placements

Test(layout, replicate_2d_and_3d) {
    check_layout(2, (size_t[]){5, 7}, layout_replicate(), 1);
    check_layout(2, (size_t[]){5, 7}, layout_replicate(), 3);
    check_layout(3, (size_t[]){2, 3, 5}, layout_replicate(), 4);
}

Test(layout, shard0_2d) {
    for (int P = 1; P <= 4; P++) check_layout(2, (size_t[]){12, 5}, layout_shard(0), P);
    check_layout(2, (size_t[]){8, 1}, layout_shard(0), 8);
}

Test(layout, shard1_2d) {
    for (int P = 1; P <= 4; P++) check_layout(2, (size_t[]){3, 12}, layout_shard(1), P);
    check_layout(2, (size_t[]){1, 6}, layout_shard(1), 6);
}

Test(layout, shards_of_3d_and_1d) {
    const size_t shape[3] = {4, 6, 10};
    for (int dim = 0; dim < 3; dim++)
        for (int P = 1; P <= 2; P++) check_layout(3, shape, layout_shard(dim), P);
    check_layout(3, shape, layout_shard(0), 4);
    check_layout(3, shape, layout_shard(1), 3);
    check_layout(3, shape, layout_shard(1), 6);
    check_layout(3, shape, layout_shard(2), 5);
    check_layout(1, (size_t[]){12}, layout_shard(0), 4);
}

Test(layout, divisibility) {
    struct dtensor_spec t = spec_make(2, (size_t[]){6, 10}, layout_shard(1));
    cr_assert(layout_divisible(&t, 2));
    cr_assert(layout_divisible(&t, 5));
    cr_assert_not(layout_divisible(&t, 3));
    cr_assert_not(layout_divisible(&t, 4));
    t.layout = layout_shard(0);
    cr_assert(layout_divisible(&t, 3));
    cr_assert_not(layout_divisible(&t, 4));
    t.layout = layout_replicate();
    cr_assert(layout_divisible(&t, 7));
}

// The fused qkv weight (3, C, C) sharded on dim 1: rank r's block holds, for each of q, k and v,
// the rows of heads [r*H/P, (r+1)*H/P), in that order, so its local (3*C/P, C) matrix is
// [q rows of its heads | k rows | v rows], which is what the attention kernel expects.
Test(layout, qkv_shard1_holds_whole_heads) {
    const size_t C = 24, H = 6, HS = C / H;
    struct dtensor_spec t = spec_make(3, (size_t[]){3, C, C}, layout_shard(1));
    for (int P = 1; P <= 6; P++) {
        if (H % (size_t)P) continue;
        size_t Cl = C / (size_t)P;
        for (int r = 0; r < P; r++) {
            size_t b, e;
            layout_shard_range(&t, r, P, &b, &e);
            cr_assert_eq(b, (size_t)r * (H / (size_t)P) * HS, "first row of rank %d's heads", r);
            cr_assert_eq(e - b, (H / (size_t)P) * HS);
            for (size_t lrow = 0; lrow < 3 * Cl; lrow++) {
                size_t part = lrow / Cl;          // 0 q, 1 k, 2 v
                size_t head = (size_t)r * (H / (size_t)P) + (lrow % Cl) / HS;
                size_t grow = part * C + head * HS + (lrow % Cl) % HS; // row of the (3C, C) view
                for (size_t col = 0; col < C; col += 5) {
                    size_t g = layout_global_index(&t, r, P, lrow * C + col);
                    cr_assert_eq(g, grow * C + col, "P=%d rank %d local row %zu col %zu", P, r, lrow, col);
                }
            }
        }
    }
}

Test(layout, describe_and_shape_strings) {
    char buf[64];
    cr_assert_str_eq(layout_describe(layout_replicate(), buf, sizeof buf), "Replicate");
    cr_assert_str_eq(layout_describe(layout_shard(1), buf, sizeof buf), "Shard(1)");
    cr_assert_str_eq(layout_shape_str((size_t[]){3, 192, 768}, 3, buf, sizeof buf), "(3, 192, 768)");
    cr_assert_str_eq(layout_shape_str((size_t[]){768}, 1, buf, sizeof buf), "(768)");
    char small[6];
    layout_shape_str((size_t[]){3, 192, 768}, 3, small, sizeof small);
    cr_assert_eq(strlen(small), sizeof small - 1, "truncated, still terminated");
}

// ---- the GPT-2 parameter table

static struct tp_model_config gpt2_124m(void) {
    return (struct tp_model_config){.n_layer = 12, .n_head = 12, .n_embd = 768, .vocab_size = 50257,
                                    .seq_len = 1024};
}

static const struct param_tensor *find_tensor(const struct param_tensor *t, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (strcmp(t[i].name, name) == 0) return &t[i];
    cr_assert_fail("tensor %s not in the table", name);
    return NULL;
}

static void assert_local_shape(const struct param_tensor *t, int P, int ndim, const size_t *want) {
    size_t got[LAYOUT_MAX_DIMS];
    cr_assert_eq(t->spec.ndim, ndim, "%s: ndim %d", t->name, t->spec.ndim);
    layout_local_shape(&t->spec, P, got);
    for (int d = 0; d < ndim; d++)
        cr_assert_eq(got[d], want[d], "%s at tp=%d: local dim %d is %zu, expected %zu", t->name, P, d,
                     got[d], want[d]);
}

Test(layout, gpt2_124m_parameter_count) {
    struct tp_model_config mc = gpt2_124m();
    for (int P = 1; P <= 4; P *= 2) {
        struct model_dims d = model_dims_make(&mc, 1, P, (struct model_options){0});
        int n;
        size_t local, global;
        struct param_tensor *t = model_param_table(&d, &n, &local, &global);
        cr_assert_eq(n, 12 * 12 + 4);
        // wte counted once and unpadded; the same for every TP size
        cr_assert_eq(global, 124439808, "tp=%d: %zu parameters", P, global);
        free(t);
    }
}

Test(layout, gpt2_table_shapes_for_tp_1_2_4) {
    struct tp_model_config mc = gpt2_124m();
    const size_t C = 768;
    for (int P = 1; P <= 4; P *= 2) {
        for (int r = 0; r < P; r++) {
            struct model_dims d = model_dims_make(&mc, 4, P, (struct model_options){0});
            cr_assert_eq(d.Vp % (128 * P), 0, "Vp %d not a multiple of 128*%d", d.Vp, P);
            cr_assert(d.Vp >= d.V && d.Vp - d.V < 128 * P, "Vp %d is not the smallest padding", d.Vp);
            cr_assert_eq(d.Vl * P, d.Vp);
            cr_assert_eq(d.NHl, 12 / P);
            cr_assert_eq(d.Cl, 768 / P);
            cr_assert_eq(d.Fl, 4 * 768 / P);
            cr_assert_eq(d.HS, 64);
            cr_assert_eq(d.N, 4 * 1024);

            int n;
            size_t local, global;
            struct param_tensor *t = model_param_table(&d, &n, &local, &global);
            size_t Pz = (size_t)P, off = 0;
            for (int i = 0; i < n; i++) {
                cr_assert_eq(t[i].offset, off, "%s: offset %zu, expected %zu", t[i].name, t[i].offset, off);
                cr_assert_eq(t[i].numel, layout_local_numel(&t[i].spec, P));
                cr_assert(layout_divisible(&t[i].spec, P), "%s not divisible by %d", t[i].name, P);
                off += t[i].numel;
            }
            cr_assert_eq(off, local);

            const struct param_tensor *wte = find_tensor(t, n, "wte.weight");
            cr_assert_eq(wte->spec.global_shape[0], (size_t)d.Vp);
            // rank r's vocabulary rows start at r*Vl (tp.c takes them as tp->rank * Vl)
            cr_assert_eq(layout_global_index(&wte->spec, r, P, 0), (size_t)r * (size_t)d.Vl * C);
            cr_assert_eq(wte->real_rows, 50257);
            assert_local_shape(wte, P, 2, (size_t[]){(size_t)d.Vp / Pz, C});
            assert_local_shape(find_tensor(t, n, "wpe.weight"), P, 2, (size_t[]){1024, C});
            assert_local_shape(find_tensor(t, n, "h.0.ln_1.weight"), P, 1, (size_t[]){C});
            assert_local_shape(find_tensor(t, n, "h.5.attn.c_attn.weight"), P, 3, (size_t[]){3, C / Pz, C});
            assert_local_shape(find_tensor(t, n, "h.5.attn.c_attn.bias"), P, 2, (size_t[]){3, C / Pz});
            assert_local_shape(find_tensor(t, n, "h.11.attn.c_proj.weight"), P, 2, (size_t[]){C, C / Pz});
            assert_local_shape(find_tensor(t, n, "h.11.attn.c_proj.bias"), P, 1, (size_t[]){C});
            assert_local_shape(find_tensor(t, n, "h.3.mlp.c_fc.weight"), P, 2, (size_t[]){4 * C / Pz, C});
            assert_local_shape(find_tensor(t, n, "h.3.mlp.c_fc.bias"), P, 1, (size_t[]){4 * C / Pz});
            assert_local_shape(find_tensor(t, n, "h.3.mlp.c_proj.weight"), P, 2, (size_t[]){C, 4 * C / Pz});
            assert_local_shape(find_tensor(t, n, "h.3.mlp.c_proj.bias"), P, 1, (size_t[]){C});
            assert_local_shape(find_tensor(t, n, "ln_f.bias"), P, 1, (size_t[]){C});
            // Linear weights are transposed for Hugging Face's Conv1D; embeddings are not.
            cr_assert(find_tensor(t, n, "h.0.attn.c_attn.weight")->transpose_hf);
            cr_assert(find_tensor(t, n, "h.0.mlp.c_proj.weight")->transpose_hf);
            cr_assert_not(wte->transpose_hf);
            // weight decay on 2-D weights only
            cr_assert(wte->decay);
            cr_assert(find_tensor(t, n, "h.0.mlp.c_fc.weight")->decay);
            cr_assert_not(find_tensor(t, n, "h.0.mlp.c_fc.bias")->decay);
            cr_assert_not(find_tensor(t, n, "h.0.ln_2.weight")->decay);
            free(t);
        }
    }
}

Test(layout, padded_vocab_sizes) {
    struct tp_model_config mc = gpt2_124m();
    cr_assert_eq(model_dims_make(&mc, 1, 1, (struct model_options){0}).Vp, 50304);
    cr_assert_eq(model_dims_make(&mc, 1, 2, (struct model_options){0}).Vp, 50432);
    cr_assert_eq(model_dims_make(&mc, 1, 4, (struct model_options){0}).Vp, 50688);
    mc.vocab_size = 512; // already a multiple: no padding
    struct model_dims d = model_dims_make(&mc, 1, 4, (struct model_options){0});
    cr_assert_eq(d.Vp, 512);
    // the last of 4 ranks holds rows 384..511
    cr_assert_eq(d.Vl, 128);
    int n;
    size_t local, global;
    struct param_tensor *t = model_param_table(&d, &n, &local, &global);
    cr_assert_eq(layout_global_index(&t[0].spec, 3, 4, 0), 384 * (size_t)mc.n_embd);
    free(t);
}

// ---- TP-invariant initialisation

static struct tp_model_config small_model(void) {
    return (struct tp_model_config){.n_layer = 2, .n_head = 4, .n_embd = 32, .vocab_size = 300,
                                    .seq_len = 16};
}

// Every global element's init value is the same whether it is produced through the tp=1 table
// or through a tp=2/4 rank's shard (local index -> layout_global_index). Vocabulary padding
// rows are zero.
Test(layout, init_values_are_tp_invariant) {
    struct tp_model_config mc = small_model();
    const unsigned long long seed = 4242;
    struct model_dims d1 = model_dims_make(&mc, 1, 1, (struct model_options){0});
    int n1;
    size_t l1, g1;
    struct param_tensor *t1 = model_param_table(&d1, &n1, &l1, &g1);
    for (int P = 2; P <= 4; P *= 2) {
        struct model_dims dP = model_dims_make(&mc, 1, P, (struct model_options){0});
        int nP;
        size_t lP, gP;
        struct param_tensor *tP = model_param_table(&dP, &nP, &lP, &gP);
        cr_assert_eq(nP, n1);
        cr_assert_eq(gP, g1);
        for (int i = 0; i < nP; i++) {
            cr_assert_str_eq(tP[i].name, t1[i].name);
            size_t row = layout_global_numel(&tP[i].spec) / tP[i].spec.global_shape[0];
            for (int r = 0; r < P; r++) {
                for (size_t j = 0; j < tP[i].numel; j++) {
                    size_t g = layout_global_index(&tP[i].spec, r, P, j);
                    float got = model_init_value(seed, &tP[i], g, mc.n_layer);
                    float want = g / row < t1[i].real_rows ? model_init_value(seed, &t1[i], g, mc.n_layer) : 0.0f;
                    cr_assert(memcmp(&got, &want, sizeof got) == 0,
                              "%s tp=%d rank %d local %zu (global %zu): %.9g vs tp=1 %.9g", tP[i].name,
                              P, r, j, g, got, want);
                }
            }
        }
        free(tP);
    }
    free(t1);
}

// The statistics the init promises: N(0, 0.02), residual projections 0.02/sqrt(2L), biases 0,
// LN weights 1, and distinct values per tensor (the tensor name is part of the key).
Test(layout, init_distribution) {
    struct tp_model_config mc = small_model();
    mc.n_layer = 8;
    struct model_dims d = model_dims_make(&mc, 1, 1, (struct model_options){0});
    int n;
    size_t l, g;
    struct param_tensor *t = model_param_table(&d, &n, &l, &g);
    for (int i = 0; i < n; i++) {
        size_t N = t[i].real_rows * (layout_global_numel(&t[i].spec) / t[i].spec.global_shape[0]);
        double s = 0, s2 = 0;
        for (size_t j = 0; j < N; j++) {
            double v = model_init_value(7, &t[i], j, mc.n_layer);
            s += v;
            s2 += v * v;
        }
        double mean = s / (double)N, sd = sqrt(s2 / (double)N - mean * mean);
        switch (t[i].init) {
        case PARAM_INIT_ZEROS: cr_assert(s2 == 0.0, "%s not zero", t[i].name); break;
        case PARAM_INIT_ONES: cr_assert(mean == 1.0 && sd < 1e-12, "%s not ones", t[i].name); break;
        case PARAM_INIT_NORMAL:
        case PARAM_INIT_NORMAL_RESID: {
            double want = t[i].init == PARAM_INIT_NORMAL ? 0.02 : 0.02 / sqrt(2.0 * mc.n_layer);
            double se = want / sqrt((double)N); // standard error of the mean
            cr_assert(fabs(mean) < 5 * se + 1e-12, "%s: mean %g (sd %g, N %zu)", t[i].name, mean, want, N);
            cr_assert(fabs(sd / want - 1.0) < 5.0 / sqrt((double)N) + 0.01, "%s: sd %g, expected %g",
                      t[i].name, sd, want);
            break;
        }
        }
    }
    const struct param_tensor *a = find_tensor(t, n, "h.0.attn.c_attn.weight");
    const struct param_tensor *b = find_tensor(t, n, "h.1.attn.c_attn.weight");
    cr_assert_neq(model_init_value(7, a, 0, mc.n_layer), model_init_value(7, b, 0, mc.n_layer),
                  "two layers got the same values");
    cr_assert_neq(model_init_value(7, a, 0, mc.n_layer), model_init_value(8, a, 0, mc.n_layer),
                  "the seed changes nothing");
    free(t);
}

// fp32 views of the model's compute-type parameters (fp32 here, so they are the master weights).
#define F(ptr) ((const float *)(ptr))

// model_create itself places the right values: each rank's buffers of a tp=2/4 model equal the
// matching slices of the tp=1 model's buffers (qkv: q, k, v rows of the rank's heads; wte: the
// rank's vocab rows, zero beyond the real vocabulary).
Test(layout, model_create_shards_match_tp1) {
    struct tp_model_config mc = small_model();
    const unsigned long long seed = 99;
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
    struct model_dims d1 = model_dims_make(&mc, 1, 1, (struct model_options){0});
    struct model m1;
    struct comm one = {.rank = 0, .size = 1}; // only places the rank: model_create issues no collective
    model_create(&m1, &d1, be, &one, seed);
    const size_t C = (size_t)mc.n_embd;
    for (size_t i = (size_t)mc.vocab_size * C; i < (size_t)d1.Vp * C; i++)
        cr_assert_eq(F(m1.p.wte)[i], 0.0f, "padding row %zu is not zero", i / C);
    for (int P = 2; P <= 4; P *= 2) {
        for (int r = 0; r < P; r++) {
            struct model_dims d = model_dims_make(&mc, 1, P, (struct model_options){0});
            struct model m;
            struct comm rank_r = {.rank = r, .size = P};
            model_create(&m, &d, be, &rank_r, seed);
            size_t Cl = C / (size_t)P, Fl = 4 * C / (size_t)P;
            // wte (Vl, C): rows r*Vl.. of the padded table
            for (size_t i = 0; i < (size_t)d.Vl; i++) {
                size_t grow = (size_t)r * (size_t)d.Vl + i;
                for (size_t c = 0; c < C; c++) {
                    float want = grow < (size_t)mc.vocab_size ? F(m1.p.wte)[grow * C + c] : 0.0f;
                    cr_assert_eq(F(m.p.wte)[i * C + c], want, "tp=%d rank %d wte[%zu][%zu]", P, r, i, c);
                }
            }
            for (int l = 0; l < mc.n_layer; l++) {
                const struct layer_params *a = &m.p.layers[l], *b = &m1.p.layers[l];
                for (size_t row = 0; row < 3 * Cl; row++) {
                    size_t grow = (row / Cl) * C + (size_t)r * Cl + row % Cl;
                    for (size_t c = 0; c < C; c++)
                        cr_assert_eq(F(a->qkvw)[row * C + c], F(b->qkvw)[grow * C + c], "tp=%d rank %d qkv", P, r);
                }
                for (size_t o = 0; o < C; o++)
                    for (size_t k = 0; k < Cl; k++)
                        cr_assert_eq(F(a->attprojw)[o * Cl + k], F(b->attprojw)[o * C + (size_t)r * Cl + k]);
                for (size_t row = 0; row < Fl; row++)
                    for (size_t c = 0; c < C; c++)
                        cr_assert_eq(F(a->fcw)[row * C + c], F(b->fcw)[((size_t)r * Fl + row) * C + c]);
                for (size_t o = 0; o < C; o++)
                    for (size_t k = 0; k < Fl; k++)
                        cr_assert_eq(F(a->fcprojw)[o * Fl + k], F(b->fcprojw)[o * 4 * C + (size_t)r * Fl + k]);
                for (size_t c = 0; c < C; c++) cr_assert_eq(F(a->ln1w)[c], 1.0f);
            }
            cr_assert(memcmp(m.p.wpe, m1.p.wpe, (size_t)mc.seq_len * C * sizeof(float)) == 0, "wpe replicated");
            model_destroy(&m);
        }
    }
    model_destroy(&m1);
    backend_destroy(&be);
}
