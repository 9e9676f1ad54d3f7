// Communication family on the CPU: bucket packing (flatten / unflatten / cast_div), gradient
// compression with error feedback (top-k, sign, int8 stochastic rounding) and PowerSGD's
// Gram-Schmidt. accelops/reference/comm.py is the spec; every output here is bit-identical
// to it, except orthogonalize_ (judged by its error against fp64) and, for top-k, which of
// several equal magnitudes at the selection boundary is sent.
//
// Exactness notes (the build uses -ffp-contract=off, so nothing below is fused into an FMA
// unless written as one):
//   - conversions go through fp32 exactly as torch's: fp64 -> bf16/fp16 rounds to fp32
//     first; fp32 -> bf16 rounds to nearest even and writes NaN as 0xFFFF (the pattern
//     torch's vectorized conversion writes); fp16 uses F16C (IEEE round to nearest even);
//   - "x / divisor" is one IEEE fp32 division by float(divisor), as torch's div does;
//   - the compressors' acc = float(grad) + residual is one fp32 add, written back into the
//     residual on the first pass so later passes read it instead of recomputing it.
//
// Parallel work is split into fixed ranges that never depend on the thread count, and
// every reduction is combined in range order, so results do not change with
// torch.set_num_threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

#include "../ops.h"
#include "kernels.h"

