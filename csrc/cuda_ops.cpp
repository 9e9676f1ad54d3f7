// CUDA implementations of the accelops ops: TORCH_LIBRARY_IMPL(accelops, CUDA, m) over the
// plain C kernels of csrc/cuda (declared in csrc/cuda/accelops_cuda.h). Built into
// accelops._C_cuda only when torch has CUDA (setup.py); the schemas are defined in Python
// (accelops/ops/<family>.py, through accelops/ops/_library.py).
//
// This file does the torch side only: argument checks (the same messages as csrc/cpu),
// contiguity, dtype conversion of scales and bias to fp32, output and workspace
// allocation from the caching allocator, the device guard and the current stream. The
// arithmetic, and with it bit-exactness against accelops/reference, is in the kernels.
//
// Importing accelops._C_cuda runs the registrations below; accelops/ops/_backend.py imports
// it only when triton is missing (Triton's kernels are the CUDA ones otherwise). Its one
// function, ops(), names the ops registered here, which the backend choice then sends to
// torch.ops.accelops on CUDA tensors (the others fall back to the reference).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/accelops_cuda.h"

namespace accelops {
namespace {

constexpr float kQuantEps = 1e-5f;  // reference/int8.py EPS
constexpr int64_t kTernaryBlockK = 128, kTernaryBlockBytes = 32;

// The ops registered below, for accelops._C_cuda.ops().
const char* const kCudaOps[] = {"ternary_matmul", "quantize_activation_int8", "quantize_weight_int8", "int8_matmul",
                                "int8_linear", "bucket_flatten", "bucket_unflatten_", "cast_div", "topk_compress_",
                                "topk_decompress", "sign_compress_", "sign_decompress", "int8_compress_",
                                "int8_decompress", "orthogonalize_"};

// The current stream of the current device (which the caller's CUDAGuard has set to the
// inputs' device). c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream
// names; c10/cuda/CUDAStream.h declares it without pulling in cuBLAS / cuSPARSE headers.
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "accelops.", op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

accelops_dtype dtype_tag(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ACCELOPS_FLOAT32;
    case at::kBFloat16:
      return ACCELOPS_BFLOAT16;
    case at::kHalf:
      return ACCELOPS_FLOAT16;
    default:
      break;
  }
  TORCH_CHECK(false, "accelops: no CUDA kernel for dtype ", t);
  return ACCELOPS_FLOAT32;  // not reached
}

bool is_kernel_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_kernel_float(t.scalar_type()), name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

void check_on(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), " like the input, got ", t.device());
}

// Rows of x [..., K] seen as a matrix [rows, K]; well defined for K = 0 too.
int64_t leading_rows(const at::Tensor& x) { return c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1); }

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  auto s = x.sizes().vec();
  s.back() = n;
  return s;
}

// w_scale [1] or [N] (any float dtype, any shape of that many elements) as dense fp32.
at::Tensor scales_f32(const at::Tensor& w_scale, int64_t n, const at::Tensor& ref) {
  check_on(w_scale, "w_scale", ref);
  TORCH_CHECK(w_scale.numel() == 1 || w_scale.numel() == n, "w_scale must hold 1 or N=", n, " scales, got shape ",
              w_scale.sizes());
  return w_scale.to(at::kFloat).contiguous();
}

// bias [N] as dense fp32, or an undefined tensor.
at::Tensor bias_f32(const std::optional<at::Tensor>& bias, int64_t n, const at::Tensor& ref) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  check_on(*bias, "bias", ref);
  TORCH_CHECK(bias->numel() == n, "bias must hold N=", n, " values, got shape ", bias->sizes());
  return bias->to(at::kFloat).contiguous();
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// The ternary kernels use 16-byte vector loads; a view with an odd storage offset is
// copied to a fresh (aligned) allocation.
at::Tensor aligned16(at::Tensor t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone(at::MemoryFormat::Contiguous);
}

// ---------------------------------------------------------------- ternary

