// INT8 family on the CPU: per-token activation quantization, per-channel weight
// quantization and the exact W8A8 GEMM with the dequantization epilogue fused.
//
// The GEMM widens int8 to int16 and uses vpmaddwd (16 MACs an instruction, int32 sums).
// vpmaddubsw would do 32 MACs an instruction but its int16 pair sums saturate for general
// int8 x int8 (255 * 127 * 2 > 32767) and, even with the |x| / sign(w, x) trick, leave no
// headroom to accumulate; both end up bound by the same two multiply pipes, and the
// vpmaddwd path is exact for every int8 value, -128 included.
//
// With AVX-512 VNNI, vpdpbusd does 64 u8 x s8 MACs an instruction straight into int32
// lanes (see the VNNI section below): one instruction where AVX2 needs two or three.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "../ops.h"
#include "kernels.h"
#include "vnni512.h"

namespace accelops {

const char* cpu_isa_name() { return isa_name(active_dot_isa()); }

// ---------------------------------------------------------------- row quantization

static float quantize_row_scalar(const float* x, int64_t k, int64_t kp, int8_t* q, int32_t* qsum) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t i = 0; i < k; ++i) {
    float a = std::fabs(x[i]);
    if (!(a < std::numeric_limits<float>::infinity())) finite = false;
    amax = a > amax ? a : amax;
  }
  if (!finite) {
    std::memset(q, 0, kp);
    if (qsum) *qsum = 0;
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float a = std::max(amax, kQuantEps);
  const float inv = 127.0f / a;
  int32_t s = 0;
  for (int64_t i = 0; i < k; ++i) {
    float r = std::nearbyint(x[i] * inv);  // round half to even, like torch.round
    r = std::min(127.0f, std::max(-127.0f, r));
    q[i] = static_cast<int8_t>(r);
    s += q[i];
  }
  std::memset(q + k, 0, kp - k);
  if (qsum) *qsum = s;
  return a / 127.0f;
}

__attribute__((target("avx2,fma"))) static float quantize_row_avx2(const float* x, int64_t k, int64_t kp,
                                                                   int8_t* q, int32_t* qsum) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 vmax = _mm256_setzero_ps();
  __m256 bad = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask);
    vmax = _mm256_max_ps(vmax, a);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // Inf or NaN
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.f;
  for (float l : lanes) amax = std::max(amax, l);
  bool finite = _mm256_movemask_ps(bad) == 0;
  for (; i < k; ++i) {
    float a = std::fabs(x[i]);
    if (!(a < std::numeric_limits<float>::infinity())) finite = false;
    amax = a > amax ? a : amax;
  }
  if (!finite) {
    std::memset(q, 0, kp);
    if (qsum) *qsum = 0;
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float a = std::max(amax, kQuantEps);
  const float inv = 127.0f / a;
  const __m256 vinv = _mm256_set1_ps(inv);
  // packs_* interleave 128-bit lanes; this restores element order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i vsum = _mm256_setzero_si256();
  i = 0;
  for (; i + 32 <= k; i += 32) {
    // cvtps rounds with MXCSR's default mode, round-half-to-even, like torch.round.
    __m256i c0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv));
    __m256i c1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vinv));
    __m256i c2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 16), vinv));
    __m256i c3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 24), vinv));
    vsum = _mm256_add_epi32(vsum, _mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3)));
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(c0, c1), _mm256_packs_epi32(c2, c3));
    // |x * inv| <= 127 * (1 + 2^-23) rounds to at most 127, so saturation never bites.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(p, order));
  }
  alignas(32) int32_t sl[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(sl), vsum);
  int32_t s = 0;
  for (int32_t v : sl) s += v;
  for (; i < k; ++i) {
    float r = std::nearbyint(x[i] * inv);
    r = std::min(127.0f, std::max(-127.0f, r));
    q[i] = static_cast<int8_t>(r);
    s += q[i];
  }
  std::memset(q + k, 0, kp - k);
  if (qsum) *qsum = s;
  return a / 127.0f;
}