#define AO_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace accelops {
namespace {

constexpr int64_t kBlock = 2048;          // elements staged per step (an 8 KiB fp32 buffer)
constexpr int64_t kCopyGrain = 1 << 15;   // elements per parallel task for copies
constexpr int64_t kTaskGrain = 1 << 16;   // elements per task for the compressors
constexpr int64_t kFusedChunkMax = 1 << 16;  // larger sign/int8 chunks take the two-phase path
constexpr int64_t kStreamBytes = int64_t(16) << 20;  // outputs this large bypass the caches
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---------------------------------------------------------------- element types

enum class Dt { F32, BF16, F16, F64 };

Dt dt_of(at::ScalarType t, const char* op, const char* name) {
  switch (t) {
    case at::kFloat:
      return Dt::F32;
    case at::kBFloat16:
      return Dt::BF16;
    case at::kHalf:
      return Dt::F16;
    case at::kDouble:
      return Dt::F64;
    default:
      break;
  }
  TORCH_CHECK(false, "accelops.", op, ": ", name, " must be float32, bfloat16, float16 or float64, got ", t);
  return Dt::F32;  // not reached
}

inline int64_t dt_size(Dt d) { return d == Dt::F64 ? 8 : (d == Dt::F32 ? 4 : 2); }

// The AVX2 paths need F16C too (every AVX2 CPU has it); ACCELOPS_CPU_ISA=scalar forces the
// portable path, which the tests run as well.
Isa comm_isa() {
  static const bool f16c = cpu_has("f16c");
  return (active_isa() == Isa::Avx2 && f16c) ? Isa::Avx2 : Isa::Scalar;
}

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  if (std::isnan(f)) return 0xFFFF;
  const uint32_t u = f32_bits(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <Dt D>
inline float load1(const void* p, int64_t i) {
  if constexpr (D == Dt::F32) return static_cast<const float*>(p)[i];
  if constexpr (D == Dt::BF16) return bits_f32(uint32_t(static_cast<const uint16_t*>(p)[i]) << 16);
  if constexpr (D == Dt::F16) return c10::detail::fp16_ieee_to_fp32_value(static_cast<const uint16_t*>(p)[i]);
  if constexpr (D == Dt::F64) return static_cast<float>(static_cast<const double*>(p)[i]);
}

template <Dt D>
inline void store1(void* p, int64_t i, float v) {
  if constexpr (D == Dt::F32) static_cast<float*>(p)[i] = v;
  if constexpr (D == Dt::BF16) static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  if constexpr (D == Dt::F16) static_cast<uint16_t*>(p)[i] = c10::detail::fp16_ieee_from_fp32_value(v);
  if constexpr (D == Dt::F64) static_cast<double*>(p)[i] = static_cast<double>(v);
}

template <Dt D>
AO_AVX2 inline __m256 load8(const void* p, int64_t i) {
  if constexpr (D == Dt::F32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  if constexpr (D == Dt::BF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  if constexpr (D == Dt::F16)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  if constexpr (D == Dt::F64) {
    const double* d = static_cast<const double*>(p) + i;
    return _mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(d + 4)), _mm256_cvtpd_ps(_mm256_loadu_pd(d)));
  }
}

template <Dt D>
AO_AVX2 inline void store8(void* p, int64_t i, __m256 v) {
  if constexpr (D == Dt::F32) _mm256_storeu_ps(static_cast<float*>(p) + i, v);
  if constexpr (D == Dt::BF16) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0xFFFF), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), _mm256_castsi256_si128(packed));
  }
  if constexpr (D == Dt::F16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  if constexpr (D == Dt::F64) {
    double* d = static_cast<double*>(p) + i;
    _mm256_storeu_pd(d, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    _mm256_storeu_pd(d + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
}

// dst[i] = D(float(src[i]) [/ div]) for i < n.
using ConvertFn = void (*)(const void* src, void* dst, int64_t n, float div);

template <Dt S, Dt D, bool DIV>
void convert_scalar(const void* src, void* dst, int64_t n, float div) {
  for (int64_t i = 0; i < n; ++i) {
    float v = load1<S>(src, i);
    if (DIV) v = v / div;
    store1<D>(dst, i, v);
  }
}

// Streaming (non-temporal) store of 8 converted values at an aligned address: an output
// larger than the caches is written without first reading each line into them, which
// cuts a copy's memory traffic by a third.
template <Dt D>
AO_AVX2 inline void stream8(void* p, int64_t i, __m256 v) {
  if constexpr (D == Dt::F32) _mm256_stream_ps(static_cast<float*>(p) + i, v);
  if constexpr (D == Dt::BF16 || D == Dt::F16) {
    alignas(16) uint16_t h[8];
    store8<D>(h, 0, v);
    _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i),
                     _mm_load_si128(reinterpret_cast<const __m128i*>(h)));
  }
  if constexpr (D == Dt::F64) {
    double* d = static_cast<double*>(p) + i;
    _mm256_stream_pd(d, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    _mm256_stream_pd(d + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
}

template <Dt S, Dt D, bool DIV, bool NT>
AO_AVX2 void convert_avx2(const void* src, void* dst, int64_t n, float div) {
  const __m256 dv = _mm256_set1_ps(div);
  int64_t i = 0;
  if (NT) {  // scalar up to the first address the streaming stores can take
    constexpr uintptr_t align = (D == Dt::F32 || D == Dt::F64) ? 32 : 16;
    constexpr int64_t size = D == Dt::F64 ? 8 : (D == Dt::F32 ? 4 : 2);
    for (; i < n && (reinterpret_cast<uintptr_t>(static_cast<char*>(dst) + i * size) & (align - 1)); ++i) {
      float v = load1<S>(src, i);
      if (DIV) v = v / div;
      store1<D>(dst, i, v);
    }
  }
  for (; i + 8 <= n; i += 8) {
    __m256 v = load8<S>(src, i);
    if (DIV) v = _mm256_div_ps(v, dv);
    if (NT)
      stream8<D>(dst, i, v);
    else
      store8<D>(dst, i, v);
  }
  for (; i < n; ++i) {
    float v = load1<S>(src, i);
    if (DIV) v = v / div;
    store1<D>(dst, i, v);
  }
  if (NT) _mm_sfence();
}

void copy_bytes(const void* src, void* dst, int64_t n, float) { std::memcpy(dst, src, size_t(n)); }

template <Dt S, Dt D>
ConvertFn pick_sd(bool div, Isa isa, bool stream) {
  if (isa == Isa::Avx2 && stream) return div ? convert_avx2<S, D, true, true> : convert_avx2<S, D, false, true>;
  if (isa == Isa::Avx2) return div ? convert_avx2<S, D, true, false> : convert_avx2<S, D, false, false>;
  return div ? convert_scalar<S, D, true> : convert_scalar<S, D, false>;
}

template <Dt S>
ConvertFn pick_s(Dt d, bool div, Isa isa, bool stream) {
  switch (d) {
    case Dt::F32:
      return pick_sd<S, Dt::F32>(div, isa, stream);
    case Dt::BF16:
      return pick_sd<S, Dt::BF16>(div, isa, stream);
    case Dt::F16:
      return pick_sd<S, Dt::F16>(div, isa, stream);
    case Dt::F64:
      return pick_sd<S, Dt::F64>(div, isa, stream);
  }
  return nullptr;
}

// The converter for src -> dst; with no divisor and one dtype it is a byte copy (so fp64
// stays fp64 and NaN payloads are kept, as torch.cat keeps them). Byte counts for the copy
// are n * element size: callers scale n by dt_size for that case (see run_copies).
// stream: write with non-temporal stores (for outputs larger than the caches).
ConvertFn converter(Dt s, Dt d, bool div, Isa isa, bool stream = false) {
  if (!div && s == d) return copy_bytes;
  switch (s) {
    case Dt::F32:
      return pick_s<Dt::F32>(d, div, isa, stream);
    case Dt::BF16:
      return pick_s<Dt::BF16>(d, div, isa, stream);
    case Dt::F16:
      return pick_s<Dt::F16>(d, div, isa, stream);
    case Dt::F64:
      return pick_s<Dt::F64>(d, div, isa, stream);
  }
  return nullptr;
}

// ---------------------------------------------------------------- bucket copies

struct Piece {
  const char* src;
  Dt sdt;
  char* dst;
  Dt ddt;
  int64_t n;
};

// Runs every piece's conversion over the concatenated element range [0, total), split
// into equal parallel ranges (a range may span many small tensors or part of a large one).
void run_copies(const std::vector<Piece>& pieces, const std::vector<int64_t>& starts, int64_t total, bool div,
                float d) {
  const Isa isa = comm_isa();
  int64_t out_bytes = 0;
  for (const Piece& p : pieces) out_bytes += p.n * dt_size(p.ddt);
  const bool stream = out_bytes >= kStreamBytes;
  at::parallel_for(0, total, kCopyGrain, [&](int64_t b, int64_t e) {
    size_t j = size_t(std::upper_bound(starts.begin(), starts.end(), b) - starts.begin()) - 1;
    while (b < e && j < pieces.size()) {
      const Piece& p = pieces[j];
      const int64_t off = b - starts[j];
      const int64_t len = std::min(e, starts[j] + p.n) - b;
      if (len > 0) {
        const ConvertFn fn = converter(p.sdt, p.ddt, div, isa, stream);
        const int64_t bytes_scale = (fn == copy_bytes) ? dt_size(p.sdt) : 1;
        fn(p.src + off * dt_size(p.sdt), p.dst + off * dt_size(p.ddt), len * bytes_scale, d);
        b += len;
      }
      ++j;
    }
  });
}

float divisor_f32(const std::optional<double>& divisor, const char* op) {
  if (!divisor.has_value()) return 1.0f;
  TORCH_CHECK(std::isfinite(*divisor) && *divisor > 0, "accelops.", op,
              ": divisor must be a finite number > 0 (e.g. the world size), got ", *divisor);
  return static_cast<float>(*divisor);
}

// ---------------------------------------------------------------- the compressors' acc

// acc = float(grad) + residual, read block by block. With a residual the first pass writes
// acc into it, so every later pass (and the caller's error feedback) reads it from there.
struct AccSrc {
  const void* grad;
  Dt gdt;
  float* res;  // null: no error feedback
  Isa isa;

  // acc[b, b + len): the residual (holding acc) or an fp32 grad in place, else converted into buf.
  const float* view(int64_t b, int64_t len, float* buf) const {
    if (res != nullptr) return res + b;
    if (gdt == Dt::F32) return static_cast<const float*>(grad) + b;
    converter(gdt, Dt::F32, false, isa)(static_cast<const char*>(grad) + b * dt_size(gdt), buf, len, 1.0f);
    return buf;
  }

  // The first pass over [b, b + len): residual += float(grad) (fp32 add, acc written back).
  const float* first(int64_t b, int64_t len, float* buf) const;

  // acc[i] once the first pass has run.
  float at(int64_t i) const { return res != nullptr ? res[i] : grad_at(i); }

  // acc[i] before the first pass: float(grad[i]) + residual[i], the same fp32 add.
  float pre(int64_t i) const { return res != nullptr ? grad_at(i) + res[i] : grad_at(i); }

  float grad_at(int64_t i) const {
    switch (gdt) {
      case Dt::F32:
        return load1<Dt::F32>(grad, i);
      case Dt::BF16:
        return load1<Dt::BF16>(grad, i);
      case Dt::F16:
        return load1<Dt::F16>(grad, i);
      case Dt::F64:
        return load1<Dt::F64>(grad, i);
    }
    return 0.f;
  }
};

template <Dt G>
void accumulate_scalar(const void* g, float* r, int64_t n) {
  for (int64_t i = 0; i < n; ++i) r[i] = load1<G>(g, i) + r[i];
}

template <Dt G>
AO_AVX2 void accumulate_avx2(const void* g, float* r, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(r + i, _mm256_add_ps(load8<G>(g, i), _mm256_loadu_ps(r + i)));
  for (; i < n; ++i) r[i] = load1<G>(g, i) + r[i];
}

const float* AccSrc::first(int64_t b, int64_t len, float* buf) const {
  if (res == nullptr) return view(b, len, buf);
  const char* g = static_cast<const char*>(grad) + b * dt_size(gdt);
  float* r = res + b;
  const bool v = isa == Isa::Avx2;
  switch (gdt) {
    case Dt::F32:
      v ? accumulate_avx2<Dt::F32>(g, r, len) : accumulate_scalar<Dt::F32>(g, r, len);
      break;
    case Dt::BF16:
      v ? accumulate_avx2<Dt::BF16>(g, r, len) : accumulate_scalar<Dt::BF16>(g, r, len);
      break;
    case Dt::F16:
      v ? accumulate_avx2<Dt::F16>(g, r, len) : accumulate_scalar<Dt::F16>(g, r, len);
      break;
    case Dt::F64:
      v ? accumulate_avx2<Dt::F64>(g, r, len) : accumulate_scalar<Dt::F64>(g, r, len);
      break;
  }
  return r;
}

AccSrc make_acc_src(const at::Tensor& grad, const std::optional<at::Tensor>& residual, const char* op) {
  const Dt gdt = dt_of(grad.scalar_type(), op, "grad");
  TORCH_CHECK(grad.device().is_cpu(), "accelops.", op, ": grad must be a CPU tensor");
  TORCH_CHECK(grad.is_contiguous(), "accelops.", op, ": grad must be contiguous");
  float* res = nullptr;
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.scalar_type() == at::kFloat, "accelops.", op, ": residual must be float32, got ", r.scalar_type());
    TORCH_CHECK(r.numel() == grad.numel(), "accelops.", op, ": residual must have grad's ", grad.numel(),
                " elements, got ", r.numel());
    TORCH_CHECK(r.is_contiguous() && r.device().is_cpu(), "accelops.", op, ": residual must be a contiguous CPU tensor");
    res = r.data_ptr<float>();
  }
  return AccSrc{grad.data_ptr(), gdt, res, comm_isa()};
}

// [0, n) split into `tasks` ranges whose starts are multiples of 8.
std::vector<int64_t> split_ranges(int64_t n, int64_t tasks) {
  std::vector<int64_t> bounds(static_cast<size_t>(tasks) + 1);
  for (int64_t t = 0; t <= tasks; ++t) bounds[size_t(t)] = std::min(n, (n * t / tasks + 7) / 8 * 8);
  bounds[size_t(tasks)] = n;
  return bounds;
}

// Fixed task count for a size: never the thread count, so results cannot depend on it.
int64_t task_count(int64_t n) { return std::max<int64_t>(1, std::min<int64_t>(64, n / kTaskGrain)); }

// ---------------------------------------------------------------- top-k

// |acc| as an ordered integer key: the float's bits without the sign (monotonic in the
// magnitude), NaN mapped to +Inf's key (the spec counts NaN as the largest, equal to Inf).
constexpr uint32_t kInfKey = 0x7F800000u;
constexpr int64_t kTopkSample = 1 << 14;  // exact top-k: sampled positions for the threshold estimate

inline uint32_t mag_key(float v) {
  const uint32_t u = f32_bits(v) & 0x7FFFFFFFu;
  return u < kInfKey ? u : kInfKey;
}

AO_AVX2 inline __m256i mag_key8(__m256 v) {
  const __m256i u = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7FFFFFFF));
  return _mm256_min_epu32(u, _mm256_set1_epi32(int(kInfKey)));
}

