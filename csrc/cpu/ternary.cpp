// Ternary (BitNet b1.58) family on the CPU: absmean weight quantization, 2-bit packing,
// and the fused int8-activation x packed-ternary GEMM/GEMV with exact int32 sums.
//
// The dot: weights are stored as codes c = w + 1 in {0, 1, 2}, so
//     sum_k x[k] * w[k] = sum_k c[k] * x[k] - sum_k x[k],
// and sum_k c[k] * x[k] is exactly what vpmaddubsw computes (unsigned codes times signed
// int8 activations, pairs summed to int16) with no decode beyond shift-and-mask. Pair sums
// are bounded (see ternary_tile_avx2), so int16 lanes never saturate before they are
// widened to int32: exact for any K.
// sum_k x[k] is computed once per activation row and shared by all N outputs.
// With AVX-512 VNNI, vpdpbusd takes the codes and activations straight to int32 (see below).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "../ops.h"
#include "kernels.h"
#include "vnni512.h"

namespace accelops {

static int64_t ternary_blocks(int64_t k) { return (k + kTernaryBlockK - 1) / kTernaryBlockK; }

// ---------------------------------------------------------------- GEMM kernels

// acc[mi, j] += sum over blocks [b0, b1) of codes(w row j) . x row mi, for an MT x NT tile.
// x rows are ldx bytes apart (zero padded to whole blocks), packed weight rows ldw bytes.
//
// Decode in 5 operations a block instead of 7: with q = p >> 4 (16-bit shift), the codes
// of slices 0 and 2 are p & 0x03 and q & 0x03, and those of slices 1 and 3 are left in
// place as p & 0x0c and q & 0x0c, i.e. scaled by 4. The two scales get separate int16
// accumulators (lo: 2 * 508 a block, hi: 2 * 4 * 508 a block, so 8 blocks fit in int16
// exactly) that are widened to int32 as 4 * lo + hi by one vpmaddwd each (the int32 sum is
// 4 * the dot product, at most 4 * 127 * K: exact up to K of about 4 million). This is
// ~10% fewer vector operations than shifting every code down, and the loop is bound by
// vector ALU throughput.
template <int MT, int NT>
__attribute__((target("avx2"))) static inline void ternary_tile_avx2(const int8_t* x, int64_t ldx,
                                                                    const uint8_t* w, int64_t ldw, int64_t b0,
                                                                    int64_t b1, int32_t* acc, int64_t ldacc) {
  constexpr int64_t kWiden = 8;  // blocks an int16 accumulator takes before it must widen
  // 16 blocks (512 B) ahead: measured best of 8/16/32/64 (cold 4096x4096 GEMV 315 us vs
  // 494 us without prefetch, 2 threads).
  constexpr int64_t kPrefetchBlocks = 16;
  const __m256i lo_mask = _mm256_set1_epi8(0x03);
  const __m256i hi_mask = _mm256_set1_epi8(0x0c);
  const __m256i ones16 = _mm256_set1_epi16(1);
  const __m256i fours16 = _mm256_set1_epi16(4);
  __m256i s32[MT][NT];
  for (int mi = 0; mi < MT; ++mi)
    for (int j = 0; j < NT; ++j) s32[mi][j] = _mm256_setzero_si256();
  for (int64_t bs = b0; bs < b1; bs += kWiden) {
    const int64_t be = std::min(b1, bs + kWiden);
    __m256i lo[MT][NT], hi[MT][NT];
    for (int mi = 0; mi < MT; ++mi)
      for (int j = 0; j < NT; ++j) lo[mi][j] = hi[mi][j] = _mm256_setzero_si256();
    for (int64_t b = bs; b < be; ++b) {
      // Decode one weight row and use it at once: keeping all NT rows' codes live would
      // spill (llvm-mca: 1x4 tile 3.49 cycles a row-block this way, 3.79 the other).
#pragma GCC unroll 8
      for (int j = 0; j < NT; ++j) {
        // GEMV streams weights from DRAM: ask for them well ahead, since the decode keeps
        // the core too busy for the hardware prefetcher to keep enough lines in flight.
        if (MT == 1) _mm_prefetch(reinterpret_cast<const char*>(w + j * ldw + (b + kPrefetchBlocks) * 32), _MM_HINT_T0);
        const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * ldw + b * 32));
        const __m256i q = _mm256_srli_epi16(p, 4);
        const __m256i c0 = _mm256_and_si256(p, lo_mask);  // slice 0, codes
        const __m256i c1 = _mm256_and_si256(p, hi_mask);  // slice 1, 4 * codes
        const __m256i c2 = _mm256_and_si256(q, lo_mask);  // slice 2, codes
        const __m256i c3 = _mm256_and_si256(q, hi_mask);  // slice 3, 4 * codes
#pragma GCC unroll 8
        for (int mi = 0; mi < MT; ++mi) {
          const __m256i* xb = reinterpret_cast<const __m256i*>(x + mi * ldx + b * 128);
          lo[mi][j] = _mm256_add_epi16(lo[mi][j], _mm256_maddubs_epi16(c0, _mm256_loadu_si256(xb)));
          hi[mi][j] = _mm256_add_epi16(hi[mi][j], _mm256_maddubs_epi16(c1, _mm256_loadu_si256(xb + 1)));
          lo[mi][j] = _mm256_add_epi16(lo[mi][j], _mm256_maddubs_epi16(c2, _mm256_loadu_si256(xb + 2)));
          hi[mi][j] = _mm256_add_epi16(hi[mi][j], _mm256_maddubs_epi16(c3, _mm256_loadu_si256(xb + 3)));
        }
      }
    }
    for (int mi = 0; mi < MT; ++mi)
      for (int j = 0; j < NT; ++j)
        s32[mi][j] = _mm256_add_epi32(s32[mi][j], _mm256_add_epi32(_mm256_madd_epi16(lo[mi][j], fours16),
                                                                   _mm256_madd_epi16(hi[mi][j], ones16)));
  }
  // s32 holds 4 * the dot product: an exact multiple of 4, so the division is exact.
  for (int mi = 0; mi < MT; ++mi)
    for (int j = 0; j < NT; ++j) acc[mi * ldacc + j] += hsum_epi32(s32[mi][j]) / 4;
}

