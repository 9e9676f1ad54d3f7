// Fake quantization on the CPU: the forward in one pass that also writes the straight-
// through mask as bits, the masked backward, and the learnable (LSQ) forward and backward.
// The arithmetic is accelops/reference/fake_quant.py's (which is torch's) step for step;
// the build uses -ffp-contract=off so no multiply-add is fused into an FMA that would
// round once where the spec rounds twice.
//
// Geometry: x is viewed as [outer, C, inner] with C the channel axis (C = 1, inner = numel
// per tensor). Work is split into 8-element groups that start at multiples of 8, so each
// group owns exactly one mask byte and threads never share a byte.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "../ops.h"
#include "kernels.h"

namespace accelops {
namespace {

// The paths: Scalar, Avx2, and Avx512Vnni standing for AVX-512 F/BW/VL (no VNNI needed).
// ACCELOPS_CPU_ISA caps them as it caps the dot kernels: avx512vnni allows AVX-512, avx2 or
// avxvnni the AVX2 path, scalar the scalar one.
Isa fq_isa() {
  const Isa requested = requested_isa();
  if (requested == Isa::Avx512Vnni && cpu_has_avx2() && cpu_has("avx512f") && cpu_has("avx512bw") &&
      cpu_has("avx512vl"))
    return Isa::Avx512Vnni;
  return active_isa();
}

struct QParams {
  const float* scale;  // [C]
  const float* inv;    // [C], 1.0f / scale in fp32
  const float* zero;   // [C], the integer zero point as a float
  int64_t channels, inner;
  float qmin, qmax;
};

// Which channel element p belongs to, advanced group by group without a division per group.
struct ChannelCursor {
  int64_t c, off;
  int64_t channels, inner;
  ChannelCursor(const QParams& p, int64_t start) : channels(p.channels), inner(p.inner) {
    c = (start / inner) % channels;
    off = start % inner;
  }
  bool uniform(int64_t k) const { return off + k <= inner; }  // next k elements share channel c
  void advance(int64_t k) {
    off += k;
    if (off < inner) return;
    if (inner == 1) {
      c += off;
      off = 0;
      while (c >= channels) c -= channels;
      return;
    }
    const int64_t rows = off / inner;
    off -= rows * inner;
    c = (c + rows) % channels;
  }
};

inline float fq_one(float x, float s, float inv, float z, float qmin, float qmax, bool* inside) {
  const float q = std::nearbyint(x * inv) + z;
  *inside = q >= qmin && q <= qmax;
  if (std::isnan(x)) return x;
  return (std::min(std::max(q, qmin), qmax) - z) * s;
}

// Elements [begin, begin + count) of x (x, y already offset to begin); mask (offset to
// begin / 8) may be null. begin is a multiple of 8.
void fq_forward_scalar(const float* x, float* y, uint8_t* mask, int64_t begin, int64_t count, const QParams& p) {
  ChannelCursor cur(p, begin);
  for (int64_t g = 0; g < count; g += 8) {
    const int64_t lanes = std::min<int64_t>(8, count - g);
    uint8_t bits = 0;
    for (int64_t j = 0; j < lanes; ++j) {
      bool inside;
      const int64_t c = cur.c;
      y[g + j] = fq_one(x[g + j], p.scale[c], p.inv[c], p.zero[c], p.qmin, p.qmax, &inside);
      bits |= static_cast<uint8_t>(inside) << j;
      cur.advance(1);
    }
    if (mask) mask[g / 8] = bits;
  }
}

__attribute__((target("avx2,fma"))) void fq_forward_avx2(const float* x, float* y, uint8_t* mask, int64_t begin,
                                                         int64_t count, const QParams& p) {
  ChannelCursor cur(p, begin);
  const __m256 qmin = _mm256_set1_ps(p.qmin), qmax = _mm256_set1_ps(p.qmax);
  alignas(32) float ls[8], linv[8], lz[8];
  int64_t g = 0;
  for (; g + 8 <= count; g += 8) {
    __m256 s, inv, z;
    if (cur.uniform(8)) {
      s = _mm256_set1_ps(p.scale[cur.c]);
      inv = _mm256_set1_ps(p.inv[cur.c]);
      z = _mm256_set1_ps(p.zero[cur.c]);
      cur.advance(8);
    } else if (cur.inner == 1 && cur.c + 8 <= cur.channels) {  // channels along the last axis
      s = _mm256_loadu_ps(p.scale + cur.c);
      inv = _mm256_loadu_ps(p.inv + cur.c);
      z = _mm256_loadu_ps(p.zero + cur.c);
      cur.advance(8);
    } else {  // the group crosses channels: gather lane by lane
      for (int j = 0; j < 8; ++j) {
        ls[j] = p.scale[cur.c];
        linv[j] = p.inv[cur.c];
        lz[j] = p.zero[cur.c];
        cur.advance(1);
      }
      s = _mm256_load_ps(ls);
      inv = _mm256_load_ps(linv);
      z = _mm256_load_ps(lz);
    }
    const __m256 xv = _mm256_loadu_ps(x + g);
    const __m256 q =
        _mm256_add_ps(_mm256_round_ps(_mm256_mul_ps(xv, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), z);
    const __m256 inside = _mm256_and_ps(_mm256_cmp_ps(q, qmin, _CMP_GE_OQ), _mm256_cmp_ps(q, qmax, _CMP_LE_OQ));
    __m256 yv = _mm256_mul_ps(_mm256_sub_ps(_mm256_min_ps(_mm256_max_ps(q, qmin), qmax), z), s);
    yv = _mm256_blendv_ps(yv, xv, _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q));  // NaN stays NaN
    _mm256_storeu_ps(y + g, yv);
    if (mask) mask[g / 8] = static_cast<uint8_t>(_mm256_movemask_ps(inside));
  }
  if (g < count) fq_forward_scalar(x + g, y + g, mask ? mask + g / 8 : nullptr, begin + g, count - g, p);
}

// The AVX2 arithmetic on 16 lanes: two groups, so two mask bytes per vector (written as one
// little-endian uint16). The tail (under 16 elements) runs the AVX2 path.
#define ACCELOPS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
ACCELOPS_AVX512 void fq_forward_avx512(const float* x, float* y, uint8_t* mask, int64_t begin, int64_t count,
                                       const QParams& p) {
  ChannelCursor cur(p, begin);
  const __m512 qmin = _mm512_set1_ps(p.qmin), qmax = _mm512_set1_ps(p.qmax);
  alignas(64) float ls[16], linv[16], lz[16];
  int64_t g = 0;
  for (; g + 16 <= count; g += 16) {
    __m512 s, inv, z;
    if (cur.uniform(16)) {
      s = _mm512_set1_ps(p.scale[cur.c]);
      inv = _mm512_set1_ps(p.inv[cur.c]);
      z = _mm512_set1_ps(p.zero[cur.c]);
      cur.advance(16);
    } else if (cur.inner == 1 && cur.c + 16 <= cur.channels) {  // channels along the last axis
      s = _mm512_loadu_ps(p.scale + cur.c);
      inv = _mm512_loadu_ps(p.inv + cur.c);
      z = _mm512_loadu_ps(p.zero + cur.c);
      cur.advance(16);
    } else {  // the vector crosses channels: gather lane by lane
      for (int j = 0; j < 16; ++j) {
        ls[j] = p.scale[cur.c];
        linv[j] = p.inv[cur.c];
        lz[j] = p.zero[cur.c];
        cur.advance(1);
      }
      s = _mm512_load_ps(ls);
      inv = _mm512_load_ps(linv);
      z = _mm512_load_ps(lz);
    }
    const __m512 xv = _mm512_loadu_ps(x + g);
    const __m512 q = _mm512_add_ps(
        _mm512_roundscale_ps(_mm512_mul_ps(xv, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), z);
    const __mmask16 inside = _mm512_cmp_ps_mask(q, qmin, _CMP_GE_OQ) & _mm512_cmp_ps_mask(q, qmax, _CMP_LE_OQ);
    __m512 yv = _mm512_mul_ps(_mm512_sub_ps(_mm512_min_ps(_mm512_max_ps(q, qmin), qmax), z), s);
    yv = _mm512_mask_mov_ps(yv, _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q), xv);  // NaN stays NaN
    _mm512_storeu_ps(y + g, yv);
    if (mask) {
      const uint16_t bits = inside;
      std::memcpy(mask + g / 8, &bits, 2);
    }
  }
  if (g < count) fq_forward_avx2(x + g, y + g, mask ? mask + g / 8 : nullptr, begin + g, count - g, p);
}

void fq_forward_f32(const float* x, float* y, uint8_t* mask, int64_t begin, int64_t count, const QParams& p,
                    Isa isa) {
  if (isa == Isa::Avx512Vnni)
    fq_forward_avx512(x, y, mask, begin, count, p);
  else if (isa == Isa::Avx2)
    fq_forward_avx2(x, y, mask, begin, count, p);
  else
    fq_forward_scalar(x, y, mask, begin, count, p);
}

// dx = dy * bit, a multiply as torch's dy * mask (NaN * 0 stays NaN).
void fq_backward_scalar(const float* dy, const uint8_t* mask, float* dx, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dx[i] = dy[i] * static_cast<float>((mask[i / 8] >> (i % 8)) & 1);
}

__attribute__((target("avx2,fma"))) void fq_backward_avx2(const float* dy, const uint8_t* mask, float* dx,
                                                          int64_t count) {
  const __m256i lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256i sel = _mm256_and_si256(_mm256_set1_epi32(mask[i / 8]), lane_bits);
    const __m256 m = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(sel, lane_bits)), one);
    _mm256_storeu_ps(dx + i, _mm256_mul_ps(_mm256_loadu_ps(dy + i), m));
  }
  if (i < count) fq_backward_scalar(dy + i, mask + i / 8, dx + i, count - i);
}