at::Tensor ternary_matmul_cuda(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                               const std::optional<at::Tensor>& bias) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension");
  TORCH_CHECK(w_packed.scalar_type() == at::kByte, "w_packed must be uint8, got ", w_packed.scalar_type());
  TORCH_CHECK(w_packed.dim() == 2, "w_packed must be 2-D [N, ceil(K/128)*32], got shape ", w_packed.sizes());
  check_on(w_packed, "w_packed", x);
  const int64_t k = x.size(-1), n = w_packed.size(0);
  const int64_t nblocks = (k + kTernaryBlockK - 1) / kTernaryBlockK, kp = nblocks * kTernaryBlockK;
  TORCH_CHECK(w_packed.size(1) == nblocks * kTernaryBlockBytes, "w_packed must have ", nblocks * kTernaryBlockBytes,
              " columns to hold K=", k, ", got shape ", w_packed.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor ws = scales_f32(w_scale, n, x);
  at::Tensor b = bias_f32(bias, n, x);
  at::Tensor out = at::empty(out_shape(x, n), x.options());
  const int64_t m = leading_rows(x);
  if (m == 0 || n == 0) return out;

  const cudaStream_t stream = current_stream();
  // Workspace: activations quantized per row and zero padded to whole 128-weight blocks,
  // with their scales and row sums (the kernel subtracts sum(x_q): codes are w + 1).
  at::Tensor xq = at::empty({m, kp}, x.options().dtype(at::kChar));
  at::Tensor xs = at::empty({m}, x.options().dtype(at::kFloat));
  at::Tensor xsum = at::empty({m}, x.options().dtype(at::kInt));
  at::Tensor x2 = x.reshape({m, k}).contiguous();
  check_launch(accelops_quantize_activation_int8(x2.data_ptr(), dtype_tag(x.scalar_type()), m, k,
                                                 xq.data_ptr<int8_t>(), kp, xs.data_ptr<float>(),
                                                 xsum.data_ptr<int32_t>(), stream),
               "ternary_matmul");
  at::Tensor wp = aligned16(w_packed.contiguous());
  check_launch(accelops_ternary_gemm(xq.data_ptr<int8_t>(), xsum.data_ptr<int32_t>(), xs.data_ptr<float>(), m,
                                     wp.data_ptr<uint8_t>(), n, nblocks, ws.data_ptr<float>(), ws.numel() != 1 ? 1 : 0,
                                     ptr_or_null(b), out.data_ptr(), dtype_tag(out.scalar_type()), stream),
               "ternary_matmul");
  return out;
}

// ---------------------------------------------------------------- int8

std::tuple<at::Tensor, at::Tensor> quantize_activation_int8_cuda(const at::Tensor& x) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension, got a scalar");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t k = x.size(-1);
  auto scale_shape = x.sizes().vec();
  scale_shape.back() = 1;
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = at::empty(scale_shape, x.options().dtype(at::kFloat));
  if (k == 0) {
    scale.fill_(kQuantEps / 127.0f);  // the reference's value for an empty row
    return {q, scale};
  }
  if (x.numel() == 0) return {q, scale};
  at::Tensor x2 = x.contiguous();
  check_launch(accelops_quantize_activation_int8(x2.data_ptr(), dtype_tag(x.scalar_type()), x.numel() / k, k,
                                                 q.data_ptr<int8_t>(), k, scale.data_ptr<float>(), nullptr,
                                                 current_stream()),
               "quantize_activation_int8");
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor> quantize_weight_int8_cuda(const at::Tensor& w) {
  check_float(w, "w");
  TORCH_CHECK(w.dim() == 2, "w must be 2-D [out_features, in_features], got shape ", w.sizes());
  const c10::cuda::CUDAGuard guard(w.device());
  // A host sync, acceptable for a one-off weight conversion; the reference raises too.
  TORCH_CHECK(at::isfinite(w).all().item<bool>(), "w must be finite: it holds NaN or Inf");
  at::Tensor q = at::empty(w.sizes(), w.options().dtype(at::kChar));
  at::Tensor scale = at::empty({w.size(0)}, w.options().dtype(at::kFloat));
  if (w.numel() == 0) {
    scale.fill_(kQuantEps / 127.0f);
    return {q, scale};
  }
  at::Tensor w2 = w.contiguous();
  check_launch(accelops_quantize_weight_int8(w2.data_ptr(), dtype_tag(w.scalar_type()), w.size(0), w.size(1),
                                             q.data_ptr<int8_t>(), scale.data_ptr<float>(), current_stream()),
               "quantize_weight_int8");
  return {q, scale};
}