template <int MT, int NT>
static inline void ternary_tile_scalar(const int8_t* x, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t b0,
                                       int64_t b1, int32_t* acc, int64_t ldacc) {
  for (int mi = 0; mi < MT; ++mi)
    for (int j = 0; j < NT; ++j) {
      int32_t t = 0;
      for (int64_t b = b0; b < b1; ++b) {
        const uint8_t* p = w + j * ldw + b * 32;
        const int8_t* xb = x + mi * ldx + b * 128;
        for (int q = 0; q < 4; ++q)
          for (int i = 0; i < 32; ++i) t += int32_t((p[i] >> (2 * q)) & 3) * int32_t(xb[32 * q + i]);
      }
      acc[mi * ldacc + j] += t;
    }
}

template <int MT, int NT>
static inline void ternary_tile(Isa isa, const int8_t* x, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t b0,
                                int64_t b1, int32_t* acc, int64_t ldacc) {
  if (isa != Isa::Scalar)
    ternary_tile_avx2<MT, NT>(x, ldx, w, ldw, b0, b1, acc, ldacc);
  else
    ternary_tile_scalar<MT, NT>(x, ldx, w, ldw, b0, b1, acc, ldacc);
}

// ---------------------------------------------------------------- AVX-512 VNNI

// vpdpbusd(codes, x) adds c * x for 64 (unsigned code, signed activation) byte pairs into
// int32 lanes, four pairs a lane, with no int16 stage: the codes {0, 1, 2} are already the
// unsigned operand, and the sum_k x[k] correction is the one the AVX2 path subtracts.
// All four slices are shifted down to plain codes (7 operations per 256 weights rather than
// the AVX2 path's 5 with scaled codes): unscaled sums are kept modulo 2^32 and stay exact
// for every K the contract allows (the true sum_k w x fits in int32 for K < 2^31 / 127).
// One zmm holds the packed bytes of two blocks; the activations are rearranged once per
// call so that the 64 activations of a slice of two blocks are contiguous (pair layout):
//     xp[pair * 256 + slice * 64 + half * 32 + i] = x[(2 pair + half) * 128 + 32 slice + i].

// acc[mi, j] += codes(w row j) . x row mi (mod 2^32) over the block pairs [p0, p1); an odd
// last block is loaded with its upper 32 bytes masked off (its activations are zero).
// A GEMV tile keeps two accumulators per output so that vpdpbusd's latency is hidden with
// only four outputs in flight.
template <int MT, int NT>
ACCELOPS_TARGET_AVX512VNNI static void ternary_tile_vnni512(const int8_t* x, int64_t ldx, const uint8_t* w, int64_t ldw,
                                                           int64_t p0, int64_t p1, int64_t nblocks, uint32_t* acc,
                                                           int64_t ldacc) {
  constexpr int A = MT == 1 ? 2 : 1;
  constexpr int64_t kPrefetchBytes = 1024;
  const __m512i m3 = _mm512_set1_epi8(0x03);
  __m512i s[MT * NT * A];
#pragma GCC unroll 16
  for (int i = 0; i < MT * NT * A; ++i) s[i] = _mm512_setzero_si512();
  for (int64_t p = p0; p < p1; ++p) {
    const __mmask64 mask = 2 * p + 2 <= nblocks ? ~__mmask64(0) : __mmask64(0xffffffffu);
    __m512i xv[MT][4];
#pragma GCC unroll 8
    for (int mi = 0; mi < MT; ++mi)
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) xv[mi][q] = _mm512_loadu_si512(x + mi * ldx + p * 256 + q * 64);
#pragma GCC unroll 8
    for (int j = 0; j < NT; ++j) {
      if (MT == 1) _mm_prefetch(reinterpret_cast<const char*>(w + j * ldw + p * 64 + kPrefetchBytes), _MM_HINT_T0);
      const __m512i b = _mm512_maskz_loadu_epi8(mask, w + j * ldw + p * 64);
      const __m512i c[4] = {_mm512_and_si512(b, m3), _mm512_and_si512(_mm512_srli_epi16(b, 2), m3),
                            _mm512_and_si512(_mm512_srli_epi16(b, 4), m3),
                            _mm512_and_si512(_mm512_srli_epi16(b, 6), m3)};
#pragma GCC unroll 8
      for (int mi = 0; mi < MT; ++mi)
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
          __m512i& a = s[(mi * NT + j) * A + (q % A)];
          a = _mm512_dpbusd_epi32(a, c[q], xv[mi][q]);
        }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MT * NT * A; ++i) acc[(i / A / NT) * ldacc + (i / A) % NT] += hsum_u32_512(s[i]);
}

