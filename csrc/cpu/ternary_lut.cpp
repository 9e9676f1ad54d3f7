// Lookup-table ternary GEMV (the T-MAC / TL2 idea) on the "lut3" weight format: the
// activations are turned into tables once per row, and the packed weights only index them.
//
// Format (accelops/reference/ternary_lut.py is the spec): weights in groups of 3 along K;
// a group's codes c = w + 1 in {0, 1, 2} make one index c0 + 3 c1 + 9 c2 in [0, 27), 5 bits.
// Three groups (9 weights) share one 16-bit word, bits [5 g, 5 g + 5); bit 15 is 0. Words
// are stored in blocks of 32 rows: w_lut int16 [ceil(N/32), ceil(K/9), 32], element
// [b, t, r] for row 32 b + r and weights [9 t, 9 t + 9). Padding (rows >= N, weights >= K)
// holds zero weights (index 13). 16 bits for 9 weights: 1.78 bits a weight, 11% fewer bytes
// than the 2-bit format (exactly 1.67 would need 5-bit fields across word boundaries,
// which costs a shift-and-merge per group to decode).
//
// The dot: for every group of 3 activations (a0, a1, a2), a table of the 27 sums
// T[i] = (c0 - 1) a0 + (c1 - 1) a1 + (c2 - 1) a2 (int16: |T| <= 3 * 127), built once per
// activation row and shared by all N outputs. A row's dot is then the sum of T[index] over
// its groups: one table lookup per 3 weights and no multiply.
// * AVX-512 (BW): vpermw looks up 32 int16 entries by the low 5 bits of each 16-bit lane,
//   so one load of 32 rows' words feeds three vpermw (the word itself, >> 5, >> 10: the
//   upper bits are ignored) with the group tables: 9 vector operations per 32 x 9 weights.
// * AVX2: vpshufb looks up 16 bytes, so each group's table is kept as four 16-byte tables
//   (low and high bytes of entries 0-15 and 16-31) and the fifth index bit selects between
//   the two halves (vpblendvb); vpunpck{l,h}bw joins the bytes into int16. About 16
//   operations per 32 x 3 weights: more work per weight than the 2-bit kernels' decode.
// Sums: int16 accumulators take 28 words (84 groups, at most 84 * 381 < 2^15) before they
// are widened to int32; exact for every K the contract allows (|dot| <= 127 K < 2^31).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <vector>

#include "../ops.h"
#include "kernels.h"
#include "vnni512.h"

