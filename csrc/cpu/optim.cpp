// 8-bit optimizer family on the CPU: one fused pass per parameter that dequantizes the
// block-wise 8-bit states, takes the AdamW (or SGD-momentum) step in fp32, updates the
// parameter in place and requantizes the states with their new block absmax.
// accelops/reference/optim.py is the spec; codes, scales and the parameter are bit-identical
// to it (the build uses -ffp-contract=off; every op below rounds on its own, in the spec's order).
//
// Nearest code of a non-linear map without a search: the code is #{i : t_i < x} over the 255
// fp32 thresholds t_i. Both built-in maps put at most one threshold in any range of floats
// sharing their top 16 bits (sign, exponent, 7 mantissa bits), so one 32-bit entry per such
// key holds the whole answer: lo = #{t_i < smallest float of the range} and the low 16 bits of
// the one threshold inside the range (0xFFFF when there is none), and
//     code = lo + (low16(x) > entry's low16)      (bits flipped for negative x)
// One table read per element (an AVX2 gather) instead of two (the key's lo, then t_lo). The
// table is built once per map and checked at build time (a map that breaks the property is
// rejected).
//
// The AVX-512 path finds the code without any memory gather (a zmm gather costs about as much
// as 20 other zmm instructions on Zen 4): within one binary octave of |x| the thresholds of a
// dynamic map are nearly evenly spaced (a decade's codes are linear), so a line
// h = round(A * |x| + C) per octave (two lines and their min where a decade boundary bends
// the spacing inside the octave) lands within one code of the answer, and one exact compare
// with the threshold there settles it:
//     g = Z + h (x >= 0) or Zn - h (x < 0), clamped to [0, 255];  code = g + (x > t_g)
// The 32 octaves' lines sit in zmm registers (vpermt2ps by the exponent) and t_g is looked up
// as four byte planes with vpermi2b, 64 codes at a time. The lines are fitted when the table is
// built and then checked exactly, not trusted: g and code are both monotone in |x| inside one
// octave, so "code is g or g + 1" holds for every x in [-1, 1] once it holds at both ends of
// every run of equal codes (each threshold, its float neighbours, the octave ends). Maps that
// cannot be fitted (none of the built-in two) keep the gather. The search needs |x| <= 1, true
// whenever the block absmax is not NaN (x = value / absmax); NaN blocks take the gather.
//
// Blocks are independent, so the work is split over whole blocks (at::parallel_for); each
// block is done in two passes over a per-task buffer of block_size floats that stays in L1:
// the step (writes the parameter and the new fp32 states, reduces absmax), then the requantization.
// Paths: scalar, AVX2 (8 lanes) and AVX-512 (16 lanes, masked tails), chosen at run time
// (cpu_features.h; ACCELOPS_CPU_ISA forces a lower one): all three give the same bits.
//
// adamw8bit_fp8_step_ (AdamW8bit(state_map="fp8")) is the same step with states on the fp8
// maps (m E4M3, v E5M3, see "fp8 maps" below): decode and encode are a few integer ops on 16
// lanes, no table, search, gather or shuffle, which is what made the dynamic maps' step
// compute-bound.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "cpu_features.h"

#define AO_OPT_AVX2 __attribute__((target("avx2")))