float quantize_row_int8(const float* x, int64_t k, int64_t kp, int8_t* q, int32_t* qsum, Isa isa) {
  return isa != Isa::Scalar ? quantize_row_avx2(x, k, kp, q, qsum) : quantize_row_scalar(x, k, kp, q, qsum);
}

void quantize_rows(const at::Tensor& x2d, int64_t kp, int8_t* q, float* scale, int32_t* qsum) {
  const int64_t m = x2d.size(0), k = x2d.size(1);
  const Isa isa = active_isa();
  // Small batches stay on the calling thread: an OpenMP region costs more than a row.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
  if (x2d.scalar_type() == at::kFloat) {
    const float* xp = x2d.data_ptr<float>();
    at::parallel_for(0, m, grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        scale[r] = quantize_row_int8(xp + r * k, k, kp, q + r * kp, qsum ? qsum + r : nullptr, isa);
    });
    return;
  }
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x2d.scalar_type(), "quantize_rows", [&] {
    const scalar_t* xp = x2d.data_ptr<scalar_t>();
    at::parallel_for(0, m, grain, [&](int64_t b, int64_t e) {
      std::vector<float> row(k);
      for (int64_t r = b; r < e; ++r) {
        for (int64_t i = 0; i < k; ++i) row[i] = static_cast<float>(xp[r * k + i]);
        scale[r] = quantize_row_int8(row.data(), k, kp, q + r * kp, qsum ? qsum + r : nullptr, isa);
      }
    });
  });
}

// ---------------------------------------------------------------- epilogue

Epilogue::Epilogue(const float* x_scale, const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                   at::Tensor& out2d)
    : x_scale_(x_scale), w_scale_(w_scale.to(at::kFloat).contiguous()), out_(out2d) {
  ws_ = w_scale_.data_ptr<float>();
  ws_per_row_ = w_scale_.numel() != 1;
  if (bias.has_value()) {
    bias_ = bias->to(at::kFloat).contiguous();
    bias_ptr_ = bias_.data_ptr<float>();
  }
}

template <typename T>
static inline void epilogue_rows(const int32_t* acc, int64_t n, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                                 const float* xs, const float* ws, bool ws_per_row, const float* bp, T* y) {
  for (int64_t r = m0; r < m1; ++r) {
    const float x_scale = xs[r];
    for (int64_t c = n0; c < n1; ++c) {
      float v = (static_cast<float>(acc[r * n + c]) * x_scale) * ws[ws_per_row ? c : 0];
      if (bp) v += bp[c];
      y[r * n + c] = static_cast<T>(v);
    }
  }
}

void Epilogue::apply(const int32_t* acc, int64_t m, int64_t n, int64_t m0, int64_t m1, int64_t n0,
                     int64_t n1) const {
  (void)m;
  switch (out_.scalar_type()) {
    case at::kFloat:
      return epilogue_rows(acc, n, m0, m1, n0, n1, x_scale_, ws_, ws_per_row_, bias_ptr_, out_.data_ptr<float>());
    case at::kBFloat16:
      return epilogue_rows(acc, n, m0, m1, n0, n1, x_scale_, ws_, ws_per_row_, bias_ptr_,
                           out_.data_ptr<at::BFloat16>());
    case at::kHalf:
      return epilogue_rows(acc, n, m0, m1, n0, n1, x_scale_, ws_, ws_per_row_, bias_ptr_, out_.data_ptr<at::Half>());
    default:
      TORCH_CHECK(false, "output dtype must be float32, bfloat16 or float16, got ", out_.scalar_type());
  }
}

void dequant_epilogue(const int32_t* acc, int64_t m, int64_t n, const float* x_scale, const at::Tensor& w_scale,
                      const std::optional<at::Tensor>& bias, at::Tensor& out2d) {
  const Epilogue epi(x_scale, w_scale, bias, out2d);
  at::parallel_for(0, m, std::max<int64_t>(1, 65536 / std::max<int64_t>(n, 1)),
                   [&](int64_t b, int64_t e) { epi.apply(acc, m, n, b, e, 0, n); });
}

// ---------------------------------------------------------------- int8 GEMM