ACCELOPS_AVX512 void fq_backward_avx512(const float* dy, const uint8_t* mask, float* dx, int64_t count) {
  const __m512 one = _mm512_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    uint16_t bits;
    std::memcpy(&bits, mask + i / 8, 2);
    // a multiply by 0 or 1, not a masked move: -dy * 0 is -0 and NaN * 0 NaN, as torch's
    _mm512_storeu_ps(dx + i, _mm512_mul_ps(_mm512_loadu_ps(dy + i), _mm512_maskz_mov_ps(bits, one)));
  }
  if (i < count) fq_backward_avx2(dy + i, mask + i / 8, dx + i, count - i);
}

void fq_backward_f32(const float* dy, const uint8_t* mask, float* dx, int64_t count, Isa isa) {
  if (isa == Isa::Avx512Vnni)
    fq_backward_avx512(dy, mask, dx, count);
  else if (isa == Isa::Avx2)
    fq_backward_avx2(dy, mask, dx, count);
  else
    fq_backward_scalar(dy, mask, dx, count);
}

// Learnable backward (torch's formulas; see the reference). `zero` holds the backward zero
// point. Accumulates dscale / dzero partial sums per channel in acc_s / acc_z, in fp64: a
// channel may be millions of elements long.
//
// The vector LSQ backward: the per-element values are the scalar body's bit for bit (same
// fp32 operations in the same order); only the fp64 sums of a channel run are taken in
// another order (one partial sum per lane, added up at the end of the run). Runs shorter
// than a vector (a channel axis near the last one) take the scalar body.
struct LsqChannel {
  float s, inv, z, below_d, above_d;
};