namespace accelops {

constexpr int kLutRows = 32;          // rows a block of the format
constexpr int kLutGroupsPerWord = 3;  // groups of 3 weights a 16-bit word
constexpr int kLutWordK = 9;          // weights a word
constexpr int kLutEntries = 32;       // table entries a group (27 used, 5 zero)
constexpr int64_t kLutWiden = 28;     // words an int16 accumulator takes: 28 * 3 * 381 < 2^15
constexpr int64_t kLutPrefetchBytes = 16 << 10;

static int64_t lut_words(int64_t k) { return (k + kLutWordK - 1) / kLutWordK; }
static int64_t lut_blocks(int64_t n) { return (n + kLutRows - 1) / kLutRows; }

// Digit d (0, 1, 2) of every table index, minus 1: the weight of activation d of the group.
struct LutDigits {
  alignas(64) int16_t d[3][kLutEntries];
  LutDigits() {
    for (int i = 0; i < kLutEntries; ++i) {
      d[0][i] = i < 27 ? int16_t(i % 3 - 1) : 0;
      d[1][i] = i < 27 ? int16_t(i / 3 % 3 - 1) : 0;
      d[2][i] = i < 27 ? int16_t(i / 9 - 1) : 0;
    }
  }
};
static const LutDigits kDigits;

// ---------------------------------------------------------------- tables

// tab[g * 32 + i] = table entry i of group g, for the groups [g0, g1) of x (x padded with
// zeros to whole words).
static void lut_tables_scalar(const int8_t* x, int64_t g0, int64_t g1, int16_t* tab) {
  for (int64_t g = g0; g < g1; ++g) {
    const int16_t a0 = x[3 * g], a1 = x[3 * g + 1], a2 = x[3 * g + 2];
    for (int i = 0; i < kLutEntries; ++i)
      tab[g * kLutEntries + i] = int16_t(kDigits.d[0][i] * a0 + kDigits.d[1][i] * a1 + kDigits.d[2][i] * a2);
  }
}

ACCELOPS_TARGET_AVX512VNNI static void lut_tables_avx512(const int8_t* x, int64_t g0, int64_t g1, int16_t* tab) {
  const __m512i d0 = _mm512_load_si512(kDigits.d[0]), d1 = _mm512_load_si512(kDigits.d[1]),
                d2 = _mm512_load_si512(kDigits.d[2]);
  for (int64_t g = g0; g < g1; ++g) {
    const __m512i t = _mm512_add_epi16(
        _mm512_add_epi16(_mm512_mullo_epi16(d0, _mm512_set1_epi16(x[3 * g])),
                         _mm512_mullo_epi16(d1, _mm512_set1_epi16(x[3 * g + 1]))),
        _mm512_mullo_epi16(d2, _mm512_set1_epi16(x[3 * g + 2])));
    _mm512_storeu_si512(tab + g * kLutEntries, t);
  }
}

// The AVX2 layout: 64 bytes a group, [low bytes of entries 0-15][low bytes of 16-31]
// [high bytes of 0-15][high bytes of 16-31], each a vpshufb table.
__attribute__((target("avx2"))) static void lut_tables_avx2(const int8_t* x, int64_t g0, int64_t g1, uint8_t* tab) {
  const __m256i* d = reinterpret_cast<const __m256i*>(kDigits.d);
  const __m256i d0a = _mm256_load_si256(d), d0b = _mm256_load_si256(d + 1), d1a = _mm256_load_si256(d + 2),
                d1b = _mm256_load_si256(d + 3), d2a = _mm256_load_si256(d + 4), d2b = _mm256_load_si256(d + 5);
  const __m256i lo_byte = _mm256_set1_epi16(0x00ff);
  for (int64_t g = g0; g < g1; ++g) {
    const __m256i a0 = _mm256_set1_epi16(x[3 * g]), a1 = _mm256_set1_epi16(x[3 * g + 1]),
                  a2 = _mm256_set1_epi16(x[3 * g + 2]);
    // vpsignw: a * d for d in {-1, 0, 1}
    const __m256i ta = _mm256_add_epi16(_mm256_add_epi16(_mm256_sign_epi16(a0, d0a), _mm256_sign_epi16(a1, d1a)),
                                        _mm256_sign_epi16(a2, d2a));
    const __m256i tb = _mm256_add_epi16(_mm256_add_epi16(_mm256_sign_epi16(a0, d0b), _mm256_sign_epi16(a1, d1b)),
                                        _mm256_sign_epi16(a2, d2b));
    // packus works per 128-bit lane: [a 0-7, b 16-23 | a 8-15, b 24-31], and the 64-bit
    // permute puts the entries back in order.
    const __m256i lo = _mm256_permute4x64_epi64(
        _mm256_packus_epi16(_mm256_and_si256(ta, lo_byte), _mm256_and_si256(tb, lo_byte)), 0xd8);
    const __m256i hi =
        _mm256_permute4x64_epi64(_mm256_packus_epi16(_mm256_srli_epi16(ta, 8), _mm256_srli_epi16(tb, 8)), 0xd8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tab + g * 64), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tab + g * 64 + 32), hi);
  }
}

// ---------------------------------------------------------------- AVX-512

// out[32 r + i] = dot of row i of block r with x, for R blocks of 32 rows over all `words`
// (tab: the int16 tables, 32 entries a group; w: block 0's words, blocks ldb words apart).
template <int R>
ACCELOPS_TARGET_AVX512VNNI static void lut_tile_avx512(const int16_t* tab, const int16_t* w, int64_t ldb,
                                                      int64_t words, int64_t pf, int32_t* out) {
  __m512i s32[R][2];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) s32[r][0] = s32[r][1] = _mm512_setzero_si512();
  for (int64_t t0 = 0; t0 < words; t0 += kLutWiden) {
    const int64_t t1 = std::min(words, t0 + kLutWiden);
    __m512i s16[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) s16[r] = _mm512_setzero_si512();
    for (int64_t t = t0; t < t1; ++t) {
      const int16_t* tt = tab + t * (kLutGroupsPerWord * kLutEntries);
      const __m512i T0 = _mm512_loadu_si512(tt), T1 = _mm512_loadu_si512(tt + 32), T2 = _mm512_loadu_si512(tt + 64);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int16_t* wr = w + r * ldb + t * kLutRows;
        // Every block is its own stream: the hardware prefetchers follow R interleaved
        // streams badly (as in the 2-bit GEMV, see ternary.cpp).
        _mm_prefetch(reinterpret_cast<const char*>(wr) + pf, _MM_HINT_T1);
        const __m512i v = _mm512_loadu_si512(wr);
        // vpermw uses the low 5 bits of each index lane: the fields above are ignored.
        const __m512i a = _mm512_add_epi16(_mm512_permutexvar_epi16(v, T0),
                                           _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 5), T1));
        s16[r] = _mm512_add_epi16(s16[r], _mm512_add_epi16(a, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 10), T2)));
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      s32[r][0] = _mm512_add_epi32(s32[r][0], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(s16[r])));
      s32[r][1] = _mm512_add_epi32(s32[r][1], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(s16[r], 1)));
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_si512(out + r * kLutRows, s32[r][0]);
    _mm512_storeu_si512(out + r * kLutRows + 16, s32[r][1]);
  }
}