// Two exact int8 dot kernels, chosen by what the activations can hold:
//
// * Sign path (activations in [-127, 127], which quantize_activation_int8 guarantees):
//   vpmaddubsw(|w|, sign(x, w)) multiplies |w| (unsigned, <= 128) by x * sign(w) (signed,
//   |.| <= 127, so the negation cannot wrap); its pair sums are at most 2 * 128 * 127 =
//   32512 and never saturate; vpmaddwd by ones widens them to int32. 32 MACs for four
//   vector operations, on int8 operands as stored.
// * Widened path (any int8, -128 included, e.g. a user's x_q): activations are widened to
//   int16 once, weights per load, and vpmaddwd does 16 MACs an instruction.
// llvm-mca (znver3) for the register tiles used below: sign path 21.6 MACs/cycle for the
// 1x4 GEMV tile and 25 for the 3x2 GEMM tile; widened path 10 (1x4) and 14 (4x3: the
// sign-extending loads are the bottleneck there).

// Reduces each accumulator of a tile, adds the K tail [k, k1) that did not fill a vector,
// and accumulates into acc: shared by both paths.
template <int MT, int NT, typename X>
__attribute__((target("avx2"))) static inline void finish_tile(const __m256i* s, const X* x, int64_t ldx,
                                                              const int8_t* w, int64_t ldw, int64_t k, int64_t k1,
                                                              int32_t* acc, int64_t ldacc) {
#pragma GCC unroll 16
  for (int i = 0; i < MT * NT; ++i) {
    const int mi = i / NT, j = i % NT;
    int32_t t = hsum_epi32(s[i]);
    for (int64_t kk = k; kk < k1; ++kk) t += int32_t(x[mi * ldx + kk]) * int32_t(w[j * ldw + kk]);
    acc[mi * ldacc + j] += t;
  }
}

struct SignPath {
  using X = int8_t;
  // acc[mi, j] += sum_{k in [k0, k1)} x[mi, k] * w[j, k] for an MT x NT tile.
  template <int MT, int NT>
  __attribute__((target("avx2"))) static void tile_avx2(const X* x, int64_t ldx, const int8_t* w, int64_t ldw,
                                                        int64_t k0, int64_t k1, int32_t* acc, int64_t ldacc) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s[MT * NT];
#pragma GCC unroll 16
    for (int i = 0; i < MT * NT; ++i) s[i] = _mm256_setzero_si256();
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
      __m256i wv[NT], wa[NT];
#pragma GCC unroll 8
      for (int j = 0; j < NT; ++j) {
        wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * ldw + k));
        wa[j] = _mm256_abs_epi8(wv[j]);
      }
#pragma GCC unroll 8
      for (int mi = 0; mi < MT; ++mi) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + mi * ldx + k));
#pragma GCC unroll 8
        for (int j = 0; j < NT; ++j)
          s[mi * NT + j] = _mm256_add_epi32(
              s[mi * NT + j], _mm256_madd_epi16(_mm256_maddubs_epi16(wa[j], _mm256_sign_epi8(xv, wv[j])), ones));
      }
    }
    finish_tile<MT, NT>(s, x, ldx, w, ldw, k, k1, acc, ldacc);
  }
};

struct WidenedPath {
  using X = int16_t;
  template <int MT, int NT>
  __attribute__((target("avx2"))) static void tile_avx2(const X* x16, int64_t ldx, const int8_t* w, int64_t ldw,
                                                        int64_t k0, int64_t k1, int32_t* acc, int64_t ldacc) {
    __m256i s[MT * NT];
#pragma GCC unroll 16
    for (int i = 0; i < MT * NT; ++i) s[i] = _mm256_setzero_si256();
    int64_t k = k0;
    for (; k + 16 <= k1; k += 16) {
      __m256i wv[NT];
#pragma GCC unroll 8
      for (int j = 0; j < NT; ++j)
        wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * ldw + k)));
#pragma GCC unroll 8
      for (int mi = 0; mi < MT; ++mi) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + mi * ldx + k));
#pragma GCC unroll 8
        for (int j = 0; j < NT; ++j) s[mi * NT + j] = _mm256_add_epi32(s[mi * NT + j], _mm256_madd_epi16(xv, wv[j]));
      }
    }
    finish_tile<MT, NT>(s, x16, ldx, w, ldw, k, k1, acc, ldacc);
  }
};