__attribute__((always_inline)) inline void lsq_element(float xv, float g, const LsqChannel& ch, const QParams& p,
                                                       float grad_factor, float* dx, double* sum_s, double* sum_z) {
  const float q = std::nearbyint(xv * ch.inv) + ch.z;
  const bool inside = q >= p.qmin && q <= p.qmax;
  *dx = g * static_cast<float>(inside);
  const float xfq = (std::min(std::max(q, p.qmin), p.qmax) - ch.z) * ch.s;
  const float ds = inside ? g * (xfq - xv) * ch.inv : g * (q < p.qmin ? ch.below_d : ch.above_d);
  const float dz = inside ? 0.f : g * -1.0f * ch.s * grad_factor;
  *sum_s += ds * grad_factor;
  *sum_z += dz;
}

// A vector run: elements [0, done) of one channel run, done returned; their sums added to
// *sum_s / *sum_z.
using LsqRunFn = int64_t (*)(const float* x, const float* dy, float* dx, int64_t n, const LsqChannel& ch,
                             const QParams& p, float grad_factor, double* sum_s, double* sum_z);

template <LsqRunFn vector_run>
__attribute__((always_inline)) inline void lsq_backward_runs(const float* x, const float* dy, float* dx,
                                                             double* acc_s, double* acc_z, int64_t begin,
                                                             int64_t count, const QParams& p, float grad_factor) {
  ChannelCursor cur(p, begin);
  int64_t i = 0;
  while (i < count) {
    const int64_t c = cur.c;
    const int64_t run = std::min<int64_t>(count - i, cur.inner - cur.off);
    const LsqChannel ch{p.scale[c], p.inv[c], p.zero[c], p.qmin - p.zero[c], p.qmax - p.zero[c]};
    double sum_s = 0.0, sum_z = 0.0;
    const int64_t done = vector_run(x + i, dy + i, dx + i, run, ch, p, grad_factor, &sum_s, &sum_z);
    for (int64_t j = i + done; j < i + run; ++j)
      lsq_element(x[j], dy[j], ch, p, grad_factor, dx + j, &sum_s, &sum_z);
    acc_s[c] += sum_s;
    acc_z[c] += sum_z;
    i += run;
    cur.advance(run);
  }
}