static void ternary_gemm_vnni512(const int8_t* x_q, const int32_t* xsum, int64_t m, const uint8_t* w_packed,
                                 int64_t n, int64_t nblocks, int32_t* acc_out,
                                 const std::function<void(int64_t, int64_t)>& finish_columns) {
  const int64_t npairs = (nblocks + 1) / 2, ldxp = npairs * 256;
  const int64_t ldx = nblocks * kTernaryBlockK, ldw = nblocks * kTernaryBlockBytes;
  std::vector<int8_t> xp(m * ldxp, 0);
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(ldxp, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t blk = 0; blk < nblocks; ++blk)
        for (int q = 0; q < 4; ++q)
          std::memcpy(&xp[r * ldxp + (blk / 2) * 256 + q * 64 + (blk % 2) * 32], x_q + r * ldx + blk * 128 + q * 32, 32);
  });
  // Blocking as in ternary_gemm_i32: a GEMV streams whole rows, a GEMM takes K in chunks of
  // 8 pairs (2048 weights) so a 4-row activation slice stays in L1.
  const CpuTiles tiles = cpu_tiles();
  const int64_t kChunk = tiles.k_chunk ? tiles.k_chunk / 256 : (m <= 3 ? std::max<int64_t>(npairs, 1) : 8);
  const int64_t nb = tiles.n_block ? tiles.n_block : (m <= 3 ? 32 : 64);
  const int64_t ntiles = (n + nb - 1) / nb;
  uint32_t* acc = reinterpret_cast<uint32_t*>(acc_out);
  at::parallel_for(0, ntiles, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t n0 = t * nb, n1 = std::min(n, n0 + nb);
      for (int64_t mi = 0; mi < m; ++mi) std::fill(acc + mi * n + n0, acc + mi * n + n1, 0u);
      for (int64_t p0 = 0; p0 < npairs; p0 += kChunk) {
        const int64_t p1 = std::min(npairs, p0 + kChunk);
        const int8_t* xb = xp.data();
        int64_t mi = 0;
        // 4 x 2: 16 activation vectors + 8 accumulators + 4 codes in the 32 zmm registers.
        for (; mi + 4 <= m; mi += 4) {
          int64_t j = n0;
          for (; j + 2 <= n1; j += 2)
            ternary_tile_vnni512<4, 2>(xb + mi * ldxp, ldxp, w_packed + j * ldw, ldw, p0, p1, nblocks, acc + mi * n + j, n);
          for (; j < n1; ++j)
            ternary_tile_vnni512<4, 1>(xb + mi * ldxp, ldxp, w_packed + j * ldw, ldw, p0, p1, nblocks, acc + mi * n + j, n);
        }
        for (; mi < m; ++mi) {
          int64_t j = n0;
          for (; j + 4 <= n1; j += 4)
            ternary_tile_vnni512<1, 4>(xb + mi * ldxp, ldxp, w_packed + j * ldw, ldw, p0, p1, nblocks, acc + mi * n + j, n);
          for (; j < n1; ++j)
            ternary_tile_vnni512<1, 1>(xb + mi * ldxp, ldxp, w_packed + j * ldw, ldw, p0, p1, nblocks, acc + mi * n + j, n);
        }
      }
      for (int64_t mi = 0; mi < m; ++mi)
        for (int64_t j = n0; j < n1; ++j) acc[mi * n + j] -= static_cast<uint32_t>(xsum[mi]);
      if (finish_columns) finish_columns(n0, n1);
    }
  });
}

// ---------------------------------------------------------------- GEMV (M = 1)
//
// At M = 1 every weight byte is used once, so the call is as fast as the weights stream
// from DRAM, provided the decode-and-dot keeps well ahead of the memory (measured on a
// Zen 4, 1 core: a cold streaming read 23-27 GB/s; the GEMM tiles' GEMV decoded at 25 GB/s
// from L2 and reached 8 GB/s cold). What the GEMV does differently:
// * Four weight rows a tile, so the activations loaded for a block serve four rows and each
//   accumulator sees one dot product per four rows (latency hidden without unrolling K).
// * Software prefetch into L2 (prefetcht1) kGemvPrefetchBytes ahead in the thread's
//   contiguous range of rows: a tile reads four interleaved streams, which the hardware
//   prefetchers followed badly (cold 4096x4096, 1 thread: 8 GB/s without, 18-21 GB/s with;
//   prefetcht0 instead: 9 GB/s; 16 KB ahead was the best of 4, 8 and 16 KB and of one to
//   four tiles ahead on the bench shapes, 4 KB 40% slower on 11008-wide rows).
// * AVX-512 VNNI: the codes are decoded with one AND each and no shift, left in place in
//   their byte (slice q scaled by 4^q, at most 2 * 64 = 128, still an unsigned byte), with
//   one accumulator per slice; the scales are divided out (exact arithmetic shifts) when a
//   window of pairs is folded. 9 vector operations per 256 weights instead of 12; and
//   vpdpbusd is issued in place (see dpbusd_inplace), which GCC 12 does not do for the
//   intrinsic. 45 GB/s from L2 on 1 Zen 4 core (the GEMM tile: 25).
// * One horizontal reduction per four rows (a transpose-and-add tree), the sum_k x[k]
//   correction and the epilogue per column block, as in the GEMM.
// Each thread takes one contiguous range of column blocks (at::parallel_for), so its weights
// are one sequential range of memory.
constexpr int kGemvRows = 4;
constexpr int64_t kGemvPrefetchBytes = 16 << 10;

// The prefetch distance for a tile of `tile_bytes` at `tile` whose thread reads up to `end`:
// kGemvPrefetchBytes, less near the end so that no line past the thread's range is asked
// for (the last tiles then prefetch lines they or their neighbours already hold).
static inline int64_t gemv_prefetch_distance(const uint8_t* tile, int64_t tile_bytes, const uint8_t* end) {
  return std::max<int64_t>(0, std::min<int64_t>(kGemvPrefetchBytes, end - (tile + tile_bytes)));
}

// acc += u8 . s8 (vpdpbusd), accumulating in place. GCC 12 compiles _mm512_dpbusd_epi32 in an
// unrolled loop with a register copy (and often a stack store) of the accumulator per
// instruction: 25 GB/s instead of 45 from L2 for the GEMV tile below.
ACCELOPS_TARGET_AVX512VNNI static inline void dpbusd_inplace(__m512i& acc, __m512i u8, __m512i s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
}