// Appends (index, key) of every element of a[0, len) (global indices from i0) with key >= lower.
void collect_scalar(const float* a, int64_t len, int64_t i0, uint32_t lower, std::vector<int32_t>& idx,
                    std::vector<uint32_t>& keys) {
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t k = mag_key(a[i]);
    if (k >= lower) {
      idx.push_back(int32_t(i0 + i));
      keys.push_back(k);
    }
  }
}

AO_AVX2 void collect_avx2(const float* a, int64_t len, int64_t i0, uint32_t lower, std::vector<int32_t>& idx,
                          std::vector<uint32_t>& keys) {
  // keys <= 0x7F800000 < 2^31, so a signed compare against lower - 1 is exact
  const __m256i lo = _mm256_set1_epi32(int(lower) - 1);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256i k = mag_key8(_mm256_loadu_ps(a + i));
    int mask = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(k, lo)));
    while (mask) {
      const int j = __builtin_ctz(unsigned(mask));
      mask &= mask - 1;
      idx.push_back(int32_t(i0 + i + j));
      keys.push_back(mag_key(a[i + j]));
    }
  }
  collect_scalar(a + i, len - i, i0 + i, lower, idx, keys);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_compress_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& residual,
                                                     int64_t k, c10::string_view method, int64_t sample_size,
                                                     int64_t seed) {
  const char* op = "topk_compress_";
  const int64_t n = grad.numel();
  TORCH_CHECK(n > 0, "accelops.topk_compress_: grad is empty: nothing to select");
  TORCH_CHECK(n < (int64_t(1) << 31), "accelops.topk_compress_: grad has ", n,
              " elements; int32 indices address at most 2^31 - 1");
  TORCH_CHECK(k >= 1 && k <= n, "accelops.topk_compress_: k must be in [1, ", n, "], got ", k);
  const bool exact = method == "exact";
  TORCH_CHECK(exact || method == "sampled", "accelops.topk_compress_: method must be 'exact' or 'sampled', got '",
              std::string(method), "'");
  TORCH_CHECK(sample_size >= 1, "accelops.topk_compress_: sample_size must be >= 1, got ", sample_size);
  TORCH_CHECK(seed >= 0, "accelops.topk_compress_: seed must be >= 0, got ", seed);
  const AccSrc src = make_acc_src(grad, residual, op);
  const Isa isa = src.isa;
  const int64_t tasks = task_count(n);
  const std::vector<int64_t> bounds = split_ranges(n, tasks);
  auto for_tasks = [&](const std::function<void(int64_t)>& f) {
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) f(t);
    });
  };

  // One pass forms acc (into the residual) and collects the candidates, the elements with
  // key >= lower, in index order per task. `lower` comes from a strided sample of acc taken
  // before that pass (acc computed at the sampled positions): for 'sampled' the spec's
  // threshold; for 'exact' a conservative estimate of the k-th largest key (about 1.3 k
  // candidates expected), checked after the pass: should fewer than k elements reach it
  // (adversarial data), the candidates are collected again with lower = 0. No histogram,
  // no sort: an nth_element over the candidates' keys finds the exact threshold.
  uint32_t lower = 0;
  {
    int64_t stride, offset = 0, len, ks;
    if (exact) {
      stride = std::max<int64_t>(1, n / kTopkSample);
      len = (n + stride - 1) / stride;
      const double expect = double(k) * double(len) / double(n);
      ks = std::min<int64_t>(len, int64_t(std::ceil(1.3 * expect + 4.0 * std::sqrt(expect) + 16.0)));
    } else {  // the spec's formulas (ks by exact integer ceil)
      stride = std::max<int64_t>(1, n / sample_size);
      offset = seed % stride;
      len = std::min<int64_t>(sample_size, (n - offset + stride - 1) / stride);
      ks = std::max<int64_t>(1, (k * len + n - 1) / n);
    }
    if (!exact || ks < len) {
      std::vector<uint32_t> sample(static_cast<size_t>(len));
      for (int64_t j = 0; j < len; ++j) sample[size_t(j)] = mag_key(src.pre(offset + j * stride));
      std::nth_element(sample.begin(), sample.begin() + (ks - 1), sample.end(), std::greater<uint32_t>());
      lower = sample[size_t(ks - 1)];
    }
  }
  std::vector<std::vector<int32_t>> cand_idx(static_cast<size_t>(tasks));
  std::vector<std::vector<uint32_t>> cand_key(static_cast<size_t>(tasks));
  auto collect = [&](bool first_pass) {
    for_tasks([&](int64_t t) {
      float buf[kBlock];
      auto& idx = cand_idx[size_t(t)];
      auto& keys = cand_key[size_t(t)];
      idx.clear();
      keys.clear();
      const size_t guess = size_t(std::min<int64_t>(bounds[t + 1] - bounds[t], 3 * k / tasks + 1024));
      idx.reserve(guess);
      keys.reserve(guess);
      for (int64_t b = bounds[t]; b < bounds[t + 1]; b += kBlock) {
        const int64_t len = std::min(kBlock, bounds[t + 1] - b);
        const float* a = first_pass ? src.first(b, len, buf) : src.view(b, len, buf);
        isa == Isa::Avx2 ? collect_avx2(a, len, b, lower, idx, keys) : collect_scalar(a, len, b, lower, idx, keys);
      }
    });
    int64_t total = 0;
    for (const auto& c : cand_idx) total += int64_t(c.size());
    return total;
  };
  int64_t total = collect(true);
  if (exact && total < k) {
    lower = 0;
    total = collect(false);
  }

  // The k-th largest key `thr`; `ties` of the elements equal to it are sent, first in index order.
  uint32_t thr = lower;
  int64_t ties = std::numeric_limits<int64_t>::max();
  int64_t count = k;
  if (!exact && total <= k) {
    count = total;  // every candidate is sent; the remaining slots are padding
  } else {  // the k largest candidates (for 'sampled': more than k reached t, so the exact top-k)
    std::vector<uint32_t> keys;
    keys.reserve(size_t(total));
    for (const auto& ck : cand_key) keys.insert(keys.end(), ck.begin(), ck.end());
    std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<uint32_t>());
    thr = keys[size_t(k - 1)];
    int64_t gt = 0;
    for (uint32_t key : keys) gt += key > thr;
    ties = k - gt;
  }
  std::vector<int64_t> offsets(static_cast<size_t>(tasks) + 1, 0), take(static_cast<size_t>(tasks), 0);
  int64_t ties_left = ties;
  for (int64_t t = 0; t < tasks; ++t) {
    int64_t gt = 0, eq = 0;
    for (uint32_t key : cand_key[size_t(t)]) {
      gt += key > thr;
      eq += key == thr;
    }
    take[size_t(t)] = std::min(eq, ties_left);
    ties_left -= take[size_t(t)];
    offsets[size_t(t) + 1] = offsets[size_t(t)] + gt + take[size_t(t)];
  }
  TORCH_CHECK(offsets[size_t(tasks)] == count, "accelops.topk_compress_: internal error: selected ",
              offsets[size_t(tasks)], " of ", count);

  at::Tensor values = at::empty({k}, grad.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({k}, grad.options().dtype(at::kInt));
  float* vp = values.data_ptr<float>();
  int32_t* ip = indices.data_ptr<int32_t>();
  for_tasks([&](int64_t t) {
    int64_t o = offsets[size_t(t)], taken = 0;
    const int64_t quota = take[size_t(t)];
    const auto& idx = cand_idx[size_t(t)];
    const auto& keys = cand_key[size_t(t)];
    for (size_t j = 0; j < idx.size(); ++j) {
      const uint32_t key = keys[j];
      if (key < thr || (key == thr && taken++ >= quota)) continue;
      const int32_t i = idx[j];
      const float v = src.at(i);
      vp[o] = v;
      ip[o] = i;
      if (src.res != nullptr) src.res[i] = v - v;  // acc - sent: 0, or NaN for Inf/NaN, as the spec computes it
      ++o;
    }
  });
  for (int64_t j = count; j < k; ++j) {
    vp[j] = 0.f;
    ip[j] = ip[0];
  }
  return {values, indices};
}

