// INT8 family on CUDA: per-token activation and per-channel weight quantization, and the
// exact W8A8 matmul with the dequantization epilogue fused. The spec is
// accelops/reference/int8.py; csrc/cpu/int8.cpp is the same arithmetic on the CPU.
//
// The row quantizer lives here, as quantize_rows does in csrc/cpu/int8.cpp, and the
// ternary matmul (ternary.cu) calls it through the C ABI like the CPU ternary path does:
// per-token activation quantization is one op of this family, shared by both matmuls.
//
// The matmul picks by M: up to kGemvMaxM rows (decode) the weight-streaming GEMV, whose
// cost is reading w_q once; beyond (or for K % 16 != 0), the tiled dp4a GEMM (common.cuh). Both accumulate
// int8 x int8 in int32 with dp4a, which is exact for every int8 value (-128 included, which
// the quantizers never produce but int8_matmul's callers may pass).
#include "common.cuh"

namespace {

// ---------------------------------------------------------------- row quantizer

constexpr float kQuantEps = 1e-5f;  // floor on a row's absmax (reference/int8.py EPS)
constexpr int kQuantThreads = 256;

// Every thread gets the block's result; the trailing barrier lets `red` be reused at once.
__device__ __forceinline__ float block_max(float v, float* red) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & (kWarp - 1)) == 0) red[threadIdx.x / kWarp] = v;
  __syncthreads();
  v = red[0];
  for (int w = 1; w < int(blockDim.x / kWarp); ++w) v = fmaxf(v, red[w]);
  __syncthreads();
  return v;
}

__device__ __forceinline__ int block_sum(int v, int* red) {
  v = warp_sum(v);
  if ((threadIdx.x & (kWarp - 1)) == 0) red[threadIdx.x / kWarp] = v;
  __syncthreads();
  v = 0;
  for (int w = 0; w < int(blockDim.x / kWarp); ++w) v += red[w];
  __syncthreads();
  return v;
}

// One block per row (grid-stride over rows): the same two passes as quantize_row_scalar in
// csrc/cpu/int8.cpp. Pass 1 takes max|x| and notes any NaN/Inf (fmaxf drops NaN, hence
// the separate flag); pass 2 re-reads the row, which is still in L1/L2 for any realistic
// K, and rounds. rint via __float2int_rn is round-half-to-even, like torch.round, and
// |x * inv| <= 127 * (1 + 2^-23) keeps the clamp a formality, as in the reference.
// On a GPU: check this hits DRAM bandwidth for large M; for M = 1 (decode) it is launch
// and latency bound (~2 passes of K / 256 elements per thread), which is the case for
// fusing it into the GEMV prologue.
template <class T>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_rows_kernel(const T* __restrict__ x, int64_t m, int64_t k, int8_t* __restrict__ q, int64_t ldq,
                         float* __restrict__ scale, int32_t* __restrict__ qsum) {
  __shared__ float red_f[kQuantThreads / kWarp];
  __shared__ int red_i[kQuantThreads / kWarp];
  const float inf = __int_as_float(0x7f800000);
  for (int64_t r = blockIdx.x; r < m; r += gridDim.x) {
    const T* xr = x + r * k;
    int8_t* qr = q + r * ldq;
    float amax = 0.f;
    int bad = 0;
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      const float a = fabsf(to_float(xr[i]));
      bad |= !(a < inf);  // +-Inf, or NaN (which fails every comparison)
      amax = fmaxf(amax, a);
    }
    amax = block_max(amax, red_f);
    if (__syncthreads_or(bad)) {  // same value in every thread: the branch is uniform
      for (int64_t i = threadIdx.x; i < ldq; i += blockDim.x) qr[i] = 0;
      if (threadIdx.x == 0) {
        scale[r] = __int_as_float(0x7fc00000);  // quiet NaN, as torch writes it
        if (qsum != nullptr) qsum[r] = 0;
      }
      continue;
    }
    const float a = fmaxf(amax, kQuantEps);
    const float inv = __fdiv_rn(127.0f, a);  // IEEE division, not a reciprocal-multiply
    int s = 0;
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      const int v = min(127, max(-127, __float2int_rn(__fmul_rn(to_float(xr[i]), inv))));
      qr[i] = int8_t(v);
      s += v;
    }
    for (int64_t i = k + threadIdx.x; i < ldq; i += blockDim.x) qr[i] = 0;
    s = block_sum(s, red_i);
    if (threadIdx.x == 0) {
      scale[r] = __fdiv_rn(a, 127.0f);
      if (qsum != nullptr) qsum[r] = s;
    }
  }
}