template <class Path, int MT, int NT>
static inline void int8_tile(Isa isa, const typename Path::X* x, int64_t ldx, const int8_t* w, int64_t ldw,
                             int64_t k0, int64_t k1, int32_t* acc, int64_t ldacc) {
  if (isa != Isa::Scalar) return Path::template tile_avx2<MT, NT>(x, ldx, w, ldw, k0, k1, acc, ldacc);
  for (int mi = 0; mi < MT; ++mi)
    for (int j = 0; j < NT; ++j) {
      int32_t t = 0;
      for (int64_t k = k0; k < k1; ++k) t += int32_t(x[mi * ldx + k]) * int32_t(w[j * ldw + k]);
      acc[mi * ldacc + j] += t;
    }
}

// acc [m, n] = x [m, k] . w [n, k]^T. Blocked so a 3-row activation slice of one K chunk
// stays in L1 while a block of weight rows stays in L2; the epilogue for a block of
// columns runs as soon as they are final.
template <class Path>
static void int8_gemm_i32(const typename Path::X* x, int64_t m, int64_t k, const int8_t* w, int64_t n,
                          int32_t* acc, Isa isa, const std::function<void(int64_t, int64_t)>& finish_columns) {
  const CpuTiles tiles = cpu_tiles();
  const int64_t kChunk = tiles.k_chunk ? tiles.k_chunk : 2048;
  const int64_t nb = tiles.n_block ? tiles.n_block : (m <= 2 ? 32 : 64);
  const int64_t nblocks = (n + nb - 1) / nb;
  at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t n0 = blk * nb, n1 = std::min(n, n0 + nb);
      for (int64_t mi = 0; mi < m; ++mi) std::fill(acc + mi * n + n0, acc + mi * n + n1, 0);
      for (int64_t k0 = 0; k0 < k; k0 += kChunk) {
        const int64_t k1 = std::min(k, k0 + kChunk);
        int64_t mi = 0;
        for (; mi + 3 <= m; mi += 3) {
          int64_t j = n0;
          for (; j + 2 <= n1; j += 2)
            int8_tile<Path, 3, 2>(isa, x + mi * k, k, w + j * k, k, k0, k1, acc + mi * n + j, n);
          for (; j < n1; ++j) int8_tile<Path, 3, 1>(isa, x + mi * k, k, w + j * k, k, k0, k1, acc + mi * n + j, n);
        }
        for (; mi < m; ++mi) {
          int64_t j = n0;
          for (; j + 4 <= n1; j += 4)
            int8_tile<Path, 1, 4>(isa, x + mi * k, k, w + j * k, k, k0, k1, acc + mi * n + j, n);
          for (; j < n1; ++j) int8_tile<Path, 1, 1>(isa, x + mi * k, k, w + j * k, k, k0, k1, acc + mi * n + j, n);
        }
      }
      if (finish_columns) finish_columns(n0, n1);
    }
  });
}

// ---------------------------------------------------------------- int8 GEMM, AVX-512 VNNI

// vpdpbusd multiplies unsigned bytes by signed bytes, four adjacent pairs summed into each
// int32 lane. Activations are made unsigned as u = x + 128 (the byte x ^ 0x80), so
//     sum_k x[k] w[k] = sum_k u[k] w[k] - 128 sum_k w[k],
// and the correction 128 sum_k w[k] is one more vpdpbusd per weight vector with u = 128,
// computed in the first row tile of each weight block and shared by the block's other rows
// (no extra pass over the weights, which would double a GEMV's DRAM traffic).
// Exact for every int8 x, -128 included: a lane adds four products of at most
// 255 * 128 = 32640 in magnitude (no saturation: vpdpbusd, not vpdpbusds, never saturates,
// and the pair sums fit in int32 anyway). The u-sums themselves can pass 2^31 for K above
// 2^31 / 32640 ~ 65,800, so every sum is kept modulo 2^32 (uint32 arithmetic, vpaddd
// wraps); the final x.w fits in int32 for the K the contract promises (K < 2^31 / 128^2),
// so the wrapped result is the exact one.

