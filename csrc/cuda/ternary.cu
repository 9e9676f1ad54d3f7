// Ternary (BitNet b1.58) matmul on CUDA: int8 activations x 2-bit packed weights, exact
// int32 sums, dequantization fused. The spec is accelops/reference/ternary.py; the CPU
// kernel (csrc/cpu/ternary.cpp) computes the same sums the same way:
//
//     sum_k x[k] * w[k] = sum_k code[k] * x[k] - sum_k x[k],   code = w + 1 in {0, 1, 2},
//
// so the weights need no sign handling: a packed 32-bit word shifted right by 2 j and
// masked with 0x03030303 is four codes, one per byte, ready for dp4a against four
// consecutive activations. sum_k x[k] comes with the quantized activations (qsum of
// accelops_quantize_activation_int8) and is subtracted once per output.
//
// Layout recap (reference/ternary.py): weight k = 128 b + 32 j + t lives in byte 32 b + t,
// bits 2 j .. 2 j + 1. Bytes [32 b + t, 32 b + t + 4) therefore hold, in plane j, the codes
// of activations [128 b + 32 j + t, 128 b + 32 j + t + 4): contiguous, so a 16-byte load
// of packed weights pairs with four 16-byte activation loads, one per plane.
#include "common.cuh"

namespace {

// Plane j of 16 packed bytes: the codes of 16 consecutive weights, one per byte.
__device__ __forceinline__ int4 plane(int4 v, int j) {
  const unsigned sh = 2u * unsigned(j), mask = 0x03030303u;
  return make_int4(int((unsigned(v.x) >> sh) & mask), int((unsigned(v.y) >> sh) & mask),
                   int((unsigned(v.z) >> sh) & mask), int((unsigned(v.w) >> sh) & mask));
}

// GEMV: each warp streams kGemvRows packed rows, 512 bytes (2048 weights) a step, lane l
// loading bytes [16 l, 16 l + 16) = half (l & 1) of block l / 2. Its activations are the
// four 16-byte slices at 128 (l / 2) + 32 j + 16 (l & 1) of the staged rows. Taken in plane
// order j = 0..3 by every lane, the 8 lanes of a quarter-warp would hit only 2 distinct
// 16-byte bank groups (a 4-way conflict: their addresses differ by multiples of 128);
// starting each lane pair at plane (l / 2) & 3 spreads them over all 8, conflict-free,
// at the cost of a shift by a register instead of a constant.
// Loads: 2 bits a weight, 4x fewer bytes than int8, so this GEMV should run at ~4x the
// int8 GEMV's speed at equal bandwidth; per 4 packed bytes and plane there are 2 integer
// ops of decode + MT dp4a, ~3 integer ops per byte at M = 1; at an H100's ~132 SMs x 64
// integer ops a clock that is ~5 TB/s of packed weights, above its DRAM rate, so this
// should stay memory bound (check with ncu: dram__throughput against the ALU pipes). Also
// check local memory traffic for MT = 2, where ptxas settles on 64 registers and spills 12
// bytes; __launch_bounds__(kGemvThreads, 3) would give it room at some occupancy.
template <int MT>
__global__ void __launch_bounds__(kGemvThreads)
    ternary_gemv_kernel(const int8_t* __restrict__ xq, const int32_t* __restrict__ xsum,
                        const float* __restrict__ xs, int64_t m, const uint8_t* __restrict__ w, int64_t n,
                        int64_t kp, int chunk, const float* __restrict__ ws, int ws_per_row,
                        const float* __restrict__ bias, OutBuf out) {
  constexpr int NR = kGemvRows, U = kGemvUnroll, kStep = kWarp * 16;
  extern __shared__ int4 gemv_smem[];
  int8_t* xsm = reinterpret_cast<int8_t*>(gemv_smem);
  const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;
  const int rot = (lane >> 1) & 3, half = (lane & 1) * 16;
  const int64_t m0 = int64_t(blockIdx.y) * MT;
  const int64_t n0 = (int64_t(blockIdx.x) * kGemvWarps + warp) * NR;
  const int64_t ldp = kp / 4;
  // Rows past N read row N - 1: the warp must stay for the barriers; nothing is stored.
  const int8_t* wr[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) wr[r] = reinterpret_cast<const int8_t*>(w) + (n0 + r < n ? n0 + r : n - 1) * ldp;
  int acc[MT][NR];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int r = 0; r < NR; ++r) acc[mi][r] = 0;

  for (int64_t k0 = 0; k0 < kp; k0 += chunk) {
    __syncthreads();  // every warp is done with the previous chunk
    stage_rows<MT>(xsm, xq, kp, m, m0, kp, k0, chunk);
    __syncthreads();
    // Packed bytes of this chunk; a multiple of 32, so a lane's 16 bytes are all inside.
    const int lenp = int((kp - k0 < chunk ? kp - k0 : chunk) / 4);
    const int64_t p0 = k0 / 4;
    for (int s = lane * 16; s < lenp; s += U * kStep) {
      int4 wv[U][NR];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < NR; ++r) wv[u][r] = load16<true>(wr[r] + p0 + s + u * kStep, lenp - (s + u * kStep));
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int su = s + u * kStep;
        if (su >= lenp) break;
        const int xbase = (su / 32) * 128 + half;  // block su / 32 of the chunk, this lane's half
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          const int j = (p + rot) & 3;
          int4 codes[NR];
#pragma unroll
          for (int r = 0; r < NR; ++r) codes[r] = plane(wv[u][r], j);
#pragma unroll
          for (int mi = 0; mi < MT; ++mi) {
            const int4 xv = *reinterpret_cast<const int4*>(xsm + mi * chunk + xbase + 32 * j);
#pragma unroll
            for (int r = 0; r < NR; ++r) acc[mi][r] = dot16(codes[r], xv, acc[mi][r]);
          }
        }
      }
    }
  }
  gemv_epilogue<MT, NR>(acc, m0, n0, m, n, xsum, xs, ws, ws_per_row, bias, out);
}

