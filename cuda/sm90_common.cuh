// sm90_common.cuh: the Hopper (sm_90a) building blocks shared by the attention kernels
// (flash_attention_sm90.cu) and the matrix product (gemm_sm90.cu): shared-memory addresses, the
// wgmma matrix descriptor and the m64n128k16 product, mbarriers and named barriers, the copy
// engine's tensor loads and the host side of its tensor maps. Static: each file has its own copy.
#pragma once

#include <cuda.h> // CUtensorMap and its encoder's types; the encoder is reached through the runtime
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

typedef __nv_bfloat16 f9_bf16;

// ---- device helpers

__device__ __forceinline__ static uint32_t f9_smem_u32(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ static uint32_t f9_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

// A shared-memory matrix descriptor: start address, leading and stride byte offsets, 128-byte
// swizzle (mode 1 in bits 62-63).
__device__ __forceinline__ static uint64_t f9_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFFu) >> 4) | ((uint64_t)((lbo >> 4) & 0x3FFFu) << 16) |
           ((uint64_t)((sbo >> 4) & 0x3FFFu) << 32) | (1ull << 62);
}

__device__ __forceinline__ static void f9_wg_fence(void) {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

// Shared memory written by the generic proxy (cp.async, plain stores, stmatrix) becomes visible to
// the async proxy (wgmma, the copy engine's stores).
__device__ __forceinline__ static void f9_fence_async(void) {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// The thread's bulk copies issued since the last commit form one group.
__device__ __forceinline__ static void f9_bulk_commit(void) { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }

// The thread's bulk copies have read their shared memory (it may be written again).
__device__ __forceinline__ static void f9_bulk_wait_read(void) {
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}

// The thread's bulk copies are complete (their writes done; before the block's shared memory goes).
__device__ __forceinline__ static void f9_bulk_wait(void) {
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ static void f9_wg_commit_wait(void) {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}

// ---- wgmma wrappers (one output register per accumulator)

// The accumulator operands every wgmma wrapper lists: their place holders in the instruction's
// text and the matching read-write outputs, for 32 (n64) or 64 (n128) fp32 values of this thread.
#define F9_ACC_TEXT32 \
    "%0, %1, %2, %3, %4, %5, %6, %7, " \
    "%8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, " \
    "%24, %25, %26, %27, %28, %29, %30, %31"
#define F9_ACC_TEXT64 \
    F9_ACC_TEXT32 ", " \
    "%32, %33, %34, %35, %36, %37, %38, %39, " \
    "%40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, " \
    "%56, %57, %58, %59, %60, %61, %62, %63"
#define F9_ACC_OUT32(d) \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define F9_ACC_OUT64(d) \
    F9_ACC_OUT32(d), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// d (64 x 128 fp32, this thread's 64 values) = (scale_d ? d : 0) + A . B^T, A and B K-major
// bf16 in shared memory (descriptors da, db); with TB = 1, B MN-major (stored K x N: d = A . B).
template <int TB = 0>
__device__ __forceinline__ static void wg_ss_n128(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
                 F9_ACC_TEXT64
                 "}, %64, %65, p, 1, 1, 0, %67;\n}\n"
                 : F9_ACC_OUT64(d)
                 : "l"(da), "l"(db), "r"(scale_d), "n"(TB));
}

// ---- barriers and the copy engine

__device__ __forceinline__ static void f9_mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ static void f9_mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ static void f9_mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ static void f9_named_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ static void f9_named_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Waits until the phase of parity `parity` of the barrier has completed.
__device__ __forceinline__ static void f9_mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile("{\n.reg .pred done;\nF9_WAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra F9_WAIT;\n}\n" ::"r"(bar),
                 "r"(parity)
                 : "memory");
}

// One 64-column x 128-row box of a (B, T, cols) tensor at (x, y, z) into shared dst.
__device__ __forceinline__ static void f9_tma_load(uint32_t dst, const CUtensorMap *map, int x, int y,
                                                   int z, uint32_t bar) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
                 "l"(map), "r"(x), "r"(y), "r"(z), "r"(bar)
                 : "memory");
}

// ---- tensor maps for the copy engine (host)

typedef CUresult (*f9_encode_fn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *,
                                 const cuuint64_t *, const cuuint64_t *, const cuuint32_t *,
                                 const cuuint32_t *, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's tensor-map encoder, found once through the runtime (no link against the driver).
static f9_encode_fn f9_encoder(void) {
    static f9_encode_fn fn;
    static int tried;
    if (!tried) {
        tried = 1;
        cudaDriverEntryPointQueryResult q;
        void *p = NULL;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault,
                                             &q) == cudaSuccess &&
            q == cudaDriverEntryPointSuccess)
            fn = (f9_encode_fn)p;
        (void)cudaGetLastError();
    }
    return fn;
}

// A (B, T, cols) bf16 tensor whose rows are stride elements apart (batches T rows apart), read
// in 64 x 128 boxes with the 128-byte swizzle; rows past T read as zeros.
static bool f9_tensor_map(CUtensorMap *map, const void *ptr, int cols, int T, int B, int stride,
                          int box_rows) {
    f9_encode_fn enc = f9_encoder();
    if (!enc) return false;
    cuuint64_t dim[3] = {(cuuint64_t)cols, (cuuint64_t)T, (cuuint64_t)B};
    cuuint64_t str[2] = {(cuuint64_t)stride * 2, (cuuint64_t)stride * 2 * (cuuint64_t)T};
    cuuint32_t box[3] = {64, (cuuint32_t)box_rows, 1}, es[3] = {1, 1, 1};
    return enc(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, (void *)ptr, dim, str, box, es,
               CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
               CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The current device's multiprocessors (persistent kernels launch a block on each).
static int f9_sm_count(void) {
    static int n;
    if (n <= 0) {
        int dev = 0;
        if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
            (void)cudaGetLastError();
            n = 132;
        }
    }
    return n;
}