namespace accelops {
namespace {

struct QTable {
  float map[256];
  float t[256];           // thresholds t_0..t_254, t_255 = +inf (never below x)
  // per top-16-bit key: lo in bits 0-7, the in-range threshold's (sign-adjusted) low 16 bits in
  // bits 16-31 (see the header comment)
  uint32_t lut[65536];
  // byte k of every map value (planes[k][code]): the AVX-512 path looks codes up in registers
  // (vpermi2b over 4 x 64 bytes per plane) instead of gathering fp32 values
  alignas(64) uint8_t planes[4][256];
  // the AVX-512 code search (header comment): per octave index (see fit_guess) two lines
  // a1 * |x| + c1 and a2 * |x| + c2, the offsets Z and Zn, and the byte planes of t
  bool fit_ok = false;
  bool fit_unsigned = false;  // map[0] = 0 (so Z = 0): negative x needs no mirror (see quantize_fit_avx512)
  alignas(64) float a1[32];
  alignas(64) float c1[32];
  alignas(64) float a2[32];
  alignas(64) float c2[32];
  int32_t z = 0, zn = 0;
  alignas(64) uint8_t tplanes[4][256];
};

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

int count_below(const float* t, float x) {  // #{i < 255 : t_i < x}
  int c = 0;
  for (int i = 0; i < 255; ++i) c += t[i] < x;
  return c;
}


// #{i < 255 : t_i < x} by bisection (x not NaN)
int code_of(const float* t, float x) { return int(std::lower_bound(t, t + 255, x) - t); }

// The AVX-512 search's first guess, as the vector code computes it (x in [-1, 1], not NaN):
// octave index 0-31 from |x|'s biased exponent (96 -> 0: everything below 2^-30 shares index
// 0, far below the smallest threshold; 127 -> 31 is |x| = 1), the min of two lines rounded to
// nearest even (vcvtps2dq), then mirrored for negative x. Not clamped above: the fit check
// requires g <= 255.
int fit_guess(const QTable& q, float x) {
  const uint32_t u = float_bits(x), ab = u & 0x7FFFFFFFu;
  const float a = bits_float(ab);
  const int idx = std::max(int(ab >> 23) - 96, 0);
  const float y = std::min(std::fma(a, q.a1[idx], q.c1[idx]), std::fma(a, q.a2[idx], q.c2[idx]));
  const int h = int(std::nearbyint(y));
  return std::max((u >> 31) ? q.zn - h : q.z + h, 0);
}

// One constraint of the line fit: at |x| = p, round(y) must lie in [lo, hi] (+-inf: unbounded).
struct FitPoint {
  double p, lo, hi;
};

constexpr double kInf = std::numeric_limits<double>::infinity();

// The h values allowed at |x| = a so that both x = a and x = -a get code g or g + 1
// (g = clamp(Z + h) and clamp(Zn - h)); false when no h works.
bool allowed_h(const float* t, int z, int zn, float a, double& lo, double& hi) {
  const int cp = code_of(t, a), cn = code_of(t, -a);
  double lp = cp - 1 - z, hp = cp - z;
  if (cp == 255) hp = kInf;
  if (cp == 0) lp = -kInf, hp = -z;
  double ln = zn - cn, hn = zn - cn + 1;
  if (cn == 0) ln = zn, hn = kInf;
  if (cn == 255) ln = -kInf, hn = zn - 254;
  lo = std::max(lp, ln);
  hi = std::min(hp, hn);
  return lo <= hi;
}

// For slope a: the widest band of intercepts c with lo - 0.5 <= a * p + c <= hi + 0.5 at every
// point; returns its width (negative: none) and its middle in c.
double fit_margin(const std::vector<FitPoint>& pts, double a, double& c) {
  double cmax = kInf, cmin = -kInf;
  for (const FitPoint& f : pts) {
    if (f.hi != kInf) cmax = std::min(cmax, f.hi + 0.5 - a * f.p);
    if (f.lo != -kInf) cmin = std::max(cmin, f.lo - 0.5 - a * f.p);
  }
  if (cmax == kInf || cmin == -kInf) {
    c = cmax == kInf ? (cmin == -kInf ? 0.0 : cmin + 1) : cmax - 1;
    return 1e9;
  }
  c = 0.5 * (cmin + cmax);
  return cmax - cmin;
}

// The line with the widest margin (a concave function of the slope: ternary search).
double fit_line(const std::vector<FitPoint>& pts, double& a, double& c) {
  a = 0, c = 0;
  if (pts.empty()) return 1e9;
  double pmin = kInf, pmax = -kInf, hmin = kInf, hmax = -kInf;
  for (const FitPoint& f : pts) {
    pmin = std::min(pmin, f.p), pmax = std::max(pmax, f.p);
    for (double h : {f.lo, f.hi})
      if (std::isfinite(h)) hmin = std::min(hmin, h), hmax = std::max(hmax, h);
  }
  double lo = 0, hi = (hmax > hmin && pmax > pmin) ? 4 * (hmax - hmin + 2) / (pmax - pmin) : 1.0;
  for (int it = 0; it < 100; ++it) {
    const double m1 = lo + (hi - lo) / 3, m2 = hi - (hi - lo) / 3;
    if (fit_margin(pts, m1, c) < fit_margin(pts, m2, c)) lo = m1;
    else hi = m2;
  }
  a = 0.5 * (lo + hi);
  return fit_margin(pts, a, c);
}

// Fits the lines of every octave and checks them (header comment); leaves q.fit_ok false when
// the map cannot be handled this way.
void build_fit(QTable& q) {
  q.fit_ok = false;
  if (!(q.map[0] >= -1.f && q.map[255] <= 1.f)) return;  // the search clamps nothing: |x| <= 1
  for (int i = 0; i < 256; ++i)
    for (int k = 0; k < 4; ++k) q.tplanes[k][i] = uint8_t(float_bits(q.t[i]) >> (8 * k));
  const int z = code_of(q.t, 0.f);
  auto next = [](float a) { return std::nextafter(a, 2.f); };
  auto prev = [](float a) { return std::nextafter(a, -1.f); };
  for (int zn : {z, z + 1, z - 1}) {
    q.z = z, q.zn = zn;
    bool ok = true;
    for (int idx = 0; idx < 32 && ok; ++idx) {
      const float s0 = idx == 0 ? 0.f : std::ldexp(1.f, idx - 31);
      const float s1 = idx == 31 ? 1.f : prev(std::ldexp(1.f, idx - 30));
      // where a code of x or -x can change inside [s0, s1], and the ends
      std::vector<float> at{s0, s1};
      for (int i = 0; i < 255; ++i) {
        const float m = std::fabs(q.t[i]);
        for (float p : {m, prev(m), next(m)})
          if (p >= s0 && p <= s1) at.push_back(p);
      }
      std::sort(at.begin(), at.end());
      at.erase(std::unique(at.begin(), at.end()), at.end());
      std::vector<FitPoint> pts;
      for (float p : at) {
        FitPoint f{p, 0, 0};
        ok = ok && allowed_h(q.t, z, zn, p, f.lo, f.hi);
        pts.push_back(f);
      }
      if (!ok) break;
      auto check = [&](double a1, double c1, double a2, double c2) {
        q.a1[idx] = float(a1), q.c1[idx] = float(c1), q.a2[idx] = float(a2), q.c2[idx] = float(c2);
        for (float p : at)
          for (float x : {p, -p}) {
            const int g = fit_guess(q, x), c = code_of(q.t, x);
            if (g > 255 || (c != g && c != g + 1)) return false;
          }
        return true;
      };
      double a, c;
      if (fit_line(pts, a, c) > 0.05 && check(a, c, a, c)) continue;
      // two lines, split at one of the points: the min of them follows the lower piece, then
      // the upper one (the spacing widens going up a decade, so the pieces meet concavely)
      double best = 0, b1 = 0, b2 = 0, b3 = 0, b4 = 0;
      for (size_t j = 1; j < pts.size(); ++j) {
        const std::vector<FitPoint> below(pts.begin(), pts.begin() + j), above(pts.begin() + j, pts.end());
        double la, lc, ua, uc;
        const double m = std::min(fit_line(below, la, lc), fit_line(above, ua, uc));
        if (m > std::max(best, 0.05) && check(la, lc, ua, uc)) best = m, b1 = la, b2 = lc, b3 = ua, b4 = uc;
      }
      ok = best > 0 && check(b1, b2, b3, b4);
    }
    if (ok) {
      q.fit_ok = true;
      q.fit_unsigned = q.map[0] == 0.f && z == 0;
      return;
    }
  }
}

std::unique_ptr<QTable> build_table(const float* map) {
  auto q = std::make_unique<QTable>();
  std::memcpy(q->map, map, sizeof(q->map));
  for (int i = 0; i < 255; ++i) {
    TORCH_CHECK(map[i] < map[i + 1], "accelops optim: the quantization map must be strictly increasing");
    q->t[i] = (map[i] + map[i + 1]) * 0.5f;
  }
  q->t[255] = std::numeric_limits<float>::infinity();
  for (int i = 0; i < 256; ++i)
    for (int k = 0; k < 4; ++k) q->planes[k][i] = uint8_t(float_bits(map[i]) >> (8 * k));
  for (uint32_t key = 0; key < 65536; ++key) {
    const bool negative = key & 0x8000;
    // the numerically smallest and largest floats whose top 16 bits are `key`
    const float a = bits_float((key << 16) | (negative ? 0xFFFFu : 0u));
    const float b = bits_float((key << 16) | (negative ? 0u : 0xFFFFu));
    const int lo = count_below(q->t, a);
    if (a == a && b == b) {
      TORCH_CHECK(count_below(q->t, b) - lo <= 1,
                  "accelops optim: the quantization map has two thresholds in one 16-bit float range");
    }
    // t_lo >= a by the definition of lo; when it is also <= b it lies in this range, and
    // t_lo < x compares the low 16 bits (reversed for negative floats, whose magnitude grows
    // with the bits). Otherwise t_lo < x is false over the whole range: 0xFFFF never compares below.
    uint32_t thr = 0xFFFFu;
    if (lo < 255 && q->t[lo] <= b) {
      const uint32_t low = float_bits(q->t[lo]) & 0xFFFFu;
      thr = negative ? (~low & 0xFFFFu) : low;
    }
    q->lut[key] = uint32_t(lo) | (thr << 16);  // NaN keys: the kernels force NaN x to code 0
  }
  build_fit(*q);
  return q;
}

// One table per distinct map (in practice two: signed and unsigned), built on first use.
const QTable& table_for(const at::Tensor& qmap) {
  TORCH_CHECK(qmap.scalar_type() == at::kFloat && qmap.numel() == 256 && qmap.is_contiguous() &&
                  qmap.device().is_cpu(),
              "accelops optim: the quantization map must be a contiguous fp32 CPU tensor of 256 values");
  static std::mutex mu;
  static std::vector<std::unique_ptr<QTable>> tables;
  const float* m = qmap.data_ptr<float>();
  std::lock_guard<std::mutex> lock(mu);
  for (auto& t : tables)
    if (!std::memcmp(t->map, m, sizeof(t->map))) return *t;
  tables.push_back(build_table(m));
  return *tables.back();
}

// The low 16 bits of x as compared with a lut entry's threshold: flipped for negative x.
inline uint32_t cmp_bits(uint32_t u) { return (u ^ uint32_t(int32_t(u) >> 31)) & 0xFFFFu; }

inline uint8_t quantize_one(const QTable& q, float x) {
  if (x != x) return 0;
  const uint32_t u = float_bits(x), e = q.lut[u >> 16];
  return uint8_t((e & 0xFFu) + (cmp_bits(u) > (e >> 16)));
}

// NaN-sticky absmax: a NaN anywhere in the block makes its scale NaN (as torch.amax).
struct AbsMax {
  float v = 0.f;
  bool nan = false;
  void add(float x) {
    const float a = std::fabs(x);
    if (a != a) nan = true;
    else if (a > v) v = a;
  }
  float get() const { return nan ? std::numeric_limits<float>::quiet_NaN() : v; }
};

inline float divisor(float absmax) { return absmax > 0.f ? absmax : 1.f; }

struct AdamScalars {
  float b1, c1, b2, c2, decay, step_size, bc2_sqrt, eps;
};

struct SgdScalars {
  float lr, mu, damp_c, wd;
  bool has_wd, nesterov, first;
};

template <typename T>
inline float load_f(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// ------------------------------------------------------------------ scalar path

template <typename T>
void adamw_step_range(T* p, const T* g, int64_t i0, int64_t i1, const QTable& qm, const QTable& qv,
                      const uint8_t* mc, const uint8_t* vc, float s1, float s2, const AdamScalars& s, float* mbuf,
                      float* vbuf, AbsMax& a1, AbsMax& a2) {
  for (int64_t i = i0; i < i1; ++i) {
    const float gi = load_f(g, i);
    float pi = load_f(p, i);
    const float mo = qm.map[mc[i]] * s1;
    const float vo = qv.map[vc[i]] * s2;
    const float m = s.b1 * mo + s.c1 * gi;
    const float v = s.b2 * vo + (s.c2 * gi) * gi;
    pi = pi * s.decay;
    const float denom = std::sqrt(v) / s.bc2_sqrt + s.eps;
    pi = pi - s.step_size * (m / denom);
    p[i] = static_cast<T>(pi);
    mbuf[i] = m;
    vbuf[i] = v;
    a1.add(m);
    a2.add(v);
  }
}

void quantize_range(const QTable& q, const float* x, int64_t i0, int64_t i1, float div, uint8_t* codes) {
  for (int64_t i = i0; i < i1; ++i) codes[i] = quantize_one(q, x[i] / div);
}

template <typename T>
void sgd_step_range(T* p, const T* g, int64_t i0, int64_t i1, const QTable& q, const uint8_t* c, float s,
                    const SgdScalars& k, float* buf, AbsMax& a) {
  for (int64_t i = i0; i < i1; ++i) {
    float gi = load_f(g, i);
    float pi = load_f(p, i);
    if (k.has_wd) gi = gi + k.wd * pi;
    const float b = k.first ? gi : k.mu * (q.map[c[i]] * s) + k.damp_c * gi;
    const float d = k.nesterov ? gi + k.mu * b : b;
    pi = pi - k.lr * d;
    p[i] = static_cast<T>(pi);
    buf[i] = b;
    a.add(b);
  }
}

// ------------------------------------------------------------------ AVX2 path (fp32 params)

AO_OPT_AVX2 inline __m256 dequant8(const QTable& q, const uint8_t* c, __m256 scale) {
  const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
  return _mm256_mul_ps(_mm256_i32gather_ps(q.map, idx, 4), scale);
}

AO_OPT_AVX2 inline void absmax8(__m256 x, __m256& amax, __m256& nan) {
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.f), x);
  nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  amax = _mm256_max_ps(amax, a);  // a NaN lane is caught by `nan`
}

AO_OPT_AVX2 inline void absmax_finish(__m256 amax, __m256 nan, AbsMax& out) {
  alignas(32) float a[8];
  _mm256_store_ps(a, amax);
  if (_mm256_movemask_ps(nan)) out.nan = true;
  for (int j = 0; j < 8; ++j)
    if (a[j] == a[j]) out.add(a[j]);
}

AO_OPT_AVX2 void quantize_range_avx2(const QTable& q, const float* x, int64_t i0, int64_t i1, float div,
                                     uint8_t* codes) {
  const __m256 vdiv = _mm256_set1_ps(div);
  const __m256i byte = _mm256_set1_epi32(0xFF), low16 = _mm256_set1_epi32(0xFFFF),
                one = _mm256_set1_epi32(1);
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    const __m256 xv = _mm256_div_ps(_mm256_loadu_ps(x + i), vdiv);
    const __m256i u = _mm256_castps_si256(xv);
    const __m256i e = _mm256_i32gather_epi32(reinterpret_cast<const int*>(q.lut), _mm256_srli_epi32(u, 16), 4);
    const __m256i xc = _mm256_and_si256(_mm256_xor_si256(u, _mm256_srai_epi32(u, 31)), low16);
    // unsigned 16-bit values compared as signed 32-bit ints
    const __m256i gt = _mm256_cmpgt_epi32(xc, _mm256_srli_epi32(e, 16));
    __m256i code = _mm256_add_epi32(_mm256_and_si256(e, byte), _mm256_and_si256(gt, one));
    code = _mm256_andnot_si256(_mm256_castps_si256(_mm256_cmp_ps(xv, xv, _CMP_UNORD_Q)), code);
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packus_epi16(w, w));
  }
  quantize_range(q, x, i, i1, div, codes);
}

