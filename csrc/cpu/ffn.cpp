// Fused FFN on the CPU: y = act(x Wg^T + bg, x Wu^T + bu) Wd^T + bd, forward and backward,
// processed in blocks of tokens so that, besides the outputs and the saved pre-activations
// g and u, only [block, hidden] temporaries are ever alive.
//
// Forward per block: g_b, u_b = two GEMMs written straight into the saved g/u (or block
// buffers in inference), h_b = act(g_b) * u_b in one pass, y_b = h_b Wd^T + bd.
// Backward per block: dh_b = dy_b Wd, then one pass reads g_b, u_b, dh_b and writes h_b
// (recomputed, never saved), dg_b (in place over dh_b) and du_b; then
// dWd += dy_b^T h_b, dWg += dg_b^T x_b, dWu += du_b^T x_b, dx_b = dg_b Wg + du_b Wu.
//
// GEMMs are at::mm_out / at::addmm_out into preallocated block buffers (no allocator
// churn). Everything is computed in fp32: bf16/fp16 operands are widened per block (on
// AVX2 CPUs without bf16 FMA an fp32 GEMM is also the faster one) and the weight
// gradients accumulate across blocks in fp32, rounded to the weights' dtype once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "../ops.h"
#include "kernels.h"

namespace accelops {
namespace {

enum class Act { SwiGLU, GeGLU, GELU };

Act parse_activation(const std::string& a) {
  if (a == "swiglu") return Act::SwiGLU;
  if (a == "geglu") return Act::GeGLU;
  if (a == "gelu") return Act::GELU;
  TORCH_CHECK(false, "activation must be one of 'swiglu', 'geglu', 'gelu', got '", a, "'");
}

constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

// 512 rows: [512, H] fp32 buffers are 5.5 MiB at H = 2816, and dW accumulations with
// K = 512 cost ~2% over one full-K GEMM (measured at T=4096, D=1024, H=2816).
int64_t block_rows(int64_t t) {
  static const int64_t configured = [] {
    const char* env = std::getenv("ACCELOPS_FFN_BLOCK");
    return env ? std::max<int64_t>(1, std::atoll(env)) : int64_t(512);
  }();
  return std::max<int64_t>(1, std::min(t, configured));
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }
inline float gelu(float v) { return 0.5f * v * (1.0f + std::erf(v * kInvSqrt2)); }

// ---------------------------------------------------------------- SwiGLU, AVX2
// silu is the one activation whose cost matters at LLM shapes; glibc's expf does not
// vectorize, so exp is the Cephes polynomial (as in avx_mathfun, ~1 ulp) on 8 lanes.
// GELU's erf stays scalar (glibc erff).

__attribute__((target("avx2,fma"))) static inline __m256 exp256(__m256 x) {
  // min/max with x second: a NaN lane stays NaN.
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);
  x = _mm256_max_ps(_mm256_set1_ps(-88.3762626647949f), x);
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) static int64_t swiglu_forward_avx2(const float* g, const float* u, float* h,
                                                                      int64_t b, int64_t e) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    const __m256 gi = _mm256_loadu_ps(g + i);
    const __m256 den = _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, gi)));
    _mm256_storeu_ps(h + i, _mm256_mul_ps(_mm256_div_ps(gi, den), _mm256_loadu_ps(u + i)));
  }
  return i;
}

__attribute__((target("avx2,fma"))) static int64_t swiglu_backward_avx2(const float* g, const float* u,
                                                                       const float* dh, float* dg, float* du,
                                                                       int64_t b, int64_t e) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    const __m256 gi = _mm256_loadu_ps(g + i), ui = _mm256_loadu_ps(u + i), d = _mm256_loadu_ps(dh + i);
    const __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, gi))));
    const __m256 a = _mm256_mul_ps(gi, s);
    _mm256_storeu_ps(du + i, _mm256_mul_ps(d, a));
    const __m256 ds = _mm256_add_ps(s, _mm256_mul_ps(a, _mm256_sub_ps(one, s)));
    _mm256_storeu_ps(dg + i, _mm256_mul_ps(_mm256_mul_ps(d, ui), ds));
  }
  return i;
}