namespace {

void check_payload(const at::Tensor& t, at::ScalarType dtype, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, "accelops.", op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 || t.dim() == 2, "accelops.", op, ": ", name,
              " must be 1-D or 2-D [ranks, ...], got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "accelops.", op, ": ", name, " must be a CPU tensor");
}

int64_t payload_ranks(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.dim() == b.dim() && (a.dim() == 1 || a.size(0) == b.size(0)), "accelops.", op,
              ": payloads must be all 1-D or all [ranks, ...] with the same rank count, got ", a.sizes(), " and ",
              b.sizes());
  return a.dim() == 1 ? 1 : a.size(0);
}

}  // namespace

at::Tensor topk_decompress_cpu(const at::Tensor& values, const at::Tensor& indices, int64_t numel) {
  const char* op = "topk_decompress";
  check_payload(values, at::kFloat, op, "values");
  check_payload(indices, at::kInt, op, "indices");
  TORCH_CHECK(values.sizes() == indices.sizes(), "accelops.topk_decompress: values ", values.sizes(), " and indices ",
              indices.sizes(), " must have one shape");
  TORCH_CHECK(numel >= 1, "accelops.topk_decompress: numel must be >= 1, got ", numel);
  const int64_t ranks = values.dim() == 1 ? 1 : values.size(0);
  const int64_t k = values.size(-1);
  const at::Tensor v = values.contiguous(), ix = indices.contiguous();
  const float* vp = v.data_ptr<float>();
  const int32_t* ip = ix.data_ptr<int32_t>();
  for (int64_t j = 0; j < ranks * k; ++j)
    TORCH_CHECK(ip[j] >= 0 && ip[j] < numel, "accelops.topk_decompress: index ", ip[j], " lies outside [0, ", numel,
                ")");
  // The spec: each rank's values scatter-added into zeros (in slot order), then the ranks
  // summed in rank order, then / W. Each rank becomes a list of distinct ascending indices
  // with the sum of its values there (slot order). Partial sums that start at +0 never
  // become -0, so a zero value (top-k's padding) changes nothing and is dropped; a rank
  // whose other indices ascend strictly (what topk_compress_ writes) is used as it is.
  struct Sparse {
    const int32_t* idx;
    const float* val;
    int64_t count;
    std::vector<int32_t> own_idx;
    std::vector<float> own_val;
  };
  std::vector<Sparse> sparse(static_cast<size_t>(ranks));
  for (int64_t r = 0; r < ranks; ++r) {
    const float* rv = vp + r * k;
    const int32_t* ri = ip + r * k;
    Sparse& sp = sparse[size_t(r)];
    bool ascending = true, zeros = false;
    int64_t last = -1;
    for (int64_t j = 0; j < k && ascending; ++j) {
      if (rv[j] == 0.f) {
        zeros = true;
        continue;
      }
      ascending = ri[j] > last;
      last = ri[j];
    }
    if (ascending && !zeros) {
      sp.idx = ri, sp.val = rv, sp.count = k;
      continue;
    }
    std::vector<std::pair<int32_t, int64_t>> order;
    for (int64_t j = 0; j < k; ++j)
      if (rv[j] != 0.f) order.push_back({ri[j], j});
    if (!ascending)
      std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    for (size_t j = 0; j < order.size();) {
      const int32_t i = order[j].first;
      float sum = 0.f;
      for (; j < order.size() && order[j].first == i; ++j) sum += rv[order[j].second];
      sp.own_idx.push_back(i);
      sp.own_val.push_back(sum);
    }
    sp.idx = sp.own_idx.data(), sp.val = sp.own_val.data(), sp.count = int64_t(sp.own_idx.size());
  }
  // One pass over the output by ranges: zero it, add each rank's entries in rank order and
  // divide, while the range is in cache (a scatter over the whole buffer would miss the
  // cache on every value).
  at::Tensor out = empty_output({numel}, values.options());
  float* o = out.data_ptr<float>();
  const float w = static_cast<float>(ranks);
  at::parallel_for(0, numel, kCopyGrain, [&](int64_t b, int64_t e) {
    std::memset(o + b, 0, size_t(e - b) * sizeof(float));
    for (const Sparse& sp : sparse) {
      int64_t j = std::lower_bound(sp.idx, sp.idx + sp.count, int32_t(b)) - sp.idx;
      for (; j < sp.count && sp.idx[j] < e; ++j) o[sp.idx[j]] += sp.val[j];
    }
    if (ranks > 1)
      for (int64_t i = b; i < e; ++i) o[i] = o[i] / w;
  });
  return out;
}

namespace {

// ---------------------------------------------------------------- sign and int8: chunked passes

// Per-chunk statistics of acc, gathered by pass 1.
struct SignStat {
  double sum = 0.0;
  void merge(const SignStat& o) { sum += o.sum; }
};

struct Int8Stat {
  float amax = 0.f;
  bool bad = false;
  void merge(const Int8Stat& o) {
    amax = std::max(amax, o.amax);
    bad = bad || o.bad;
  }
};

void sign_stat_scalar(const float* a, int64_t len, SignStat& s) {
  double sum = 0.0;
  for (int64_t i = 0; i < len; ++i) sum += static_cast<double>(std::fabs(a[i]));
  s.sum += sum;
}

AO_AVX2 void sign_stat_avx2(const float* a, int64_t len, SignStat& s) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256 v = _mm256_and_ps(_mm256_loadu_ps(a + i), abs_mask);
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(s0, s1));
  double sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; i < len; ++i) sum += static_cast<double>(std::fabs(a[i]));
  s.sum += sum;
}

void int8_stat_scalar(const float* a, int64_t len, Int8Stat& s) {
  for (int64_t i = 0; i < len; ++i) {
    const float v = std::fabs(a[i]);
    if (!(v < kInf)) s.bad = true;
    s.amax = v > s.amax ? v : s.amax;
  }
}