AO_OPT_AVX2 void adamw_block_avx2(float* p, const float* g, int64_t n, const QTable& qm, const QTable& qv,
                                  const uint8_t* mc, const uint8_t* vc, float s1, float s2, const AdamScalars& s,
                                  float* mbuf, float* vbuf, AbsMax& a1, AbsMax& a2) {
  const __m256 vs1 = _mm256_set1_ps(s1), vs2 = _mm256_set1_ps(s2);
  const __m256 b1 = _mm256_set1_ps(s.b1), c1 = _mm256_set1_ps(s.c1), b2 = _mm256_set1_ps(s.b2),
               c2 = _mm256_set1_ps(s.c2), decay = _mm256_set1_ps(s.decay), step = _mm256_set1_ps(s.step_size),
               bc2 = _mm256_set1_ps(s.bc2_sqrt), eps = _mm256_set1_ps(s.eps);
  __m256 am1 = _mm256_setzero_ps(), am2 = _mm256_setzero_ps(), nan1 = _mm256_setzero_ps(),
         nan2 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    __m256 pv = _mm256_loadu_ps(p + i);
    const __m256 mo = dequant8(qm, mc + i, vs1);
    const __m256 vo = dequant8(qv, vc + i, vs2);
    const __m256 m = _mm256_add_ps(_mm256_mul_ps(b1, mo), _mm256_mul_ps(c1, gv));
    const __m256 v = _mm256_add_ps(_mm256_mul_ps(b2, vo), _mm256_mul_ps(_mm256_mul_ps(c2, gv), gv));
    pv = _mm256_mul_ps(pv, decay);
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), bc2), eps);
    pv = _mm256_sub_ps(pv, _mm256_mul_ps(step, _mm256_div_ps(m, denom)));
    _mm256_storeu_ps(p + i, pv);
    _mm256_storeu_ps(mbuf + i, m);
    _mm256_storeu_ps(vbuf + i, v);
    absmax8(m, am1, nan1);
    absmax8(v, am2, nan2);
  }
  absmax_finish(am1, nan1, a1);
  absmax_finish(am2, nan2, a2);
  adamw_step_range(p, g, i, n, qm, qv, mc, vc, s1, s2, s, mbuf, vbuf, a1, a2);
}

AO_OPT_AVX2 void sgd_block_avx2(float* p, const float* g, int64_t n, const QTable& q, const uint8_t* c, float s,
                                const SgdScalars& k, float* buf, AbsMax& a) {
  const __m256 vs = _mm256_set1_ps(s), lr = _mm256_set1_ps(k.lr), mu = _mm256_set1_ps(k.mu),
               dc = _mm256_set1_ps(k.damp_c), wd = _mm256_set1_ps(k.wd);
  __m256 am = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 gv = _mm256_loadu_ps(g + i);
    __m256 pv = _mm256_loadu_ps(p + i);
    if (k.has_wd) gv = _mm256_add_ps(gv, _mm256_mul_ps(wd, pv));
    const __m256 b = k.first ? gv : _mm256_add_ps(_mm256_mul_ps(mu, dequant8(q, c + i, vs)), _mm256_mul_ps(dc, gv));
    const __m256 d = k.nesterov ? _mm256_add_ps(gv, _mm256_mul_ps(mu, b)) : b;
    pv = _mm256_sub_ps(pv, _mm256_mul_ps(lr, d));
    _mm256_storeu_ps(p + i, pv);
    _mm256_storeu_ps(buf + i, b);
    absmax8(b, am, nan);
  }
  absmax_finish(am, nan, a);
  sgd_step_range(p, g, i, n, q, c, s, k, buf, a);
}

// ------------------------------------------------------------------ AVX-512 path (fp32 params)
// 16 lanes. The tail of a block (and a block shorter than 16) runs the same code under a lane
// mask: masked-off lanes load zeros, are never stored and are kept out of the absmax.

#define AO_OPT_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vbmi")))

AO_OPT_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
}