void check_int8_weight(const at::Tensor& w_q, const at::Tensor& x, const char* xname) {
  TORCH_CHECK(w_q.scalar_type() == at::kChar, "w_q must be int8, got ", w_q.scalar_type());
  TORCH_CHECK(w_q.dim() == 2, "w_q must be 2-D [N, K], got shape ", w_q.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w_q.size(1), xname, "'s last dim must equal w_q's K=", w_q.size(1),
              ", got shape ", x.sizes());
  check_on(w_q, "w_q", x);
}

at::Tensor int8_matmul_cuda(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                            const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                            std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(x_q.scalar_type() == at::kChar, "x_q must be int8, got ", x_q.scalar_type());
  check_int8_weight(w_q, x_q, "x_q");
  check_on(x_scale, "x_scale", x_q);
  const at::ScalarType odt = out_dtype.value_or(at::kFloat);
  TORCH_CHECK(at::isFloatingType(odt), "out_dtype must be a floating-point dtype, got ", odt);
  const c10::cuda::CUDAGuard guard(x_q.device());
  const int64_t k = w_q.size(1), n = w_q.size(0), m = leading_rows(x_q);
  // The kernels write fp32 / bf16 / fp16; any other float dtype is the fp32 result
  // converted, which is what the reference's y.to(out_dtype) does.
  const bool direct = is_kernel_float(odt);
  at::Tensor out = at::empty(out_shape(x_q, n), x_q.options().dtype(direct ? odt : at::kFloat));
  TORCH_CHECK(x_scale.numel() == m, "x_scale must hold one scale per row of x_q (", m, "), got shape ",
              x_scale.sizes());
  at::Tensor ws = scales_f32(w_scale, n, x_q);
  at::Tensor b = bias_f32(bias, n, x_q);
  if (m > 0 && n > 0) {
    at::Tensor xs = x_scale.to(at::kFloat).contiguous();
    at::Tensor x2 = x_q.reshape({m, k}).contiguous();
    at::Tensor w = w_q.contiguous();
    check_launch(accelops_int8_gemm(x2.data_ptr<int8_t>(), xs.data_ptr<float>(), m, w.data_ptr<int8_t>(), n, k,
                                    ws.data_ptr<float>(), ws.numel() != 1 ? 1 : 0, ptr_or_null(b), out.data_ptr(),
                                    dtype_tag(out.scalar_type()), current_stream()),
                 "int8_matmul");
  }
  return direct ? out : out.to(odt);
}

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                            const std::optional<at::Tensor>& bias) {
  check_float(x, "x");
  check_int8_weight(w_q, x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t k = w_q.size(1), n = w_q.size(0), m = leading_rows(x);
  at::Tensor ws = scales_f32(w_scale, n, x);
  at::Tensor b = bias_f32(bias, n, x);
  at::Tensor out = at::empty(out_shape(x, n), x.options());
  if (m == 0 || n == 0) return out;
  const cudaStream_t stream = current_stream();
  at::Tensor xq = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor xs = at::empty({m}, x.options().dtype(at::kFloat));
  at::Tensor x2 = x.reshape({m, k}).contiguous();
  check_launch(accelops_quantize_activation_int8(x2.data_ptr(), dtype_tag(x.scalar_type()), m, k,
                                                 xq.data_ptr<int8_t>(), k, xs.data_ptr<float>(), nullptr, stream),
               "int8_linear");
  at::Tensor w = w_q.contiguous();
  check_launch(accelops_int8_gemm(xq.data_ptr<int8_t>(), xs.data_ptr<float>(), m, w.data_ptr<int8_t>(), n, k,
                                  ws.data_ptr<float>(), ws.numel() != 1 ? 1 : 0, ptr_or_null(b), out.data_ptr(),
                                  dtype_tag(out.scalar_type()), stream),
               "int8_linear");
  return out;
}

// ---------------------------------------------------------------- comm family

// The comm family also takes fp64 gradients.
accelops_dtype comm_tag(at::ScalarType t, const char* op, const char* name) {
  TORCH_CHECK(is_kernel_float(t) || t == at::kDouble, "accelops.", op, ": ", name,
              " must be float32, bfloat16, float16 or float64, got ", t);
  return t == at::kDouble ? ACCELOPS_FLOAT64 : dtype_tag(t);
}

float comm_divisor(std::optional<double> divisor, const char* op) {
  if (!divisor.has_value()) return 1.0f;
  TORCH_CHECK(std::isfinite(*divisor) && *divisor > 0, "accelops.", op,
              ": divisor must be a finite number > 0 (e.g. the world size), got ", *divisor);
  return static_cast<float>(*divisor);
}

// The piece table goes to the device through pinned memory, asynchronously.
void run_bucket_copy(const std::vector<accelops_bucket_piece>& pieces, int64_t total, bool has_div, float div,
                     const at::Device& device, const char* op) {
  if (total == 0) return;
  const int64_t bytes = int64_t(pieces.size() * sizeof(accelops_bucket_piece));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), pieces.data(), size_t(bytes));
  at::Tensor table = host.to(device, /*non_blocking=*/true);
  check_launch(accelops_bucket_copy(reinterpret_cast<const accelops_bucket_piece*>(table.data_ptr()),
                                    int64_t(pieces.size()), total, has_div ? 1 : 0, div, current_stream()),
               op);
}