int64_t lsq_run_none(const float*, const float*, float*, int64_t, const LsqChannel&, const QParams&, float, double*,
                     double*) {
  return 0;
}

void lsq_backward_scalar(const float* x, const float* dy, float* dx, double* acc_s, double* acc_z, int64_t begin,
                         int64_t count, const QParams& p, float grad_factor) {
  lsq_backward_runs<lsq_run_none>(x, dy, dx, acc_s, acc_z, begin, count, p, grad_factor);
}

__attribute__((target("avx2,fma"))) int64_t lsq_run_avx2(const float* xr, const float* gr, float* dr, int64_t n,
                                                         const LsqChannel& ch, const QParams& p, float grad_factor,
                                                         double* sum_s, double* sum_z) {
  const __m256 qmin = _mm256_set1_ps(p.qmin), qmax = _mm256_set1_ps(p.qmax), one = _mm256_set1_ps(1.0f);
  const __m256 minus_one = _mm256_set1_ps(-1.0f), gf = _mm256_set1_ps(grad_factor);
  const __m256 s = _mm256_set1_ps(ch.s), inv = _mm256_set1_ps(ch.inv), z = _mm256_set1_ps(ch.z);
  const __m256 below_d = _mm256_set1_ps(ch.below_d), above_d = _mm256_set1_ps(ch.above_d);
  __m256d as0 = _mm256_setzero_pd(), as1 = as0, az0 = as0, az1 = as0;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 xv = _mm256_loadu_ps(xr + j), g = _mm256_loadu_ps(gr + j);
    const __m256 q =
        _mm256_add_ps(_mm256_round_ps(_mm256_mul_ps(xv, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), z);
    const __m256 inside = _mm256_and_ps(_mm256_cmp_ps(q, qmin, _CMP_GE_OQ), _mm256_cmp_ps(q, qmax, _CMP_LE_OQ));
    _mm256_storeu_ps(dr + j, _mm256_mul_ps(g, _mm256_and_ps(inside, one)));
    const __m256 xfq = _mm256_mul_ps(_mm256_sub_ps(_mm256_min_ps(_mm256_max_ps(q, qmin), qmax), z), s);
    const __m256 ds_in = _mm256_mul_ps(_mm256_mul_ps(g, _mm256_sub_ps(xfq, xv)), inv);
    const __m256 ds_out = _mm256_mul_ps(g, _mm256_blendv_ps(above_d, below_d, _mm256_cmp_ps(q, qmin, _CMP_LT_OQ)));
    const __m256 ds = _mm256_mul_ps(_mm256_blendv_ps(ds_out, ds_in, inside), gf);
    const __m256 dz_out = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(g, minus_one), s), gf);
    const __m256 dz = _mm256_andnot_ps(inside, dz_out);  // +0 inside, as the scalar
    as0 = _mm256_add_pd(as0, _mm256_cvtps_pd(_mm256_castps256_ps128(ds)));
    as1 = _mm256_add_pd(as1, _mm256_cvtps_pd(_mm256_extractf128_ps(ds, 1)));
    az0 = _mm256_add_pd(az0, _mm256_cvtps_pd(_mm256_castps256_ps128(dz)));
    az1 = _mm256_add_pd(az1, _mm256_cvtps_pd(_mm256_extractf128_ps(dz, 1)));
  }
  alignas(32) double ls[4], lz[4];
  _mm256_store_pd(ls, _mm256_add_pd(as0, as1));
  _mm256_store_pd(lz, _mm256_add_pd(az0, az1));
  *sum_s += (ls[0] + ls[1]) + (ls[2] + ls[3]);
  *sum_z += (lz[0] + lz[1]) + (lz[2] + lz[3]);
  return j;
}

__attribute__((target("avx2,fma"))) void lsq_backward_avx2(const float* x, const float* dy, float* dx, double* acc_s,
                                                           double* acc_z, int64_t begin, int64_t count,
                                                           const QParams& p, float grad_factor) {
  lsq_backward_runs<lsq_run_avx2>(x, dy, dx, acc_s, acc_z, begin, count, p, grad_factor);
}