// [sum of a, sum of b, sum of c, sum of d] (int32 lanes modulo 2^32): one tree for four rows.
ACCELOPS_TARGET_AVX512VNNI static inline __m128i hsum4_u32_512(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// One pair of blocks (256 weights) of R rows into s[r][slice]; `tail`: the odd last block,
// whose upper 32 bytes lie past the row (masked off; their activations are zero).
template <int R, bool kTail>
ACCELOPS_TARGET_AVX512VNNI static inline __attribute__((always_inline)) void gemv_pair_vnni512(
    const int8_t* xp, const uint8_t* w, int64_t ldw, int64_t p, int64_t pf, __m512i (&s)[R][4]) {
  const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0c), m2 = _mm512_set1_epi8(0x30),
                m3 = _mm512_set1_epi8(static_cast<char>(0xc0));
  const int8_t* xq = xp + p * 256;
  const __m512i x0 = _mm512_loadu_si512(xq), x1 = _mm512_loadu_si512(xq + 64), x2 = _mm512_loadu_si512(xq + 128),
                x3 = _mm512_loadu_si512(xq + 192);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const uint8_t* wr = w + r * ldw + p * 64;
    _mm_prefetch(reinterpret_cast<const char*>(wr + pf), _MM_HINT_T1);
    const __m512i b = kTail ? _mm512_maskz_loadu_epi8(__mmask64(0xffffffffu), wr) : _mm512_loadu_si512(wr);
    dpbusd_inplace(s[r][0], _mm512_and_si512(b, m0), x0);
    dpbusd_inplace(s[r][1], _mm512_and_si512(b, m1), x1);
    dpbusd_inplace(s[r][2], _mm512_and_si512(b, m2), x2);
    dpbusd_inplace(s[r][3], _mm512_and_si512(b, m3), x3);
  }
}

// folded[r] += codes(w row r) . x over the pairs [p0, p1) of R rows (mod 2^32), plus the odd
// last block when `tail`. The accumulators are locals of this function alone: with the
// window loop of gemv_tile_vnni512 around them, GCC kept them on the stack.
// Exactness: a lane of the slice-3 accumulator gains at most 4 * 128 * 128 = 2^16 a pair,
// so a window of up to 2^15 - 1 pairs cannot overflow int32 and the shifts that divide the
// scales out are exact.
template <int R>
ACCELOPS_TARGET_AVX512VNNI __attribute__((noinline)) static void gemv_window_vnni512(
    const int8_t* xp, const uint8_t* w, int64_t ldw, int64_t p0, int64_t p1, bool tail, int64_t pf,
    __m512i* folded) {
  __m512i s[R][4];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) s[r][q] = _mm512_setzero_si512();
  for (int64_t p = p0; p < p1; ++p) gemv_pair_vnni512<R, false>(xp, w, ldw, p, pf, s);
  if (tail) gemv_pair_vnni512<R, true>(xp, w, ldw, p1, pf, s);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
    folded[r] = _mm512_add_epi32(
        folded[r], _mm512_add_epi32(_mm512_add_epi32(s[r][0], _mm512_srai_epi32(s[r][1], 2)),
                                    _mm512_add_epi32(_mm512_srai_epi32(s[r][2], 4), _mm512_srai_epi32(s[r][3], 6))));
}

// out[r] = codes(w row r) . x (mod 2^32) for R rows, x in the pair layout of
// ternary_gemm_vnni512: windows of 2^13 pairs (2^21 weights) folded into sums kept modulo
// 2^32 like the GEMM's (exact for every K the contract allows).
template <int R>
ACCELOPS_TARGET_AVX512VNNI static void gemv_tile_vnni512(const int8_t* xp, const uint8_t* w, int64_t ldw,
                                                        int64_t nblocks, int64_t pf, uint32_t* out) {
  constexpr int64_t kFoldPairs = 1 << 13;
  const int64_t full = nblocks / 2;
  __m512i folded[R];
  for (int r = 0; r < R; ++r) folded[r] = _mm512_setzero_si512();
  int64_t p0 = 0;
  for (; p0 + kFoldPairs < full; p0 += kFoldPairs)
    gemv_window_vnni512<R>(xp, w, ldw, p0, p0 + kFoldPairs, false, pf, folded);
  gemv_window_vnni512<R>(xp, w, ldw, p0, full, nblocks % 2 != 0, pf, folded);
  if constexpr (R == 4) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), hsum4_u32_512(folded[0], folded[1], folded[2], folded[3]));
  } else {
    for (int r = 0; r < R; ++r) out[r] = hsum_u32_512(folded[r]);
  }
}

static void ternary_gemv_vnni512(const int8_t* x_q, int32_t xsum, const uint8_t* w_packed, int64_t n,
                                 int64_t nblocks, int32_t* acc_out,
                                 const std::function<void(int64_t, int64_t)>& finish_columns) {
  const int64_t npairs = (nblocks + 1) / 2, ldw = nblocks * kTernaryBlockBytes;
  std::vector<int8_t> xp(npairs * 256, 0);
  for (int64_t blk = 0; blk < nblocks; ++blk)
    for (int q = 0; q < 4; ++q)
      std::memcpy(&xp[(blk / 2) * 256 + q * 64 + (blk % 2) * 32], x_q + blk * 128 + q * 32, 32);
  const CpuTiles tiles = cpu_tiles();  // k_chunk does not apply: a GEMV streams whole rows
  const int64_t nb = tiles.n_block ? tiles.n_block : 32;
  const int64_t ntiles = (n + nb - 1) / nb;
  uint32_t* acc = reinterpret_cast<uint32_t*>(acc_out);
  at::parallel_for(0, ntiles, 1, [&](int64_t tb, int64_t te) {
    const uint8_t* end = w_packed + std::min(n, te * nb) * ldw;
    for (int64_t t = tb; t < te; ++t) {
      const int64_t n0 = t * nb, n1 = std::min(n, n0 + nb);
      int64_t j = n0;
      for (; j + kGemvRows <= n1; j += kGemvRows) {
        const uint8_t* w = w_packed + j * ldw;
        gemv_tile_vnni512<kGemvRows>(xp.data(), w, ldw, nblocks, gemv_prefetch_distance(w, kGemvRows * ldw, end),
                                     acc + j);
      }
      for (; j < n1; ++j) {
        const uint8_t* w = w_packed + j * ldw;
        gemv_tile_vnni512<1>(xp.data(), w, ldw, nblocks, gemv_prefetch_distance(w, ldw, end), acc + j);
      }
      for (j = n0; j < n1; ++j) acc[j] -= static_cast<uint32_t>(xsum);
      if (finish_columns) finish_columns(n0, n1);
    }
  });
}