AO_AVX2 void int8_stat_avx2(const float* a, int64_t len, Int8Stat& s) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 inf = _mm256_set1_ps(kInf);
  __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256 v = _mm256_and_ps(_mm256_loadu_ps(a + i), abs_mask);
    vmax = _mm256_max_ps(vmax, v);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, inf, _CMP_NLT_UQ));  // Inf or NaN
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  for (float l : lanes) s.amax = std::max(s.amax, l);
  if (_mm256_movemask_ps(bad)) s.bad = true;
  int8_stat_scalar(a + i, len - i, s);
}

// Sign pass 2 over acc a[0, len) = elements [i0, i0 + len) of one chunk (scale s): bit i
// of the output is set for acc >= 0 or NaN, residual r = acc - (+-s). A byte's first
// element assigns it, the others OR into it: the callers visit each byte's elements in
// order, within one task.
void sign_apply_scalar(const float* a, float* r, uint8_t* bits, int64_t i0, int64_t len, float s) {
  for (int64_t j = 0; j < len; ++j) {
    const int64_t i = i0 + j;
    const float v = a[j];
    const bool pos = !(v < 0.f);
    const uint8_t bit = uint8_t(uint8_t(pos) << (i & 7));
    if ((i & 7) == 0)
      bits[i >> 3] = bit;
    else
      bits[i >> 3] |= bit;
    if (r != nullptr) r[j] = v - (pos ? s : -s);
  }
}

AO_AVX2 void sign_apply_avx2(const float* a, float* r, uint8_t* bits, int64_t i0, int64_t len, float s) {
  int64_t j = 0;
  const int64_t head = std::min(len, (8 - (i0 & 7)) & 7);
  sign_apply_scalar(a, r, bits, i0, head, s);
  j = head;
  const __m256 sp = _mm256_set1_ps(s), sn = _mm256_set1_ps(-s), zero = _mm256_setzero_ps();
  for (; j + 8 <= len; j += 8) {
    const __m256 v = _mm256_loadu_ps(a + j);
    const __m256 neg = _mm256_cmp_ps(v, zero, _CMP_LT_OQ);  // NaN: not negative
    bits[(i0 + j) >> 3] = uint8_t(~_mm256_movemask_ps(neg));
    if (r != nullptr) _mm256_storeu_ps(r + j, _mm256_sub_ps(v, _mm256_blendv_ps(sp, sn, neg)));
  }
  sign_apply_scalar(a + j, r == nullptr ? nullptr : r + j, bits, i0 + j, len - j, s);
}

// The counter hash of reference uniform_hash: murmur3's fmix32 over (i mod 2^32) ^ key.
inline uint32_t seed_key(int64_t seed) {
  return uint32_t((uint64_t(seed) * 0x9E3779B9ull + 0x7F4A7C15ull) & 0xFFFFFFFFull);
}

inline float uniform1(uint32_t key, int64_t i) {
  uint32_t x = uint32_t(uint64_t(i) & 0xFFFFFFFFull) ^ key;
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return static_cast<float>(x >> 8) * (1.0f / 16777216.0f);
}

AO_AVX2 inline __m256 uniform8(uint32_t key, int64_t i) {
  __m256i x = _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(uint64_t(i) & 0xFFFFFFFFull))),
                               _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  x = _mm256_xor_si256(x, _mm256_set1_epi32(int(key)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int(0x85EBCA6Bu)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 13));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int(0xC2B2AE35u)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(x, 8)), _mm256_set1_ps(1.0f / 16777216.0f));
}

struct Int8Chunk {
  float scale, inv;
  bool bad;
};

Int8Chunk int8_finish(const Int8Stat& s) {
  if (s.bad) return {kNaN, 0.f, true};
  return {s.amax / 127.0f, s.amax > 0.f ? 127.0f / s.amax : 0.f, false};
}

// Int8 pass 2 over acc a[0, len) = elements [i0, i0 + len) of one chunk.
void int8_apply_scalar(const float* a, float* r, int8_t* q, int64_t i0, int64_t len, const Int8Chunk& c,
                       uint32_t key) {
  for (int64_t j = 0; j < len; ++j) {
    float qf = 0.f;
    if (!c.bad) {
      qf = std::floor(a[j] * c.inv + uniform1(key, i0 + j));
      qf = std::min(std::max(qf, -127.0f), 127.0f);
    }
    q[j] = static_cast<int8_t>(qf);
    if (r != nullptr) r[j] = a[j] - qf * c.scale;
  }
}

AO_AVX2 void int8_apply_avx2(const float* a, float* r, int8_t* q, int64_t i0, int64_t len, const Int8Chunk& c,
                             uint32_t key) {
  if (c.bad) {
    int8_apply_scalar(a, r, q, i0, len, c, key);
    return;
  }
  const __m256 inv = _mm256_set1_ps(c.inv), scale = _mm256_set1_ps(c.scale);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i gather = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    const __m256 v = _mm256_loadu_ps(a + j);
    __m256 qf = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(v, inv), uniform8(key, i0 + j)));
    qf = _mm256_min_ps(_mm256_max_ps(qf, lo), hi);
    const __m256i qi = _mm256_cvttps_epi32(qf);
    const __m256i p16 = _mm256_packs_epi32(qi, qi);
    const __m256i p8 = _mm256_packs_epi16(p16, p16);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + j),
                     _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(p8, gather)));
    if (r != nullptr) _mm256_storeu_ps(r + j, _mm256_sub_ps(v, _mm256_mul_ps(qf, scale)));
  }
  int8_apply_scalar(a + j, r == nullptr ? nullptr : r + j, q + j, i0 + j, len - j, c, key);
}