// h = act(g) * u over n elements.
void activation_forward(Act act, const float* g, const float* u, float* h, int64_t n) {
  const Isa isa = active_isa();
  at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) {
    if (act == Act::SwiGLU) {
      int64_t i = isa == Isa::Avx2 ? swiglu_forward_avx2(g, u, h, b, e) : b;
      for (; i < e; ++i) h[i] = silu(g[i]) * u[i];
    } else if (act == Act::GeGLU) {
#pragma omp simd
      for (int64_t i = b; i < e; ++i) h[i] = gelu(g[i]) * u[i];
    } else {
#pragma omp simd
      for (int64_t i = b; i < e; ++i) h[i] = gelu(u[i]);
    }
  });
}

// From g, u and dh: dg and du, in one pass.
//   swiglu: s = sigmoid(g); dg = dh u s (1 + g (1 - s)); du = dh g s
//   geglu:  dg = dh u gelu'(g); du = dh gelu(g)
//   gelu:   du = dh gelu'(u)                                  (dg unused)
// Each element is read before it is written, so the outputs may alias the inputs
// element for element: dg over dh or over g, du over dh or over u.
void activation_backward(Act act, const float* g, const float* u, const float* dh, float* dg, float* du,
                         int64_t n) {
  const Isa isa = active_isa();
  at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) {
    if (act == Act::SwiGLU) {
      int64_t i = isa == Isa::Avx2 ? swiglu_backward_avx2(g, u, dh, dg, du, b, e) : b;
      for (; i < e; ++i) {
        const float gi = g[i], ui = u[i], d = dh[i];
        const float s = 1.0f / (1.0f + std::exp(-gi));
        const float a = gi * s;
        du[i] = d * a;
        dg[i] = d * ui * (s + a * (1.0f - s));
      }
    } else if (act == Act::GeGLU) {
#pragma omp simd
      for (int64_t i = b; i < e; ++i) {
        const float gi = g[i], ui = u[i], d = dh[i];
        const float cdf = 0.5f * (1.0f + std::erf(gi * kInvSqrt2));
        du[i] = d * gi * cdf;
        dg[i] = d * ui * (cdf + gi * kInvSqrt2Pi * std::exp(-0.5f * gi * gi));
      }
    } else {
#pragma omp simd
      for (int64_t i = b; i < e; ++i) {
        const float ui = u[i], d = dh[i];
        const float cdf = 0.5f * (1.0f + std::erf(ui * kInvSqrt2));
        du[i] = d * (cdf + ui * kInvSqrt2Pi * std::exp(-0.5f * ui * ui));
      }
    }
  });
}

// Per-token int8 quantize-dequantize of the rows of a [m, k] fp32 block, in place: the
// same q and scale as reference/int8.py (quantize_row_int8), then x = float(q) * scale.
void fake_quant_rows(float* x, int64_t m, int64_t k) {
  if (k == 0) return;
  const Isa isa = active_isa();
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / k), [&](int64_t b, int64_t e) {
    std::vector<int8_t> q(k);
    for (int64_t r = b; r < e; ++r) {
      float* row = x + r * k;
      const float scale = quantize_row_int8(row, k, k, q.data(), nullptr, isa);
      for (int64_t i = 0; i < k; ++i) row[i] = static_cast<float>(q[i]) * scale;
    }
  });
}

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// A [rows, cols] fp32 view of `src`'s rows [r0, r0 + n): the rows themselves when src is
// fp32 (and contiguous), otherwise widened into `buf`.
at::Tensor float_rows(const at::Tensor& src, int64_t r0, int64_t n, at::Tensor& buf) {
  at::Tensor rows = src.narrow(0, r0, n);
  if (src.scalar_type() == at::kFloat) return rows;
  at::Tensor view = buf.narrow(0, 0, n);
  view.copy_(rows);
  return view;
}