// AVX2: the GEMM tile's decode (5 operations a block: one shift, four ANDs; codes of slices
// 1 and 3 scaled by 4, int16 accumulators widened every kWiden blocks), four rows a tile.
// vpmaddubsw, the int16 adds and the ANDs leave this path bound by vector ALU throughput
// (about 27 GB/s from L2 on a Zen 4 core), so at one thread it is close to, not far above,
// the DRAM rate.
template <int R>
__attribute__((target("avx2"))) static inline __attribute__((always_inline)) void gemv_block_avx2(
    const int8_t* x, const uint8_t* w, int64_t ldw, int64_t b, int64_t pf, __m256i (&lo)[R], __m256i (&hi)[R]) {
  const __m256i lo_mask = _mm256_set1_epi8(0x03), hi_mask = _mm256_set1_epi8(0x0c);
  const __m256i* xb = reinterpret_cast<const __m256i*>(x + b * 128);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const uint8_t* wr = w + r * ldw + b * 32;
    // Every block, so every other one asks for a line already asked for: measured as fast
    // as one prefetch a line (which needs two blocks a step and spills accumulators).
    _mm_prefetch(reinterpret_cast<const char*>(wr + pf), _MM_HINT_T1);
    const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr));
    const __m256i q = _mm256_srli_epi16(p, 4);
    lo[r] = _mm256_add_epi16(lo[r], _mm256_add_epi16(
                                        _mm256_maddubs_epi16(_mm256_and_si256(p, lo_mask), _mm256_loadu_si256(xb)),
                                        _mm256_maddubs_epi16(_mm256_and_si256(q, lo_mask), _mm256_loadu_si256(xb + 2))));
    hi[r] = _mm256_add_epi16(hi[r], _mm256_add_epi16(
                                        _mm256_maddubs_epi16(_mm256_and_si256(p, hi_mask), _mm256_loadu_si256(xb + 1)),
                                        _mm256_maddubs_epi16(_mm256_and_si256(q, hi_mask), _mm256_loadu_si256(xb + 3))));
  }
}

// s32[r] += 4 * codes(w row r) . x over the blocks [b0, b1) (at most kWiden of them). The
// int16 accumulators are locals of this function alone, as in gemv_window_vnni512.
template <int R>
__attribute__((target("avx2"), noinline)) static void gemv_window_avx2(const int8_t* x, const uint8_t* w,
                                                                      int64_t ldw, int64_t b0, int64_t b1, int64_t pf,
                                                                      __m256i* s32) {
  __m256i lo[R], hi[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
  for (int64_t b = b0; b < b1; ++b) gemv_block_avx2<R>(x, w, ldw, b, pf, lo, hi);
  const __m256i ones16 = _mm256_set1_epi16(1), fours16 = _mm256_set1_epi16(4);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
    s32[r] = _mm256_add_epi32(s32[r], _mm256_add_epi32(_mm256_madd_epi16(lo[r], fours16),
                                                       _mm256_madd_epi16(hi[r], ones16)));
}

// out[r] = codes(w row r) . x for R rows (exact for K up to 2^31 / 1016, as the GEMM tile).
template <int R>
__attribute__((target("avx2"))) static void gemv_tile_avx2(const int8_t* x, const uint8_t* w, int64_t ldw,
                                                          int64_t nblocks, int64_t pf, int32_t* out) {
  constexpr int64_t kWiden = 8;  // blocks an int16 accumulator takes (see ternary_tile_avx2)
  __m256i s32[R];
  for (int r = 0; r < R; ++r) s32[r] = _mm256_setzero_si256();
  for (int64_t bs = 0; bs < nblocks; bs += kWiden)
    gemv_window_avx2<R>(x, w, ldw, bs, std::min(nblocks, bs + kWiden), pf, s32);
  // s32 holds 4 * the dot product: an exact multiple of 4, so the division is exact.
  if constexpr (R == 4) {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(s32[0], s32[1]), _mm256_hadd_epi32(s32[2], s32[3]));
    const __m128i t = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_srai_epi32(t, 2));
  } else {
    for (int r = 0; r < R; ++r) out[r] = hsum_epi32(s32[r]) / 4;
  }
}