ACCELOPS_AVX512 int64_t lsq_run_avx512(const float* xr, const float* gr, float* dr, int64_t n, const LsqChannel& ch,
                                       const QParams& p, float grad_factor, double* sum_s, double* sum_z) {
  const __m512 qmin = _mm512_set1_ps(p.qmin), qmax = _mm512_set1_ps(p.qmax), one = _mm512_set1_ps(1.0f);
  const __m512 minus_one = _mm512_set1_ps(-1.0f), gf = _mm512_set1_ps(grad_factor);
  const __m512 s = _mm512_set1_ps(ch.s), inv = _mm512_set1_ps(ch.inv), z = _mm512_set1_ps(ch.z);
  const __m512 below_d = _mm512_set1_ps(ch.below_d), above_d = _mm512_set1_ps(ch.above_d);
  __m512d as0 = _mm512_setzero_pd(), as1 = as0, az0 = as0, az1 = as0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 xv = _mm512_loadu_ps(xr + j), g = _mm512_loadu_ps(gr + j);
    const __m512 q = _mm512_add_ps(
        _mm512_roundscale_ps(_mm512_mul_ps(xv, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), z);
    const __mmask16 inside = _mm512_cmp_ps_mask(q, qmin, _CMP_GE_OQ) & _mm512_cmp_ps_mask(q, qmax, _CMP_LE_OQ);
    _mm512_storeu_ps(dr + j, _mm512_mul_ps(g, _mm512_maskz_mov_ps(inside, one)));
    const __m512 xfq = _mm512_mul_ps(_mm512_sub_ps(_mm512_min_ps(_mm512_max_ps(q, qmin), qmax), z), s);
    const __m512 ds_in = _mm512_mul_ps(_mm512_mul_ps(g, _mm512_sub_ps(xfq, xv)), inv);
    const __mmask16 below = _mm512_cmp_ps_mask(q, qmin, _CMP_LT_OQ);
    const __m512 ds_out = _mm512_mul_ps(g, _mm512_mask_mov_ps(above_d, below, below_d));
    const __m512 ds = _mm512_mul_ps(_mm512_mask_mov_ps(ds_out, inside, ds_in), gf);
    const __m512 dz_out = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(g, minus_one), s), gf);
    const __m512 dz = _mm512_maskz_mov_ps(static_cast<__mmask16>(~inside), dz_out);  // +0 inside, as the scalar
    const __m512d ds_hi = _mm512_castps_pd(ds), dz_hi = _mm512_castps_pd(dz);
    as0 = _mm512_add_pd(as0, _mm512_cvtps_pd(_mm512_castps512_ps256(ds)));
    as1 = _mm512_add_pd(as1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(ds_hi, 1))));
    az0 = _mm512_add_pd(az0, _mm512_cvtps_pd(_mm512_castps512_ps256(dz)));
    az1 = _mm512_add_pd(az1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(dz_hi, 1))));
  }
  *sum_s += _mm512_reduce_add_pd(_mm512_add_pd(as0, as1));
  *sum_z += _mm512_reduce_add_pd(_mm512_add_pd(az0, az1));
  return j;
}

ACCELOPS_AVX512 void lsq_backward_avx512(const float* x, const float* dy, float* dx, double* acc_s, double* acc_z,
                                         int64_t begin, int64_t count, const QParams& p, float grad_factor) {
  lsq_backward_runs<lsq_run_avx512>(x, dy, dx, acc_s, acc_z, begin, count, p, grad_factor);
}

// ---------------------------------------------------------------- tensor plumbing

}  // namespace

// A new output tensor, its large pages backed by 2 MiB transparent huge pages where the
// kernel allows it (THP "madvise" mode, the common default). These ops are memory-bound
// and write a fresh full-size tensor; on a VM a 4 KiB page fault costs microseconds, and
// first-touch faults of a 64 MiB output measured 4-5x the kernel's own time (67 ms vs
// 14 ms with huge pages). torch offers the same for all its allocations behind
// THP_MEM_ALLOC_ENABLE=1. Advice only: without THP nothing changes. Declared in ops.h:
// the comm family's buffers are just as memory-bound.
#ifdef MADV_POPULATE_WRITE
constexpr int kMadvPopulateWrite = MADV_POPULATE_WRITE;
#else
constexpr int kMadvPopulateWrite = 23;  // Linux's value; older libc headers lack the name
#endif

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t bytes = t.nbytes();
  if (bytes >= 2 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1), end = (p + bytes) & ~(kHuge - 1);