// ---------------------------------------------------------------- AVX2

template <int R>
__attribute__((target("avx2"))) static void lut_tile_avx2(const uint8_t* tab, const int16_t* w, int64_t ldb,
                                                         int64_t words, int64_t pf, int32_t* out) {
  const __m256i m31 = _mm256_set1_epi16(31);
  __m256i s32[R][4];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) s32[r][q] = _mm256_setzero_si256();
  for (int64_t t0 = 0; t0 < words; t0 += kLutWiden) {
    const int64_t t1 = std::min(words, t0 + kLutWiden);
    __m256i s16[R][2];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) s16[r][0] = s16[r][1] = _mm256_setzero_si256();
    for (int64_t t = t0; t < t1; ++t) {
      __m256i va[R], vb[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int16_t* wr = w + r * ldb + t * kLutRows;
        _mm_prefetch(reinterpret_cast<const char*>(wr) + pf, _MM_HINT_T1);
        va[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr));       // rows 0-15
        vb[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + 16));  // rows 16-31
      }
#pragma GCC unroll 3
      for (int g = 0; g < kLutGroupsPerWord; ++g) {
        const uint8_t* tg = tab + (t * kLutGroupsPerWord + g) * 64;
        const __m256i lo_a = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tg)));
        const __m256i lo_b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tg + 16)));
        const __m256i hi_a = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tg + 32)));
        const __m256i hi_b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tg + 48)));
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const __m256i ia = _mm256_and_si256(_mm256_srli_epi16(va[r], 5 * g), m31);
          const __m256i ib = _mm256_and_si256(_mm256_srli_epi16(vb[r], 5 * g), m31);
          // Bytes per lane: [rows 0-7, rows 16-23 | rows 8-15, rows 24-31]; the unpacks
          // below undo that order.
          const __m256i i8 = _mm256_packus_epi16(ia, ib);
          const __m256i sel = _mm256_slli_epi16(i8, 3);  // index bit 4 -> bit 7 of its byte
          const __m256i lo =
              _mm256_blendv_epi8(_mm256_shuffle_epi8(lo_a, i8), _mm256_shuffle_epi8(lo_b, i8), sel);
          const __m256i hi =
              _mm256_blendv_epi8(_mm256_shuffle_epi8(hi_a, i8), _mm256_shuffle_epi8(hi_b, i8), sel);
          s16[r][0] = _mm256_add_epi16(s16[r][0], _mm256_unpacklo_epi8(lo, hi));  // rows 0-15
          s16[r][1] = _mm256_add_epi16(s16[r][1], _mm256_unpackhi_epi8(lo, hi));  // rows 16-31
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < 2; ++h) {
        s32[r][2 * h] = _mm256_add_epi32(s32[r][2 * h], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s16[r][h])));
        s32[r][2 * h + 1] =
            _mm256_add_epi32(s32[r][2 * h + 1], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s16[r][h], 1)));
      }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * kLutRows + 8 * q), s32[r][q]);
}

// ---------------------------------------------------------------- scalar

static void lut_tile_scalar(const int16_t* tab, const int16_t* w, int64_t words, int32_t* out) {
  for (int i = 0; i < kLutRows; ++i) {
    int32_t s = 0;
    for (int64_t t = 0; t < words; ++t) {
      const uint16_t v = static_cast<uint16_t>(w[t * kLutRows + i]);
      const int16_t* tt = tab + t * (kLutGroupsPerWord * kLutEntries);
      s += tt[v & 31] + tt[32 + ((v >> 5) & 31)] + tt[64 + ((v >> 10) & 31)];
    }
    out[i] = s;
  }
}

// ---------------------------------------------------------------- GEMV

