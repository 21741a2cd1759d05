// flash_attention_common.cuh: device code the portable (flash_attention.cu) and the Hopper
// (flash_attention_sm90.cu) attention kernels share; inlined where it is called.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

// The backward's row statistics for a warp's 16 query rows from r0: D = rowsum(dout * out) (lane:
// row lane / 2, every other 8-column chunk from lane % 2; hc chunks a row, off the head's offset in
// dout and out), stored to Dv (B*NH, T) by the even lanes when store_d; drow and lrow get the D and
// the log-sum-exp (log2 units, lse scaled by log2e) of the lane's fragment rows g and g + 8.
__device__ __forceinline__ static void fa_row_stats(const __nv_bfloat16 *dout, const __nv_bfloat16 *out,
                                                    size_t off, size_t out_stride, const float *lse,
                                                    float *Dv, bool store_d, int bh, int T, int r0,
                                                    int hc, int lane, float log2e, float (&drow)[2],
                                                    float (&lrow)[2]) {
    int g = lane >> 2, t = r0 + (lane >> 1);
    float d = 0.0f;
    if (t < T) {
        const uint4 *a = reinterpret_cast<const uint4 *>(dout + off + (size_t)t * out_stride);
        const uint4 *o = reinterpret_cast<const uint4 *>(out + off + (size_t)t * out_stride);
        for (int c = lane & 1; c < hc; c += 2) {
            uint4 av = a[c], ov = o[c];
            const __nv_bfloat162 *a2 = reinterpret_cast<const __nv_bfloat162 *>(&av);
            const __nv_bfloat162 *o2 = reinterpret_cast<const __nv_bfloat162 *>(&ov);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float2 af = __bfloat1622float2(a2[e]), of = __bfloat1622float2(o2[e]);
                d = fmaf(af.x, of.x, d);
                d = fmaf(af.y, of.y, d);
            }
        }
    }
    d += __shfl_xor_sync(0xffffffffu, d, 1);
    if (store_d && (lane & 1) == 0 && t < T) Dv[(size_t)bh * T + t] = d;
    drow[0] = __shfl_sync(0xffffffffu, d, 2 * g);
    drow[1] = __shfl_sync(0xffffffffu, d, 2 * g + 16);
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        int row = r0 + g + 8 * hr;
        lrow[hr] = row < T ? lse[(size_t)bh * T + row] * log2e : 0.0f;
    }
}