std::optional<at::Tensor> comm_residual(const std::optional<at::Tensor>& residual, const at::Tensor& grad,
                                        const char* op) {
  if (!residual.has_value() || !residual->defined()) return std::nullopt;
  const at::Tensor& r = *residual;
  TORCH_CHECK(r.scalar_type() == at::kFloat, "accelops.", op, ": residual must be float32, got ", r.scalar_type());
  TORCH_CHECK(r.numel() == grad.numel(), "accelops.", op, ": residual must have grad's ", grad.numel(),
              " elements, got ", r.numel());
  TORCH_CHECK(r.is_contiguous(), "accelops.", op, ": residual must be contiguous (it is updated in place)");
  check_on(r, "residual", grad);
  return r;
}

float* residual_ptr(const std::optional<at::Tensor>& r) { return r.has_value() ? r->data_ptr<float>() : nullptr; }

at::Tensor bucket_flatten_cuda(at::TensorList tensors, std::optional<at::ScalarType> dtype,
                               std::optional<double> divisor) {
  TORCH_CHECK(!tensors.empty(), "accelops.bucket_flatten: tensors is empty");
  const at::ScalarType out_type = dtype.has_value() ? *dtype : tensors[0].scalar_type();
  const accelops_dtype out_tag = comm_tag(out_type, "bucket_flatten", "dtype");
  const float div = comm_divisor(divisor, "bucket_flatten");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  std::vector<at::Tensor> keep;
  std::vector<accelops_bucket_piece> pieces;
  int64_t total = 0;
  for (const at::Tensor& t : tensors) {
    check_on(t, "tensors", tensors[0]);
    keep.push_back(t.contiguous());
    pieces.push_back(accelops_bucket_piece{keep.back().data_ptr(), nullptr, total, t.numel(),
                                           int32_t(comm_tag(t.scalar_type(), "bucket_flatten", "tensors")),
                                           int32_t(out_tag)});
    total += t.numel();
  }
  at::Tensor out = at::empty({total}, tensors[0].options().dtype(out_type));
  char* o = static_cast<char*>(out.data_ptr());
  for (auto& p : pieces) p.dst = o + p.start * int64_t(out.element_size());
  run_bucket_copy(pieces, total, divisor.has_value(), div, out.device(), "bucket_flatten");
  return out;
}