// The shared driver of sign_compress_ and int8_compress_: pass 1 gathers each chunk's
// statistic (writing acc into the residual), `finish` turns it into the chunk's
// parameters, pass 2 applies them. Chunks up to kFusedChunkMax are processed one by one
// inside a task, so pass 2 reads acc from cache; larger chunks are split across tasks:
// pass 1 by sub-blocks whose partial statistics are merged in order, pass 2 by ranges.
// `align` elements: task boundaries in pass 2 fall on multiples of it (8 for sign bits).
template <class Stat, class Param, class StatFn, class FinishFn, class ApplyFn>
void chunked_passes(const AccSrc& src, int64_t n, int64_t cs, int64_t align, StatFn stat, FinishFn finish,
                    ApplyFn apply) {
  const int64_t chunks = (n + cs - 1) / cs;
  if (cs <= kFusedChunkMax) {
    // Units of g chunks so every unit starts at a multiple of `align` elements.
    const int64_t g = align / std::gcd(cs, align);
    const int64_t units = (chunks + g - 1) / g;
    const int64_t grain = std::max<int64_t>(1, kTaskGrain / (g * cs));
    at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
      float buf[kBlock];
      for (int64_t c = u0 * g; c < std::min(chunks, u1 * g); ++c) {
        const int64_t cb = c * cs, ce = std::min(n, cb + cs);
        Stat s;
        for (int64_t b = cb; b < ce; b += kBlock) {
          const int64_t len = std::min(kBlock, ce - b);
          stat(src.first(b, len, buf), len, s);
        }
        const Param p = finish(c, s, ce - cb);
        for (int64_t b = cb; b < ce; b += kBlock) {
          const int64_t len = std::min(kBlock, ce - b);
          apply(src.view(b, len, buf), b, len, p);
        }
      }
    });
    return;
  }
  // Pass 1 by sub-blocks of kTaskGrain elements within each chunk.
  const int64_t subs_per_chunk = (cs + kTaskGrain - 1) / kTaskGrain;
  std::vector<Stat> partial(static_cast<size_t>(chunks * subs_per_chunk));
  at::parallel_for(0, chunks * subs_per_chunk, 1, [&](int64_t s0, int64_t s1) {
    float buf[kBlock];
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t c = s / subs_per_chunk;
      const int64_t cb = c * cs, ce = std::min(n, cb + cs);
      const int64_t sb = cb + (s % subs_per_chunk) * kTaskGrain, se = std::min(ce, sb + kTaskGrain);
      for (int64_t b = sb; b < se; b += kBlock) {
        const int64_t len = std::min(kBlock, se - b);
        stat(src.first(b, len, buf), len, partial[size_t(s)]);
      }
    }
  });
  std::vector<Param> params;
  params.reserve(size_t(chunks));
  for (int64_t c = 0; c < chunks; ++c) {
    Stat s;
    for (int64_t j = 0; j < subs_per_chunk; ++j) s.merge(partial[size_t(c * subs_per_chunk + j)]);
    params.push_back(finish(c, s, std::min(n, (c + 1) * cs) - c * cs));
  }
  // Pass 2 over ranges of kTaskGrain elements (a multiple of `align`), run by run.
  at::parallel_for(0, (n + kTaskGrain - 1) / kTaskGrain, 1, [&](int64_t r0, int64_t r1) {
    float buf[kBlock];
    const int64_t e = std::min(n, r1 * kTaskGrain);
    for (int64_t b = r0 * kTaskGrain; b < e;) {
      const int64_t c = b / cs;
      const int64_t len = std::min({kBlock, e - b, (c + 1) * cs - b});
      apply(src.view(b, len, buf), b, len, params[size_t(c)]);
      b += len;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sign_compress_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& residual,
                                                     int64_t chunk_size) {
  const int64_t n = grad.numel();
  TORCH_CHECK(n > 0, "accelops.sign_compress_: grad is empty: nothing to compress");
  TORCH_CHECK(chunk_size >= 1, "accelops.sign_compress_: chunk_size must be >= 1, got ", chunk_size);
  const AccSrc src = make_acc_src(grad, residual, "sign_compress_");
  const int64_t chunks = (n + chunk_size - 1) / chunk_size;
  at::Tensor bits = empty_output({(n + 7) / 8}, grad.options().dtype(at::kByte));
  at::Tensor scales = at::empty({chunks}, grad.options().dtype(at::kFloat));
  uint8_t* bp = bits.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();
  const bool avx2 = src.isa == Isa::Avx2;
  chunked_passes<SignStat, float>(
      src, n, chunk_size, 8,
      [&](const float* a, int64_t len, SignStat& s) { avx2 ? sign_stat_avx2(a, len, s) : sign_stat_scalar(a, len, s); },
      [&](int64_t c, const SignStat& s, int64_t len) {
        // mean |acc| in fp64, rounded once to fp32; NaN/Inf in the chunk -> NaN
        const float scale = static_cast<float>(s.sum / static_cast<double>(len));
        return sp[c] = std::isfinite(scale) ? scale : kNaN;
      },
      [&](const float* a, int64_t b, int64_t len, float s) {
        float* r = src.res == nullptr ? nullptr : src.res + b;
        avx2 ? sign_apply_avx2(a, r, bp, b, len, s) : sign_apply_scalar(a, r, bp, b, len, s);
      });
  return {bits, scales};
}

std::tuple<at::Tensor, at::Tensor> int8_compress_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& residual,
                                                     int64_t chunk_size, int64_t seed) {
  const int64_t n = grad.numel();
  TORCH_CHECK(n > 0, "accelops.int8_compress_: grad is empty: nothing to compress");
  TORCH_CHECK(chunk_size >= 1, "accelops.int8_compress_: chunk_size must be >= 1, got ", chunk_size);
  TORCH_CHECK(seed >= 0, "accelops.int8_compress_: seed must be >= 0, got ", seed);
  const AccSrc src = make_acc_src(grad, residual, "int8_compress_");
  const int64_t chunks = (n + chunk_size - 1) / chunk_size;
  at::Tensor q = empty_output({n}, grad.options().dtype(at::kChar));
  at::Tensor scales = at::empty({chunks}, grad.options().dtype(at::kFloat));
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  const bool avx2 = src.isa == Isa::Avx2;
  const uint32_t key = seed_key(seed);
  chunked_passes<Int8Stat, Int8Chunk>(
      src, n, chunk_size, 8,
      [&](const float* a, int64_t len, Int8Stat& s) { avx2 ? int8_stat_avx2(a, len, s) : int8_stat_scalar(a, len, s); },
      [&](int64_t c, const Int8Stat& s, int64_t) {
        const Int8Chunk p = int8_finish(s);
        sp[c] = p.scale;
        return p;
      },
      [&](const float* a, int64_t b, int64_t len, const Int8Chunk& p) {
        float* r = src.res == nullptr ? nullptr : src.res + b;
        avx2 ? int8_apply_avx2(a, r, qp + b, b, len, p, key) : int8_apply_scalar(a, r, qp + b, b, len, p, key);
      });
  return {q, scales};
}

namespace {

// ---------------------------------------------------------------- decompressors

// out[i] for i in [i0, i0 + len) (one chunk, scale column c): the rank-order sum of
// +-scale[r][c], divided by W when W > 1 (the spec's mean over ranks).
void sign_decode_scalar(const uint8_t* bits, int64_t nbytes, const float* scales, int64_t nchunks, int64_t ranks,
                        int64_t c, int64_t i0, int64_t len, float* out) {
  const float w = static_cast<float>(ranks);
  for (int64_t j = 0; j < len; ++j) {
    const int64_t i = i0 + j;
    float total = 0.f;
    for (int64_t r = 0; r < ranks; ++r) {
      const float s = scales[r * nchunks + c];
      const float v = ((bits[r * nbytes + (i >> 3)] >> (i & 7)) & 1) ? s : -s;
      total = r == 0 ? v : total + v;
    }
    out[j] = ranks > 1 ? total / w : total;
  }
}

// nt: the output is larger than the caches; aligned groups are written with streaming stores.
AO_AVX2 inline void store_out8(float* p, __m256 v, bool nt) {
  if (nt && (reinterpret_cast<uintptr_t>(p) & 31) == 0)
    _mm256_stream_ps(p, v);
  else
    _mm256_storeu_ps(p, v);
}

AO_AVX2 void sign_decode_avx2(const uint8_t* bits, int64_t nbytes, const float* scales, int64_t nchunks,
                              int64_t ranks, int64_t c, int64_t i0, int64_t len, float* out, bool nt) {
  const int64_t head = std::min(len, (8 - (i0 & 7)) & 7);
  sign_decode_scalar(bits, nbytes, scales, nchunks, ranks, c, i0, head, out);
  int64_t j = head;
  const __m256i lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 w = _mm256_set1_ps(static_cast<float>(ranks));
  for (; j + 8 <= len; j += 8) {
    const int64_t byte = (i0 + j) >> 3;
    __m256 total = _mm256_setzero_ps();
    for (int64_t r = 0; r < ranks; ++r) {
      const __m256i sel = _mm256_and_si256(_mm256_set1_epi32(bits[r * nbytes + byte]), lane_bits);
      const __m256 zero_bit = _mm256_castsi256_ps(_mm256_cmpeq_epi32(sel, _mm256_setzero_si256()));
      const __m256 v = _mm256_xor_ps(_mm256_set1_ps(scales[r * nchunks + c]), _mm256_and_ps(zero_bit, sign));
      total = r == 0 ? v : _mm256_add_ps(total, v);
    }
    store_out8(out + j, ranks > 1 ? _mm256_div_ps(total, w) : total, nt);
  }
  if (nt) _mm_sfence();
  sign_decode_scalar(bits, nbytes, scales, nchunks, ranks, c, i0 + j, len - j, out + j);
}

void int8_decode_scalar(const int8_t* q, int64_t n, const float* scales, int64_t nchunks, int64_t ranks, int64_t c,
                        int64_t i0, int64_t len, float* out) {
  const float w = static_cast<float>(ranks);
  for (int64_t j = 0; j < len; ++j) {
    float total = 0.f;
    for (int64_t r = 0; r < ranks; ++r) {
      const float v = static_cast<float>(q[r * n + i0 + j]) * scales[r * nchunks + c];
      total = r == 0 ? v : total + v;
    }
    out[j] = ranks > 1 ? total / w : total;
  }
}

AO_AVX2 void int8_decode_avx2(const int8_t* q, int64_t n, const float* scales, int64_t nchunks, int64_t ranks,
                              int64_t c, int64_t i0, int64_t len, float* out, bool nt) {
  const __m256 w = _mm256_set1_ps(static_cast<float>(ranks));
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    __m256 total = _mm256_setzero_ps();
    for (int64_t r = 0; r < ranks; ++r) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + r * n + i0 + j));
      const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
                                     _mm256_set1_ps(scales[r * nchunks + c]));
      total = r == 0 ? v : _mm256_add_ps(total, v);
    }
    store_out8(out + j, ranks > 1 ? _mm256_div_ps(total, w) : total, nt);
  }
  if (nt) _mm_sfence();
  int8_decode_scalar(q, n, scales, nchunks, ranks, c, i0 + j, len - j, out + j);
}

