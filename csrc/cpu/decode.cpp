// One decode step of a ternary (BitNet b1.58 / Llama-shaped) transformer block on the CPU:
// RMSNorm -> int8 activations -> q/k/v ternary GEMVs -> RoPE -> KV-cache write -> attention
// over the cache -> (sub-norm) -> o_proj -> residual -> RMSNorm -> gate/up GEMVs ->
// relu2 / swiglu -> (sub-norm) -> down_proj -> residual, in one call.
//
// Why: at M = 1 the seven GEMVs of a 2B-parameter block take ~0.7 ms on 2 cores, and the
// eager PyTorch step around them (about 40 small ops, each a dispatcher call plus an OpenMP
// region, and F.scaled_dot_product_attention's set-up) took as long again. The GEMVs here
// are the ones ternary_matmul runs (ternary_gemm_i32, same int32 sums, same epilogue
// formula), so every projection's output equals ternary_matmul's for the same input; the
// float parts (norms, RoPE, softmax) are computed in fp32 in the order PyTorch's eager ops
// use, but reductions may round differently (accelops/reference/decode.py is the spec,
// matched to a tolerance).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../ops.h"
#include "kernels.h"

namespace accelops {

namespace {

constexpr int kProjections = 7;  // q, k, v, o, gate, up, down
enum Proj { Q = 0, K = 1, V = 2, O = 3, GATE = 4, UP = 5, DOWN = 6 };
const char* const kProjectionNames[kProjections] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"};

int64_t blocks_of(int64_t k) { return (k + kTernaryBlockK - 1) / kTernaryBlockK; }
int64_t base3_blocks_of(int64_t k) { return (k + kBase3BlockK - 1) / kBase3BlockK; }

// The packed weight formats the step reads (reference/ternary.py, reference/ternary_base3.py):
// "i2" 2 bits a weight in blocks of 128, "base3" 5 weights a byte in blocks of 320.
enum class Format { I2, Base3 };

// Bytes a row of a weight packed for K, and the activation length the kernels read (K
// zero-padded to the format's block).
int64_t packed_cols(Format fmt, int64_t k) {
  return fmt == Format::I2 ? blocks_of(k) * kTernaryBlockBytes : base3_blocks_of(k) * kBase3BlockBytes;
}
int64_t padded_k(Format fmt, int64_t k) {
  return fmt == Format::I2 ? blocks_of(k) * kTernaryBlockK : base3_blocks_of(k) * kBase3BlockK;
}

// ---------------------------------------------------------------- float helpers

__attribute__((target("avx2"))) float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_add_ps(acc0, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    acc1 = _mm256_add_ps(acc1, _mm256_mul_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8)));
  }
  float s = hsum_ps(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

float dot_scalar(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += p * x
__attribute__((target("avx2"))) void axpy_avx2(float p, const float* x, float* y, int64_t n) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_mul_ps(pv, _mm256_loadu_ps(x + i))));
  for (; i < n; ++i) y[i] += p * x[i];
}

void axpy_scalar(float p, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += p * x[i];
}

struct FloatOps {
  bool avx2;
  float dot(const float* a, const float* b, int64_t n) const { return avx2 ? dot_avx2(a, b, n) : dot_scalar(a, b, n); }
  void axpy(float p, const float* x, float* y, int64_t n) const {
    avx2 ? axpy_avx2(p, x, y, n) : axpy_scalar(p, x, y, n);
  }
};

// y = (x * rsqrt(mean(x^2) + eps)) * w: nn.RMSNorm's formula and order of the products.
void rms_norm_row(const FloatOps& f, const float* x, const float* w, int64_t n, double eps, float* y) {
  const float mean_sq = f.dot(x, x, n) / static_cast<float>(n);
  const float r = 1.0f / std::sqrt(mean_sq + static_cast<float>(eps));
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] * r) * w[i];
}

// ---------------------------------------------------------------- attention

// exp(x) for 8 floats: x = n ln2 + r (|r| <= ln2 / 2), exp(r) by its degree-6 Taylor
// polynomial (truncation ~1e-7 relative), times 2^n built in the exponent bits; 0 below
// -87.3 (where expf underflows to denormals).
__attribute__((target("avx2,fma"))) __m256 exp_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.37626f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// p[j] = exp(s[j] - mx), -> sum_j p[j] (in place).
__attribute__((target("avx2,fma"))) float softmax_numerators_avx2(float* s, int64_t n, float mx) {
  const __m256 m = _mm256_set1_ps(mx);
  __m256 total = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
    _mm256_storeu_ps(s + j, e);
    total = _mm256_add_ps(total, e);
  }
  float sum = hsum_ps(total);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  return sum;
}

