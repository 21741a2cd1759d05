// flash_attention_sm90.h: the Hopper (sm_90a) forward kernel behind flash_attention_fwd; internal to
// cuda/ (flash_attention.cu dispatches to it on compute capability 9.0 devices).
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

// As flash_attention_fwd, for 8 <= HS <= 128 (HS a multiple of 8) with arguments already checked;
// returns 0, or 2 when the launch failed.
int flash_attention_sm90_fwd(void *stream, void *out, float *lse, const void *q, const void *k,
                             const void *v, int B, int T, int NH, int HS, int qkv_stride,
                             int out_stride);

#ifdef __cplusplus
}
#endif