// 64 byte indices into a 256-entry table of 4-byte values stored as 4 byte planes
// (planes[k][i] = byte k of entry i) -> the 64 entries as 4 x 16 dwords: two vpermi2b a plane
// (indices 0-127, 128-255) and a blend on the index's top bit, then the planes unpacked into
// dwords (within 128-bit lanes: the dword order follows the index bytes' lane layout).
AO_OPT_AVX512 inline void lookup_planes(const uint8_t (*planes)[256], __m512i idx, __m512i* out) {
  const __mmask64 high = _mm512_movepi8_mask(idx);
  __m512i b[4];
  for (int k = 0; k < 4; ++k) {
    const uint8_t* pl = planes[k];
    const __m512i lo = _mm512_permutex2var_epi8(_mm512_load_si512(pl), idx, _mm512_load_si512(pl + 64));
    const __m512i hi = _mm512_permutex2var_epi8(_mm512_load_si512(pl + 128), idx, _mm512_load_si512(pl + 192));
    b[k] = _mm512_mask_blend_epi8(high, lo, hi);
  }
  const __m512i w01l = _mm512_unpacklo_epi8(b[0], b[1]), w01h = _mm512_unpackhi_epi8(b[0], b[1]);
  const __m512i w23l = _mm512_unpacklo_epi8(b[2], b[3]), w23h = _mm512_unpackhi_epi8(b[2], b[3]);
  out[0] = _mm512_unpacklo_epi16(w01l, w23l);
  out[1] = _mm512_unpackhi_epi16(w01l, w23l);
  out[2] = _mm512_unpacklo_epi16(w01h, w23h);
  out[3] = _mm512_unpackhi_epi16(w01h, w23h);
}

// 64 codes -> their 64 map values as 4 x 16 fp32 lanes in order, without a gather (a zmm
// gather costs about as much as the whole AdamW arithmetic on Zen 4). Each byte plane of the
// map is looked up with two vpermi2b (codes 0-127, 128-255) and a blend on the code's top bit;
// unpacking the 4 byte planes into dwords works within 128-bit lanes, so the codes are first
// permuted (a 4 x 4 transpose of 4-byte groups) to make the unpacked dwords come out in order.
AO_OPT_AVX512 inline void dequant64(const QTable& q, __m512i codes, __m512* out) {
  static const struct Perm {
    alignas(64) uint8_t idx[64];
    Perm() {
      for (int lane = 0; lane < 4; ++lane)
        for (int j = 0; j < 4; ++j)
          for (int r = 0; r < 4; ++r) idx[16 * lane + 4 * j + r] = uint8_t(16 * j + 4 * lane + r);
    }
  } perm;
  const __m512i c = _mm512_permutexvar_epi8(_mm512_load_si512(perm.idx), codes);
  __m512i values[4];
  lookup_planes(q.planes, c, values);
  for (int k = 0; k < 4; ++k) out[k] = _mm512_castsi512_ps(values[k]);
}

AO_OPT_AVX512 inline __m512i load_codes64(const uint8_t* c, int64_t left) {
  return _mm512_maskz_loadu_epi8(left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1, c);
}

// NaN-sticky absmax as an unsigned max of |x|'s bits: every NaN pattern is above +inf, which
// is above every finite magnitude, so one integer max per vector keeps both the max and any NaN
// (a float max would drop NaN lanes, and a separate NaN test costs two more instructions).
AO_OPT_AVX512 inline void absmax16(__m512 x, __mmask16 k, __m512i& amax) {
  const __m512i ab = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF));
  amax = _mm512_mask_max_epu32(amax, k, amax, ab);
}

AO_OPT_AVX512 inline void absmax16_finish(__m512i amax, AbsMax& out) {
  out.add(bits_float(uint32_t(_mm512_reduce_max_epu32(amax))));  // AbsMax::add keeps a NaN
}

AO_OPT_AVX512 void quantize_gather_avx512(const QTable& q, const float* x, int64_t n, float div, uint8_t* codes) {
  const __m512 vdiv = _mm512_set1_ps(div);
  const __m512i byte = _mm512_set1_epi32(0xFF), low16 = _mm512_set1_epi32(0xFFFF), one = _mm512_set1_epi32(1);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 xv = _mm512_div_ps(_mm512_maskz_loadu_ps(k, x + i), vdiv);
    const __m512i u = _mm512_castps_si512(xv);
    const __m512i e = _mm512_i32gather_epi32(_mm512_srli_epi32(u, 16), q.lut, 4);
    const __m512i xc = _mm512_and_si512(_mm512_xor_si512(u, _mm512_srai_epi32(u, 31)), low16);
    const __mmask16 gt = _mm512_cmpgt_epu32_mask(xc, _mm512_srli_epi32(e, 16));
    __m512i code = _mm512_and_si512(e, byte);
    code = _mm512_mask_add_epi32(code, gt, code, one);
    code = _mm512_maskz_mov_epi32(__mmask16(~_mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q)), code);
    _mm512_mask_cvtepi32_storeu_epi8(codes + i, k, code);
  }
}

// The gather-free search (header comment), 64 codes a round. Needs every x / div in [-1, 1] or
// NaN (the block absmax not NaN). Unsigned: the map starts at 0, so every threshold is > 0 and
// any x <= 0 (or NaN) has code 0; the search then takes max(x, +0) (NaN -> +0) instead of |x|
// and the sign: g is the guess at +0, which the fit check holds at 0 (code 0), and
// x > t_0 is false, so code 0 again, with three fewer instructions for each 16 values.
template <bool Unsigned>
AO_OPT_AVX512 void quantize_fit_avx512(const QTable& q, const float* x, int64_t n, float div, uint8_t* codes) {
  // the saturating packs below leave the 4 x 16 dwords as a 4 x 4 transpose of 4-byte groups:
  // the order the byte-plane lookup wants (see dequant64); this puts the codes back in order
  static const struct Order {
    alignas(64) int32_t idx[16];
    Order() {
      for (int k = 0; k < 4; ++k)
        for (int lane = 0; lane < 4; ++lane) idx[4 * k + lane] = 4 * lane + k;
    }
  } order;
  const __m512 vdiv = _mm512_set1_ps(div);
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF), e96 = _mm512_set1_epi32(96),
                zero = _mm512_setzero_si512(), vz = _mm512_set1_epi32(q.z), vzn = _mm512_set1_epi32(q.zn),
                one8 = _mm512_set1_epi8(1), vorder = _mm512_load_si512(order.idx);
  const __m512 a1l = _mm512_load_ps(q.a1), a1h = _mm512_load_ps(q.a1 + 16), c1l = _mm512_load_ps(q.c1),
               c1h = _mm512_load_ps(q.c1 + 16), a2l = _mm512_load_ps(q.a2), a2h = _mm512_load_ps(q.a2 + 16),
               c2l = _mm512_load_ps(q.c2), c2h = _mm512_load_ps(q.c2 + 16);
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    __m512 xv[4];
    __m512i g[4];
    for (int j = 0; j < 4; ++j) {
      const int64_t left = n - i0 - 16 * j;
      const __mmask16 k = left <= 0 ? __mmask16(0) : tail_mask(left);
      xv[j] = _mm512_div_ps(_mm512_maskz_loadu_ps(k, x + i0 + 16 * j), vdiv);
      const __m512i u = _mm512_castps_si512(xv[j]);
      const __m512 a = Unsigned ? _mm512_max_ps(xv[j], _mm512_setzero_ps())
                                : _mm512_castsi512_ps(_mm512_and_si512(u, absmask));
      const __m512i ab = _mm512_castps_si512(a);
      // the octave index: vpermt2ps reads the low 5 bits of the biased exponent, 96-127 -> 0-31
      const __m512i idx = _mm512_max_epi32(_mm512_srli_epi32(ab, 23), e96);
      const __m512 y1 =
          _mm512_fmadd_ps(a, _mm512_permutex2var_ps(a1l, idx, a1h), _mm512_permutex2var_ps(c1l, idx, c1h));
      const __m512 y2 =
          _mm512_fmadd_ps(a, _mm512_permutex2var_ps(a2l, idx, a2h), _mm512_permutex2var_ps(c2l, idx, c2h));
      // a NaN x makes y NaN, h 0x80000000 and g negative: g clamps to 0 below and NaN > t_0
      // is false, so NaN gets code 0 with no test of its own
      const __m512i h = _mm512_cvtps_epi32(_mm512_min_ps(y1, y2));
      g[j] = Unsigned ? h : _mm512_mask_sub_epi32(_mm512_add_epi32(h, vz), _mm512_cmplt_epi32_mask(u, zero), vzn, h);
    }
    // unsigned saturation clamps g to [0, 255]
    const __m512i gp = _mm512_packus_epi16(_mm512_packus_epi32(g[0], g[1]), _mm512_packus_epi32(g[2], g[3]));
    __m512i tg[4];
    lookup_planes(q.tplanes, gp, tg);
    __mmask64 above = 0;  // x > t_g (false for NaN)
    for (int j = 0; j < 4; ++j)
      above |= __mmask64(_mm512_cmp_ps_mask(xv[j], _mm512_castsi512_ps(tg[j]), _CMP_GT_OQ)) << (16 * j);
    const __m512i ge = _mm512_permutexvar_epi32(vorder, gp);
    const __m512i code = _mm512_mask_add_epi8(ge, above, ge, one8);
    const int64_t left = n - i0;
    _mm512_mask_storeu_epi8(codes + i0, left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1, code);
  }
}