// acc[0, 32 * nblk) = dots of every row (padding rows included) with one activation row
// x_q (padded with zeros to 9 * words); finish(n0, n1) per range of finished rows.
static void lut_gemv(const int8_t* x_q, const int16_t* w, int64_t nblk, int64_t words, int32_t* acc, Isa isa,
                     const std::function<void(int64_t, int64_t)>& finish) {
  const int64_t groups = words * kLutGroupsPerWord, ldb = words * kLutRows;
  // Tables: 64 bytes a group (int16 x 32, or the AVX2 byte layout), built in parallel.
  std::vector<int16_t> tab(std::max<int64_t>(groups, 1) * kLutEntries);
  at::parallel_for(0, groups, 512, [&](int64_t g0, int64_t g1) {
    if (isa == Isa::Avx512Vnni)
      lut_tables_avx512(x_q, g0, g1, tab.data());
    else if (isa != Isa::Scalar)
      lut_tables_avx2(x_q, g0, g1, reinterpret_cast<uint8_t*>(tab.data()));
    else
      lut_tables_scalar(x_q, g0, g1, tab.data());
  });
  // Tasks of 4 blocks (128 rows); each thread takes one contiguous range of them, i.e. one
  // sequential range of memory.
  constexpr int64_t kTaskBlocks = 4;
  const int64_t ntasks = (nblk + kTaskBlocks - 1) / kTaskBlocks;
  at::parallel_for(0, ntasks, 1, [&](int64_t tb, int64_t te) {
    const int16_t* end = w + std::min(nblk, te * kTaskBlocks) * ldb;
    for (int64_t task = tb; task < te; ++task) {
      const int64_t b0 = task * kTaskBlocks, b1 = std::min(nblk, b0 + kTaskBlocks);
      auto pf_for = [&](int64_t b, int64_t nb) {
        const int16_t* tile_end = w + (b + nb) * ldb;
        return std::max<int64_t>(0, std::min<int64_t>(kLutPrefetchBytes, (end - tile_end) * 2));
      };
      int64_t b = b0;
      if (isa == Isa::Avx512Vnni) {
        for (; b + 4 <= b1; b += 4) lut_tile_avx512<4>(tab.data(), w + b * ldb, ldb, words, pf_for(b, 4), acc + b * kLutRows);
        for (; b < b1; ++b) lut_tile_avx512<1>(tab.data(), w + b * ldb, ldb, words, pf_for(b, 1), acc + b * kLutRows);
      } else if (isa != Isa::Scalar) {
        const uint8_t* t8 = reinterpret_cast<const uint8_t*>(tab.data());
        for (; b + 2 <= b1; b += 2) lut_tile_avx2<2>(t8, w + b * ldb, ldb, words, pf_for(b, 2), acc + b * kLutRows);
        for (; b < b1; ++b) lut_tile_avx2<1>(t8, w + b * ldb, ldb, words, pf_for(b, 1), acc + b * kLutRows);
      } else {
        for (; b < b1; ++b) lut_tile_scalar(tab.data(), w + b * ldb, words, acc + b * kLutRows);
      }
      if (finish) finish(b0 * kLutRows, b1 * kLutRows);
    }
  });
}

// ---------------------------------------------------------------- tensor-level op

at::Tensor ternary_matmul_lut_cpu(const at::Tensor& x, const at::Tensor& w_lut, const at::Tensor& w_scale, int64_t n,
                                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension");
  TORCH_CHECK(n >= 0, "n must be non-negative, got ", n);
  const int64_t k = x.size(-1), words = lut_words(k), nblk = lut_blocks(n);
  TORCH_CHECK(w_lut.scalar_type() == at::kShort, "w_lut must be int16 (the lut3 format), got ", w_lut.scalar_type());
  TORCH_CHECK(w_lut.dim() == 3 && w_lut.size(0) == nblk && w_lut.size(1) == words && w_lut.size(2) == kLutRows,
              "w_lut must have shape [ceil(N/32), ceil(K/9), 32] = [", nblk, ", ", words, ", 32] for N=", n, ", K=", k,
              ", got shape ", w_lut.sizes());
  TORCH_CHECK(w_scale.numel() == 1 || w_scale.numel() == n, "w_scale must hold 1 or N=", n, " scales, got shape ",
              w_scale.sizes());
  auto shape = x.sizes().vec();
  shape.back() = n;
  at::Tensor out = at::empty(shape, x.options());
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  if (m == 0 || n == 0) return out;  // (a view of N=0 columns as [-1, 0] is ambiguous)
  at::Tensor out2d = out.view({m, n});
  const int64_t kp = words * kLutWordK;
  std::vector<int8_t> q(m * std::max<int64_t>(kp, 1), 0);
  std::vector<float> xs(m, kQuantEps / 127.0f);
  if (k > 0) quantize_rows(x.reshape({m, k}).contiguous(), kp, q.data(), xs.data(), nullptr);
  at::Tensor wl = w_lut.contiguous();
  const Isa isa = active_dot_isa();
  std::vector<int32_t> acc(nblk * kLutRows);
  // A GEMV per activation row: the weights are read once per row (the format is meant for
  // M = 1; ternary_matmul's 2-bit GEMM tiles serve larger M).
  for (int64_t i = 0; i < m; ++i) {
    at::Tensor row = out2d.narrow(0, i, 1);
    const Epilogue epi(xs.data() + i, w_scale, bias, row);
    lut_gemv(q.data() + i * kp, wl.data_ptr<int16_t>(), nblk, words, acc.data(), isa, [&](int64_t n0, int64_t n1) {
      n1 = std::min(n1, n);
      if (n0 < n1) epi.apply(acc.data(), 1, n, 0, 1, n0, n1);
    });
  }
  return out;
}

}  // namespace accelops