static void ternary_gemv_avx2(const int8_t* x_q, int32_t xsum, const uint8_t* w_packed, int64_t n, int64_t nblocks,
                              int32_t* acc, const std::function<void(int64_t, int64_t)>& finish_columns) {
  const int64_t ldw = nblocks * kTernaryBlockBytes;
  const CpuTiles tiles = cpu_tiles();  // k_chunk does not apply: a GEMV streams whole rows
  const int64_t nb = tiles.n_block ? tiles.n_block : 32;
  const int64_t ntiles = (n + nb - 1) / nb;
  at::parallel_for(0, ntiles, 1, [&](int64_t tb, int64_t te) {
    const uint8_t* end = w_packed + std::min(n, te * nb) * ldw;
    for (int64_t t = tb; t < te; ++t) {
      const int64_t n0 = t * nb, n1 = std::min(n, n0 + nb);
      int64_t j = n0;
      for (; j + kGemvRows <= n1; j += kGemvRows) {
        const uint8_t* w = w_packed + j * ldw;
        gemv_tile_avx2<kGemvRows>(x_q, w, ldw, nblocks, gemv_prefetch_distance(w, kGemvRows * ldw, end), acc + j);
      }
      for (; j < n1; ++j) {
        const uint8_t* w = w_packed + j * ldw;
        gemv_tile_avx2<1>(x_q, w, ldw, nblocks, gemv_prefetch_distance(w, ldw, end), acc + j);
      }
      for (j = n0; j < n1; ++j) acc[j] -= xsum;
      if (finish_columns) finish_columns(n0, n1);
    }
  });
}

// AVX-VNNI: vpdpbusd on ymm, for CPUs that have it without AVX-512 (Intel client cores since
// Alder Lake, E-core Xeons). The decode of the AVX2 path (one shift, four ANDs, slices 1 and
// 3 scaled by 4) with vpdpbusd taking codes and activations straight to int32: 10 vector
// operations a block instead of 13, and no int16 stage to widen. Two rows a tile with one
// accumulator per slice: the 16 ymm registers do not hold four rows' accumulators, and two
// accumulators a row (one per scale) made each wait on the previous vpdpbusd (measured with
// the EVEX form on a Zen 4 core from L2: 2 rows x 4 accumulators 36 GB/s, 4 rows x 2: 23).
// The instruction is issued by inline asm (in place, as dpbusd_inplace; the activations as
// its memory operand), in its VEX form (AVX-VNNI) or its EVEX form (AVX-512 VNNI + VL, the
// same 256-bit operation): with ACCELOPS_CPU_ISA=avxvnni a CPU that has AVX-512 VNNI but not
// AVX-VNNI runs this path through the EVEX form, which is how it is tested on AVX-512
// machines.
enum class Vnni256 { None, Vex, Evex };
constexpr int kGemvRowsVnni256 = 2;

// Whether the M = 1 ternary GEMV at dot level `isa` takes the 256-bit VNNI path, and how.
static Vnni256 gemv_vnni256(Isa isa) {
  if (isa != Isa::Avx2 || requested_isa() < Isa::AvxVnni) return Vnni256::None;
  if (cpu_supports(Isa::AvxVnni)) return Vnni256::Vex;
  if (requested_isa() == Isa::AvxVnni && cpu_supports(Isa::Avx512Vnni)) return Vnni256::Evex;
  return Vnni256::None;
}

template <Vnni256 kForm>
__attribute__((target("avx2"))) static inline __attribute__((always_inline)) void dpbusd256(__m256i& acc, __m256i u8,
                                                                                            const int8_t* s8) {
  const __m256i& x = *reinterpret_cast<const __m256i*>(s8);
  if constexpr (kForm == Vnni256::Vex)
    asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u8), "m"(x));
  else
    asm("%{evex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u8), "m"(x));
}

// folded[r] += codes(w row r) . x over the blocks [b0, b1) of R rows: s[r][slice], slices 1
// and 3 holding 4 x their sums (exact: a lane gains at most 4 * 8 * 128 = 2^12 a block, so
// up to 2^19 blocks cannot overflow int32, and the shift that divides by 4 is exact).
template <Vnni256 kForm, int R>
__attribute__((target("avx2"), noinline)) static void gemv_window_vnni256(const int8_t* x, const uint8_t* w,
                                                                         int64_t ldw, int64_t b0, int64_t b1,
                                                                         int64_t pf, __m256i* folded) {
  const __m256i lo_mask = _mm256_set1_epi8(0x03), hi_mask = _mm256_set1_epi8(0x0c);
  __m256i s[R][4];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) s[r][q] = _mm256_setzero_si256();
  for (int64_t b = b0; b < b1; ++b) {
    const int8_t* xb = x + b * 128;
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const uint8_t* wr = w + r * ldw + b * 32;
      _mm_prefetch(reinterpret_cast<const char*>(wr + pf), _MM_HINT_T1);
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr));
      const __m256i q = _mm256_srli_epi16(p, 4);
      dpbusd256<kForm>(s[r][0], _mm256_and_si256(p, lo_mask), xb);
      dpbusd256<kForm>(s[r][1], _mm256_and_si256(p, hi_mask), xb + 32);
      dpbusd256<kForm>(s[r][2], _mm256_and_si256(q, lo_mask), xb + 64);
      dpbusd256<kForm>(s[r][3], _mm256_and_si256(q, hi_mask), xb + 96);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
    folded[r] = _mm256_add_epi32(folded[r], _mm256_add_epi32(_mm256_add_epi32(s[r][0], s[r][2]),
                                                             _mm256_srai_epi32(_mm256_add_epi32(s[r][1], s[r][3]), 2)));
}

// out[r] = codes(w row r) . x (mod 2^32) for R rows, x in the plain block layout: windows of
// 2^16 blocks folded into sums kept modulo 2^32 (exact for every K the contract allows).
template <Vnni256 kForm, int R>
__attribute__((target("avx2"))) static void gemv_tile_vnni256(const int8_t* x, const uint8_t* w, int64_t ldw,
                                                             int64_t nblocks, int64_t pf, uint32_t* out) {
  constexpr int64_t kFoldBlocks = 1 << 16;
  __m256i folded[R];
  for (int r = 0; r < R; ++r) folded[r] = _mm256_setzero_si256();
  for (int64_t b0 = 0; b0 < nblocks; b0 += kFoldBlocks)
    gemv_window_vnni256<kForm, R>(x, w, ldw, b0, std::min(nblocks, b0 + kFoldBlocks), pf, folded);
  for (int r = 0; r < R; ++r) out[r] = static_cast<uint32_t>(hsum_epi32(folded[r]));
}