// out[0 : 8C) = inv * sum_j p[j] * v[j * ld + 0 : 8C), the sums in registers while the
// rows stream by (one pass over the value rows a block of 64 columns).
template <int C>
__attribute__((target("avx2,fma"))) void weighted_rows_avx2(const float* p, const float* v, int64_t n, int64_t ld,
                                                           float inv, float* out) {
  __m256 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 pj = _mm256_set1_ps(p[j]);
    const float* vj = v + j * ld;
    for (int c = 0; c < C; ++c) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * c), acc[c]);
  }
  const __m256 s = _mm256_set1_ps(inv);
  for (int c = 0; c < C; ++c) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(acc[c], s));
}

// H query heads (q: H rows of hd) against one key/value head (k, v: n rows of hd), hd a
// multiple of 8: scores (H x n scratch) then out (H rows of hd) = softmax(q k^T * scale) v.
template <int H>
__attribute__((target("avx2,fma"))) void attend_avx2(const float* q, const float* k, const float* v, int64_t n,
                                                    int64_t hd, float scale, float* scores, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    __m256 acc[H];
    for (int h = 0; h < H; ++h) acc[h] = _mm256_setzero_ps();
    const float* kj = k + j * hd;
    for (int64_t c = 0; c < hd; c += 8) {
      const __m256 kv = _mm256_loadu_ps(kj + c);
      for (int h = 0; h < H; ++h) acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * hd + c), kv, acc[h]);
    }
    for (int h = 0; h < H; ++h) scores[h * n + j] = hsum_ps(acc[h]) * scale;
  }
  float inv[H];
  for (int h = 0; h < H; ++h) {
    float* s = scores + h * n;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
    inv[h] = 1.0f / softmax_numerators_avx2(s, n, mx);
  }
  for (int h = 0; h < H; ++h) {
    int64_t c = 0;
    for (; c + 64 <= hd; c += 64) weighted_rows_avx2<8>(scores + h * n, v + c, n, hd, inv[h], out + h * hd + c);
    for (; c < hd; c += 8) weighted_rows_avx2<1>(scores + h * n, v + c, n, hd, inv[h], out + h * hd + c);
  }
}

void attend_scalar(const float* q, const float* k, const float* v, int64_t n, int64_t hd, float scale, float* s,
                   float* out) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    s[j] = dot_scalar(q, k + j * hd, hd) * scale;
    mx = std::max(mx, s[j]);
  }
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - mx);
    total += s[j];
  }
  std::fill_n(out, hd, 0.0f);
  for (int64_t j = 0; j < n; ++j) axpy_scalar(s[j], v + j * hd, out, hd);
  const float inv = 1.0f / total;
  for (int64_t i = 0; i < hd; ++i) out[i] *= inv;
}

// `heads` (1 to 4) consecutive query heads sharing one key/value head.
void attend_heads(const FloatOps& f, const float* q, const float* k, const float* v, int64_t n, int64_t hd,
                  int64_t heads, float scale, float* scores, float* out) {
  if (f.avx2 && hd % 8 == 0) {
    switch (heads) {
      case 1:
        return attend_avx2<1>(q, k, v, n, hd, scale, scores, out);
      case 2:
        return attend_avx2<2>(q, k, v, n, hd, scale, scores, out);
      case 3:
        return attend_avx2<3>(q, k, v, n, hd, scale, scores, out);
      default:
        return attend_avx2<4>(q, k, v, n, hd, scale, scores, out);
    }
  }
  for (int64_t h = 0; h < heads; ++h) attend_scalar(q + h * hd, k, v, n, hd, scale, scores, out + h * hd);
}

// ---------------------------------------------------------------- projections

// int8 activations of `rows` rows of width k (already normed), shared by every projection
// that reads them.
struct QuantizedRows {
  int64_t m = 0, kp = 0;
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;

