// Ternary GEMV on the dense "base3" weight format: five weights a byte, 1.6 bits a weight.
//
// Format (accelops/reference/ternary_base3.py is the spec): per row, K padded to a multiple
// of 320; w_b3 uint8 [N, ceil(K/320) * 64]. Byte j of block b holds the weights
// k = 320 b + 64 i + j (i = 0..4) as byte = sum_i d_i 3^i with digits d = w + 1 in {0, 1, 2}.
// Digit i of a block's 64 bytes is the weight vector of 64 contiguous activations, so each
// digit feeds one vpdpbusd (digits as u8, activations as s8) with no activation shuffle, and
// the dot is sum(d * x) - sum(x) as in the 2-bit format (ternary.cpp).
//
// At M = 1 the call is memory-bound: every weight byte is used once. The 2-bit GEMV already
// streams at DRAM speed on a Zen 4, so the only way to go faster is fewer bytes: 20% fewer
// here, if the decode keeps well ahead of memory.
//
// Decode (AVX-512 VBMI): two 256-entry byte tables,
//     TA[v] = d0 + 4 d1 + 16 d2 + 64 d3   (at most 170: still an unsigned byte),
//     TB[v] = d4,
// each looked up with two merge-masked vpermi2b (entries 128-255, then 0-127, split by bit 7
// through vpmovb2m and its complement, shared by both tables). Digits 0-3 are then left in
// place by one AND each (scaled by 1, 4, 16, 64) with one accumulator per scale, divided out
// by exact arithmetic shifts when a window is folded (the trick of the 2-bit GEMV); digit 4
// needs no AND. 15 vector operations per 320 weights (2 masks + 4 lookups + 4 ANDs + 5
// vpdpbusd) against the 2-bit GEMV's 8 per 256: the decode, not memory, bounds this kernel
// on a Zen 4 core (all these run at about 2 zmm operations a cycle).
// Measured against the other candidate, the "ceil" encoding q = ceil(256 v / 243) decoded by
// x <- 3 x mod 256 and two byte compares per digit (about 28 operations per 320 weights
// before the dot): see docs/backends.md, "Five weights a byte (base3)".
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

#define ACCELOPS_TARGET_AVX512VBMI \
  __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))

namespace accelops {

static int64_t base3_blocks(int64_t k) { return (k + kBase3BlockK - 1) / kBase3BlockK; }

// Digit i of every byte value v: (v / 3^i) % 3 (bytes 243-255 included, as the spec says),
// and the two lookup tables of the AVX-512 path.
struct Base3Tables {
  uint8_t digit[256][5];
  alignas(64) uint8_t ta[256];
  alignas(64) uint8_t tb[256];
  Base3Tables() {
    for (int v = 0; v < 256; ++v) {
      int p = 1;
      for (int i = 0; i < 5; ++i, p *= 3) digit[v][i] = uint8_t(v / p % 3);
      ta[v] = uint8_t(digit[v][0] + 4 * digit[v][1] + 16 * digit[v][2] + 64 * digit[v][3]);
      tb[v] = digit[v][4];
    }
  }
};
static const Base3Tables kBase3;

// ---------------------------------------------------------------- scalar

static void base3_rows_scalar(const int8_t* x, const uint8_t* w, int64_t ldw, int64_t rows, int64_t nblocks,
                              uint32_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    int32_t s = 0;
    const uint8_t* wr = w + r * ldw;
    for (int64_t b = 0; b < nblocks; ++b) {
      const int8_t* xb = x + b * kBase3BlockK;
      for (int j = 0; j < kBase3BlockBytes; ++j) {
        const uint8_t* d = kBase3.digit[wr[b * kBase3BlockBytes + j]];
        for (int i = 0; i < 5; ++i) s += int32_t(d[i]) * int32_t(xb[64 * i + j]);
      }
    }
    out[r] = static_cast<uint32_t>(s);
  }
}

// ---------------------------------------------------------------- AVX-512 VNNI + VBMI

// acc += u8 . s8 with the activations as a memory operand, in place (GCC 12 copies the
// accumulator for the intrinsic in unrolled loops: see dpbusd_inplace in ternary.cpp).
ACCELOPS_TARGET_AVX512VBMI static inline __attribute__((always_inline)) void dpbusd_mem(__m512i& acc, __m512i u8,
                                                                                       const int8_t* s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "m"(*reinterpret_cast<const __m512i*>(s8)));
}

struct Base3Zmm {
  __m512i a0, a1, a2, a3, b0, b1, b2, b3;  // TA and TB, 64 entries a register
};