void bucket_unflatten_cuda(const at::Tensor& flat, at::TensorList tensors, std::optional<double> divisor) {
  const accelops_dtype flat_tag = comm_tag(flat.scalar_type(), "bucket_unflatten_", "flat");
  TORCH_CHECK(flat.dim() == 1, "accelops.bucket_unflatten_: flat must be 1-D, got shape ", flat.sizes());
  const float div = comm_divisor(divisor, "bucket_unflatten_");
  const c10::cuda::CUDAGuard guard(flat.device());
  const at::Tensor f = flat.contiguous();
  const char* fp = static_cast<const char*>(f.data_ptr());
  std::vector<accelops_bucket_piece> pieces;
  int64_t total = 0;
  for (const at::Tensor& t : tensors) {
    check_on(t, "tensors", flat);
    TORCH_CHECK(t.is_contiguous(), "accelops.bucket_unflatten_: tensors must be contiguous (written in place)");
    pieces.push_back(accelops_bucket_piece{fp + total * int64_t(f.element_size()), t.data_ptr(), total, t.numel(),
                                           int32_t(flat_tag),
                                           int32_t(comm_tag(t.scalar_type(), "bucket_unflatten_", "tensors"))});
    total += t.numel();
  }
  TORCH_CHECK(total == flat.numel(), "accelops.bucket_unflatten_: flat has ", flat.numel(),
              " elements but the tensors hold ", total);
  run_bucket_copy(pieces, total, divisor.has_value(), div, flat.device(), "bucket_unflatten_");
}

at::Tensor cast_div_cuda(const at::Tensor& x, double divisor, at::ScalarType dtype) {
  const accelops_dtype x_tag = comm_tag(x.scalar_type(), "cast_div", "x");
  TORCH_CHECK(is_kernel_float(dtype), "accelops.cast_div: dtype must be float32, bfloat16 or float16, got ", dtype);
  const float div = comm_divisor(divisor, "cast_div");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  check_launch(accelops_cast_div(xc.data_ptr(), x_tag, x.numel(), div, out.data_ptr(), dtype_tag(dtype),
                                 current_stream()),
               "cast_div");
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_compress_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& residual,
                                                      int64_t k, c10::string_view method, int64_t sample_size,
                                                      int64_t seed) {
  const accelops_dtype tag = comm_tag(grad.scalar_type(), "topk_compress_", "grad");
  TORCH_CHECK(grad.is_contiguous(), "accelops.topk_compress_: grad must be contiguous");
  const int64_t n = grad.numel();
  TORCH_CHECK(n >= 1 && n < (int64_t(1) << 31), "accelops.topk_compress_: grad must have 1 to 2^31 - 1 elements, got ",
              n);
  TORCH_CHECK(k >= 1 && k <= n, "accelops.topk_compress_: k must be in [1, ", n, "], got ", k);
  TORCH_CHECK(method == "exact" || method == "sampled",
              "accelops.topk_compress_: method must be 'exact' or 'sampled', got '", std::string(method), "'");
  TORCH_CHECK(sample_size >= 1 && seed >= 0, "accelops.topk_compress_: sample_size must be >= 1 and seed >= 0");
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto res = comm_residual(residual, grad, "topk_compress_");
  size_t bytes = 0;
  check_launch(accelops_topk_workspace_size(n, sample_size, &bytes), "topk_compress_");
  at::Tensor ws = at::empty({int64_t(bytes)}, grad.options().dtype(at::kByte));
  at::Tensor values = at::empty({k}, grad.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({k}, grad.options().dtype(at::kInt));
  check_launch(accelops_topk_compress(grad.data_ptr(), tag, residual_ptr(res), n, k, method == "sampled" ? 1 : 0,
                                      sample_size, seed, values.data_ptr<float>(), indices.data_ptr<int32_t>(),
                                      ws.data_ptr(), bytes, current_stream()),
               "topk_compress_");
  return {values, indices};
}

// [ranks, len] payloads: a 1-D payload is one rank.
int64_t comm_ranks(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK((a.dim() == 1 || a.dim() == 2) && a.dim() == b.dim() && (a.dim() == 1 || a.size(0) == b.size(0)),
              "accelops.", op, ": payloads must be all 1-D or all [ranks, ...] with the same rank count, got ",
              a.sizes(), " and ", b.sizes());
  check_on(b, "payload", a);
  return a.dim() == 1 ? 1 : a.size(0);
}

at::Tensor topk_decompress_cuda(const at::Tensor& values, const at::Tensor& indices, int64_t numel) {
  TORCH_CHECK(values.scalar_type() == at::kFloat && indices.scalar_type() == at::kInt,
              "accelops.topk_decompress: values must be float32 and indices int32");
  TORCH_CHECK(values.sizes() == indices.sizes(), "accelops.topk_decompress: values and indices must have one shape");
  TORCH_CHECK(numel >= 1, "accelops.topk_decompress: numel must be >= 1, got ", numel);
  const int64_t ranks = comm_ranks(values, indices, "topk_decompress");
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor v = values.contiguous(), i = indices.contiguous();
  at::Tensor out = at::empty({numel}, values.options());
  check_launch(accelops_topk_decompress(v.data_ptr<float>(), i.data_ptr<int32_t>(), ranks, values.size(-1), numel,
                                        out.data_ptr<float>(), current_stream()),
               "topk_decompress");
  return out;
}

std::tuple<at::Tensor, at::Tensor> sign_compress_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& residual,
                                                      int64_t chunk_size) {
  const accelops_dtype tag = comm_tag(grad.scalar_type(), "sign_compress_", "grad");
  TORCH_CHECK(grad.is_contiguous() && grad.numel() >= 1, "accelops.sign_compress_: grad must be contiguous, not empty");
  TORCH_CHECK(chunk_size >= 1, "accelops.sign_compress_: chunk_size must be >= 1, got ", chunk_size);
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto res = comm_residual(residual, grad, "sign_compress_");
  const int64_t n = grad.numel(), chunks = (n + chunk_size - 1) / chunk_size;
  at::Tensor bits = at::empty({(n + 7) / 8}, grad.options().dtype(at::kByte));
  at::Tensor scales = at::empty({chunks}, grad.options().dtype(at::kFloat));
  at::Tensor sums = at::empty({chunks}, grad.options().dtype(at::kDouble));
  check_launch(accelops_sign_compress(grad.data_ptr(), tag, residual_ptr(res), n, chunk_size, bits.data_ptr<uint8_t>(),
                                      scales.data_ptr<float>(), sums.data_ptr<double>(), current_stream()),
               "sign_compress_");
  return {bits, scales};
}