// absmax_ok: the block's absmax is not NaN, so every x / div is in [-1, 1] or NaN
AO_OPT_AVX512 void quantize_range_avx512(const QTable& q, const float* x, int64_t n, float div, bool absmax_ok,
                                         uint8_t* codes) {
  if (q.fit_ok && absmax_ok && q.fit_unsigned) quantize_fit_avx512<true>(q, x, n, div, codes);
  else if (q.fit_ok && absmax_ok) quantize_fit_avx512<false>(q, x, n, div, codes);
  else quantize_gather_avx512(q, x, n, div, codes);
}

AO_OPT_AVX512 void adamw_block_avx512(float* p, const float* g, int64_t n, const QTable& qm, const QTable& qv,
                                      const uint8_t* mc, const uint8_t* vc, float s1, float s2,
                                      const AdamScalars& s, float* mbuf, float* vbuf, AbsMax& a1, AbsMax& a2) {
  const __m512 vs1 = _mm512_set1_ps(s1), vs2 = _mm512_set1_ps(s2);
  const __m512 b1 = _mm512_set1_ps(s.b1), c1 = _mm512_set1_ps(s.c1), b2 = _mm512_set1_ps(s.b2),
               c2 = _mm512_set1_ps(s.c2), decay = _mm512_set1_ps(s.decay), step = _mm512_set1_ps(s.step_size),
               bc2 = _mm512_set1_ps(s.bc2_sqrt), eps = _mm512_set1_ps(s.eps);
  __m512i am1 = _mm512_setzero_si512(), am2 = _mm512_setzero_si512();
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    __m512 mq[4], vq[4];
    dequant64(qm, load_codes64(mc + i0, n - i0), mq);
    dequant64(qv, load_codes64(vc + i0, n - i0), vq);
    for (int j = 0; j < 4 && i0 + 16 * j < n; ++j) {
      const int64_t i = i0 + 16 * j;
      const __mmask16 k = tail_mask(n - i);
      const __m512 gv = _mm512_maskz_loadu_ps(k, g + i);
      __m512 pv = _mm512_maskz_loadu_ps(k, p + i);
      const __m512 mo = _mm512_mul_ps(mq[j], vs1);
      const __m512 vo = _mm512_mul_ps(vq[j], vs2);
      const __m512 m = _mm512_add_ps(_mm512_mul_ps(b1, mo), _mm512_mul_ps(c1, gv));
      const __m512 v = _mm512_add_ps(_mm512_mul_ps(b2, vo), _mm512_mul_ps(_mm512_mul_ps(c2, gv), gv));
      pv = _mm512_mul_ps(pv, decay);
      const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), bc2), eps);
      pv = _mm512_sub_ps(pv, _mm512_mul_ps(step, _mm512_div_ps(m, denom)));
      _mm512_mask_storeu_ps(p + i, k, pv);
      _mm512_mask_storeu_ps(mbuf + i, k, m);
      _mm512_mask_storeu_ps(vbuf + i, k, v);
      absmax16(m, k, am1);
      absmax16(v, k, am2);
    }
  }
  absmax16_finish(am1, a1);
  absmax16_finish(am2, a2);
}

AO_OPT_AVX512 void sgd_block_avx512(float* p, const float* g, int64_t n, const QTable& q, const uint8_t* c, float s,
                                    const SgdScalars& k, float* buf, AbsMax& a) {
  const __m512 vs = _mm512_set1_ps(s), lr = _mm512_set1_ps(k.lr), mu = _mm512_set1_ps(k.mu),
               dc = _mm512_set1_ps(k.damp_c), wd = _mm512_set1_ps(k.wd);
  __m512i am = _mm512_setzero_si512();
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    __m512 bq[4];
    if (!k.first) dequant64(q, load_codes64(c + i0, n - i0), bq);
    for (int j = 0; j < 4 && i0 + 16 * j < n; ++j) {
      const int64_t i = i0 + 16 * j;
      const __mmask16 lanes = tail_mask(n - i);
      __m512 gv = _mm512_maskz_loadu_ps(lanes, g + i);
      __m512 pv = _mm512_maskz_loadu_ps(lanes, p + i);
      if (k.has_wd) gv = _mm512_add_ps(gv, _mm512_mul_ps(wd, pv));
      const __m512 b =
          k.first ? gv : _mm512_add_ps(_mm512_mul_ps(mu, _mm512_mul_ps(bq[j], vs)), _mm512_mul_ps(dc, gv));
      const __m512 d = k.nesterov ? _mm512_add_ps(gv, _mm512_mul_ps(mu, b)) : b;
      pv = _mm512_sub_ps(pv, _mm512_mul_ps(lr, d));
      _mm512_mask_storeu_ps(p + i, lanes, pv);
      _mm512_mask_storeu_ps(buf + i, lanes, b);
      absmax16(b, lanes, am);
    }
  }
  absmax16_finish(am, a);
}

// ------------------------------------------------------------------ fp8 maps (state_map="fp8")
// A code is a tiny float relative to the block absmax (reference: "The fp8 maps"): m signed
// E4M3 (sign, 4 exponent, 3 mantissa bits; 1.0 = 120), v unsigned E5M3 (1.0 = 248); code 0 is
// zero. Decoding puts the code's exponent and mantissa bits into an fp32's fields:
//     bits = c ? (c << 20) + bias : 0, plus m's sign bit
// and encoding is round-to-nearest-even of x's fp32 bits to 3 mantissa bits after moving the
// exponent down by the bias: integer adds and shifts on 16 lanes, no table, no gather, no
// shuffle. x = value * fl(1 / divisor): one division per block instead of one per element
// (the step's own divisions and square root already keep Zen 4's divider the busiest unit).

constexpr uint32_t kFp8BiasM = 112u << 23, kFp8BiasV = 96u << 23;
constexpr uint32_t kOneBits = 0x3F800000u, kInfBits = 0x7F800000u;

template <bool Signed>
constexpr uint32_t fp8_bias() {
  return Signed ? kFp8BiasM : kFp8BiasV;
}

template <bool Signed>
inline uint8_t fp8_encode(float x) {
  const uint32_t u = float_bits(x);
  uint32_t a = Signed ? (u & 0x7FFFFFFFu) : (int32_t(u) < 0 ? 0u : u);
  if (a > kInfBits) return 0;  // NaN
  a = std::min(a, kOneBits);
  a = a > fp8_bias<Signed>() ? a - fp8_bias<Signed>() : 0u;
  const uint32_t c = (a + 0x7FFFFu + ((a >> 20) & 1u)) >> 20;
  return uint8_t(Signed ? (c | ((u >> 24) & 0x80u)) : c);
}

template <bool Signed>
inline float fp8_decode(uint8_t code) {
  const uint32_t c = Signed ? (code & 0x7Fu) : code;
  uint32_t bits = c ? (c << 20) + fp8_bias<Signed>() : 0u;
  if (Signed) bits |= uint32_t(code & 0x80u) << 24;
  return bits_float(bits);
}

inline float fp8_recip(float absmax) { return 1.f / divisor(absmax); }

