// Device code shared by int8.cu and ternary.cu: element types, the dp4a helper, the fp32
// dequantization epilogue, the GEMV building blocks and the tiled dp4a GEMM main loop.
//
// Everything lives in an anonymous namespace, so each .cu gets its own copy of the
// kernels it uses: no clash between the two objects, and the extern "C" functions are the
// only names a linker can see (nvcc gives anonymous-namespace code per-file unique names).
//
// Exactness rules followed throughout (they are what makes the output bit-identical to
// accelops/reference): integer dot products are exact in int32; every fp32 step is one
// correctly rounded IEEE operation in the reference's order, written with the __f*_rn
// intrinsics, which nvcc never contracts into an FMA (a plain `a * b + c` it would).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "accelops_cuda.h"

namespace {

constexpr int kWarp = 32;

// ---------------------------------------------------------------- element types

template <class T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

// Calls f(static_cast<T*>(nullptr)) with T the C type of `dt`: one switch turns the ABI's
// type tag into a template argument.
template <class F>
inline cudaError_t dispatch_dtype(accelops_dtype dt, F&& f) {
  switch (dt) {
    case ACCELOPS_FLOAT32:
      return f(static_cast<float*>(nullptr));
    case ACCELOPS_BFLOAT16:
      return f(static_cast<__nv_bfloat16*>(nullptr));
    case ACCELOPS_FLOAT16:
      return f(static_cast<__half*>(nullptr));
    case ACCELOPS_FLOAT64:  // only the comm family (comm.cu) takes fp64 buffers
      break;
  }
  return cudaErrorInvalidValue;
}

inline bool valid_dtype(accelops_dtype dt) {
  return dt == ACCELOPS_FLOAT32 || dt == ACCELOPS_BFLOAT16 || dt == ACCELOPS_FLOAT16;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// An output buffer and its element type. The type is a runtime tag, not a template
// parameter: the store is one warp-uniform switch per output element, noise next to a
// K-long dot product, and every kernel gets one instantiation instead of three (which
// cuts nvcc's time, and the compile test's, by about half).
struct OutBuf {
  void* p;
  accelops_dtype t;
};

// ---------------------------------------------------------------- integer helpers

// Four int8 x int8 products summed into c, exact. dp4a exists from sm_61 on; the fallback
// keeps an older -gencode (e.g. a TORCH_CUDA_ARCH_LIST that still lists 5.x) compiling.
__device__ __forceinline__ int dot4(int a, int b, int c) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 610
  return __dp4a(a, b, c);
#else
#pragma unroll
  for (int s = 0; s < 32; s += 8) c += int(int8_t(a >> s)) * int(int8_t(b >> s));
  return c;
#endif
}

__device__ __forceinline__ int dot16(int4 a, int4 b, int c) {
  c = dot4(a.x, b.x, c);
  c = dot4(a.y, b.y, c);
  c = dot4(a.z, b.z, c);
  return dot4(a.w, b.w, c);
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// 16 bytes from p, of which only the first `rem` exist (rem <= 0: none); the rest read as
// zero. Vec: p is 16-byte aligned and rem >= 16 whenever rem > 0, so one vector load.
template <bool Vec>
__device__ __forceinline__ int4 load16(const int8_t* p, int64_t rem) {
  int4 v = make_int4(0, 0, 0, 0);
  if (rem <= 0) return v;
  if (Vec) return __ldg(reinterpret_cast<const int4*>(p));
  unsigned w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int i = 0; i < 16; ++i)
    if (i < rem) w[i >> 2] |= unsigned(uint8_t(__ldg(p + i))) << (8 * (i & 3));
  return make_int4(int(w[0]), int(w[1]), int(w[2]), int(w[3]));
}

// ---------------------------------------------------------------- epilogue

// y = (float(acc) * xs) * ws (+ b), rounded once to the output type: the reference's
// dequantize_epilogue step by step. No bias means no addition at all (adding 0 would turn
// -0.0 into +0.0). The bf16 / fp16 conversions round to nearest even, like torch's .to().
__device__ __forceinline__ void store_dequant(OutBuf out, int64_t idx, int acc, float xs, float ws,
                                              const float* bias, int64_t col) {
  float v = __fmul_rn(__fmul_rn(__int2float_rn(acc), xs), ws);
  if (bias != nullptr) v = __fadd_rn(v, bias[col]);
  switch (out.t) {
    case ACCELOPS_BFLOAT16:
      static_cast<__nv_bfloat16*>(out.p)[idx] = __float2bfloat16_rn(v);
      break;
    case ACCELOPS_FLOAT16:
      static_cast<__half*>(out.p)[idx] = __float2half_rn(v);
      break;
    default:
      static_cast<float*>(out.p)[idx] = v;
      break;
  }
}

// ---------------------------------------------------------------- GEMV building blocks
//
// The GEMV kernels (int8.cu, ternary.cu) give each warp NR weight rows and stream them
// with 16-byte __ldg loads, a warp covering 512 contiguous bytes of a row per step: every
// DRAM sector fetched is used whole. The M <= 8 activation rows are staged once per block
// in shared memory (a chunk of K at a time; one chunk for K up to 32768 / MT), so the only
// DRAM traffic is the weights, read once. Loads for kGemvUnroll steps are issued before
// their dot products so each lane keeps kGemvUnroll * NR * 16 bytes in flight; at N = 4096
// that is ~2 K warps x 2 KiB, about the bytes-in-flight an H100 needs to approach its
// ~3.3 TB/s. What to measure on a GPU: achieved DRAM bandwidth (ncu dram__throughput)
// against `nvidia-smi`'s peak for N = K = 4096..16384 at M = 1, the best NR / unroll / block
// size, and the M at which the tiled kernel overtakes (kGemvMaxM is a guess until then).

constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * kWarp;
constexpr int kGemvRows = 2;        // NR: weight rows per warp
constexpr int kGemvUnroll = 2;      // warp steps whose loads are issued together
constexpr int kGemvMaxM = 8;        // up to here the GEMV; beyond, the tiled GEMM
constexpr int kGemvSmemBytes = 32768;  // activation staging per block, all MT rows together

// smem[mi * chunk + j] = x[(m0 + mi) * ldx + k0 + j] for mi < MT, j < chunk; zero where the
// row is >= m or the column is >= kvalid. x, ldx, k0, kvalid and chunk are multiples of 16
// bytes (the GEMVs only run on such operands), so it is all 16-byte copies.
template <int MT>
__device__ __forceinline__ void stage_rows(int8_t* smem, const int8_t* __restrict__ x, int64_t ldx, int64_t m,
                                           int64_t m0, int64_t kvalid, int64_t k0, int chunk) {
  const int per_row = chunk / 16;
  for (int idx = threadIdx.x; idx < MT * per_row; idx += blockDim.x) {
    const int mi = idx / per_row, c = (idx - mi * per_row) * 16;
    const int64_t rem = m0 + mi < m ? kvalid - (k0 + c) : 0;
    *reinterpret_cast<int4*>(smem + mi * chunk + c) = load16<true>(x + (m0 + mi) * ldx + k0 + c, rem);
  }
}

// Reduces acc over the warp and lets lane (mi * NR + r) write output (m0 + mi, n0 + r).
// xsum (ternary only) turns sum(code * x) into sum(w * x): codes are w + 1.
template <int MT, int NR>
__device__ __forceinline__ void gemv_epilogue(int (&acc)[MT][NR], int64_t m0, int64_t n0, int64_t m, int64_t n,
                                              const int32_t* __restrict__ xsum, const float* __restrict__ xs,
                                              const float* __restrict__ ws, int ws_per_row,
                                              const float* __restrict__ bias, OutBuf out) {
  const int lane = threadIdx.x & (kWarp - 1);
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      const int total = warp_sum(acc[mi][r]);
      const int64_t row = m0 + mi, col = n0 + r;
      if (lane == mi * NR + r && row < m && col < n)
        store_dequant(out, row * n + col, total - (xsum != nullptr ? xsum[row] : 0), xs[row],
                      ws[ws_per_row ? col : 0], bias, col);
    }
}