  void quantize(const float* x, int64_t m_, int64_t k, Format fmt) {
    m = m_;
    kp = padded_k(fmt, k);
    q.assign(m * kp, 0);
    scale.assign(m, kQuantEps / 127.0f);
    sum.assign(m, 0);
    const Isa isa = active_isa();
    for (int64_t r = 0; r < m; ++r)
      scale[r] = quantize_row_int8(x + r * k, k, kp, q.data() + r * kp, sum.data() + r, isa);
  }
};

struct Projection {
  const uint8_t* w = nullptr;
  const float* w_scale = nullptr;
  bool scale_per_row = false;
  const float* bias = nullptr;
  int64_t n = 0, k = 0;
  Format format = Format::I2;
};

// out[m, n] = (float(sum_k q[m, k] * W[n, k]) * x_scale[m]) * w_scale[n or 0] + bias[n]:
// ternary_matmul's GEMV / GEMM and epilogue, into a caller's fp32 buffer.
void project(const QuantizedRows& x, const Projection& p, std::vector<int32_t>& acc, float* out) {
  const int64_t m = x.m, n = p.n;
  acc.resize(m * n);
  int32_t* a = acc.data();
  auto finish = [&](int64_t r0, int64_t r1, int64_t n0, int64_t n1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float xs = x.scale[r];
      for (int64_t c = n0; c < n1; ++c) {
        float v = (static_cast<float>(a[r * n + c]) * xs) * p.w_scale[p.scale_per_row ? c : 0];
        if (p.bias) v += p.bias[c];
        out[r * n + c] = v;
      }
    }
  };
  if (p.format == Format::Base3) {
    // a GEMV per row (the base3 kernel is made for M = 1; decode batches are small)
    for (int64_t r = 0; r < m; ++r)
      ternary_base3_gemv_i32(x.q.data() + r * x.kp, x.sum[r], p.w, n, base3_blocks_of(p.k), a + r * n,
                             active_dot_isa(), [&](int64_t n0, int64_t n1) { finish(r, r + 1, n0, n1); });
    return;
  }
  ternary_gemm_i32(x.q.data(), x.sum.data(), m, p.w, n, blocks_of(p.k), a, active_dot_isa(),
                   [&](int64_t n0, int64_t n1) { finish(0, m, n0, n1); });
}

// x * cos + rotate_half(x) * sin for one head (rotate_half(x) = [-x2, x1]), products rounded
// separately as in the eager expression.
void rope_head(float* x, const float* cos, const float* sin, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] + (-b) * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

const float* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

void check_f32_vector(const std::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == n && t->is_contiguous(), what,
              " must be a contiguous float32 [", n, "] tensor, got ", t->scalar_type(), " of shape ", t->sizes());
}

}  // namespace

