// The accelops op schemas and their CPU implementations. CUDA implementations are
// registered by accelops._C_cuda (csrc/cuda_ops.cpp) or from Python (Triton kernels);
// fake (meta) implementations and autograd live in accelops/ops/.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"
#include "cpu/cpu_features.h"
#include "cpu/kernels.h"

// Importing accelops._C loads this library, which runs the registrations below; the module
// itself only reports which instruction set the kernels picked on this CPU.
static PyObject* py_cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(accelops::cpu_isa_name());
  } catch (const std::exception& e) {  // a bad ACCELOPS_CPU_ISA
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}
static PyObject* py_cpu_isas(PyObject*, PyObject*) {
  PyObject* out = PyList_New(0);
  for (accelops::Isa isa : {accelops::Isa::Scalar, accelops::Isa::Avx2, accelops::Isa::AvxVnni,
                            accelops::Isa::Avx512Vnni})
    if (accelops::cpu_supports(isa) && accelops::has_dot_kernels(isa)) {
      PyObject* name = PyUnicode_FromString(accelops::isa_name(isa));
      PyList_Append(out, name);
      Py_DECREF(name);
    }
  return out;
}
// set_cpu_tiles(n_block, k_chunk) -> the previous (n_block, k_chunk) of this thread; 0 = the
// kernels' own choice (see CpuTiles in cpu/kernels.h). A plain function, not an op: the tuned
// dispatch calls it around a kernel call, where a dispatcher round trip would cost more than
// the lookup itself.
static PyObject* py_set_cpu_tiles(PyObject*, PyObject* args) {
  long long n_block = 0, k_chunk = 0;
  if (!PyArg_ParseTuple(args, "LL", &n_block, &k_chunk)) return nullptr;
  if (n_block != 0 && (n_block < 4 || n_block > accelops::kMaxNBlock || n_block % 4 != 0)) {
    PyErr_Format(PyExc_ValueError, "set_cpu_tiles: n_block must be 0 (the kernel's choice) or a multiple of 4 in "
                 "[4, %lld], got %lld", static_cast<long long>(accelops::kMaxNBlock), n_block);
    return nullptr;
  }
  if (k_chunk != 0 && (k_chunk < 256 || k_chunk % 256 != 0)) {
    PyErr_Format(PyExc_ValueError, "set_cpu_tiles: k_chunk must be 0 (the kernel's choice) or a positive multiple "
                 "of 256, got %lld", k_chunk);
    return nullptr;
  }
  accelops::CpuTiles& tiles = accelops::cpu_tiles();
  PyObject* previous = Py_BuildValue("(LL)", static_cast<long long>(tiles.n_block),
                                     static_cast<long long>(tiles.k_chunk));
  tiles.n_block = n_block;
  tiles.k_chunk = k_chunk;
  return previous;
}
static PyMethodDef accelops_c_methods[] = {
    {"set_cpu_tiles", py_set_cpu_tiles, METH_VARARGS,
     "set_cpu_tiles(n_block, k_chunk) -> previous (n_block, k_chunk): tile sizes of the int8/ternary CPU kernels "
     "for this thread (0 = the kernel's choice)."},
    {"cpu_isa", py_cpu_isa, METH_NOARGS,
     "Instruction set the int8/ternary dot kernels use on this machine (after ACCELOPS_CPU_ISA)."},
    {"cpu_isas", py_cpu_isas, METH_NOARGS, "Instruction-set levels with kernels that this CPU can run, lowest first (ACCELOPS_CPU_ISA values)."},
    {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef accelops_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, accelops_c_methods};
extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&accelops_c_module); }