// ---------------------------------------------------------------- tiled dp4a GEMM

// A 64 x 64 output tile per 256-thread block, K in tiles of 128: both operands are staged
// as int8 rows in shared memory and each thread computes a 4 x 4 sub-tile with dp4a
// (16-byte shared loads: 8 of them feed 64 dp4a). Rows are padded to 144 bytes so the 8
// threads of a quarter-warp reading B rows tx, tx + 1, ... hit 8 distinct 16-byte bank
// groups; A reads are broadcasts (those threads share ty). The ternary GEMM reuses this
// main loop with a B loader that decodes the packed codes while staging, so the decode is
// paid once per tile, not once per output row.
// On a GPU, measure against cuBLASLt's int8 GEMM: dp4a tops out near 1/16 of the int8
// tensor-core rate, so for large M the next step is mma.sync m16n8k32.s8 (sm_80+) with
// cp.async double buffering; the loaders and epilogue here would stay.
constexpr int kTileM = 64, kTileN = 64, kTileK = 128;
constexpr int kTileLd = kTileK + 16;
constexpr int kTileThreads = 256;

// Stages rows [row0, row0 + 64) x columns [kt * 128, kt * 128 + 128) of a dense int8
// matrix [rows, cols] into s (row stride kTileLd), zero outside the matrix. Eight threads
// per 128-byte row segment keep the global loads coalesced.
template <bool Vec>
struct Int8Tile {
  const int8_t* p;
  int64_t rows, cols;
  __device__ __forceinline__ void load(int8_t* s, int64_t row0, int64_t kt) const {
    for (int idx = threadIdx.x; idx < kTileM * (kTileK / 16); idx += blockDim.x) {
      const int r = idx / (kTileK / 16), c = (idx % (kTileK / 16)) * 16;
      const int64_t gr = row0 + r, gc = kt * kTileK + c;
      *reinterpret_cast<int4*>(s + r * kTileLd + c) = load16<Vec>(p + gr * cols + gc, gr < rows ? cols - gc : 0);
    }
  }
};