// acc[mi, j] += sum_{k in [k0, k1)} u[mi, k] w[j, k] (mod 2^32) for an MT x NT tile; with
// kCorr, also corr[j] += 128 sum_{k in [k0, k1)} w[j, k] (mod 2^32). The K tail is one
// masked iteration (masked-off bytes load as 0 and add nothing).
template <int MT, int NT, bool kCorr>
ACCELOPS_TARGET_AVX512VNNI static void int8_tile_vnni512(const uint8_t* u, int64_t ldx, const int8_t* w, int64_t ldw,
                                                        int64_t k0, int64_t k1, uint32_t* acc, int64_t ldacc,
                                                        uint32_t* corr) {
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i s[MT * NT], c[NT];
#pragma GCC unroll 16
  for (int i = 0; i < MT * NT; ++i) s[i] = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (int j = 0; j < NT; ++j) c[j] = _mm512_setzero_si512();
  for (int64_t k = k0; k < k1; k += 64) {
    const __mmask64 mask = k1 - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (k1 - k)) - 1;
    __m512i wv[NT];
#pragma GCC unroll 8
    for (int j = 0; j < NT; ++j) {
      // A GEMV streams its weights from DRAM once: ask for them ahead of the hardware
      // prefetcher (as the ternary GEMV does).
      if (MT == 1) _mm_prefetch(reinterpret_cast<const char*>(w + j * ldw + k + 1024), _MM_HINT_T0);
      wv[j] = _mm512_maskz_loadu_epi8(mask, w + j * ldw + k);
      if (kCorr) c[j] = _mm512_dpbusd_epi32(c[j], bias, wv[j]);
    }
#pragma GCC unroll 8
    for (int mi = 0; mi < MT; ++mi) {
      const __m512i xv = _mm512_maskz_loadu_epi8(mask, u + mi * ldx + k);
#pragma GCC unroll 8
      for (int j = 0; j < NT; ++j) s[mi * NT + j] = _mm512_dpbusd_epi32(s[mi * NT + j], xv, wv[j]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MT * NT; ++i) acc[(i / NT) * ldacc + i % NT] += hsum_u32_512(s[i]);
  if (kCorr)
#pragma GCC unroll 8
    for (int j = 0; j < NT; ++j) corr[j] += hsum_u32_512(c[j]);
}

template <int MT, int NT>
static inline void int8_tile_vnni(bool first, const uint8_t* u, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k0,
                                  int64_t k1, uint32_t* acc, int64_t ldacc, uint32_t* corr) {
  if (first)
    int8_tile_vnni512<MT, NT, true>(u, ldx, w, ldw, k0, k1, acc, ldacc, corr);
  else
    int8_tile_vnni512<MT, NT, false>(u, ldx, w, ldw, k0, k1, acc, ldacc, corr);
}

// acc [m, n] = x [m, k] . w [n, k]^T from u = x ^ 0x80, blocked like int8_gemm_i32.
// 4 x 4 tiles: 16 accumulators + 4 weight vectors + 4 corrections + 1 activation of the
// 32 zmm registers, 8 loads for 16 vpdpbusd.
static void int8_gemm_vnni(const uint8_t* u, int64_t m, int64_t k, const int8_t* w, int64_t n, int32_t* acc_out,
                           const std::function<void(int64_t, int64_t)>& finish_columns) {
  // GEMV: whole rows, so each weight row is one sequential stream (as in ternary_gemm_i32).
  const CpuTiles tiles = cpu_tiles();
  const int64_t kChunk = tiles.k_chunk ? tiles.k_chunk : (m <= 3 ? std::max<int64_t>(k, 1) : 2048);
  const int64_t nb = tiles.n_block ? tiles.n_block : (m <= 2 ? 32 : 64);
  const int64_t nblocks = (n + nb - 1) / nb;
  uint32_t* acc = reinterpret_cast<uint32_t*>(acc_out);
  at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
    uint32_t corr[kMaxNBlock];
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t n0 = blk * nb, n1 = std::min(n, n0 + nb);
      for (int64_t mi = 0; mi < m; ++mi) std::fill(acc + mi * n + n0, acc + mi * n + n1, 0u);
      std::fill(corr, corr + (n1 - n0), 0u);
      for (int64_t k0 = 0; k0 < k; k0 += kChunk) {
        const int64_t k1 = std::min(k, k0 + kChunk);
        bool first = true;  // the first row tile of this K chunk also sums the weights
        int64_t mi = 0;
        for (; mi + 4 <= m; mi += 4, first = false) {
          int64_t j = n0;
          for (; j + 4 <= n1; j += 4)
            int8_tile_vnni<4, 4>(first, u + mi * k, k, w + j * k, k, k0, k1, acc + mi * n + j, n, corr + (j - n0));
          for (; j < n1; ++j)
            int8_tile_vnni<4, 1>(first, u + mi * k, k, w + j * k, k, k0, k1, acc + mi * n + j, n, corr + (j - n0));
        }
        for (; mi < m; ++mi, first = false) {
          int64_t j = n0;
          for (; j + 4 <= n1; j += 4)
            int8_tile_vnni<1, 4>(first, u + mi * k, k, w + j * k, k, k0, k1, acc + mi * n + j, n, corr + (j - n0));
          for (; j < n1; ++j)
            int8_tile_vnni<1, 1>(first, u + mi * k, k, w + j * k, k, k0, k1, acc + mi * n + j, n, corr + (j - n0));
        }
      }
      // Modulo 2^32, then read as int32: exact, since the true sum fits (see above).
      for (int64_t mi = 0; mi < m; ++mi)
        for (int64_t j = n0; j < n1; ++j) acc[mi * n + j] -= corr[j - n0];
      if (finish_columns) finish_columns(n0, n1);
    }
  });
}

