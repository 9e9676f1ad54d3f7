// INT8 family on CUDA: per-token activation and per-channel weight quantization, and the
// exact W8A8 matmul with the dequantization epilogue fused. The spec is
// accelops/reference/int8.py; csrc/cpu/int8.cpp is the same arithmetic on the CPU.
//
// The row quantizer lives here, as quantize_rows does in csrc/cpu/int8.cpp, and the
// ternary matmul (ternary.cu) calls it through the C ABI like the CPU ternary path does:
// per-token activation quantization is one op of this family, shared by both matmuls.
//
// The matmul picks by M: up to kGemvMaxM rows (decode) the weight-streaming GEMV, whose
// cost is reading w_q once; beyond, the tiled dp4a GEMM (common.cuh). Both accumulate
// int8 x int8 in int32 with dp4a, which is exact for every int8 value (-128 included, which
// the quantizers never produce but int8_matmul's callers may pass).
#include "common.cuh"

namespace {

// Each warp streams kGemvRows rows of w_q; lane l owns bytes [16 l, 16 l + 16) of every
// 512-byte step and reads the matching 16 activation bytes of each of the MT rows from
// shared memory: consecutive lanes, consecutive 16-byte words, so no bank conflicts.
// Vec: k % 16 == 0 and both operands 16-byte aligned; otherwise byte loads with the tail
// zero filled (correct for any K and any storage offset, just slower).
template <int MT, bool Vec, class Out>
__global__ void __launch_bounds__(kGemvThreads)
    int8_gemv_kernel(const int8_t* __restrict__ xq, const float* __restrict__ xs, int64_t m,
                     const int8_t* __restrict__ w, int64_t n, int64_t k, int chunk, const float* __restrict__ ws,
                     int ws_per_row, const float* __restrict__ bias, Out* __restrict__ out) {
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
    stage_rows<MT, Vec>(xsm, xq, k, m, m0, k, k0, chunk);
    __syncthreads();
    const int len = int(k - k0 < chunk ? k - k0 : chunk);
    for (int s = lane * 16; s < len; s += U * kStep) {
      int4 wv[U][NR];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < NR; ++r) wv[u][r] = load16<Vec>(wr[r] + k0 + s + u * kStep, len - (s + u * kStep));
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

template <int MT, class Out>
cudaError_t launch_int8_gemv(const int8_t* x_q, const float* x_scale, int64_t m, const int8_t* w_q, int64_t n,
                             int64_t k, const float* w_scale, int ws_per_row, const float* bias, Out* out, bool vec,
                             cudaStream_t stream) {
  const int64_t cap = kGemvSmemBytes / MT, k16 = (k + 15) / 16 * 16;
  const int chunk = int(k16 < cap ? k16 : cap);
  const int64_t rows_per_block = int64_t(kGemvWarps) * kGemvRows;
  const int64_t blocks = (n + rows_per_block - 1) / rows_per_block;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(blocks), unsigned((m + MT - 1) / MT));
  const size_t smem = size_t(MT) * size_t(chunk);
  if (vec)
    int8_gemv_kernel<MT, true, Out><<<grid, kGemvThreads, smem, stream>>>(x_q, x_scale, m, w_q, n, k, chunk,
                                                                          w_scale, ws_per_row, bias, out);
  else
    int8_gemv_kernel<MT, false, Out><<<grid, kGemvThreads, smem, stream>>>(x_q, x_scale, m, w_q, n, k, chunk,
                                                                           w_scale, ws_per_row, bias, out);
  return cudaGetLastError();
}

template <class Out>
cudaError_t launch_int8_matmul(const int8_t* x_q, const float* x_scale, int64_t m, const int8_t* w_q, int64_t n,
                               int64_t k, const float* w_scale, int ws_per_row, const float* bias, Out* out,
                               cudaStream_t stream) {
  const bool vec = k % 16 == 0 && aligned16(x_q) && aligned16(w_q);
  if (m <= kGemvMaxM) {
    if (m == 1) return launch_int8_gemv<1>(x_q, x_scale, m, w_q, n, k, w_scale, ws_per_row, bias, out, vec, stream);
    if (m == 2) return launch_int8_gemv<2>(x_q, x_scale, m, w_q, n, k, w_scale, ws_per_row, bias, out, vec, stream);
    if (m <= 4) return launch_int8_gemv<4>(x_q, x_scale, m, w_q, n, k, w_scale, ws_per_row, bias, out, vec, stream);
    return launch_int8_gemv<8>(x_q, x_scale, m, w_q, n, k, w_scale, ws_per_row, bias, out, vec, stream);
  }
  dim3 grid;
  if (!gemm_grid(m, n, &grid)) return cudaErrorInvalidValue;
  const int64_t ktiles = (k + kTileK - 1) / kTileK;
  if (vec)
    gemm_dp4a_kernel<Int8Tile<true>, Int8Tile<true>, Out><<<grid, kTileThreads, 0, stream>>>(
        Int8Tile<true>{x_q, m, k}, Int8Tile<true>{w_q, n, k}, m, n, ktiles, nullptr, x_scale, w_scale, ws_per_row,
        bias, out);
  else
    gemm_dp4a_kernel<Int8Tile<false>, Int8Tile<false>, Out><<<grid, kTileThreads, 0, stream>>>(
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
  const int ws_per_row = w_scale_per_row != 0;
  return dispatch_dtype(out_dtype, [&](auto* tag) {
    using Out = typename std::remove_pointer<decltype(tag)>::type;
    return launch_int8_matmul(x_q, x_scale, m, w_q, n, k, w_scale, ws_per_row, bias, static_cast<Out*>(out),
                              stream);
  });
}