#ifdef MADV_HUGEPAGE
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
    // Fault the whole output in with one call, before any thread writes it: demand faults
    // taken by two threads at once serialise on the address-space lock and measured
    // 9-37 ms for a 32 MiB output here, one populate call 6 ms. Fails harmlessly
    // (EINVAL) on kernels before 5.14, which then fault on first touch as before.
    const uintptr_t first_page = p & ~uintptr_t(4095);
    madvise(reinterpret_cast<void*>(first_page), p + bytes - first_page, kMadvPopulateWrite);
  }
  return t;
}

namespace {

constexpr int64_t kGroupGrain = 2048;  // 8-element groups per chunk (16 Ki elements)

// fn(g0, g1) over [0, groups) in chunks of `grain` that every thread pulls from a shared
// counter until none is left, instead of one fixed half per thread: on a machine shared
// with other jobs one of two threads is often descheduled, and with a fixed split the
// other then waits for its half (OpenMP barrier) where it could have done it. Each chunk
// is a whole number of 8-element groups, so mask bytes are never shared; the results do
// not depend on which thread ran a chunk.
template <typename F>
void parallel_chunks(int64_t groups, int64_t grain, const F& fn) {
  const int64_t chunks = (groups + grain - 1) / grain;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1 || at::in_parallel_region()) {
    fn(0, groups);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed))
      fn(c * grain, std::min(groups, (c + 1) * grain));
  });
}
constexpr int64_t kConvertChunk = 1024;

struct Geometry {
  int64_t channels = 1, inner = 1;
};