// Launches the quantizer for x [m, k] of dtype `dt`; sizes already validated by the caller.
inline cudaError_t launch_quantize_rows(const void* x, accelops_dtype dt, int64_t m, int64_t k, int8_t* q,
                                        int64_t ldq, float* scale, int32_t* qsum, cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  const unsigned blocks = unsigned(m < (int64_t(1) << 20) ? m : (int64_t(1) << 20));
  return dispatch_dtype(dt, [&](auto* tag) {
    using T = typename std::remove_pointer<decltype(tag)>::type;
    quantize_rows_kernel<T><<<blocks, kQuantThreads, 0, stream>>>(static_cast<const T*>(x), m, k, q, ldq, scale,
                                                                  qsum);
    return cudaGetLastError();
  });
}

// ---------------------------------------------------------------- GEMV (M <= kGemvMaxM)

// Each warp streams kGemvRows rows of w_q; lane l owns bytes [16 l, 16 l + 16) of every
// 512-byte step and reads the matching 16 activation bytes of each of the MT rows from
// shared memory: consecutive lanes, consecutive 16-byte words, so no bank conflicts.
// Needs k % 16 == 0 and 16-byte aligned x_q and w_q (every real layer; the dispatch below
// sends anything else to the tiled kernel, whose byte-wise loader takes any K and offset).
template <int MT>
__global__ void __launch_bounds__(kGemvThreads)
    int8_gemv_kernel(const int8_t* __restrict__ xq, const float* __restrict__ xs, int64_t m,
                     const int8_t* __restrict__ w, int64_t n, int64_t k, int chunk, const float* __restrict__ ws,
                     int ws_per_row, const float* __restrict__ bias, OutBuf out) {
  constexpr int NR = kGemvRows, U = kGemvUnroll, kStep = kWarp * 16;
  extern __shared__ int4 gemv_smem[];  // int4: 16-byte alignment for the vector reads
  int8_t* xsm = reinterpret_cast<int8_t*>(gemv_smem);
  const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;
  const int64_t m0 = int64_t(blockIdx.y) * MT;
  const int64_t n0 = (int64_t(blockIdx.x) * kGemvWarps + warp) * NR;
  // Rows past N read row N - 1 instead of branching: a warp must stay for the barriers,
  // and its results there are never stored.
  const int8_t* wr[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) wr[r] = w + (n0 + r < n ? n0 + r : n - 1) * k;
  int acc[MT][NR];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int r = 0; r < NR; ++r) acc[mi][r] = 0;

  for (int64_t k0 = 0; k0 < k; k0 += chunk) {
    __syncthreads();  // every warp is done with the previous chunk
    stage_rows<MT>(xsm, xq, k, m, m0, k, k0, chunk);
    __syncthreads();
    const int len = int(k - k0 < chunk ? k - k0 : chunk);
    for (int s = lane * 16; s < len; s += U * kStep) {
      int4 wv[U][NR];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < NR; ++r) wv[u][r] = load16<true>(wr[r] + k0 + s + u * kStep, len - (s + u * kStep));
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int su = s + u * kStep;
        if (su >= len) break;
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          const int4 xv = *reinterpret_cast<const int4*>(xsm + mi * chunk + su);
#pragma unroll
          for (int r = 0; r < NR; ++r) acc[mi][r] = dot16(wv[u][r], xv, acc[mi][r]);
        }
      }
    }
  }
  gemv_epilogue<MT, NR>(acc, m0, n0, m, n, nullptr, xs, ws, ws_per_row, bias, out);
}

template <int MT>
cudaError_t launch_int8_gemv(const int8_t* x_q, const float* x_scale, int64_t m, const int8_t* w_q, int64_t n,
                             int64_t k, const float* w_scale, int ws_per_row, const float* bias, OutBuf out,
                             cudaStream_t stream) {
  const int64_t cap = kGemvSmemBytes / MT, k16 = (k + 15) / 16 * 16;
  const int chunk = int(k16 < cap ? k16 : cap);
  const int64_t rows_per_block = int64_t(kGemvWarps) * kGemvRows;
  const int64_t blocks = (n + rows_per_block - 1) / rows_per_block;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(blocks), unsigned((m + MT - 1) / MT));
  const size_t smem = size_t(MT) * size_t(chunk);
  int8_gemv_kernel<MT><<<grid, kGemvThreads, smem, stream>>>(x_q, x_scale, m, w_q, n, k, chunk, w_scale,
                                                                  ws_per_row, bias, out);
  return cudaGetLastError();
}