// Runs decode(c, i0, len, out + i0) over [0, n) in chunk-constant runs, in parallel ranges
// starting at multiples of 8.
template <class F>
void for_chunk_runs(int64_t n, int64_t cs, F decode) {
  at::parallel_for(0, (n + 7) / 8, kCopyGrain / 8, [&](int64_t g0, int64_t g1) {
    const int64_t e = std::min(n, g1 * 8);
    for (int64_t b = g0 * 8; b < e;) {
      const int64_t c = b / cs;
      const int64_t len = std::min(e, (c + 1) * cs) - b;
      decode(c, b, len);
      b += len;
    }
  });
}

}  // namespace

at::Tensor sign_decompress_cpu(const at::Tensor& bits, const at::Tensor& scales, int64_t numel, int64_t chunk_size) {
  const char* op = "sign_decompress";
  check_payload(bits, at::kByte, op, "bits");
  check_payload(scales, at::kFloat, op, "scales");
  const int64_t ranks = payload_ranks(bits, scales, op);
  TORCH_CHECK(numel >= 1, "accelops.sign_decompress: numel must be >= 1, got ", numel);
  TORCH_CHECK(chunk_size >= 1, "accelops.sign_decompress: chunk_size must be >= 1, got ", chunk_size);
  const int64_t nbytes = (numel + 7) / 8, nchunks = (numel + chunk_size - 1) / chunk_size;
  TORCH_CHECK(bits.size(-1) == nbytes, "accelops.sign_decompress: bits must hold ", nbytes, " bytes for ", numel,
              " elements, got ", bits.size(-1));
  TORCH_CHECK(scales.size(-1) == nchunks, "accelops.sign_decompress: scales must hold ", nchunks, " scales, got ",
              scales.size(-1));
  TORCH_CHECK(ranks >= 1, "accelops.sign_decompress: no ranks in the payload");
  const at::Tensor b = bits.contiguous(), s = scales.contiguous();
  at::Tensor out = empty_output({numel}, scales.options());
  const uint8_t* bp = b.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const bool avx2 = comm_isa() == Isa::Avx2, nt = numel * 4 >= kStreamBytes;
  for_chunk_runs(numel, chunk_size, [&](int64_t c, int64_t i0, int64_t len) {
    avx2 ? sign_decode_avx2(bp, nbytes, sp, nchunks, ranks, c, i0, len, o + i0, nt)
         : sign_decode_scalar(bp, nbytes, sp, nchunks, ranks, c, i0, len, o + i0);
  });
  return out;
}

at::Tensor int8_decompress_cpu(const at::Tensor& q, const at::Tensor& scales, int64_t chunk_size) {
  const char* op = "int8_decompress";
  check_payload(q, at::kChar, op, "q");
  check_payload(scales, at::kFloat, op, "scales");
  const int64_t ranks = payload_ranks(q, scales, op);
  TORCH_CHECK(chunk_size >= 1, "accelops.int8_decompress: chunk_size must be >= 1, got ", chunk_size);
  const int64_t n = q.size(-1);
  TORCH_CHECK(n >= 1, "accelops.int8_decompress: q is empty");
  const int64_t nchunks = (n + chunk_size - 1) / chunk_size;
  TORCH_CHECK(scales.size(-1) == nchunks, "accelops.int8_decompress: scales must hold ", nchunks, " scales, got ",
              scales.size(-1));
  TORCH_CHECK(ranks >= 1, "accelops.int8_decompress: no ranks in the payload");
  const at::Tensor qc = q.contiguous(), s = scales.contiguous();
  at::Tensor out = empty_output({n}, scales.options());
  const int8_t* qp = qc.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const bool avx2 = comm_isa() == Isa::Avx2, nt = n * 4 >= kStreamBytes;
  for_chunk_runs(n, chunk_size, [&](int64_t c, int64_t i0, int64_t len) {
    avx2 ? int8_decode_avx2(qp, n, sp, nchunks, ranks, c, i0, len, o + i0, nt)
         : int8_decode_scalar(qp, n, sp, nchunks, ranks, c, i0, len, o + i0);
  });
  return out;
}

// ---------------------------------------------------------------- buckets

at::Tensor bucket_flatten_cpu(at::TensorList tensors, std::optional<at::ScalarType> dtype,
                              std::optional<double> divisor) {
  const char* op = "bucket_flatten";
  TORCH_CHECK(!tensors.empty() || dtype.has_value(), "accelops.bucket_flatten: tensors is empty: pass dtype=");
  const at::ScalarType out_type = dtype.has_value() ? *dtype : tensors[0].scalar_type();
  const Dt ddt = dt_of(out_type, op, "dtype");
  const float d = divisor_f32(divisor, op);
  std::vector<at::Tensor> keep;
  std::vector<Piece> pieces;
  std::vector<int64_t> starts;
  int64_t total = 0;
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "accelops.bucket_flatten: tensors must be CPU tensors");
    const Dt sdt = dt_of(t.scalar_type(), op, "tensors");
    keep.push_back(t.contiguous());
    pieces.push_back(Piece{static_cast<const char*>(keep.back().data_ptr()), sdt, nullptr, ddt, t.numel()});
    starts.push_back(total);
    total += t.numel();
  }
  at::Tensor out = empty_output({total}, at::TensorOptions().dtype(out_type).device(at::kCPU));
  char* o = static_cast<char*>(out.data_ptr());
  for (size_t j = 0; j < pieces.size(); ++j) pieces[j].dst = o + starts[j] * dt_size(ddt);
  run_copies(pieces, starts, total, divisor.has_value(), d);
  return out;
}