Geometry geometry(const at::Tensor& x, std::optional<int64_t> axis) {
  Geometry g;
  if (!axis.has_value()) {
    g.inner = std::max<int64_t>(x.numel(), 1);
    return g;
  }
  const int64_t a = *axis;
  TORCH_CHECK(a >= 0 && a < x.dim(), "fake_quantize: axis ", a, " is out of range for a ", x.dim(), "-D tensor");
  g.channels = x.size(a);
  g.inner = 1;
  for (int64_t d = a + 1; d < x.dim(); ++d) g.inner *= x.size(d);
  g.channels = std::max<int64_t>(g.channels, 1);
  g.inner = std::max<int64_t>(g.inner, 1);
  return g;
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              "fake_quantize: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

void check_range(int64_t qmin, int64_t qmax) {
  TORCH_CHECK(qmin <= qmax, "fake_quantize: quant_min (", qmin, ") must be <= quant_max (", qmax, ")");
  TORCH_CHECK(qmin >= -(int64_t(1) << 24) && qmax <= (int64_t(1) << 24),
              "fake_quantize: quant_min/quant_max must lie in [-2^24, 2^24], got [", qmin, ", ", qmax, "]");
}

// An empty x still has its qparams checked against its shape (a channel axis may be 0 long).
void check_empty(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                 std::optional<int64_t> axis) {
  if (axis.has_value()) TORCH_CHECK(*axis >= 0 && *axis < x.dim(), "fake_quantize: axis ", *axis, " is out of range");
  const int64_t channels = axis.has_value() ? x.size(*axis) : 1;
  TORCH_CHECK(scale.numel() == channels && zero_point.numel() == channels, "fake_quantize: scale and zero_point must have ",
              channels, " element(s), got ", scale.numel(), " and ", zero_point.numel());
}

// Owns the fp32 per-channel arrays a QParams points to.
struct QParamArrays {
  std::vector<float> scale, inv, zero;
  QParams params(const Geometry& g, int64_t qmin, int64_t qmax) const {
    return QParams{scale.data(), inv.data(), zero.data(), g.channels, g.inner, static_cast<float>(qmin),
                   static_cast<float>(qmax)};
  }
};

// zero_mode: 0 = integer zero point used as is (checked in range), 1 = learnable forward
// (round half even, clamp), 2 = learnable backward per tensor (trunc(clamp(z + 0.5))),
// 3 = learnable backward per channel (round, clamp).
QParamArrays qparam_arrays(const at::Tensor& scale, const at::Tensor& zero_point, const Geometry& g, int64_t qmin,
                           int64_t qmax, int zero_mode) {
  TORCH_CHECK(scale.numel() == g.channels, "fake_quantize: scale must have ", g.channels, " element(s), got ",
              scale.numel());
  TORCH_CHECK(zero_point.numel() == g.channels, "fake_quantize: zero_point must have ", g.channels,
              " element(s), got ", zero_point.numel());
  const at::Tensor s = scale.to(at::kFloat).contiguous().reshape(-1);
  const at::Tensor z = zero_point.to(zero_mode == 0 ? at::kLong : at::kFloat).contiguous().reshape(-1);
  QParamArrays a;
  a.scale.resize(g.channels);
  a.inv.resize(g.channels);
  a.zero.resize(g.channels);
  const float* sp = s.data_ptr<float>();
  const float fmin = static_cast<float>(qmin), fmax = static_cast<float>(qmax);
  for (int64_t c = 0; c < g.channels; ++c) {
    TORCH_CHECK(sp[c] > 0.f && std::isfinite(sp[c]), "fake_quantize: scale must be positive and finite, got ",
                sp[c], " for channel ", c);
    a.scale[c] = sp[c];
    a.inv[c] = 1.0f / sp[c];
    if (zero_mode == 0) {
      const int64_t zc = z.data_ptr<int64_t>()[c];
      TORCH_CHECK(zc >= qmin && zc <= qmax, "fake_quantize: zero_point ", zc, " (channel ", c,
                  ") lies outside [quant_min, quant_max] = [", qmin, ", ", qmax, "]");
      a.zero[c] = static_cast<float>(zc);
    } else {
      const float zf = z.data_ptr<float>()[c];
      float r;
      if (zero_mode == 2)
        r = std::trunc(std::min(std::max(zf + 0.5f, fmin), fmax));
      else
        r = std::min(std::max(std::nearbyint(zf), fmin), fmax);
      a.zero[c] = r;
    }
  }
  return a;
}

// Runs the fp32 forward over x (any float dtype; 16-bit types go through fp32 buffers,
// converted exactly as torch converts).
void forward_tensor(const at::Tensor& x, at::Tensor& y, uint8_t* mask, const QParams& p) {
  const Isa isa = fq_isa();
  const int64_t n = x.numel();
  const int64_t groups = (n + 7) / 8;
  if (x.scalar_type() == at::kFloat) {
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    parallel_chunks(groups, kGroupGrain, [&](int64_t g0, int64_t g1) {
      const int64_t b = g0 * 8, e = std::min(g1 * 8, n);
      fq_forward_f32(xp + b, yp + b, mask ? mask + g0 : nullptr, b, e - b, p, isa);
    });
    return;
  }
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "fake_quantize", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    parallel_chunks(groups, kGroupGrain, [&](int64_t g0, int64_t g1) {
      float xb[kConvertChunk], yb[kConvertChunk];
      const int64_t e = std::min(g1 * 8, n);
      for (int64_t b = g0 * 8; b < e; b += kConvertChunk) {
        const int64_t len = std::min(kConvertChunk, e - b);
        for (int64_t i = 0; i < len; ++i) xb[i] = static_cast<float>(xp[b + i]);
        fq_forward_f32(xb, yb, mask ? mask + b / 8 : nullptr, b, len, p, isa);
        for (int64_t i = 0; i < len; ++i) yp[b + i] = static_cast<scalar_t>(yb[i]);
      }
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fake_quantize_cpu(const at::Tensor& x, const at::Tensor& scale,
                                                     const at::Tensor& zero_point, int64_t quant_min,
                                                     int64_t quant_max, std::optional<int64_t> axis) {
  check_float(x, "x");
  check_range(quant_min, quant_max);
  if (x.numel() == 0) {
    check_empty(x, scale, zero_point, axis);
    return {at::empty(x.sizes(), x.options()), at::empty({0}, x.options().dtype(at::kByte))};
  }
  const Geometry g = geometry(x, axis);
  const QParamArrays arrays = qparam_arrays(scale, zero_point, g, quant_min, quant_max, 0);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = empty_output(x.sizes(), x.options());
  at::Tensor mask = empty_output({(x.numel() + 7) / 8}, x.options().dtype(at::kByte));
  forward_tensor(xc, y, mask.data_ptr<uint8_t>(), arrays.params(g, quant_min, quant_max));
  return {y, mask};
}

at::Tensor fake_quantize_backward_cpu(const at::Tensor& grad, const at::Tensor& mask) {
  check_float(grad, "grad");
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 1 && mask.numel() == (grad.numel() + 7) / 8,
              "fake_quantize_backward: mask must be uint8 [ceil(numel / 8)] = [", (grad.numel() + 7) / 8,
              "], got ", mask.scalar_type(), " ", mask.sizes());
  const at::Tensor gc = grad.contiguous();
  const at::Tensor mc = mask.contiguous();
  at::Tensor dx = empty_output(grad.sizes(), grad.options());
  const uint8_t* mp = mc.data_ptr<uint8_t>();
  const Isa isa = fq_isa();
  const int64_t n = grad.numel();
  const int64_t groups = (n + 7) / 8;
  if (grad.scalar_type() == at::kFloat) {
    const float* gp = gc.data_ptr<float>();
    float* dp = dx.data_ptr<float>();
    parallel_chunks(groups, kGroupGrain, [&](int64_t g0, int64_t g1) {
      const int64_t b = g0 * 8, e = std::min(g1 * 8, n);
      fq_backward_f32(gp + b, mp + g0, dp + b, e - b, isa);
    });
    return dx;
  }
  AT_DISPATCH_REDUCED_FLOATING_TYPES(grad.scalar_type(), "fake_quantize_backward", [&] {
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    parallel_chunks(groups, kGroupGrain, [&](int64_t g0, int64_t g1) {
      const int64_t e = std::min(g1 * 8, n);
      for (int64_t i = g0 * 8; i < e; ++i) {
        // the product in the 16-bit type, as torch's dy * mask computes it
        dp[i] = gp[i] * static_cast<scalar_t>(static_cast<float>((mp[i / 8] >> (i % 8)) & 1));
      }
    });
  });
  return dx;
}

at::Tensor fake_quantize_learnable_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                                       int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis,
                                       double grad_factor) {
  (void)grad_factor;  // scales the gradients only
  check_float(x, "x");
  check_range(quant_min, quant_max);
  if (x.numel() == 0) {
    check_empty(x, scale, zero_point, axis);
    return at::empty(x.sizes(), x.options());
  }
  const Geometry g = geometry(x, axis);
  const QParamArrays arrays = qparam_arrays(scale, zero_point, g, quant_min, quant_max, 1);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = empty_output(x.sizes(), x.options());
  forward_tensor(xc, y, nullptr, arrays.params(g, quant_min, quant_max));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_learnable_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis, double grad_factor) {
  check_float(x, "x");
  check_range(quant_min, quant_max);
  TORCH_CHECK(grad.sizes() == x.sizes(), "fake_quantize_learnable_backward: grad shape ", grad.sizes(),
              " differs from x's ", x.sizes());
  if (x.numel() == 0) {
    check_empty(x, scale, zero_point, axis);
    return {at::empty(x.sizes(), grad.options()), at::zeros_like(scale), at::zeros_like(zero_point)};
  }
  const Geometry g = geometry(x, axis);
  const QParamArrays arrays = qparam_arrays(scale, zero_point, g, quant_min, quant_max, axis.has_value() ? 3 : 2);
  const QParams p = arrays.params(g, quant_min, quant_max);
  // The kernel works in fp32 (torch's learnable kernels accept only fp32 x).
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor gf = grad.to(at::kFloat).contiguous();
  at::Tensor dx = empty_output(x.sizes(), xf.options());
  const int64_t n = x.numel();
  const int64_t channels = g.channels;
  const int nthreads = at::get_num_threads();
  const int64_t grain = 1 << 15;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(nthreads, (n + grain - 1) / grain));
  const int64_t per_task = (n + tasks - 1) / tasks;
  std::vector<double> acc_s(tasks * channels, 0.0), acc_z(tasks * channels, 0.0);
  const float* xp = xf.data_ptr<float>();
  const float* gp = gf.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  const Isa isa = fq_isa();
  const float gfac = static_cast<float>(grad_factor);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t * per_task, e = std::min(n, b + per_task);
      if (b >= e) continue;
      double* as = acc_s.data() + t * channels;
      double* az = acc_z.data() + t * channels;
      if (isa == Isa::Avx512Vnni)
        lsq_backward_avx512(xp + b, gp + b, dp + b, as, az, b, e - b, p, gfac);
      else if (isa == Isa::Avx2)
        lsq_backward_avx2(xp + b, gp + b, dp + b, as, az, b, e - b, p, gfac);
      else
        lsq_backward_scalar(xp + b, gp + b, dp + b, as, az, b, e - b, p, gfac);
    }
  });
  at::Tensor dscale = at::zeros({channels}, xf.options());
  at::Tensor dzero = at::zeros({channels}, xf.options());
  float* ds = dscale.data_ptr<float>();
  float* dz = dzero.data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    double s = 0.0, z = 0.0;
    for (int64_t t = 0; t < tasks; ++t) {
      s += acc_s[t * channels + c];
      z += acc_z[t * channels + c];
    }
    ds[c] = static_cast<float>(s);
    dz[c] = static_cast<float>(z);
  }
  return {dx.to(x.scalar_type()), dscale.reshape(scale.sizes()).to(scale.scalar_type()),
          dzero.reshape(zero_point.sizes()).to(zero_point.scalar_type())};
}

}  // namespace accelops