// u[i] = x[i] + 128 as an unsigned byte.
static void to_unsigned(const int8_t* x, int64_t len, uint8_t* u) {
  at::parallel_for(0, len, 1 << 20, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) u[i] = static_cast<uint8_t>(x[i]) ^ 0x80u;
  });
}

// ---------------------------------------------------------------- tensor-level ops

static void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> quantize_activation_int8_cpu(const at::Tensor& x) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension, got a scalar");
  const int64_t k = x.size(-1);
  auto scale_shape = x.sizes().vec();
  scale_shape.back() = 1;
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = at::empty(scale_shape, x.options().dtype(at::kFloat));
  if (k == 0) {
    scale.fill_(kQuantEps / 127.0f);
    return {q, scale};
  }
  if (x.numel() == 0) return {q, scale};
  at::Tensor x2 = x.reshape({-1, k}).contiguous();
  quantize_rows(x2, k, q.data_ptr<int8_t>(), scale.data_ptr<float>(), nullptr);
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor> quantize_weight_int8_cpu(const at::Tensor& w) {
  check_float(w, "w");
  TORCH_CHECK(w.dim() == 2, "w must be 2-D [out_features, in_features], got shape ", w.sizes());
  TORCH_CHECK(at::isfinite(w).all().item<bool>(), "w must be finite: it holds NaN or Inf");
  at::Tensor q = at::empty(w.sizes(), w.options().dtype(at::kChar));
  at::Tensor scale = at::empty({w.size(0)}, w.options().dtype(at::kFloat));
  if (w.numel() == 0) {
    scale.fill_(kQuantEps / 127.0f);
    return {q, scale};
  }
  quantize_rows(w.contiguous(), w.size(1), q.data_ptr<int8_t>(), scale.data_ptr<float>(), nullptr);
  return {q, scale};
}