TORCH_LIBRARY(accelops, m) {
  m.def("quantize_activation_int8(Tensor x) -> (Tensor, Tensor)");
  m.def("quantize_weight_int8(Tensor w) -> (Tensor, Tensor)");
  m.def(
      "int8_matmul(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias=None, "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias=None) -> Tensor");
  // The same results with ATen's int8 GEMM computing the sums (a tuned-dispatch candidate).
  // (The ternary family's schemas are defined in Python: accelops/ops/ternary.py.)
  m.def("int8_linear_int_mm(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias=None) -> Tensor");
  // fake quantization: (y, mask bits) so autograd saves 1 bit per element, not x
  m.def(
      "fake_quantize(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
      "int? axis=None) -> (Tensor, Tensor)");
  m.def("fake_quantize_backward(Tensor grad, Tensor mask) -> Tensor");
  m.def(
      "fake_quantize_learnable(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
      "int? axis=None, float grad_factor=1.0) -> Tensor");
  m.def(
      "fake_quantize_learnable_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int quant_min, "
      "int quant_max, int? axis=None, float grad_factor=1.0) -> (Tensor, Tensor, Tensor)");
  // Fused FFN: returns (y, g, u); g and u are the pre-activation projections, saved for
  // backward when save=True (empty [0] tensors otherwise, and g is empty for 'gelu').
  m.def(
      "fused_ffn(Tensor x, Tensor? w_gate, Tensor w_up, Tensor w_down, Tensor? b_gate=None, Tensor? b_up=None, "
      "Tensor? b_down=None, str activation=\"swiglu\", bool save=False, bool act_quant=False) "
      "-> (Tensor, Tensor, Tensor)");
  // -> (dx, dw_gate, dw_up, dw_down, db_gate, db_up, db_down); absent ones are empty [0].
  m.def(
      "fused_ffn_backward(Tensor dy, Tensor x, Tensor g, Tensor u, Tensor? w_gate, Tensor w_up, Tensor w_down, "
      "str activation, bool has_b_gate, bool has_b_up, bool has_b_down, bool act_quant, bool need_dx, "
      "bool need_dw) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same gradients from float32 CPU tensors when g and u die with this call: it writes
  // dg/du over them and returns their pages to the OS block by block (lower peak memory).
  m.def(
      "fused_ffn_backward_consume_(Tensor dy, Tensor x, Tensor(a!) g, Tensor(b!) u, Tensor? w_gate, Tensor w_up, "
      "Tensor w_down, str activation, bool has_b_gate, bool has_b_up, bool has_b_down, bool act_quant, "
      "bool need_dx, bool need_dw) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ffn_activation(Tensor? g, Tensor u, str activation=\"swiglu\") -> Tensor");
  // communication: bucket packing and gradient compression (accelops/reference/comm.py);
  // the compressors update their error-feedback residual in place
  m.def("bucket_flatten(Tensor[] tensors, ScalarType? dtype=None, float? divisor=None) -> Tensor");
  m.def("bucket_unflatten_(Tensor flat, Tensor(a!)[] tensors, float? divisor=None) -> ()");
  m.def("cast_div(Tensor x, float divisor, ScalarType dtype) -> Tensor");
  m.def(
      "topk_compress_(Tensor grad, Tensor(a!)? residual, int k, str method=\"exact\", int sample_size=4096, "
      "int seed=0) -> (Tensor values, Tensor indices)");
  m.def("topk_decompress(Tensor values, Tensor indices, int numel) -> Tensor");
  m.def("sign_compress_(Tensor grad, Tensor(a!)? residual, int chunk_size=2048) -> (Tensor bits, Tensor scales)");
  m.def("sign_decompress(Tensor bits, Tensor scales, int numel, int chunk_size=2048) -> Tensor");
  m.def(
      "int8_compress_(Tensor grad, Tensor(a!)? residual, int chunk_size=2048, int seed=0) -> (Tensor q, Tensor scales)");
  m.def("int8_decompress(Tensor q, Tensor scales, int chunk_size=2048) -> Tensor");
  m.def("orthogonalize_(Tensor(a!) m, float eps=1e-8) -> ()");
  // 8-bit optimizers (accelops/reference/optim.py): one fused step per parameter, states as
  // uint8 codes + fp32 block absmax, all updated in place; the per-step scalars come from
  // accelops.reference.optim.adamw_scalars (c1 = 1 - beta1, decay = 1 - lr * wd, ...)
  m.def(
      "adamw8bit_step_(Tensor(a!) param, Tensor grad, Tensor(b!) m_codes, Tensor(c!) m_absmax, "
      "Tensor(d!) v_codes, Tensor(e!) v_absmax, Tensor m_map, Tensor v_map, float beta1, float c1, float beta2, "
      "float c2, float decay, float step_size, float bc2_sqrt, float eps, int block_size=256) -> ()");
  m.def(
      "sgd8bit_step_(Tensor(a!) param, Tensor grad, Tensor(b!) codes, Tensor(c!) absmax, Tensor qmap, float lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool first, int block_size=256) -> ()");
}

TORCH_LIBRARY_IMPL(accelops, CPU, m) {
  m.impl("pack_ternary", &accelops::pack_ternary_cpu);
  m.impl("unpack_ternary", &accelops::unpack_ternary_cpu);
  m.impl("quantize_weight_ternary", &accelops::quantize_weight_ternary_cpu);
  m.impl("ternary_matmul", &accelops::ternary_matmul_cpu);
  m.impl("quantize_activation_int8", &accelops::quantize_activation_int8_cpu);
  m.impl("quantize_weight_int8", &accelops::quantize_weight_int8_cpu);
  m.impl("int8_matmul", &accelops::int8_matmul_cpu);
  m.impl("int8_linear", &accelops::int8_linear_cpu);
  m.impl("int8_linear_int_mm", &accelops::int8_linear_int_mm_cpu);
  m.impl("ternary_matmul_int_mm", &accelops::ternary_matmul_int_mm_cpu);
  m.impl("fake_quantize", &accelops::fake_quantize_cpu);
  m.impl("fake_quantize_backward", &accelops::fake_quantize_backward_cpu);
  m.impl("fake_quantize_learnable", &accelops::fake_quantize_learnable_cpu);
  m.impl("fake_quantize_learnable_backward", &accelops::fake_quantize_learnable_backward_cpu);
  m.impl("fused_ffn", &accelops::fused_ffn_cpu);
  m.impl("fused_ffn_backward", &accelops::fused_ffn_backward_cpu);
  m.impl("fused_ffn_backward_consume_", &accelops::fused_ffn_backward_consume_cpu);
  m.impl("ffn_activation", &accelops::ffn_activation_cpu);
  m.impl("bucket_flatten", &accelops::bucket_flatten_cpu);
  m.impl("bucket_unflatten_", &accelops::bucket_unflatten_cpu);
  m.impl("cast_div", &accelops::cast_div_cpu);
  m.impl("topk_compress_", &accelops::topk_compress_cpu);
  m.impl("topk_decompress", &accelops::topk_decompress_cpu);
  m.impl("sign_compress_", &accelops::sign_compress_cpu);
  m.impl("sign_decompress", &accelops::sign_decompress_cpu);
  m.impl("int8_compress_", &accelops::int8_compress_cpu);
  m.impl("int8_decompress", &accelops::int8_decompress_cpu);
  m.impl("orthogonalize_", &accelops::orthogonalize_cpu);
  m.impl("adamw8bit_step_", &accelops::adamw8bit_step_cpu);
  m.impl("sgd8bit_step_", &accelops::sgd8bit_step_cpu);
}