// s[r][0..3]: the scale-1 (digits 0 and 4), 4, 16 and 64 accumulators of row r.
template <int R>
ACCELOPS_TARGET_AVX512VBMI static inline __attribute__((always_inline)) void base3_block_vbmi(
    const int8_t* xb, const uint8_t* w, int64_t ldw, int64_t b, int64_t pf, const Base3Zmm& t, __m512i (&s)[R][4]) {
  const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0c), m2 = _mm512_set1_epi8(0x30),
                m3 = _mm512_set1_epi8(static_cast<char>(0xc0));
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const uint8_t* wr = w + r * ldw + b * kBase3BlockBytes;
    _mm_prefetch(reinterpret_cast<const char*>(wr + pf), _MM_HINT_T1);
    const __m512i v = _mm512_loadu_si512(wr);
    // vpermi2b looks up 128 entries by the low 7 bits of each index byte. Bytes >= 128 are
    // looked up first with the merge-masked form, which keeps the index in the other lanes;
    // the second lookup then reads entries 0-127 for exactly those lanes (its index register
    // is the first result, whose looked-up lanes it leaves alone). 2 operations a table
    // instead of 3 with a blend: measured 22.3 against 19.8 GB/s from L2 on a Zen 4 core.
    const __mmask64 high = _mm512_movepi8_mask(v), low = _knot_mask64(high);
    __m512i a = _mm512_mask2_permutex2var_epi8(t.a2, v, high, t.a3);
    a = _mm512_mask2_permutex2var_epi8(t.a0, a, low, t.a1);
    __m512i d4 = _mm512_mask2_permutex2var_epi8(t.b2, v, high, t.b3);
    d4 = _mm512_mask2_permutex2var_epi8(t.b0, d4, low, t.b1);
    dpbusd_mem(s[r][0], _mm512_and_si512(a, m0), xb);
    dpbusd_mem(s[r][1], _mm512_and_si512(a, m1), xb + 64);
    dpbusd_mem(s[r][2], _mm512_and_si512(a, m2), xb + 128);
    dpbusd_mem(s[r][3], _mm512_and_si512(a, m3), xb + 192);
    dpbusd_mem(s[r][0], d4, xb + 256);
  }
}

// folded[r] += digits(w row r) . x over the blocks [b0, b1). Exactness: a lane of the scale-64
// accumulator gains at most 4 * 128 * 128 = 2^16 a block, so a window of up to 2^14 blocks
// cannot overflow int32 and the shifts that divide the scales out are exact.
template <int R>
ACCELOPS_TARGET_AVX512VBMI __attribute__((noinline)) static void base3_window_vbmi(const int8_t* x, const uint8_t* w,
                                                                                 int64_t ldw, int64_t b0, int64_t b1,
                                                                                 int64_t pf, __m512i* folded) {
  Base3Zmm t;
  t.a0 = _mm512_load_si512(kBase3.ta), t.a1 = _mm512_load_si512(kBase3.ta + 64);
  t.a2 = _mm512_load_si512(kBase3.ta + 128), t.a3 = _mm512_load_si512(kBase3.ta + 192);
  t.b0 = _mm512_load_si512(kBase3.tb), t.b1 = _mm512_load_si512(kBase3.tb + 64);
  t.b2 = _mm512_load_si512(kBase3.tb + 128), t.b3 = _mm512_load_si512(kBase3.tb + 192);
  __m512i s[R][4];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) s[r][q] = _mm512_setzero_si512();
  for (int64_t b = b0; b < b1; ++b) base3_block_vbmi<R>(x + b * kBase3BlockK, w, ldw, b, pf, t, s);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
    folded[r] = _mm512_add_epi32(
        folded[r], _mm512_add_epi32(_mm512_add_epi32(s[r][0], _mm512_srai_epi32(s[r][1], 2)),
                                    _mm512_add_epi32(_mm512_srai_epi32(s[r][2], 4), _mm512_srai_epi32(s[r][3], 6))));
}

// out[r] = digits(w row r) . x (mod 2^32) for R rows.
template <int R>
ACCELOPS_TARGET_AVX512VBMI static void base3_tile_vbmi(const int8_t* x, const uint8_t* w, int64_t ldw,
                                                      int64_t nblocks, int64_t pf, uint32_t* out) {
  constexpr int64_t kFoldBlocks = 1 << 14;
  __m512i folded[R];
  for (int r = 0; r < R; ++r) folded[r] = _mm512_setzero_si512();
  for (int64_t b0 = 0; b0 < nblocks; b0 += kFoldBlocks)
    base3_window_vbmi<R>(x, w, ldw, b0, std::min(nblocks, b0 + kFoldBlocks), pf, folded);
  for (int r = 0; r < R; ++r) out[r] = hsum_u32_512(folded[r]);
}

// ---------------------------------------------------------------- GEMV driver

enum class Base3Path { Scalar, Vbmi };

static Base3Path base3_path(Isa isa) {
  static const bool vbmi = cpu_has("avx512vbmi");
  return isa == Isa::Avx512Vnni && vbmi ? Base3Path::Vbmi : Base3Path::Scalar;
}

const char* ternary_base3_path_name(Isa isa) { return base3_path(isa) == Base3Path::Vbmi ? "avx512vbmi" : "scalar"; }