// x2d: [m, k] int8 activations; x_in_range: no element is -128 (the sign path's
// precondition). Writes the dequantized result into out2d.
static void int8_matmul_impl(const at::Tensor& x2d, bool x_in_range, const float* x_scale, const at::Tensor& w_q,
                             const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, at::Tensor& out2d) {
  const int64_t m = x2d.size(0), k = x2d.size(1), n = w_q.size(0);
  if (m == 0 || n == 0) return;
  at::Tensor w = w_q.contiguous();
  std::vector<int32_t> acc(m * n);
  const Epilogue epi(x_scale, w_scale, bias, out2d);
  auto finish = [&](int64_t n0, int64_t n1) { epi.apply(acc.data(), m, n, 0, m, n0, n1); };
  const Isa isa = active_dot_isa();
  if (isa == Isa::Avx512Vnni) {  // exact for any int8 x: x_in_range does not matter
    std::vector<uint8_t> u(m * k);
    to_unsigned(x2d.data_ptr<int8_t>(), m * k, u.data());
    int8_gemm_vnni(u.data(), m, k, w.data_ptr<int8_t>(), n, acc.data(), finish);
  } else if (x_in_range) {
    int8_gemm_i32<SignPath>(x2d.data_ptr<int8_t>(), m, k, w.data_ptr<int8_t>(), n, acc.data(), active_isa(), finish);
  } else {
    at::Tensor x16 = x2d.to(at::kShort).contiguous();
    int8_gemm_i32<WidenedPath>(x16.data_ptr<int16_t>(), m, k, w.data_ptr<int8_t>(), n, acc.data(), active_isa(),
                               finish);
  }
}

static std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  auto s = x.sizes().vec();
  s.back() = n;
  return s;
}

at::Tensor int8_matmul_cpu(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                           std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(x_q.scalar_type() == at::kChar, "x_q must be int8, got ", x_q.scalar_type());
  TORCH_CHECK(w_q.scalar_type() == at::kChar, "w_q must be int8, got ", w_q.scalar_type());
  TORCH_CHECK(w_q.dim() == 2, "w_q must be 2-D [N, K], got shape ", w_q.sizes());
  TORCH_CHECK(x_q.dim() >= 1 && x_q.size(-1) == w_q.size(1), "x_q's last dim must equal w_q's K=", w_q.size(1),
              ", got shape ", x_q.sizes());
  const int64_t k = w_q.size(1), n = w_q.size(0);
  at::Tensor out = at::empty(out_shape(x_q, n), x_q.options().dtype(out_dtype.value_or(at::kFloat)));
  at::Tensor out2d = out.view({-1, n});
  const int64_t rows = out2d.size(0);
  if (rows == 0 || n == 0) return out;
  at::Tensor xs = x_scale.to(at::kFloat).contiguous().reshape({-1});
  TORCH_CHECK(xs.numel() == rows, "x_scale must hold one scale per row of x_q (", rows, "), got shape ",
              x_scale.sizes());
  at::Tensor x2d = x_q.reshape({rows, k}).contiguous();
  // A user's x_q may hold -128, which the AVX2 sign path cannot take; checking is O(M K).
  // The VNNI path takes any int8 and skips the check.
  const bool in_range = k == 0 || active_dot_isa() == Isa::Avx512Vnni || x2d.min().item<int8_t>() > -128;
  int8_matmul_impl(x2d, in_range, xs.data_ptr<float>(), w_q, w_scale, bias, out2d);
  return out;
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias) {
  check_float(x, "x");
  TORCH_CHECK(w_q.scalar_type() == at::kChar, "w_q must be int8, got ", w_q.scalar_type());
  TORCH_CHECK(w_q.dim() == 2, "w_q must be 2-D [N, K], got shape ", w_q.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w_q.size(1), "x's last dim must equal w_q's K=", w_q.size(1),
              ", got shape ", x.sizes());
  const int64_t k = w_q.size(1), n = w_q.size(0);
  at::Tensor out = at::empty(out_shape(x, n), x.options());
  at::Tensor out2d = out.view({-1, n});
  const int64_t rows = out2d.size(0);
  if (rows == 0 || n == 0) return out;
  at::Tensor x2 = x.reshape({rows, k}).contiguous();
  at::Tensor q = at::empty({rows, k}, x.options().dtype(at::kChar));
  std::vector<float> xs(rows, kQuantEps / 127.0f);
  if (k > 0) quantize_rows(x2, k, q.data_ptr<int8_t>(), xs.data(), nullptr);
  // quantize_rows produces [-127, 127]: the sign path applies.
  int8_matmul_impl(q, /*x_in_range=*/true, xs.data(), w_q, w_scale, bias, out2d);
  return out;
}

}  // namespace accelops