// ---------------------------------------------------------------- dispatch

cudaError_t launch_int8_matmul(const int8_t* x_q, const float* x_scale, int64_t m, const int8_t* w_q, int64_t n,
                               int64_t k, const float* w_scale, int ws_per_row, const float* bias, OutBuf out,
                               cudaStream_t stream) {
  // vec: 16-byte loads are legal on both operands. K % 16 != 0 or a view at an odd offset
  // is rare enough (real layers have K a multiple of 64) to take the tiled kernel's
  // byte-wise loader whatever M is: correct everywhere, tuned only for the common case.
  const bool vec = k % 16 == 0 && aligned16(x_q) && aligned16(w_q);
  if (vec && m <= kGemvMaxM) {
    if (m == 1) return launch_int8_gemv<1>(x_q, x_scale, m, w_q, n, k, w_scale, ws_per_row, bias, out, stream);
    if (m == 2) return launch_int8_gemv<2>(x_q, x_scale, m, w_q, n, k, w_scale, ws_per_row, bias, out, stream);
    if (m <= 4) return launch_int8_gemv<4>(x_q, x_scale, m, w_q, n, k, w_scale, ws_per_row, bias, out, stream);
    return launch_int8_gemv<8>(x_q, x_scale, m, w_q, n, k, w_scale, ws_per_row, bias, out, stream);
  }
  dim3 grid;
  if (!gemm_grid(m, n, &grid)) return cudaErrorInvalidValue;
  const int64_t ktiles = (k + kTileK - 1) / kTileK;
  if (vec)
    gemm_dp4a_kernel<Int8Tile<true>, Int8Tile<true>><<<grid, kTileThreads, 0, stream>>>(
        Int8Tile<true>{x_q, m, k}, Int8Tile<true>{w_q, n, k}, m, n, ktiles, nullptr, x_scale, w_scale, ws_per_row,
        bias, out);
  else
    gemm_dp4a_kernel<Int8Tile<false>, Int8Tile<false>><<<grid, kTileThreads, 0, stream>>>(
        Int8Tile<false>{x_q, m, k}, Int8Tile<false>{w_q, n, k}, m, n, ktiles, nullptr, x_scale, w_scale,
        ws_per_row, bias, out);
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t accelops_quantize_activation_int8(const void* x, accelops_dtype x_dtype, int64_t m, int64_t k,
                                                         int8_t* q, int64_t ldq, float* scale, int32_t* qsum,
                                                         cudaStream_t stream) {
  if (m < 0 || k < 0 || ldq < k) return cudaErrorInvalidValue;
  if (m > 0 && (scale == nullptr || (k > 0 && x == nullptr) || (ldq > 0 && q == nullptr)))
    return cudaErrorInvalidValue;
  return launch_quantize_rows(x, x_dtype, m, k, q, ldq, scale, qsum, stream);
}

extern "C" cudaError_t accelops_quantize_weight_int8(const void* w, accelops_dtype w_dtype, int64_t n, int64_t k,
                                                     int8_t* w_q, float* w_scale, cudaStream_t stream) {
  // Per output channel is per row of w [N, K]: the activation quantizer's arithmetic with
  // no padding and no row sums.
  return accelops_quantize_activation_int8(w, w_dtype, n, k, w_q, k, w_scale, nullptr, stream);
}

extern "C" cudaError_t accelops_int8_gemm(const int8_t* x_q, const float* x_scale, int64_t m, const int8_t* w_q,
                                          int64_t n, int64_t k, const float* w_scale, int w_scale_per_row,
                                          const float* bias, void* out, accelops_dtype out_dtype,
                                          cudaStream_t stream) {
  if (m < 0 || n < 0 || k < 0) return cudaErrorInvalidValue;
  if (m == 0 || n == 0) return cudaSuccess;
  if (x_scale == nullptr || w_scale == nullptr || out == nullptr || (k > 0 && (x_q == nullptr || w_q == nullptr)))
    return cudaErrorInvalidValue;
  if (!valid_dtype(out_dtype)) return cudaErrorInvalidValue;
  return launch_int8_matmul(x_q, x_scale, m, w_q, n, k, w_scale, w_scale_per_row != 0, bias, OutBuf{out, out_dtype},
                            stream);
}
