// Raw-pointer CPU kernels shared between the op files; csrc/ops.cpp wraps them as torch ops.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <functional>

#include "cpu_features.h"

namespace accelops {

constexpr float kQuantEps = 1e-5f;   // floor on a row's absmax (see reference/int8.py)
constexpr int kTernaryBlockK = 128;  // weights per packed block (see reference/ternary.py)
constexpr int kTernaryBlockBytes = 32;

// Tile sizes of the int8 and ternary GEMM/GEMV kernels, for the calling thread (the
// kernels read them before they split the work, so worker threads need no copy). 0 keeps
// each kernel's own choice. Set by accelops._C.set_cpu_tiles around a call when a tuned
// dispatch table chose them (accelops tune); the result does not depend on them.
//   n_block: output columns per parallel task (a multiple of 4 in [4, kMaxNBlock]); the
//            default is 32 for a GEMV and 64 for a GEMM.
//   k_chunk: K elements per pass over a column block (a multiple of 256); the default is the
//            whole row for a GEMV (one sequential stream per weight row) and 2048 for a GEMM.
constexpr int64_t kMaxNBlock = 256;
struct CpuTiles {
  int64_t n_block = 0;
  int64_t k_chunk = 0;
};
inline CpuTiles& cpu_tiles() {
  thread_local CpuTiles tiles;
  return tiles;
}

// Sum of the eight int32 lanes of v.
__attribute__((target("avx2"))) inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// Per-row symmetric int8 quantization of k fp32 values into q[0:k); writes q[k:k_padded)
// as zeros. Returns the row's scale (NaN for a row holding NaN/Inf, whose q is all zeros)
// and stores sum(q) in *qsum when qsum is not null.
float quantize_row_int8(const float* x, int64_t k, int64_t k_padded, int8_t* q, int32_t* qsum, Isa isa);

// y[m, n] = sum_k x_q[m, k] * Wq[n, k] in exact int32, from packed ternary weights.
// x_q rows are k_padded = nblocks * 128 long (zero padded); xsum[m] = sum_k x_q[m, k].
// finish_columns(n0, n1), if given, is called (possibly from a worker thread) once the
// columns [n0, n1) of acc are final, so the caller can fuse its epilogue.
void ternary_gemm_i32(const int8_t* x_q, const int32_t* xsum, int64_t m, const uint8_t* w_packed,
                      int64_t n, int64_t nblocks, int32_t* acc, Isa isa,
                      const std::function<void(int64_t, int64_t)>& finish_columns = nullptr);

// The base3 format (csrc/cpu/ternary_base3.cpp; spec: accelops/reference/ternary_base3.py):
// 320 weights in 64 bytes, five a byte.
constexpr int kBase3BlockK = 320;
constexpr int kBase3BlockBytes = 64;

// acc[j] = sum_k x_q[k] * Wq[j, k] in exact int32 (j < n), one activation row against base3
// weights w_b3 [n, nblocks * 64]: x_q is nblocks * 320 long (zero padded past K), xsum =
// sum_k x_q[k]. Parallel over rows (at::parallel_for); finish_rows(n0, n1), if given, is
// called (possibly from a worker thread) once acc[n0, n1) is final. `isa` is the dot level
// (active_dot_isa()): Avx512Vnni on a CPU with AVX-512 VBMI takes the vpermi2b path, every
// other level the scalar one.
void ternary_base3_gemv_i32(const int8_t* x_q, int32_t xsum, const uint8_t* w_b3, int64_t n, int64_t nblocks,
                            int32_t* acc, Isa isa, const std::function<void(int64_t, int64_t)>& finish_rows = nullptr);
// The path ternary_base3_gemv_i32 takes at dot level `isa` ("avx512vbmi", "avx2", "scalar").
const char* ternary_base3_path_name(Isa isa);

}  // namespace accelops