at::Tensor sign_decompress_cuda(const at::Tensor& bits, const at::Tensor& scales, int64_t numel, int64_t chunk_size) {
  TORCH_CHECK(bits.scalar_type() == at::kByte && scales.scalar_type() == at::kFloat,
              "accelops.sign_decompress: bits must be uint8 and scales float32");
  TORCH_CHECK(numel >= 1 && chunk_size >= 1, "accelops.sign_decompress: numel and chunk_size must be >= 1");
  const int64_t ranks = comm_ranks(bits, scales, "sign_decompress");
  TORCH_CHECK(bits.size(-1) == (numel + 7) / 8 && scales.size(-1) == (numel + chunk_size - 1) / chunk_size,
              "accelops.sign_decompress: bits must hold ceil(numel / 8) bytes and scales ceil(numel / chunk_size)");
  const c10::cuda::CUDAGuard guard(bits.device());
  const at::Tensor b = bits.contiguous(), s = scales.contiguous();
  at::Tensor out = at::empty({numel}, scales.options());
  check_launch(accelops_sign_decompress(b.data_ptr<uint8_t>(), s.data_ptr<float>(), ranks, numel, chunk_size,
                                        out.data_ptr<float>(), current_stream()),
               "sign_decompress");
  return out;
}

std::tuple<at::Tensor, at::Tensor> int8_compress_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& residual,
                                                      int64_t chunk_size, int64_t seed) {
  const accelops_dtype tag = comm_tag(grad.scalar_type(), "int8_compress_", "grad");
  TORCH_CHECK(grad.is_contiguous() && grad.numel() >= 1, "accelops.int8_compress_: grad must be contiguous, not empty");
  TORCH_CHECK(chunk_size >= 1 && seed >= 0, "accelops.int8_compress_: chunk_size must be >= 1 and seed >= 0");
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto res = comm_residual(residual, grad, "int8_compress_");
  const int64_t n = grad.numel(), chunks = (n + chunk_size - 1) / chunk_size;
  at::Tensor q = at::empty({n}, grad.options().dtype(at::kChar));
  at::Tensor scales = at::empty({chunks}, grad.options().dtype(at::kFloat));
  at::Tensor amax = at::empty({chunks}, grad.options().dtype(at::kInt));
  check_launch(accelops_int8_compress(grad.data_ptr(), tag, residual_ptr(res), n, chunk_size, seed, q.data_ptr<int8_t>(),
                                      scales.data_ptr<float>(), reinterpret_cast<uint32_t*>(amax.data_ptr<int32_t>()),
                                      current_stream()),
               "int8_compress_");
  return {q, scales};
}