template <Vnni256 kForm>
static void ternary_gemv_vnni256(const int8_t* x_q, int32_t xsum, const uint8_t* w_packed, int64_t n,
                                 int64_t nblocks, int32_t* acc_out,
                                 const std::function<void(int64_t, int64_t)>& finish_columns) {
  const int64_t ldw = nblocks * kTernaryBlockBytes;
  const CpuTiles tiles = cpu_tiles();  // k_chunk does not apply: a GEMV streams whole rows
  const int64_t nb = tiles.n_block ? tiles.n_block : 32;
  const int64_t ntiles = (n + nb - 1) / nb;
  uint32_t* acc = reinterpret_cast<uint32_t*>(acc_out);
  at::parallel_for(0, ntiles, 1, [&](int64_t tb, int64_t te) {
    const uint8_t* end = w_packed + std::min(n, te * nb) * ldw;
    for (int64_t t = tb; t < te; ++t) {
      const int64_t n0 = t * nb, n1 = std::min(n, n0 + nb);
      int64_t j = n0;
      for (; j + kGemvRowsVnni256 <= n1; j += kGemvRowsVnni256) {
        const uint8_t* w = w_packed + j * ldw;
        gemv_tile_vnni256<kForm, kGemvRowsVnni256>(
            x_q, w, ldw, nblocks, gemv_prefetch_distance(w, kGemvRowsVnni256 * ldw, end), acc + j);
      }
      for (; j < n1; ++j) {
        const uint8_t* w = w_packed + j * ldw;
        gemv_tile_vnni256<kForm, 1>(x_q, w, ldw, nblocks, gemv_prefetch_distance(w, ldw, end), acc + j);
      }
      for (j = n0; j < n1; ++j) acc[j] -= static_cast<uint32_t>(xsum);
      if (finish_columns) finish_columns(n0, n1);
    }
  });
}

void ternary_gemm_i32(const int8_t* x_q, const int32_t* xsum, int64_t m, const uint8_t* w_packed, int64_t n,
                      int64_t nblocks, int32_t* acc, Isa isa,
                      const std::function<void(int64_t, int64_t)>& finish_columns) {
  if (m == 1 && nblocks > 0 && isa == Isa::Avx512Vnni)
    return ternary_gemv_vnni512(x_q, xsum[0], w_packed, n, nblocks, acc, finish_columns);
  if (m == 1 && nblocks > 0 && isa != Isa::Scalar) {
    switch (gemv_vnni256(isa)) {
      case Vnni256::Vex:
        return ternary_gemv_vnni256<Vnni256::Vex>(x_q, xsum[0], w_packed, n, nblocks, acc, finish_columns);
      case Vnni256::Evex:
        return ternary_gemv_vnni256<Vnni256::Evex>(x_q, xsum[0], w_packed, n, nblocks, acc, finish_columns);
      case Vnni256::None:
        return ternary_gemv_avx2(x_q, xsum[0], w_packed, n, nblocks, acc, finish_columns);
    }
  }
  if (isa == Isa::Avx512Vnni) return ternary_gemm_vnni512(x_q, xsum, m, w_packed, n, nblocks, acc, finish_columns);
  // GEMM: a K chunk of 16 blocks (2048 weights) keeps a 2-row activation slice in L1 while
  // a block of weight rows (nb * 512 B) stays in L2. M = 2, 3 (M = 1 took the GEMV above): no
  // chunking, so each weight row is one long sequential stream for the hardware prefetcher
  // (cold weights, M=1: chunked reads measured about 2x slower than the DRAM stream rate).
  const CpuTiles tiles = cpu_tiles();
  const int64_t kChunkBlocks = tiles.k_chunk ? tiles.k_chunk / kTernaryBlockK : (m <= 3 ? std::max<int64_t>(nblocks, 1) : 16);
  const int64_t ldx = nblocks * kTernaryBlockK, ldw = nblocks * kTernaryBlockBytes;
  const int64_t nb = tiles.n_block ? tiles.n_block : (m <= 3 ? 32 : 64);
  const int64_t ntiles = (n + nb - 1) / nb;
  at::parallel_for(0, ntiles, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t n0 = t * nb, n1 = std::min(n, n0 + nb);
      for (int64_t mi = 0; mi < m; ++mi) std::fill(acc + mi * n + n0, acc + mi * n + n1, 0);
      for (int64_t b0 = 0; b0 < nblocks; b0 += kChunkBlocks) {
        const int64_t b1 = std::min(nblocks, b0 + kChunkBlocks);
        int64_t mi = 0;
        // 2 x 1 tiles: the cheapest per row-block in llvm-mca (3.18 cycles; wider tiles spill).
        for (; mi + 2 <= m; mi += 2)
          for (int64_t j = n0; j < n1; ++j)
            ternary_tile<2, 1>(isa, x_q + mi * ldx, ldx, w_packed + j * ldw, ldw, b0, b1, acc + mi * n + j, n);
        for (; mi < m; ++mi) {
          int64_t j = n0;
          for (; j + 4 <= n1; j += 4)
            ternary_tile<1, 4>(isa, x_q + mi * ldx, ldx, w_packed + j * ldw, ldw, b0, b1, acc + mi * n + j, n);
          for (; j < n1; ++j)
            ternary_tile<1, 1>(isa, x_q + mi * ldx, ldx, w_packed + j * ldw, ldw, b0, b1, acc + mi * n + j, n);
        }
      }
      for (int64_t mi = 0; mi < m; ++mi)
        for (int64_t j = n0; j < n1; ++j) acc[mi * n + j] -= xsum[mi];
      if (finish_columns) finish_columns(n0, n1);
    }
  });
}