// B operand of the tiled GEMM: block kt of 64 packed rows (32 bytes, 128 weights each)
// staged as one code byte per weight in natural k order, so gemm_dp4a_kernel's main loop
// is the int8 one. Rows past N stage as zeros (their outputs are not stored).
struct TernaryTile {
  const uint8_t* p;  // [rows, ldp], 16-byte aligned, ldp = nblocks * 32
  int64_t rows, ldp;
  __device__ __forceinline__ void load(int8_t* s, int64_t row0, int64_t kt) const {
    for (int idx = threadIdx.x; idx < kTileN * 2; idx += blockDim.x) {
      const int r = idx >> 1, h = (idx & 1) * 16;
      const int64_t gr = row0 + r;
      const int4 v = load16<true>(reinterpret_cast<const int8_t*>(p) + gr * ldp + kt * 32 + h, gr < rows ? 16 : 0);
      // Bytes [h, h + 16) of the block hold, in plane j, weights 32 j + h + (0..15).
#pragma unroll
      for (int j = 0; j < 4; ++j) *reinterpret_cast<int4*>(s + r * kTileLd + 32 * j + h) = plane(v, j);
    }
  }
};

template <int MT>
cudaError_t launch_ternary_gemv(const int8_t* x_q, const int32_t* x_sum, const float* x_scale, int64_t m,
                                const uint8_t* w, int64_t n, int64_t kp, const float* w_scale, int ws_per_row,
                                const float* bias, OutBuf out, cudaStream_t stream) {
  // kGemvSmemBytes / MT is a multiple of 128 for MT <= 8, so chunks hold whole blocks.
  const int64_t cap = kGemvSmemBytes / MT;
  const int chunk = int(kp < cap ? kp : cap);
  const int64_t rows_per_block = int64_t(kGemvWarps) * kGemvRows;
  const int64_t blocks = (n + rows_per_block - 1) / rows_per_block;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(blocks), unsigned((m + MT - 1) / MT));
  ternary_gemv_kernel<MT><<<grid, kGemvThreads, size_t(MT) * size_t(chunk), stream>>>(
      x_q, x_sum, x_scale, m, w, n, kp, chunk, w_scale, ws_per_row, bias, out);
  return cudaGetLastError();
}

cudaError_t launch_ternary_matmul(const int8_t* x_q, const int32_t* x_sum, const float* x_scale, int64_t m,
                                  const uint8_t* w, int64_t n, int64_t nblocks, const float* w_scale,
                                  int ws_per_row, const float* bias, OutBuf out, cudaStream_t stream) {
  const int64_t kp = nblocks * 128;
  if (m <= kGemvMaxM) {
    if (m == 1) return launch_ternary_gemv<1>(x_q, x_sum, x_scale, m, w, n, kp, w_scale, ws_per_row, bias, out, stream);
    if (m == 2) return launch_ternary_gemv<2>(x_q, x_sum, x_scale, m, w, n, kp, w_scale, ws_per_row, bias, out, stream);
    if (m <= 4)
      return launch_ternary_gemv<4>(x_q, x_sum, x_scale, m, w, n, kp, w_scale, ws_per_row, bias, out, stream);
    return launch_ternary_gemv<8>(x_q, x_sum, x_scale, m, w, n, kp, w_scale, ws_per_row, bias, out, stream);
  }
  dim3 grid;
  if (!gemm_grid(m, n, &grid)) return cudaErrorInvalidValue;
  gemm_dp4a_kernel<Int8Tile<true>, TernaryTile><<<grid, kTileThreads, 0, stream>>>(
      Int8Tile<true>{x_q, m, kp}, TernaryTile{w, n, nblocks * 32}, m, n, nblocks, x_sum, x_scale, w_scale,
      ws_per_row, bias, out);
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t accelops_ternary_gemm(const int8_t* x_q, const int32_t* x_sum, const float* x_scale,
                                             int64_t m, const uint8_t* w_packed, int64_t n, int64_t nblocks,
                                             const float* w_scale, int w_scale_per_row, const float* bias, void* out,
                                             accelops_dtype out_dtype, cudaStream_t stream) {
  if (m < 0 || n < 0 || nblocks < 0 || nblocks > (int64_t(1) << 40)) return cudaErrorInvalidValue;
  if (m == 0 || n == 0) return cudaSuccess;
  if (x_sum == nullptr || x_scale == nullptr || w_scale == nullptr || out == nullptr) return cudaErrorInvalidValue;
  // The vector loads need 16-byte aligned rows; row lengths (128 / 32 bytes a block) keep
  // every row aligned once the base pointers are.
  if (nblocks > 0 && (x_q == nullptr || w_packed == nullptr || !aligned16(x_q) || !aligned16(w_packed)))
    return cudaErrorInvalidValue;
  if (!valid_dtype(out_dtype)) return cudaErrorInvalidValue;
  return launch_ternary_matmul(x_q, x_sum, x_scale, m, w_packed, n, nblocks, w_scale, w_scale_per_row != 0, bias,
                               OutBuf{out, out_dtype}, stream);
}
