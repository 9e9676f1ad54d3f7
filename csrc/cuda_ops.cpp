// CUDA implementations of the accelops ops: TORCH_LIBRARY_IMPL(accelops, CUDA, m) over the
// plain C kernels of csrc/cuda (declared in csrc/cuda/accelops_cuda.h). Built into
// accelops._C_cuda only when torch has CUDA (setup.py); the schemas are those of
// csrc/ops.cpp, which accelops._C defines.
//
// This file does the torch side only: argument checks (the same messages as csrc/cpu),
// contiguity, dtype conversion of scales and bias to fp32, output and workspace
// allocation from the caching allocator, the device guard and the current stream. The
// arithmetic, and with it bit-exactness against accelops/reference, is in the kernels.
//
// Importing accelops._C_cuda runs the registrations below; its one function, ops(), names
// the ops registered here so Python can leave those to this module and register Triton
// kernels for the rest only.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cuda/accelops_cuda.h"

namespace accelops {
namespace {

constexpr float kQuantEps = 1e-5f;  // reference/int8.py EPS
constexpr int64_t kTernaryBlockK = 128, kTernaryBlockBytes = 32;

// The ops registered below, for accelops._C_cuda.ops().
const char* const kCudaOps[] = {"ternary_matmul", "quantize_activation_int8", "quantize_weight_int8", "int8_matmul",
                                "int8_linear"};

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

}  // namespace
}  // namespace accelops

TORCH_LIBRARY_IMPL(accelops, CUDA, m) {
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