// ---------------------------------------------------------------- tensor-level ops

static void check_packed(const at::Tensor& w_packed, int64_t k) {
  TORCH_CHECK(w_packed.scalar_type() == at::kByte, "w_packed must be uint8, got ", w_packed.scalar_type());
  TORCH_CHECK(w_packed.dim() == 2, "w_packed must be 2-D [N, ceil(K/128)*32], got shape ", w_packed.sizes());
  TORCH_CHECK(w_packed.size(1) == ternary_blocks(k) * kTernaryBlockBytes, "w_packed must have ",
              ternary_blocks(k) * kTernaryBlockBytes, " columns to hold K=", k, ", got shape ", w_packed.sizes());
}

at::Tensor pack_ternary_cpu(const at::Tensor& wq) {
  TORCH_CHECK(wq.scalar_type() == at::kChar, "wq must be int8 with values in {-1, 0, 1}, got ", wq.scalar_type());
  TORCH_CHECK(wq.dim() == 2, "wq must be 2-D [N, K], got shape ", wq.sizes());
  const int64_t n = wq.size(0), k = wq.size(1), nblocks = ternary_blocks(k);
  TORCH_CHECK(wq.numel() == 0 || (wq.min().item<int>() >= -1 && wq.max().item<int>() <= 1),
              "wq must hold only -1, 0 and 1");
  at::Tensor w = wq.contiguous();
  at::Tensor out = at::empty({n, nblocks * kTernaryBlockBytes}, wq.options().dtype(at::kByte));
  const int8_t* src = w.data_ptr<int8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t blk = 0; blk < nblocks; ++blk)
        for (int i = 0; i < 32; ++i) {
          uint8_t byte = 0;
          for (int q = 0; q < 4; ++q) {
            const int64_t kk = blk * 128 + 32 * q + i;
            const uint8_t code = kk < k ? uint8_t(src[r * k + kk] + 1) : uint8_t(1);
            byte |= uint8_t(code << (2 * q));
          }
          dst[r * nblocks * 32 + blk * 32 + i] = byte;
        }
  });
  return out;
}

at::Tensor unpack_ternary_cpu(const at::Tensor& w_packed, int64_t k) {
  TORCH_CHECK(k >= 0, "k must be non-negative, got ", k);
  check_packed(w_packed, k);
  const int64_t n = w_packed.size(0), nblocks = ternary_blocks(k);
  at::Tensor p = w_packed.contiguous();
  at::Tensor out = at::empty({n, k}, w_packed.options().dtype(at::kChar));
  const uint8_t* src = p.data_ptr<uint8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t kk = 0; kk < k; ++kk) {
        const uint8_t byte = src[r * nblocks * 32 + (kk / 128) * 32 + (kk % 32)];
        dst[r * k + kk] = int8_t(((byte >> (2 * ((kk % 128) / 32))) & 3)) - 1;
      }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_weight_ternary_cpu(const at::Tensor& w, bool per_channel) {
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf,
              "w must be float32, bfloat16 or float16, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2, "w must be 2-D [out_features, in_features], got shape ", w.sizes());
  TORCH_CHECK(at::isfinite(w).all().item<bool>(), "w must be finite: it holds NaN or Inf");
  // Same arithmetic as the reference: fp64 mean of |w| rounded to fp32, then an fp32
  // division per weight, so every backend gets identical codes.
  at::Tensor a = w.abs().to(at::kDouble);
  at::Tensor scale = (per_channel ? a.sum({1}) / std::max<int64_t>(w.size(1), 1)
                                  : (a.sum() / std::max<int64_t>(w.numel(), 1)).reshape({1}))
                         .to(at::kFloat);
  at::Tensor denom = scale.clamp_min(kQuantEps).reshape({-1, 1});
  at::Tensor wq = at::round(w.to(at::kFloat) / denom).clamp_(-1, 1).to(at::kChar);
  return {pack_ternary_cpu(wq), scale};
}

at::Tensor ternary_matmul_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension");
  const int64_t k = x.size(-1);
  check_packed(w_packed, k);
  const int64_t n = w_packed.size(0), nblocks = ternary_blocks(k);
  TORCH_CHECK(w_scale.numel() == 1 || w_scale.numel() == n, "w_scale must hold 1 or N=", n, " scales, got shape ",
              w_scale.sizes());
  auto shape = x.sizes().vec();
  shape.back() = n;
  at::Tensor out = at::empty(shape, x.options());
  at::Tensor out2d = out.view({-1, n});
  const int64_t m = out2d.size(0);
  if (m == 0 || n == 0) return out;
  const int64_t kp = nblocks * kTernaryBlockK;
  std::vector<int8_t> q(m * std::max<int64_t>(kp, 1));
  std::vector<float> xs(m, kQuantEps / 127.0f);
  std::vector<int32_t> xsum(m, 0);
  if (k > 0) quantize_rows(x.reshape({m, k}).contiguous(), kp, q.data(), xs.data(), xsum.data());
  at::Tensor wp = w_packed.contiguous();
  std::vector<int32_t> acc(m * n);
  // The epilogue runs per column tile inside the GEMM's parallel region, while the tile's
  // sums are still in cache.
  const Epilogue epi(xs.data(), w_scale, bias, out2d);
  ternary_gemm_i32(q.data(), xsum.data(), m, wp.data_ptr<uint8_t>(), n, nblocks, acc.data(), active_dot_isa(),
                   [&](int64_t n0, int64_t n1) { epi.apply(acc.data(), m, n, 0, m, n0, n1); });
  return out;
}

}  // namespace accelops