template <class ATile, class BTile>
__global__ void __launch_bounds__(kTileThreads)
    gemm_dp4a_kernel(ATile a, BTile b, int64_t m, int64_t n, int64_t ktiles, const int32_t* __restrict__ xsum,
                     const float* __restrict__ xs, const float* __restrict__ ws, int ws_per_row,
                     const float* __restrict__ bias, OutBuf out) {
  __shared__ __align__(16) int8_t as[kTileM * kTileLd];
  __shared__ __align__(16) int8_t bs[kTileN * kTileLd];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t n0 = int64_t(blockIdx.x) * kTileN;
  // M tiles on grid y, strided: grid y is capped at 65535 but M (tokens) is not.
  for (int64_t m0 = int64_t(blockIdx.y) * kTileM; m0 < m; m0 += int64_t(gridDim.y) * kTileM) {
    int acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0;
    for (int64_t kt = 0; kt < ktiles; ++kt) {
      __syncthreads();  // the previous tile is fully read
      a.load(as, m0, kt);
      b.load(bs, n0, kt);
      __syncthreads();
#pragma unroll
      for (int kc = 0; kc < kTileK; kc += 16) {
        int4 av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = *reinterpret_cast<const int4*>(as + (ty + 16 * i) * kTileLd + kc);
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = *reinterpret_cast<const int4*>(bs + (tx + 16 * j) * kTileLd + kc);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = dot16(av[i], bv[j], acc[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = m0 + ty + 16 * i;
      if (row >= m) continue;
      const int sub = xsum != nullptr ? xsum[row] : 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t col = n0 + tx + 16 * j;
        if (col < n) store_dequant(out, row * n + col, acc[i][j] - sub, xs[row], ws[ws_per_row ? col : 0], bias, col);
      }
    }
  }
}

// Grid for gemm_dp4a_kernel; false when N needs more than 2^31 - 1 column tiles.
inline bool gemm_grid(int64_t m, int64_t n, dim3* grid) {
  const int64_t nt = (n + kTileN - 1) / kTileN, mt = (m + kTileM - 1) / kTileM;
  if (nt > 0x7fffffff) return false;
  *grid = dim3(unsigned(nt), unsigned(mt < 65535 ? mt : 65535), 1);
  return true;
}

}  // namespace