void project_into(at::Tensor& out, const at::Tensor& in, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  if (b.has_value())
    at::addmm_out(out, *b, in, w.t());
  else
    at::mm_out(out, in, w.t());
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

// Rows [r0, r0 + n) of x as the fp32 input of a block's GEMMs: x's own rows when they
// can be used as they are, otherwise widened (bf16/fp16) and/or per-token fake-quantized
// into `buf`.
at::Tensor x_block(const at::Tensor& x2, int64_t r0, int64_t n, at::Tensor& buf, bool act_quant) {
  at::Tensor rows = x2.narrow(0, r0, n);
  if (x2.scalar_type() == at::kFloat && !act_quant) return rows;
  at::Tensor xb = buf.narrow(0, 0, n);
  xb.copy_(rows);
  if (act_quant) fake_quant_rows(xb.data_ptr<float>(), n, xb.size(1));
  return xb;
}

// acc = a^T b for the first block, acc += a^T b for the later ones.
void accumulate_grad(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b, bool first) {
  if (first)
    at::mm_out(acc, a.t(), b);
  else
    acc.addmm_(a.t(), b);
}

// The gate/up weight gradients a block contributes: dWu += du^T x, dWg += dg^T x, and
// the bias sums (undefined accumulators are skipped; dg is undefined for 'gelu').
void accumulate_up_gate_grads(at::Tensor& dwu, at::Tensor& dwg, at::Tensor& dbu, at::Tensor& dbg,
                              const at::Tensor& dub, const at::Tensor& dgb, const at::Tensor& xb, bool first) {
  accumulate_grad(dwu, dub, xb, first);
  if (dgb.defined()) accumulate_grad(dwg, dgb, xb, first);
  if (dbu.defined()) dbu.add_(dub.sum(0));
  if (dbg.defined()) dbg.add_(dgb.sum(0));
}

// dx_b = du Wu + dg Wg.
void input_grad(at::Tensor& dxb, const at::Tensor& dub, const at::Tensor& dgb, const at::Tensor& wu,
                const at::Tensor& wg) {
  at::mm_out(dxb, dub, wu);
  if (dgb.defined()) dxb.addmm_(dgb, wg);
}

// Checks a backward call's shapes -> (D, H, tokens).
std::tuple<int64_t, int64_t, int64_t> backward_sizes(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& g,
                                                     const at::Tensor& u, const std::optional<at::Tensor>& w_gate,
                                                     const at::Tensor& w_up, bool gated) {
  TORCH_CHECK(gated == w_gate.has_value(), gated ? "w_gate is required for a gated activation"
                                                 : "w_gate must be None for activation 'gelu'");
  const int64_t d = x.size(-1), h_dim = w_up.size(0);
  const int64_t tokens = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  TORCH_CHECK(dy.sizes() == x.sizes(), "grad_y must have x's shape ", x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(u.numel() == tokens * h_dim && (!gated || g.numel() == tokens * h_dim),
              "g and u must be the saved [..., H] pre-activations (was the forward run with save=True?)");
  return {d, h_dim, tokens};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_ffn_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
    const std::optional<at::Tensor>& b_gate, const std::optional<at::Tensor>& b_up,
    const std::optional<at::Tensor>& b_down, c10::string_view activation, bool save, bool act_quant) {
  const Act act = parse_activation(std::string(activation));
  const bool gated_ = act != Act::GELU;
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension [..., D], got a scalar");
  TORCH_CHECK(gated_ == w_gate.has_value(), gated_ ? "w_gate is required for a gated activation"
                                                   : "w_gate must be None for activation 'gelu'");
  TORCH_CHECK(w_up.dim() == 2 && w_down.dim() == 2, "w_up and w_down must be 2-D");
  const int64_t d = x.size(-1), h_dim = w_up.size(0);
  const int64_t tokens = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  TORCH_CHECK(w_up.size(1) == d && w_down.size(0) == d && w_down.size(1) == h_dim,
              "weight shapes do not match x's D=", d, " and w_up's H=", h_dim);
  if (gated_) TORCH_CHECK(w_gate->sizes() == w_up.sizes(), "w_gate must have w_up's shape");

  std::vector<int64_t> hidden_shape(x.sizes().begin(), x.sizes().end());
  hidden_shape.back() = h_dim;
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor g_out = at::empty({gated_ && save ? tokens : 0, h_dim}, x.options());
  at::Tensor u_out = at::empty({save ? tokens : 0, h_dim}, x.options());
  auto finish = [&]() {
    return std::make_tuple(y, save && gated_ ? g_out.view(hidden_shape) : at::empty({0}, x.options()),
                           save ? u_out.view(hidden_shape) : at::empty({0}, x.options()));
  };
  if (tokens == 0) return finish();

  const auto fopt = x.options().dtype(at::kFloat);
  const bool is_float = x.scalar_type() == at::kFloat;
  const at::Tensor x2 = x.reshape({tokens, d}).contiguous();
  const at::Tensor wu = as_float(w_up), wd = as_float(w_down);
  const at::Tensor wg = gated_ ? as_float(*w_gate) : at::Tensor();
  auto fbias = [](const std::optional<at::Tensor>& b) -> std::optional<at::Tensor> {
    return b.has_value() ? std::optional<at::Tensor>(as_float(*b)) : std::nullopt;
  };
  const auto bg = fbias(b_gate), bu = fbias(b_up), bd = fbias(b_down);
  at::Tensor y2 = y.view({tokens, d});

  const int64_t bs = block_rows(tokens);
  // Saved g/u in fp32 are outputs [tokens, H] anyway: their GEMMs run once over all tokens
  // straight into them (no blocking cost: a row-blocked GEMM re-packs the whole weight
  // per block). Otherwise (inference, or bf16/fp16) the GEMMs land in block buffers.
  const bool direct = save && is_float && !act_quant;
  if (direct) {
    project_into(u_out, x2, wu, bu);
    if (gated_) project_into(g_out, x2, wg, bg);
  }
  at::Tensor x_buf = (!is_float || act_quant) ? at::empty({bs, d}, fopt) : at::Tensor();
  at::Tensor g_buf = gated_ && !direct ? at::empty({bs, h_dim}, fopt) : at::Tensor();
  at::Tensor u_buf = !direct ? at::empty({bs, h_dim}, fopt) : at::Tensor();
  at::Tensor h_buf = at::empty({bs, h_dim}, fopt);
  at::Tensor y_buf = !is_float ? at::empty({bs, d}, fopt) : at::Tensor();

  for (int64_t r0 = 0; r0 < tokens; r0 += bs) {
    const int64_t n = std::min(bs, tokens - r0);
    at::Tensor ub, gb;
    if (direct) {
      ub = u_out.narrow(0, r0, n);
      if (gated_) gb = g_out.narrow(0, r0, n);
    } else {
      at::Tensor xb = x_block(x2, r0, n, x_buf, act_quant);
      ub = u_buf.narrow(0, 0, n);
      project_into(ub, xb, wu, bu);
      if (gated_) {
        gb = g_buf.narrow(0, 0, n);
        project_into(gb, xb, wg, bg);
      }
    }
    at::Tensor hb = h_buf.narrow(0, 0, n);
    activation_forward(act, gated_ ? gb.data_ptr<float>() : nullptr, ub.data_ptr<float>(), hb.data_ptr<float>(),
                       n * h_dim);
    if (act_quant) fake_quant_rows(hb.data_ptr<float>(), n, h_dim);
    if (is_float) {
      at::Tensor yb = y2.narrow(0, r0, n);
      project_into(yb, hb, wd, bd);
    } else {
      at::Tensor yb = y_buf.narrow(0, 0, n);
      project_into(yb, hb, wd, bd);
      y2.narrow(0, r0, n).copy_(yb);
    }
    if (save && !direct) {
      u_out.narrow(0, r0, n).copy_(ub);
      if (gated_) g_out.narrow(0, r0, n).copy_(gb);
    }
  }
  return finish();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_ffn_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& g, const at::Tensor& u,
    const std::optional<at::Tensor>& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
    c10::string_view activation, bool has_b_gate, bool has_b_up, bool has_b_down, bool act_quant, bool need_dx,
    bool need_dw) {
  const Act act = parse_activation(std::string(activation));
  const bool gated_ = act != Act::GELU;
  check_float(x, "x");
  int64_t d, h_dim, tokens;  // not a structured binding: lambdas below capture these
  std::tie(d, h_dim, tokens) = backward_sizes(dy, x, g, u, w_gate, w_up, gated_);

  const auto fopt = x.options().dtype(at::kFloat);
  at::Tensor dx = need_dx ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  // fp32 accumulators; for fp32 weights they are the results themselves.
  // The first block writes them (mm_out), later blocks accumulate (addmm_); zeros only
  // when there is no block at all.
  auto acc = [&](int64_t r, int64_t c) { return tokens > 0 ? at::empty({r, c}, fopt) : at::zeros({r, c}, fopt); };
  at::Tensor dwg = need_dw && gated_ ? acc(h_dim, d) : at::Tensor();
  at::Tensor dwu = need_dw ? acc(h_dim, d) : at::Tensor();
  at::Tensor dwd = need_dw ? acc(d, h_dim) : at::Tensor();
  at::Tensor dbg = need_dw && has_b_gate ? at::zeros({h_dim}, fopt) : at::Tensor();
  at::Tensor dbu = need_dw && has_b_up ? at::zeros({h_dim}, fopt) : at::Tensor();
  at::Tensor dbd = need_dw && has_b_down ? at::zeros({d}, fopt) : at::Tensor();

  if (tokens > 0 && (need_dx || need_dw)) {
    const bool is_float = x.scalar_type() == at::kFloat;
    const at::Tensor x2 = x.reshape({tokens, d}).contiguous();
    const at::Tensor dy2 = dy.reshape({tokens, d}).contiguous();
    const at::Tensor u2 = u.reshape({tokens, h_dim}).contiguous();
    const at::Tensor g2 = gated_ ? g.reshape({tokens, h_dim}).contiguous() : at::Tensor();
    const at::Tensor wu = as_float(w_up), wd = as_float(w_down);
    const at::Tensor wg = gated_ ? as_float(*w_gate) : at::Tensor();
    at::Tensor dx2 = need_dx ? dx.view({tokens, d}) : at::Tensor();

    const int64_t bs = block_rows(tokens);
    const bool widen = !is_float;
    at::Tensor x_buf = (widen || act_quant) ? at::empty({bs, d}, fopt) : at::Tensor();
    at::Tensor dy_buf = widen ? at::empty({bs, d}, fopt) : at::Tensor();
    at::Tensor g_buf = widen && gated_ ? at::empty({bs, h_dim}, fopt) : at::Tensor();
    at::Tensor u_buf = widen ? at::empty({bs, h_dim}, fopt) : at::Tensor();
    at::Tensor dx_buf = widen && need_dx ? at::empty({bs, d}, fopt) : at::Tensor();
    // Two [block, H] buffers: A holds dh and then dg (du for 'gelu'); B holds the
    // recomputed h until dWd has consumed it, and then du.
    at::Tensor a_buf = at::empty({bs, h_dim}, fopt);
    at::Tensor b_buf = (need_dw || gated_) ? at::empty({bs, h_dim}, fopt) : at::Tensor();

    for (int64_t r0 = 0; r0 < tokens; r0 += bs) {
      const int64_t n = std::min(bs, tokens - r0);
      at::Tensor dyb = float_rows(dy2, r0, n, dy_buf);
      at::Tensor ub = float_rows(u2, r0, n, u_buf);
      at::Tensor gb = gated_ ? float_rows(g2, r0, n, g_buf) : at::Tensor();
      const float* gp = gated_ ? gb.data_ptr<float>() : nullptr;
      at::Tensor ab = a_buf.narrow(0, 0, n);
      at::Tensor bb = b_buf.defined() ? b_buf.narrow(0, 0, n) : at::Tensor();
      if (need_dw) {
        // h recomputed in one pass from the saved g and u, consumed at once by dWd.
        activation_forward(act, gp, ub.data_ptr<float>(), bb.data_ptr<float>(), n * h_dim);
        if (act_quant) fake_quant_rows(bb.data_ptr<float>(), n, h_dim);
        accumulate_grad(dwd, dyb, bb, r0 == 0);
        if (has_b_down) dbd.add_(dyb.sum(0));
      }
      at::mm_out(ab, dyb, wd);  // dh
      at::Tensor dub = gated_ ? bb : ab;
      at::Tensor dgb = gated_ ? ab : at::Tensor();
      activation_backward(act, gp, ub.data_ptr<float>(), ab.data_ptr<float>(), ab.data_ptr<float>(),
                          dub.data_ptr<float>(), n * h_dim);
      if (need_dw) {
        at::Tensor xb = x_block(x2, r0, n, x_buf, act_quant);
        accumulate_up_gate_grads(dwu, dwg, dbu, dbg, dub, dgb, xb, r0 == 0);
      }
      if (need_dx) {
        at::Tensor dxb = widen ? dx_buf.narrow(0, 0, n) : dx2.narrow(0, r0, n);
        input_grad(dxb, dub, dgb, wu, wg);
        if (widen) dx2.narrow(0, r0, n).copy_(dxb);
      }
    }
  }
  // Weight gradients in the weights' dtype (the same as x's, checked by accelops.ops);
  // bias gradients stay fp32 and the autograd wrapper casts them to each bias's dtype.
  // Absent gradients are fresh empty tensors: a custom op's outputs may not alias each other.
  auto cast = [&](const at::Tensor& acc) {
    return acc.defined() ? acc.to(x.scalar_type()) : at::empty({0}, x.options());
  };
  auto bias = [&](const at::Tensor& acc) { return acc.defined() ? acc : at::empty({0}, fopt); };
  return std::make_tuple(dx, cast(dwg), cast(dwu), cast(dwd), bias(dbg), bias(dbu), bias(dbd));
}

namespace {

// Returns the pages of `t`'s rows [0, rows) to the OS as they are consumed. Only pages
// wholly inside the tensor's bytes are touched (the allocator's bookkeeping next to the
// buffer is never released), and only once: `released_` moves forward monotonically.
class RowReleaser {
 public:
  RowReleaser(const at::Tensor& t, int64_t row_bytes)
      : base_(reinterpret_cast<uintptr_t>(t.data_ptr())), row_bytes_(row_bytes) {
    page_ = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    released_ = round_up(base_);
  }
  void release_rows_before(int64_t rows) {
    const uintptr_t end = round_down(base_ + static_cast<uintptr_t>(rows * row_bytes_));
    if (end > released_) {
      // MADV_DONTNEED on private anonymous memory: the pages are freed now; the bytes
      // read as zero if touched again (they are not: the caller is done with them).
      madvise(reinterpret_cast<void*>(released_), end - released_, MADV_DONTNEED);
      released_ = end;
    }
  }

 private:
  uintptr_t round_up(uintptr_t a) const { return (a + page_ - 1) / page_ * page_; }
  uintptr_t round_down(uintptr_t a) const { return a / page_ * page_; }
  uintptr_t base_, page_, released_;
  int64_t row_bytes_;
};

}  // namespace

// The backward for when the saved g and u are dead after it (the autograd wrapper checks:
// fp32 CPU, graph not retained, nobody else holds them). Same results as
// fused_ffn_backward_cpu, with peak memory lowered in two passes:
//   pass 1, per block: h (recomputed) -> dWd; dh = dy Wd into the same buffer; dg and du
//     written over the block's g and u (they are not needed again);
//   pass 2, per block: dWg, dWu, dx from dg and du, after which the block's rows of g
//     and u go back to the OS.
// So dWg/dWu are allocated only once all [T, H] temporaries of pass 1 are gone, and dx
// grows while g and u shrink: at the peak (start of pass 2) what is alive is g, u, the
// three weight gradients and one [block, H] buffer.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fused_ffn_backward_consume_cpu(const at::Tensor& dy, const at::Tensor& x, at::Tensor& g, at::Tensor& u,
                               const std::optional<at::Tensor>& w_gate, const at::Tensor& w_up,
                               const at::Tensor& w_down, c10::string_view activation, bool has_b_gate,
                               bool has_b_up, bool has_b_down, bool act_quant, bool need_dx, bool need_dw) {
  const Act act = parse_activation(std::string(activation));
  const bool gated_ = act != Act::GELU;
  TORCH_CHECK(x.scalar_type() == at::kFloat && dy.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat &&
                  w_up.scalar_type() == at::kFloat && w_down.scalar_type() == at::kFloat,
              "fused_ffn_backward_consume_ is for float32 tensors (bf16/fp16 use fused_ffn_backward)");
  int64_t d, h_dim, tokens;  // not a structured binding: lambdas below capture these
  std::tie(d, h_dim, tokens) = backward_sizes(dy, x, g, u, w_gate, w_up, gated_);
  TORCH_CHECK(u.is_contiguous() && (!gated_ || g.is_contiguous()), "g and u must be contiguous");
  if (gated_) TORCH_CHECK(w_gate->scalar_type() == at::kFloat, "w_gate must be float32");

  const auto fopt = x.options().dtype(at::kFloat);
  auto acc = [&](int64_t r, int64_t c) { return tokens > 0 ? at::empty({r, c}, fopt) : at::zeros({r, c}, fopt); };
  at::Tensor dwd = need_dw ? acc(d, h_dim) : at::Tensor();
  at::Tensor dbg = need_dw && has_b_gate ? at::zeros({h_dim}, fopt) : at::Tensor();
  at::Tensor dbu = need_dw && has_b_up ? at::zeros({h_dim}, fopt) : at::Tensor();
  at::Tensor dbd = need_dw && has_b_down ? at::zeros({d}, fopt) : at::Tensor();
  at::Tensor dwg, dwu, dx;

  const at::Tensor x2 = x.reshape({tokens, d}).contiguous();
  const at::Tensor dy2 = dy.reshape({tokens, d}).contiguous();
  at::Tensor u2 = u.view({tokens, h_dim});
  at::Tensor g2 = gated_ ? g.view({tokens, h_dim}) : at::Tensor();
  const int64_t bs = block_rows(std::max<int64_t>(tokens, 1));

  if (tokens > 0 && (need_dx || need_dw)) {
    at::Tensor buf = at::empty({bs, h_dim}, fopt);
    for (int64_t r0 = 0; r0 < tokens; r0 += bs) {  // pass 1
      const int64_t n = std::min(bs, tokens - r0);
      at::Tensor dyb = dy2.narrow(0, r0, n);
      at::Tensor ub = u2.narrow(0, r0, n);
      at::Tensor gb = gated_ ? g2.narrow(0, r0, n) : at::Tensor();
      float* gp = gated_ ? gb.data_ptr<float>() : nullptr;
      at::Tensor hb = buf.narrow(0, 0, n);
      if (need_dw) {
        activation_forward(act, gp, ub.data_ptr<float>(), hb.data_ptr<float>(), n * h_dim);
        if (act_quant) fake_quant_rows(hb.data_ptr<float>(), n, h_dim);
        accumulate_grad(dwd, dyb, hb, r0 == 0);
        if (has_b_down) dbd.add_(dyb.sum(0));
      }
      at::mm_out(hb, dyb, w_down);  // dh, over the consumed h
      activation_backward(act, gp, ub.data_ptr<float>(), hb.data_ptr<float>(), gp, ub.data_ptr<float>(),
                          n * h_dim);
    }
  }
  // Pass 2: g2 holds dg and u2 holds du.
  if (need_dw) {
    dwu = acc(h_dim, d);
    if (gated_) dwg = acc(h_dim, d);
  }
  dx = need_dx ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  if (tokens > 0 && (need_dx || need_dw)) {
    at::Tensor dx2 = need_dx ? dx.view({tokens, d}) : at::Tensor();
    at::Tensor x_buf = act_quant ? at::empty({bs, d}, fopt) : at::Tensor();
    RowReleaser release_u(u2, h_dim * static_cast<int64_t>(sizeof(float)));
    std::optional<RowReleaser> release_g;
    if (gated_) release_g.emplace(g2, h_dim * static_cast<int64_t>(sizeof(float)));
    for (int64_t r0 = 0; r0 < tokens; r0 += bs) {
      const int64_t n = std::min(bs, tokens - r0);
      at::Tensor dub = u2.narrow(0, r0, n);
      at::Tensor dgb = gated_ ? g2.narrow(0, r0, n) : at::Tensor();
      if (need_dw) {
        at::Tensor xb = x_block(x2, r0, n, x_buf, act_quant);
        accumulate_up_gate_grads(dwu, dwg, dbu, dbg, dub, dgb, xb, r0 == 0);
      }
      if (need_dx) {
        at::Tensor dxb = dx2.narrow(0, r0, n);
        input_grad(dxb, dub, dgb, w_up, gated_ ? *w_gate : at::Tensor());
      }
      release_u.release_rows_before(r0 + n);
      if (release_g) release_g->release_rows_before(r0 + n);
    }
  }
  auto out = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, x.options()); };
  return std::make_tuple(dx, out(dwg), out(dwu), out(dwd), out(dbg), out(dbu), out(dbd));
}

at::Tensor ffn_activation_cpu(const std::optional<at::Tensor>& g, const at::Tensor& u, c10::string_view activation) {
  const Act act = parse_activation(std::string(activation));
  const bool gated_ = act != Act::GELU;
  check_float(u, "u");
  TORCH_CHECK(gated_ == g.has_value(), gated_ ? "g is required for a gated activation"
                                              : "g must be None for activation 'gelu'");
  if (gated_) TORCH_CHECK(g->sizes() == u.sizes(), "g must have u's shape ", u.sizes(), ", got ", g->sizes());
  at::Tensor uf = as_float(u);
  at::Tensor gf = gated_ ? as_float(*g) : at::Tensor();
  at::Tensor h = at::empty(u.sizes(), uf.options());
  activation_forward(act, gated_ ? gf.data_ptr<float>() : nullptr, uf.data_ptr<float>(), h.data_ptr<float>(),
                     u.numel());
  return u.scalar_type() == at::kFloat ? h : h.to(u.scalar_type());
}

}  // namespace accelops