constexpr int kBase3Rows = 4;                 // rows a tile: the activations of a block serve four rows
constexpr int64_t kBase3PrefetchBytes = 16 << 10;  // as the 2-bit GEMV (ternary.cpp)

void ternary_base3_gemv_i32(const int8_t* x_q, int32_t xsum, const uint8_t* w_b3, int64_t n, int64_t nblocks,
                            int32_t* acc_out, Isa isa, const std::function<void(int64_t, int64_t)>& finish_rows) {
  const int64_t ldw = nblocks * kBase3BlockBytes;
  const Base3Path path = base3_path(isa);
  const CpuTiles tiles = cpu_tiles();  // k_chunk does not apply: a GEMV streams whole rows
  const int64_t nb = tiles.n_block ? tiles.n_block : 32;
  const int64_t ntiles = (n + nb - 1) / nb;
  uint32_t* acc = reinterpret_cast<uint32_t*>(acc_out);
  at::parallel_for(0, ntiles, 1, [&](int64_t tb, int64_t te) {
    const uint8_t* end = w_b3 + std::min(n, te * nb) * ldw;
    // Prefetch kBase3PrefetchBytes ahead in this thread's contiguous range of rows, less near
    // its end (no line past the range is asked for).
    auto pf = [&](const uint8_t* tile, int64_t rows) {
      return std::max<int64_t>(0, std::min<int64_t>(kBase3PrefetchBytes, end - (tile + rows * ldw)));
    };
    for (int64_t t = tb; t < te; ++t) {
      const int64_t n0 = t * nb, n1 = std::min(n, n0 + nb);
      if (nblocks == 0) {
        std::fill(acc + n0, acc + n1, 0u);
      } else if (path == Base3Path::Vbmi) {
        int64_t j = n0;
        for (; j + kBase3Rows <= n1; j += kBase3Rows)
          base3_tile_vbmi<kBase3Rows>(x_q, w_b3 + j * ldw, ldw, nblocks, pf(w_b3 + j * ldw, kBase3Rows), acc + j);
        for (; j < n1; ++j) base3_tile_vbmi<1>(x_q, w_b3 + j * ldw, ldw, nblocks, pf(w_b3 + j * ldw, 1), acc + j);
      } else {
        base3_rows_scalar(x_q, w_b3 + n0 * ldw, ldw, n1 - n0, nblocks, acc + n0);
      }
      for (int64_t j = n0; j < n1; ++j) acc[j] -= static_cast<uint32_t>(xsum);
      if (finish_rows) finish_rows(n0, n1);
    }
  });
}

// ---------------------------------------------------------------- tensor-level op

at::Tensor ternary_matmul_base3_cpu(const at::Tensor& x, const at::Tensor& w_b3, const at::Tensor& w_scale,
                                    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension");
  const int64_t k = x.size(-1), nblocks = base3_blocks(k);
  TORCH_CHECK(w_b3.scalar_type() == at::kByte, "w_b3 must be uint8 (the base3 format), got ", w_b3.scalar_type());
  TORCH_CHECK(w_b3.dim() == 2 && w_b3.size(1) == nblocks * kBase3BlockBytes,
              "w_b3 must have shape [N, ceil(K/320)*64] = [N, ", nblocks * kBase3BlockBytes, "] for K=", k,
              ", got shape ", w_b3.sizes());
  const int64_t n = w_b3.size(0);
  TORCH_CHECK(w_scale.numel() == 1 || w_scale.numel() == n, "w_scale must hold 1 or N=", n, " scales, got shape ",
              w_scale.sizes());
  auto shape = x.sizes().vec();
  shape.back() = n;
  at::Tensor out = at::empty(shape, x.options());
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  if (m == 0 || n == 0) return out;
  at::Tensor out2d = out.view({m, n});
  const int64_t kp = nblocks * kBase3BlockK;
  std::vector<int8_t> q(m * std::max<int64_t>(kp, 1), 0);
  std::vector<float> xs(m, kQuantEps / 127.0f);
  std::vector<int32_t> xsum(m, 0);
  if (k > 0) quantize_rows(x.reshape({m, k}).contiguous(), kp, q.data(), xs.data(), xsum.data());
  at::Tensor w = w_b3.contiguous();
  const Isa isa = active_dot_isa();
  std::vector<int32_t> acc(n);
  // A GEMV per activation row (weights read once per row: the format is made for M = 1);
  // the epilogue runs per row tile inside the parallel region.
  for (int64_t i = 0; i < m; ++i) {
    at::Tensor row = out2d.narrow(0, i, 1);
    const Epilogue epi(xs.data() + i, w_scale, bias, row);
    ternary_base3_gemv_i32(q.data() + i * kp, xsum[i], w.data_ptr<uint8_t>(), n, nblocks, acc.data(), isa,
                           [&](int64_t n0, int64_t n1) { epi.apply(acc.data(), 1, n, 0, 1, n0, n1); });
  }
  return out;
}

}  // namespace accelops