template <bool Signed>
void quantize_fp8_range(const float* x, int64_t i0, int64_t i1, float r, uint8_t* codes) {
  for (int64_t i = i0; i < i1; ++i) codes[i] = fp8_encode<Signed>(x[i] * r);
}

template <typename T>
void adamw_fp8_step_range(T* p, const T* g, int64_t i0, int64_t i1, const uint8_t* mc, const uint8_t* vc, float s1,
                          float s2, const AdamScalars& s, float* mbuf, float* vbuf, AbsMax& a1, AbsMax& a2) {
  for (int64_t i = i0; i < i1; ++i) {
    const float gi = load_f(g, i);
    float pi = load_f(p, i);
    const float mo = fp8_decode<true>(mc[i]) * s1;
    const float vo = fp8_decode<false>(vc[i]) * s2;
    const float m = s.b1 * mo + s.c1 * gi;
    const float v = s.b2 * vo + (s.c2 * gi) * gi;
    pi = pi * s.decay;
    const float denom = std::sqrt(v) / s.bc2_sqrt + s.eps;
    pi = pi - s.step_size * (m / denom);
    p[i] = static_cast<T>(pi);
    mbuf[i] = m;
    vbuf[i] = v;
    a1.add(m);
    a2.add(v);
  }
}

template <bool Signed>
AO_OPT_AVX2 inline __m256 fp8_decode8(const uint8_t* codes) {
  const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
  const __m256i mag = Signed ? _mm256_and_si256(c, _mm256_set1_epi32(0x7F)) : c;
  __m256i bits = _mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(int(fp8_bias<Signed>())));
  bits = _mm256_andnot_si256(_mm256_cmpeq_epi32(mag, _mm256_setzero_si256()), bits);
  if (Signed) bits = _mm256_or_si256(bits, _mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x80)), 24));
  return _mm256_castsi256_ps(bits);
}

template <bool Signed>
AO_OPT_AVX2 void quantize_fp8_avx2(const float* x, int64_t n, float r, uint8_t* codes) {
  const __m256 vr = _mm256_set1_ps(r);
  const __m256i inf = _mm256_set1_epi32(int(kInfBits)), one = _mm256_set1_epi32(int(kOneBits)),
                bias = _mm256_set1_epi32(int(fp8_bias<Signed>())), half = _mm256_set1_epi32(0x7FFFF),
                lsb = _mm256_set1_epi32(1), zero = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i u = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(x + i), vr));
    __m256i a = Signed ? _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)) : _mm256_max_epi32(u, zero);
    const __m256i nan = _mm256_cmpgt_epi32(a, inf);  // a >= 0: the signed compare is the unsigned one
    a = _mm256_max_epi32(_mm256_sub_epi32(_mm256_min_epi32(a, one), bias), zero);
    a = _mm256_add_epi32(_mm256_add_epi32(a, half), _mm256_and_si256(_mm256_srli_epi32(a, 20), lsb));
    __m256i c = _mm256_srli_epi32(a, 20);
    if (Signed) c = _mm256_or_si256(c, _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80)));
    c = _mm256_andnot_si256(nan, c);
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packus_epi16(w, w));
  }
  quantize_fp8_range<Signed>(x, i, n, r, codes);
}

AO_OPT_AVX2 void adamw_fp8_block_avx2(float* p, const float* g, int64_t n, const uint8_t* mc, const uint8_t* vc,
                                      float s1, float s2, const AdamScalars& s, float* mbuf, float* vbuf, AbsMax& a1,
                                      AbsMax& a2) {
  const __m256 vs1 = _mm256_set1_ps(s1), vs2 = _mm256_set1_ps(s2);
  const __m256 b1 = _mm256_set1_ps(s.b1), c1 = _mm256_set1_ps(s.c1), b2 = _mm256_set1_ps(s.b2),
               c2 = _mm256_set1_ps(s.c2), decay = _mm256_set1_ps(s.decay), step = _mm256_set1_ps(s.step_size),
               bc2 = _mm256_set1_ps(s.bc2_sqrt), eps = _mm256_set1_ps(s.eps);
  __m256 am1 = _mm256_setzero_ps(), am2 = _mm256_setzero_ps(), nan1 = _mm256_setzero_ps(),
         nan2 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    __m256 pv = _mm256_loadu_ps(p + i);
    const __m256 mo = _mm256_mul_ps(fp8_decode8<true>(mc + i), vs1);
    const __m256 vo = _mm256_mul_ps(fp8_decode8<false>(vc + i), vs2);
    const __m256 m = _mm256_add_ps(_mm256_mul_ps(b1, mo), _mm256_mul_ps(c1, gv));
    const __m256 v = _mm256_add_ps(_mm256_mul_ps(b2, vo), _mm256_mul_ps(_mm256_mul_ps(c2, gv), gv));
    pv = _mm256_mul_ps(pv, decay);
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), bc2), eps);
    pv = _mm256_sub_ps(pv, _mm256_mul_ps(step, _mm256_div_ps(m, denom)));
    _mm256_storeu_ps(p + i, pv);
    _mm256_storeu_ps(mbuf + i, m);
    _mm256_storeu_ps(vbuf + i, v);
    absmax8(m, am1, nan1);
    absmax8(v, am2, nan2);
  }
  absmax_finish(am1, nan1, a1);
  absmax_finish(am2, nan2, a2);
  adamw_fp8_step_range(p, g, i, n, mc, vc, s1, s2, s, mbuf, vbuf, a1, a2);
}

template <bool Signed>
AO_OPT_AVX512 inline __m512 fp8_decode16(const uint8_t* codes, __mmask16 k) {
  const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, codes));
  const __m512i mag = Signed ? _mm512_and_si512(c, _mm512_set1_epi32(0x7F)) : c;
  __m512i bits = _mm512_maskz_add_epi32(_mm512_test_epi32_mask(mag, mag), _mm512_slli_epi32(mag, 20),
                                        _mm512_set1_epi32(int(fp8_bias<Signed>())));
  // bits | ((c << 24) & 0x80000000): m's sign bit into the float's
  if (Signed)
    bits = _mm512_ternarylogic_epi32(bits, _mm512_slli_epi32(c, 24), _mm512_set1_epi32(int(0x80000000u)), 0xF8);
  return _mm512_castsi512_ps(bits);
}

// 64 values a round; the four 16-lane code vectors are packed to bytes with saturating packs
// (cheaper on Zen 4 than four vpmovdb stores) and put back in order with one vpermd.
template <bool Signed>
AO_OPT_AVX512 void quantize_fp8_avx512(const float* x, int64_t n, float r, uint8_t* codes) {
  static const struct Order {
    alignas(64) int32_t idx[16];
    Order() {
      for (int k = 0; k < 4; ++k)
        for (int lane = 0; lane < 4; ++lane) idx[4 * k + lane] = 4 * lane + k;
    }
  } order;
  const __m512 vr = _mm512_set1_ps(r);
  const __m512i inf = _mm512_set1_epi32(int(kInfBits)), one = _mm512_set1_epi32(int(kOneBits)),
                bias = _mm512_set1_epi32(int(fp8_bias<Signed>())),
                half_bias = _mm512_set1_epi32(int(0x7FFFFu - fp8_bias<Signed>())), lsb = _mm512_set1_epi32(1),
                zero = _mm512_setzero_si512(), absmask = _mm512_set1_epi32(0x7FFFFFFF),
                sign8 = _mm512_set1_epi32(0x80), vorder = _mm512_load_si512(order.idx);
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    __m512i c[4];
    for (int j = 0; j < 4; ++j) {
      const int64_t left = n - i0 - 16 * j;
      const __mmask16 k = left <= 0 ? __mmask16(0) : tail_mask(left);
      const __m512i u = _mm512_castps_si512(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i0 + 16 * j), vr));
      __m512i a = Signed ? _mm512_and_si512(u, absmask) : _mm512_max_epi32(u, zero);
      const __mmask16 ok = _mm512_cmple_epu32_mask(a, inf);  // not NaN
      // clamped to [bias, 1.0], then (a - bias + 0x7FFFF + lsb) >> 20 with the bias folded into
      // the rounding constant (the bias is a multiple of 2^23: a's bit 20 is the lsb either way)
      a = _mm512_max_epu32(_mm512_min_epu32(a, one), bias);
      a = _mm512_add_epi32(_mm512_add_epi32(a, half_bias), _mm512_and_si512(_mm512_srli_epi32(a, 20), lsb));
      a = _mm512_srli_epi32(a, 20);
      // Signed: c | ((u >> 24) & 0x80), zeroed for NaN
      c[j] = Signed ? _mm512_maskz_ternarylogic_epi32(ok, a, _mm512_srli_epi32(u, 24), sign8, 0xF8)
                    : _mm512_maskz_mov_epi32(ok, a);
    }
    const __m512i packed = _mm512_permutexvar_epi32(
        vorder, _mm512_packus_epi16(_mm512_packus_epi32(c[0], c[1]), _mm512_packus_epi32(c[2], c[3])));
    const int64_t left = n - i0;
    _mm512_mask_storeu_epi8(codes + i0, left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1, packed);
  }
}