at::Tensor int8_decompress_cuda(const at::Tensor& q, const at::Tensor& scales, int64_t chunk_size) {
  TORCH_CHECK(q.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat,
              "accelops.int8_decompress: q must be int8 and scales float32");
  TORCH_CHECK(chunk_size >= 1 && q.size(-1) >= 1, "accelops.int8_decompress: chunk_size must be >= 1, q not empty");
  const int64_t ranks = comm_ranks(q, scales, "int8_decompress");
  const int64_t n = q.size(-1);
  TORCH_CHECK(scales.size(-1) == (n + chunk_size - 1) / chunk_size,
              "accelops.int8_decompress: scales must hold ceil(n / chunk_size) values");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), s = scales.contiguous();
  at::Tensor out = at::empty({n}, scales.options());
  check_launch(accelops_int8_decompress(qc.data_ptr<int8_t>(), s.data_ptr<float>(), ranks, n, chunk_size,
                                        out.data_ptr<float>(), current_stream()),
               "int8_decompress");
  return out;
}

void orthogonalize_cuda(const at::Tensor& m, double eps) {
  TORCH_CHECK(m.scalar_type() == at::kFloat || m.scalar_type() == at::kDouble,
              "accelops.orthogonalize_: m must be float32 or float64, got ", m.scalar_type());
  TORCH_CHECK(m.dim() >= 2 && m.is_contiguous(), "accelops.orthogonalize_: m must be a contiguous [..., n, r]");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "accelops.orthogonalize_: eps must be a finite number >= 0");
  if (m.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(m.device());
  const int64_t n = m.size(-2), r = m.size(-1);
  check_launch(accelops_orthogonalize(m.data_ptr(), m.scalar_type() == at::kDouble ? ACCELOPS_FLOAT64 : ACCELOPS_FLOAT32,
                                      m.numel() / (n * r), n, r, eps, current_stream()),
               "orthogonalize_");
}

}  // namespace
}  // namespace accelops

TORCH_LIBRARY_IMPL(accelops, CUDA, m) {
  m.impl("bucket_flatten", &accelops::bucket_flatten_cuda);
  m.impl("bucket_unflatten_", &accelops::bucket_unflatten_cuda);
  m.impl("cast_div", &accelops::cast_div_cuda);
  m.impl("topk_compress_", &accelops::topk_compress_cuda);
  m.impl("topk_decompress", &accelops::topk_decompress_cuda);
  m.impl("sign_compress_", &accelops::sign_compress_cuda);
  m.impl("sign_decompress", &accelops::sign_decompress_cuda);
  m.impl("int8_compress_", &accelops::int8_compress_cuda);
  m.impl("int8_decompress", &accelops::int8_decompress_cuda);
  m.impl("orthogonalize_", &accelops::orthogonalize_cuda);
  m.impl("ternary_matmul", &accelops::ternary_matmul_cuda);
  m.impl("quantize_activation_int8", &accelops::quantize_activation_int8_cuda);
  m.impl("quantize_weight_int8", &accelops::quantize_weight_int8_cuda);
  m.impl("int8_matmul", &accelops::int8_matmul_cuda);
  m.impl("int8_linear", &accelops::int8_linear_cuda);
}

// ---------------------------------------------------------------- the Python module

static PyObject* py_ops(PyObject*, PyObject*) {
  const Py_ssize_t count = Py_ssize_t(sizeof(accelops::kCudaOps) / sizeof(accelops::kCudaOps[0]));
  PyObject* names = PyTuple_New(count);
  if (names == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* s = PyUnicode_FromString(accelops::kCudaOps[i]);
    if (s == nullptr) {
      Py_DECREF(names);
      return nullptr;
    }
    PyTuple_SET_ITEM(names, i, s);
  }
  return names;
}

static PyMethodDef accelops_c_cuda_methods[] = {
    {"ops", py_ops, METH_NOARGS, "Names of the accelops ops whose CUDA kernels this module registers."},
    {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef accelops_c_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1,
                                                    accelops_c_cuda_methods};
extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&accelops_c_cuda_module); }