void bucket_unflatten_cpu(const at::Tensor& flat, at::TensorList tensors, std::optional<double> divisor) {
  const char* op = "bucket_unflatten_";
  const Dt sdt = dt_of(flat.scalar_type(), op, "flat");
  TORCH_CHECK(flat.dim() == 1 && flat.device().is_cpu(), "accelops.bucket_unflatten_: flat must be a 1-D CPU tensor");
  const float d = divisor_f32(divisor, op);
  const at::Tensor fc = flat.contiguous();
  const char* f = static_cast<const char*>(fc.data_ptr());
  std::vector<Piece> pieces;
  std::vector<int64_t> starts;
  int64_t total = 0;
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "accelops.bucket_unflatten_: tensors must be CPU tensors");
    TORCH_CHECK(t.is_contiguous(), "accelops.bucket_unflatten_: tensors must be contiguous (written in place)");
    const Dt ddt = dt_of(t.scalar_type(), op, "tensors");
    starts.push_back(total);
    total += t.numel();
    TORCH_CHECK(total <= flat.numel(), "accelops.bucket_unflatten_: flat has ", flat.numel(),
                " elements but the tensors hold more");
    pieces.push_back(Piece{f + starts.back() * dt_size(sdt), sdt, static_cast<char*>(t.data_ptr()), ddt, t.numel()});
  }
  TORCH_CHECK(total == flat.numel(), "accelops.bucket_unflatten_: flat has ", flat.numel(),
              " elements but the tensors hold ", total);
  run_copies(pieces, starts, total, divisor.has_value(), d);
}

at::Tensor cast_div_cpu(const at::Tensor& x, double divisor, at::ScalarType dtype) {
  const char* op = "cast_div";
  const Dt sdt = dt_of(x.scalar_type(), op, "x");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "accelops.cast_div: dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(x.device().is_cpu(), "accelops.cast_div: x must be a CPU tensor");
  const float d = divisor_f32(divisor, op);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = empty_output(x.sizes(), x.options().dtype(dtype));
  std::vector<Piece> pieces{
      Piece{static_cast<const char*>(xc.data_ptr()), sdt, static_cast<char*>(out.data_ptr()), dt_of(dtype, op, "dtype"),
            x.numel()}};
  run_copies(pieces, {0}, x.numel(), true, d);
  return out;
}

// ---------------------------------------------------------------- PowerSGD: Gram-Schmidt

namespace {

constexpr int64_t kOrthRows = 1 << 14;  // rows per block of the (deterministic) row-parallel loops

// Sum over row blocks of f(r0, r1), blocks combined in order: the same result whatever the
// thread count (nested in a parallel region, the blocks just run in sequence). A matrix of
// one block calls f directly: no parallel_for, no type-erased call, for the small matrices
// PowerSGD batches.
template <class F>
double sum_blocks(int64_t n, const F& f) {
  const int64_t blocks = (n + kOrthRows - 1) / kOrthRows;
  if (blocks <= 1) return f(0, n);
  std::vector<double> part(static_cast<size_t>(blocks), 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) part[size_t(b)] = f(b * kOrthRows, std::min(n, (b + 1) * kOrthRows));
  });
  double s = 0.0;
  for (double p : part) s += p;
  return s;
}

template <class F>
void for_blocks(int64_t n, const F& f) {
  if (n <= kOrthRows) {
    f(0, n);
    return;
  }
  at::parallel_for(0, (n + kOrthRows - 1) / kOrthRows, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b * kOrthRows, std::min(n, (b + 1) * kOrthRows));
  });
}

double dot_scalar(const double* a, const double* b, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

AO_AVX2 double dot_avx2(const double* a, const double* b, int64_t n) {
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    s0 = _mm256_fmadd_pd(_mm256_loadu_pd(a + i), _mm256_loadu_pd(b + i), s0);
    s1 = _mm256_fmadd_pd(_mm256_loadu_pd(a + i + 4), _mm256_loadu_pd(b + i + 4), s1);
  }
  alignas(32) double l[4];
  _mm256_store_pd(l, _mm256_add_pd(s0, s1));
  double s = (l[0] + l[1]) + (l[2] + l[3]);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y -= c * x
void axpy_scalar(double* y, const double* x, double c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] -= c * x[i];
}

AO_AVX2 void axpy_avx2(double* y, const double* x, double c, int64_t n) {
  const __m256d cv = _mm256_set1_pd(c);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) _mm256_storeu_pd(y + i, _mm256_fnmadd_pd(cv, _mm256_loadu_pd(x + i), _mm256_loadu_pd(y + i)));
  for (; i < n; ++i) y[i] -= c * x[i];
}

// Modified Gram-Schmidt over the r columns of m [n, r] (row-major, T = float or double),
// in an fp64 column-major workspace: each column is contiguous there (vector loops for any
// r), and fp32 input is rounded once at the end, so its error stays at fp32's last bit
// rather than growing with n as the reference's fp32 sums do.
template <class T>
void orthogonalize_matrix(T* m, int64_t n, int64_t r, double eps, std::vector<double>& ws, Isa isa) {
  ws.resize(size_t(n * r));
  double* w = ws.data();
  for_blocks(n, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row)
      for (int64_t j = 0; j < r; ++j) w[j * n + row] = static_cast<double>(m[row * r + j]);
  });
  const bool avx2 = isa == Isa::Avx2;
  auto dot = [&](const double* a, const double* b) {
    return sum_blocks(n, [&](int64_t r0, int64_t r1) {
      return avx2 ? dot_avx2(a + r0, b + r0, r1 - r0) : dot_scalar(a + r0, b + r0, r1 - r0);
    });
  };
  std::vector<double> dots(static_cast<size_t>(r));
  for (int64_t i = 0; i < r; ++i) {
    double* ci = w + i * n;
    const double d = std::sqrt(dot(ci, ci)) + eps;
    for_blocks(n, [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) ci[row] = ci[row] / d;
    });
    for (int64_t j = i + 1; j < r; ++j) dots[size_t(j)] = dot(ci, w + j * n);
    for_blocks(n, [&](int64_t r0, int64_t r1) {
      for (int64_t j = i + 1; j < r; ++j)
        avx2 ? axpy_avx2(w + j * n + r0, ci + r0, dots[size_t(j)], r1 - r0)
             : axpy_scalar(w + j * n + r0, ci + r0, dots[size_t(j)], r1 - r0);
    });
  }
  for_blocks(n, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row)
      for (int64_t j = 0; j < r; ++j) m[row * r + j] = static_cast<T>(w[j * n + row]);
  });
}

}  // namespace

void orthogonalize_cpu(const at::Tensor& m, double eps) {
  TORCH_CHECK(m.scalar_type() == at::kFloat || m.scalar_type() == at::kDouble,
              "accelops.orthogonalize_: m must be float32 or float64, got ", m.scalar_type());
  TORCH_CHECK(m.dim() >= 2, "accelops.orthogonalize_: m must be [..., n, r], got shape ", m.sizes());
  TORCH_CHECK(m.is_contiguous() && m.device().is_cpu(), "accelops.orthogonalize_: m must be a contiguous CPU tensor");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "accelops.orthogonalize_: eps must be a finite number >= 0, got ", eps);
  const int64_t n = m.size(-2), r = m.size(-1);
  if (m.numel() == 0) return;
  const int64_t batch = m.numel() / (n * r);
  const Isa isa = comm_isa();
  // Matrices in parallel (each one's row loops then run inline); a lone matrix is called
  // directly, outside any parallel region, so a large one parallelizes its row loops.
  auto run = [&](int64_t b0, int64_t b1) {
    std::vector<double> ws;
    for (int64_t b = b0; b < b1; ++b) {
      if (m.scalar_type() == at::kFloat)
        orthogonalize_matrix(m.data_ptr<float>() + b * n * r, n, r, eps, ws, isa);
      else
        orthogonalize_matrix(m.data_ptr<double>() + b * n * r, n, r, eps, ws, isa);
    }
  };
  if (batch == 1) {
    run(0, 1);
    return;
  }
  at::parallel_for(0, batch, std::max<int64_t>(1, kOrthRows / std::max<int64_t>(1, n * r)), run);
}

}  // namespace accelops