AO_OPT_AVX512 void adamw_fp8_block_avx512(float* p, const float* g, int64_t n, const uint8_t* mc, const uint8_t* vc,
                                          float s1, float s2, const AdamScalars& s, float* mbuf, float* vbuf,
                                          AbsMax& a1, AbsMax& a2) {
  const __m512 vs1 = _mm512_set1_ps(s1), vs2 = _mm512_set1_ps(s2);
  const __m512 b1 = _mm512_set1_ps(s.b1), c1 = _mm512_set1_ps(s.c1), b2 = _mm512_set1_ps(s.b2),
               c2 = _mm512_set1_ps(s.c2), decay = _mm512_set1_ps(s.decay), step = _mm512_set1_ps(s.step_size),
               bc2 = _mm512_set1_ps(s.bc2_sqrt), eps = _mm512_set1_ps(s.eps);
  __m512i am1 = _mm512_setzero_si512(), am2 = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 gv = _mm512_maskz_loadu_ps(k, g + i);
    __m512 pv = _mm512_maskz_loadu_ps(k, p + i);
    const __m512 mo = _mm512_mul_ps(fp8_decode16<true>(mc + i, k), vs1);
    const __m512 vo = _mm512_mul_ps(fp8_decode16<false>(vc + i, k), vs2);
    const __m512 m = _mm512_add_ps(_mm512_mul_ps(b1, mo), _mm512_mul_ps(c1, gv));
    const __m512 v = _mm512_add_ps(_mm512_mul_ps(b2, vo), _mm512_mul_ps(_mm512_mul_ps(c2, gv), gv));
    pv = _mm512_mul_ps(pv, decay);
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), bc2), eps);
    pv = _mm512_sub_ps(pv, _mm512_mul_ps(step, _mm512_div_ps(m, denom)));
    _mm512_mask_storeu_ps(p + i, k, pv);
    _mm512_mask_storeu_ps(mbuf + i, k, m);
    _mm512_mask_storeu_ps(vbuf + i, k, v);
    absmax16(m, k, am1);
    absmax16(v, k, am2);
  }
  absmax16_finish(am1, a1);
  absmax16_finish(am2, a2);
}

// ------------------------------------------------------------------ drivers

// The widest path this CPU (capped by ACCELOPS_CPU_ISA) has: the AVX-512 level of
// cpu_features.h runs the 16-lane path when the CPU also has AVX-512 VBMI (vpermi2b, for the
// in-register dequantization; its VNNI is not used here), else the AVX2 one.
enum class Path { Scalar, Avx2, Avx512 };

Path active_path() {
  switch (active_dot_isa()) {
    case Isa::Scalar: return Path::Scalar;
    case Isa::Avx512Vnni: return cpu_has("avx512vbmi") ? Path::Avx512 : Path::Avx2;
    default: return Path::Avx2;
  }
}

// Requantizes a block of n values with its absmax (NaN-sticky, as AbsMax::get gives it).
void quantize_path(Path path, const QTable& q, const float* x, int64_t n, float absmax, uint8_t* codes) {
  const float div = divisor(absmax);
  if (path == Path::Avx512) quantize_range_avx512(q, x, n, div, absmax == absmax, codes);
  else if (path == Path::Avx2) quantize_range_avx2(q, x, 0, n, div, codes);
  else quantize_range(q, x, 0, n, div, codes);
}

int64_t grain_blocks(int64_t block_size) { return std::max<int64_t>(1, (int64_t(1) << 16) / block_size); }

void check_common(const char* op, const at::Tensor& param, const at::Tensor& grad, int64_t block_size) {
  TORCH_CHECK(block_size > 0 && (block_size & (block_size - 1)) == 0, "accelops.", op,
              ": block_size must be a positive power of two, got ", block_size);
  TORCH_CHECK(param.device().is_cpu() && grad.device().is_cpu(), "accelops.", op, ": tensors must be on the CPU");
  TORCH_CHECK(param.is_contiguous() && grad.is_contiguous(), "accelops.", op, ": param and grad must be contiguous");
  TORCH_CHECK(param.scalar_type() == at::kFloat || param.scalar_type() == at::kBFloat16 ||
                  param.scalar_type() == at::kHalf,
              "accelops.", op, ": param must be float32, bfloat16 or float16, got ", param.scalar_type());
  TORCH_CHECK(grad.scalar_type() == param.scalar_type(), "accelops.", op, ": grad must have param's dtype ",
              param.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK(grad.numel() == param.numel(), "accelops.", op, ": grad has ", grad.numel(),
              " elements, param has ", param.numel());
}

void check_state(const char* op, const char* name, const at::Tensor& codes, const at::Tensor& absmax, int64_t n,
                 int64_t nb) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.numel() == n && codes.is_contiguous() && codes.device().is_cpu(),
              "accelops.", op, ": ", name, " codes must be a contiguous uint8 CPU tensor of ", n, " elements");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() == nb && absmax.is_contiguous() &&
                  absmax.device().is_cpu(),
              "accelops.", op, ": ", name, " absmax must be a contiguous fp32 CPU tensor of ", nb, " elements");
}

template <typename T>
void adamw_run(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& mc_t, const at::Tensor& ma_t,
               const at::Tensor& vc_t, const at::Tensor& va_t, const QTable& qm, const QTable& qv,
               const AdamScalars& s, int64_t bs) {
  const int64_t n = param.numel(), nb = (n + bs - 1) / bs;
  T* p = param.data_ptr<T>();
  const T* g = grad.data_ptr<T>();
  uint8_t* mc = mc_t.data_ptr<uint8_t>();
  uint8_t* vc = vc_t.data_ptr<uint8_t>();
  float* ma = ma_t.data_ptr<float>();
  float* va = va_t.data_ptr<float>();
  // bf16/fp16 params take the scalar step; their requantization still uses the vector paths
  const Path path = active_path();
  at::parallel_for(0, nb, grain_blocks(bs), [&](int64_t b0, int64_t b1) {
    std::vector<float> mbuf(static_cast<size_t>(bs)), vbuf(static_cast<size_t>(bs));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t off = b * bs, len = std::min(bs, n - off);
      AbsMax a1, a2;
      bool done = false;
      if constexpr (std::is_same<T, float>::value) {
        if (path == Path::Avx512) {
          adamw_block_avx512(p + off, g + off, len, qm, qv, mc + off, vc + off, ma[b], va[b], s, mbuf.data(),
                             vbuf.data(), a1, a2);
          done = true;
        } else if (path == Path::Avx2) {
          adamw_block_avx2(p + off, g + off, len, qm, qv, mc + off, vc + off, ma[b], va[b], s, mbuf.data(),
                           vbuf.data(), a1, a2);
          done = true;
        }
      }
      if (!done)
        adamw_step_range(p + off, g + off, 0, len, qm, qv, mc + off, vc + off, ma[b], va[b], s, mbuf.data(),
                         vbuf.data(), a1, a2);
      const float m_abs = a1.get(), v_abs = a2.get();
      quantize_path(path, qm, mbuf.data(), len, m_abs, mc + off);
      quantize_path(path, qv, vbuf.data(), len, v_abs, vc + off);
      ma[b] = m_abs;
      va[b] = v_abs;
    }
  });
}