at::Tensor ternary_decode_layer_cpu(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos,
                                    const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                                    const c10::List<std::optional<at::Tensor>>& norms, at::TensorList w_packed,
                                    at::TensorList w_scale, const c10::List<std::optional<at::Tensor>>& bias,
                                    at::IntArrayRef in_features, int64_t n_heads, double eps,
                                    c10::string_view activation, c10::string_view format) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 [batch, dim] tensor, got ", x.scalar_type(), " of shape ", x.sizes());
  TORCH_CHECK(activation == "relu2" || activation == "swiglu", "activation must be 'relu2' or 'swiglu', got '",
              std::string(activation), "'");
  TORCH_CHECK_VALUE(format == "i2" || format == "base3", "format must be 'i2' or 'base3', got '",
                    std::string(format), "'");
  const Format fmt = format == "i2" ? Format::I2 : Format::Base3;
  TORCH_CHECK(norms.size() == 4, "norms must hold 4 entries (norm1, attn_sub_norm, norm2, ffn_sub_norm), got ",
              norms.size());
  TORCH_CHECK(w_packed.size() == kProjections && w_scale.size() == kProjections && bias.size() == kProjections,
              "w_packed, w_scale and bias must hold 7 entries (q, k, v, o, gate, up, down)");
  const int64_t batch = x.size(0), dim = x.size(1);
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && k_cache.dim() == 4 && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == at::kFloat &&
                  v_cache.is_contiguous() && k_cache.size(0) == batch,
              "k_cache and v_cache must be contiguous float32 [batch, n_kv_heads, size, head_dim] tensors of one "
              "shape, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t kv_heads = k_cache.size(1), slots = k_cache.size(2), hd = k_cache.size(3);
  TORCH_CHECK(n_heads > 0 && n_heads * hd == dim && kv_heads > 0 && n_heads % kv_heads == 0 && hd % 2 == 0,
              "n_heads=", n_heads, " does not fit dim=", dim, ", n_kv_heads=", kv_heads, ", head_dim=", hd);
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == batch,
              "positions must be int64 [batch], got ", positions.scalar_type(), " of shape ", positions.sizes());
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.size(0) == batch && cos.size(1) == hd &&
                  sin.sizes() == cos.sizes(),
              "cos and sin must be contiguous float32 [batch, head_dim] tensors, got ", cos.sizes(), " and ",
              sin.sizes());
  const at::Tensor pos = positions.contiguous();
  const int64_t* pos_p = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(pos_p[b] >= 0 && pos_p[b] < slots, "positions[", b, "]=", pos_p[b], " lies outside the cache of ",
                slots, " slots");

  const int64_t kv_dim = kv_heads * hd;
  const int64_t hidden = w_packed[UP].size(0);
  const int64_t out_features[kProjections] = {dim, kv_dim, kv_dim, dim, hidden, hidden, dim};
  // Each projection's K as the block gives it; in_features (the K each weight was packed for)
  // must agree: the packed width alone cannot tell K's apart within one 128-block, so a weight
  // packed for a larger K would otherwise be read as if zero-padded (reference: check_in_features).
  const int64_t implied_k[kProjections] = {dim, dim, dim, dim, dim, dim, hidden};
  TORCH_CHECK_VALUE(in_features.size() == kProjections,
                    "in_features must be a list of 7 ints (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                    "down_proj), got ",
                    in_features.size(), " entries");
  for (int i = 0; i < kProjections; ++i) {
    TORCH_CHECK_VALUE(in_features[i] >= 1, "in_features[", i, "] (", kProjectionNames[i],
                      ") must be a positive int, got ", in_features[i]);
    TORCH_CHECK_VALUE(in_features[i] == implied_k[i], "in_features[", i, "] (", kProjectionNames[i], ") = ",
                      in_features[i], " does not match its input's K=", implied_k[i],
                      i == DOWN ? " (up_proj's N, the FFN width)" : " (x's dim)", ": w_packed[", i,
                      "] was packed for another K");
  }
  Projection proj[kProjections];
  for (int i = 0; i < kProjections; ++i) {
    const at::Tensor& w = w_packed[i];
    const at::Tensor& s = w_scale[i];
    TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() &&
                    w.size(0) == out_features[i] && w.size(1) == packed_cols(fmt, in_features[i]),
                "w_packed[", i, "] (", kProjectionNames[i], ") must be a contiguous uint8 [", out_features[i], ", ",
                packed_cols(fmt, in_features[i]), "] tensor (",
                fmt == Format::I2 ? "ceil(K/128)*32" : "ceil(K/320)*64", " bytes a row in format '", std::string(format),
                "' for in_features[", i, "]=", in_features[i], "), got ",
                w.scalar_type(), " of shape ", w.sizes());
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && (s.numel() == 1 || s.numel() == out_features[i]),
                "w_scale[", i, "] must be a contiguous float32 tensor of 1 or ", out_features[i], " scales, got ",
                s.sizes());
    const std::optional<at::Tensor> b = bias.get(i);
    check_f32_vector(b, out_features[i], "bias");
    proj[i] = {w.data_ptr<uint8_t>(), s.data_ptr<float>(), s.numel() != 1, optional_ptr(b), out_features[i],
               in_features[i], fmt};
  }
  const std::optional<at::Tensor> norm1 = norms.get(0), attn_sub = norms.get(1), norm2 = norms.get(2),
                                  ffn_sub = norms.get(3);
  TORCH_CHECK(norm1.has_value() && norm2.has_value(), "norms[0] (norm1) and norms[2] (norm2) are required");
  check_f32_vector(norm1, dim, "norm1");
  check_f32_vector(attn_sub, dim, "attn_sub_norm");
  check_f32_vector(norm2, dim, "norm2");
  check_f32_vector(ffn_sub, hidden, "ffn_sub_norm");

  const FloatOps f{active_isa() != Isa::Scalar};
  const float* xp = x.data_ptr<float>();
  at::Tensor out = at::empty_like(x);
  float* yp = out.data_ptr<float>();
  std::vector<float> h(batch * std::max(dim, hidden));
  std::vector<int32_t> acc;
  QuantizedRows qx;

  // ---- attention: norm1 -> q, k, v
  for (int64_t b = 0; b < batch; ++b) rms_norm_row(f, xp + b * dim, norm1->data_ptr<float>(), dim, eps, &h[b * dim]);
  qx.quantize(h.data(), batch, dim, fmt);
  std::vector<float> q(batch * dim), k(batch * kv_dim), v(batch * kv_dim);
  project(qx, proj[Q], acc, q.data());
  project(qx, proj[K], acc, k.data());
  project(qx, proj[V], acc, v.data());

  // RoPE at each row's position, then the row's keys and values into its cache slot.
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    const float* c = cos.data_ptr<float>() + b * hd;
    const float* s = sin.data_ptr<float>() + b * hd;
    for (int64_t head = 0; head < n_heads; ++head) rope_head(&q[b * dim + head * hd], c, s, hd);
    for (int64_t g = 0; g < kv_heads; ++g) {
      rope_head(&k[b * kv_dim + g * hd], c, s, hd);
      const int64_t slot = ((b * kv_heads + g) * slots + pos_p[b]) * hd;
      std::copy_n(&k[b * kv_dim + g * hd], hd, kc + slot);
      std::copy_n(&v[b * kv_dim + g * hd], hd, vc + slot);
    }
  }

  // Attention of each row over its slots 0 .. position: softmax(q k^T / sqrt(hd)) v, the
  // query heads that share a key/value head taken together (each key and value row read once
  // for them). Tasks: (row, kv head, chunk of up to 4 query heads); chunks of 2 when there
  // would be too few tasks to share between the threads.
  std::vector<float> attn(batch * dim);
  const int64_t group = n_heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int64_t chunk = (group % 2 == 0 && batch * kv_heads < 4 * at::get_num_threads()) ? 2 : std::min<int64_t>(group, 4);
  const int64_t chunks = (group + chunk - 1) / chunk;
  at::parallel_for(0, batch * kv_heads * chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (kv_heads * chunks), g = (t / chunks) % kv_heads, c = t % chunks;
      const int64_t h0 = g * group + c * chunk, heads = std::min(chunk, (g + 1) * group - h0);
      const int64_t n = pos_p[b] + 1;
      scores.resize(heads * n);
      attend_heads(f, &q[b * dim + h0 * hd], kc + (b * kv_heads + g) * slots * hd,
                   vc + (b * kv_heads + g) * slots * hd, n, hd, heads, scale, scores.data(), &attn[b * dim + h0 * hd]);
    }
  });
  if (attn_sub.has_value())
    for (int64_t b = 0; b < batch; ++b)
      rms_norm_row(f, &attn[b * dim], attn_sub->data_ptr<float>(), dim, eps, &attn[b * dim]);
  qx.quantize(attn.data(), batch, dim, fmt);
  project(qx, proj[O], acc, yp);
  for (int64_t i = 0; i < batch * dim; ++i) yp[i] = xp[i] + yp[i];  // residual

  // ---- FFN: norm2 -> gate, up -> activation -> (sub-norm) -> down
  for (int64_t b = 0; b < batch; ++b) rms_norm_row(f, yp + b * dim, norm2->data_ptr<float>(), dim, eps, &h[b * dim]);
  qx.quantize(h.data(), batch, dim, fmt);
  std::vector<float> gate(batch * hidden), up(batch * hidden);
  project(qx, proj[GATE], acc, gate.data());
  project(qx, proj[UP], acc, up.data());
  if (activation == "relu2") {
    for (int64_t i = 0; i < batch * hidden; ++i) {
      const float r = std::max(gate[i], 0.0f);
      gate[i] = (r * r) * up[i];
    }
  } else {  // swiglu: silu(g) * u
    for (int64_t i = 0; i < batch * hidden; ++i) {
      const float g = gate[i];
      gate[i] = (g / (1.0f + std::exp(-g))) * up[i];
    }
  }
  if (ffn_sub.has_value())
    for (int64_t b = 0; b < batch; ++b)
      rms_norm_row(f, &gate[b * hidden], ffn_sub->data_ptr<float>(), hidden, eps, &gate[b * hidden]);
  qx.quantize(gate.data(), batch, hidden, fmt);
  std::vector<float> down(batch * dim);
  project(qx, proj[DOWN], acc, down.data());
  for (int64_t i = 0; i < batch * dim; ++i) yp[i] = yp[i] + down[i];
  return out;
}

}  // namespace accelops
