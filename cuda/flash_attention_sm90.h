// flash_attention_sm90.h: the Hopper (sm_90a) kernels behind flash_attention_fwd/bwd; internal to
// cuda/ (flash_attention.cu dispatches to it on compute capability 9.0 devices).
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

// As flash_attention_fwd, for 8 <= HS <= 128 (HS a multiple of 8) with arguments already checked;
// allow_ws: nonzero, use the warp-specialised, copy-engine-fed kernel where it applies (HS 64 or
// 128; 1 with its consumers in ping-pong at HS 128, 2 without), else the cp.async kernel; order
// (the warp-specialised kernel's walk over the items): 0 longest first across heads, 1 query tiles
// in pairs of one head (flash_attention_set_hopper_order); qstages (the warp-specialised kernel): 2,
// the next item's Q tile comes into a second stage while the current item runs, else one stage
// (flash_attention_set_hopper_q_stages); exp2_mixed (the warp-specialised kernel at HS 64): nonzero,
// a quarter of the softmax's exponentials by a polynomial on the FMA pipe
// (flash_attention_set_hopper_exp2). Returns 0, or 2 when the launch failed.
int flash_attention_sm90_fwd(void *stream, void *out, float *lse, const void *q, const void *k,
                             const void *v, int B, int T, int NH, int HS, int qkv_stride,
                             int out_stride, int allow_ws, int order, int qstages, int exp2_mixed);

// As flash_attention_bwd, under the same conditions; scratch as flash_attention_bwd_scratch_floats
// sizes it. allow_ws: 0 the cp.async kernels; 1 (HS 64, 128) the one-kernel warp-specialised
// backward, which takes D, a dq accumulator and counters from scratch; 2 the two warp-specialised
// kernels (dq, then dk and dv), which take D only; 3 the one-kernel backward adding dq's partial
// sums in whatever order they come (not deterministic; for measuring what the order costs).
// persist (the one-kernel backward): -1 a block per multiprocessor walking the items at T <= 1024
// and a block per item beyond (what measured faster); 0 or 1 one or the other at every T. heads
// (the one-kernel backward): nonzero, the persistent blocks hold whole heads at a time and walk
// their query tiles from the last one down (flash_attention_set_hopper_bwd_order). kvstages (the
// one-kernel backward at HS 64; one elsewhere): 2, the next item's K and V tiles come into a
// second stage while the current item runs, else one stage (flash_attention_set_hopper_kv_stages).
// dsum (NULL: none; else 3 NH HS floats: dq's columns, dk's, dv's) += the column sums of dq, dk, dv
// as stored, summed inside the one-kernel backward, using sums (flash_attention_bwd_sums_floats);
// then the return is 3. Where another kernel runs, nothing is summed and the return is 0.
int flash_attention_sm90_bwd(void *stream, void *dq, void *dk, void *dv, const void *dout,
                             const void *q, const void *k, const void *v, const void *out,
                             const float *lse, float *scratch, int B, int T, int NH, int HS,
                             int qkv_stride, int out_stride, int allow_ws, int persist, int heads,
                             int kvstages, float *dsum, float *sums);

#ifdef __cplusplus
}
#endif