template <typename T>
void sgd_run(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& c_t, const at::Tensor& a_t,
             const QTable& q, const SgdScalars& k, int64_t bs) {
  const int64_t n = param.numel(), nb = (n + bs - 1) / bs;
  T* p = param.data_ptr<T>();
  const T* g = grad.data_ptr<T>();
  uint8_t* c = c_t.data_ptr<uint8_t>();
  float* a = a_t.data_ptr<float>();
  const Path path = active_path();
  at::parallel_for(0, nb, grain_blocks(bs), [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(static_cast<size_t>(bs));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t off = b * bs, len = std::min(bs, n - off);
      AbsMax am;
      bool done = false;
      if constexpr (std::is_same<T, float>::value) {
        if (path == Path::Avx512) {
          sgd_block_avx512(p + off, g + off, len, q, c + off, a[b], k, buf.data(), am);
          done = true;
        } else if (path == Path::Avx2) {
          sgd_block_avx2(p + off, g + off, len, q, c + off, a[b], k, buf.data(), am);
          done = true;
        }
      }
      if (!done) sgd_step_range(p + off, g + off, 0, len, q, c + off, a[b], k, buf.data(), am);
      const float absmax = am.get();
      quantize_path(path, q, buf.data(), len, absmax, c + off);
      a[b] = absmax;
    }
  });
}

// The fp8 maps need only AVX-512 F/BW/VL (no VBMI: nothing is looked up in registers).
Path fp8_path() {
  switch (active_dot_isa()) {
    case Isa::Scalar: return Path::Scalar;
    case Isa::Avx512Vnni: return Path::Avx512;
    default: return Path::Avx2;
  }
}

template <bool Signed>
void quantize_fp8_path(Path path, const float* x, int64_t n, float absmax, uint8_t* codes) {
  const float r = fp8_recip(absmax);
  if (path == Path::Avx512) quantize_fp8_avx512<Signed>(x, n, r, codes);
  else if (path == Path::Avx2) quantize_fp8_avx2<Signed>(x, n, r, codes);
  else quantize_fp8_range<Signed>(x, 0, n, r, codes);
}

template <typename T>
void adamw_fp8_run(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& mc_t, const at::Tensor& ma_t,
                   const at::Tensor& vc_t, const at::Tensor& va_t, const AdamScalars& s, int64_t bs) {
  const int64_t n = param.numel(), nb = (n + bs - 1) / bs;
  T* p = param.data_ptr<T>();
  const T* g = grad.data_ptr<T>();
  uint8_t* mc = mc_t.data_ptr<uint8_t>();
  uint8_t* vc = vc_t.data_ptr<uint8_t>();
  float* ma = ma_t.data_ptr<float>();
  float* va = va_t.data_ptr<float>();
  const Path path = fp8_path();
  at::parallel_for(0, nb, grain_blocks(bs), [&](int64_t b0, int64_t b1) {
    std::vector<float> mbuf(static_cast<size_t>(bs)), vbuf(static_cast<size_t>(bs));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t off = b * bs, len = std::min(bs, n - off);
      AbsMax a1, a2;
      bool done = false;
      if constexpr (std::is_same<T, float>::value) {
        if (path == Path::Avx512) {
          adamw_fp8_block_avx512(p + off, g + off, len, mc + off, vc + off, ma[b], va[b], s, mbuf.data(),
                                 vbuf.data(), a1, a2);
          done = true;
        } else if (path == Path::Avx2) {
          adamw_fp8_block_avx2(p + off, g + off, len, mc + off, vc + off, ma[b], va[b], s, mbuf.data(), vbuf.data(),
                               a1, a2);
          done = true;
        }
      }
      if (!done)
        adamw_fp8_step_range(p + off, g + off, 0, len, mc + off, vc + off, ma[b], va[b], s, mbuf.data(), vbuf.data(),
                             a1, a2);
      const float m_abs = a1.get(), v_abs = a2.get();
      quantize_fp8_path<true>(path, mbuf.data(), len, m_abs, mc + off);
      quantize_fp8_path<false>(path, vbuf.data(), len, v_abs, vc + off);
      ma[b] = m_abs;
      va[b] = v_abs;
    }
  });
}

}  // namespace

void adamw8bit_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                        const at::Tensor& m_absmax, const at::Tensor& v_codes, const at::Tensor& v_absmax,
                        const at::Tensor& m_map, const at::Tensor& v_map, double beta1, double c1, double beta2,
                        double c2, double decay, double step_size, double bc2_sqrt, double eps, int64_t block_size) {
  const char* op = "adamw8bit_step_";
  check_common(op, param, grad, block_size);
  const int64_t n = param.numel(), nb = (n + block_size - 1) / block_size;
  check_state(op, "m", m_codes, m_absmax, n, nb);
  check_state(op, "v", v_codes, v_absmax, n, nb);
  if (n == 0) return;
  const QTable& qm = table_for(m_map);
  const QTable& qv = table_for(v_map);
  const AdamScalars s{float(beta1), float(c1), float(beta2), float(c2), float(decay), float(step_size),
                      float(bc2_sqrt), float(eps)};
  switch (param.scalar_type()) {
    case at::kFloat: adamw_run<float>(param, grad, m_codes, m_absmax, v_codes, v_absmax, qm, qv, s, block_size); break;
    case at::kBFloat16:
      adamw_run<c10::BFloat16>(param, grad, m_codes, m_absmax, v_codes, v_absmax, qm, qv, s, block_size);
      break;
    default: adamw_run<c10::Half>(param, grad, m_codes, m_absmax, v_codes, v_absmax, qm, qv, s, block_size); break;
  }
}

void sgd8bit_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& codes,
                      const at::Tensor& absmax, const at::Tensor& qmap, double lr, double momentum,
                      double dampening, double weight_decay, bool nesterov, bool first, int64_t block_size) {
  const char* op = "sgd8bit_step_";
  check_common(op, param, grad, block_size);
  const int64_t n = param.numel(), nb = (n + block_size - 1) / block_size;
  check_state(op, "momentum", codes, absmax, n, nb);
  if (n == 0) return;
  const QTable& q = table_for(qmap);
  const SgdScalars k{float(lr), float(momentum), float(1.0 - dampening), float(weight_decay), weight_decay != 0.0,
                     nesterov, first};
  switch (param.scalar_type()) {
    case at::kFloat: sgd_run<float>(param, grad, codes, absmax, q, k, block_size); break;
    case at::kBFloat16: sgd_run<c10::BFloat16>(param, grad, codes, absmax, q, k, block_size); break;
    default: sgd_run<c10::Half>(param, grad, codes, absmax, q, k, block_size); break;
  }
}

void adamw8bit_fp8_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                            const at::Tensor& m_absmax, const at::Tensor& v_codes, const at::Tensor& v_absmax,
                            double beta1, double c1, double beta2, double c2, double decay, double step_size,
                            double bc2_sqrt, double eps, int64_t block_size) {
  const char* op = "adamw8bit_fp8_step_";
  check_common(op, param, grad, block_size);
  const int64_t n = param.numel(), nb = (n + block_size - 1) / block_size;
  check_state(op, "m", m_codes, m_absmax, n, nb);
  check_state(op, "v", v_codes, v_absmax, n, nb);
  if (n == 0) return;
  const AdamScalars s{float(beta1), float(c1), float(beta2), float(c2), float(decay), float(step_size),
                      float(bc2_sqrt), float(eps)};
  switch (param.scalar_type()) {
    case at::kFloat: adamw_fp8_run<float>(param, grad, m_codes, m_absmax, v_codes, v_absmax, s, block_size); break;
    case at::kBFloat16:
      adamw_fp8_run<c10::BFloat16>(param, grad, m_codes, m_absmax, v_codes, v_absmax, s, block_size);
      break;
    default: adamw_fp8_run<c10::Half>(param, grad, m_codes, m_absmax, v_codes, v_absmax, s, block_size); break;
  }
}

}  // namespace accelops
