// The CPU implementations of the accelops ops (TORCH_LIBRARY_IMPL only). The schemas, fakes,
// autograd and default (reference) kernels are Python's (accelops/ops/); CUDA
// implementations are registered by accelops._C_cuda (csrc/cuda_ops.cpp) or from Python
// (Triton kernels). See csrc/README.md for adding a kernel.
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

// The schemas (with the reference as every op's default kernel, the fakes and the autograd)
// are defined in Python, one family per module: accelops/ops/<family>.py, through
// accelops/ops/_library.py. This file only adds the CPU kernels. Loading it before the
// Python definitions is fine (a kernel may be registered before its schema); the schema
// inferred from each function's C++ signature is checked against the Python one either way.
TORCH_LIBRARY_IMPL(accelops, CPU, m) {
  m.impl("pack_ternary", &accelops::pack_ternary_cpu);
  m.impl("unpack_ternary", &accelops::unpack_ternary_cpu);
  m.impl("quantize_weight_ternary", &accelops::quantize_weight_ternary_cpu);
  m.impl("ternary_matmul", &accelops::ternary_matmul_cpu);
  m.impl("ternary_matmul_lut", &accelops::ternary_matmul_lut_cpu);
  m.impl("ternary_matmul_base3", &accelops::ternary_matmul_base3_cpu);
  m.impl("ternary_decode_layer", &accelops::ternary_decode_layer_cpu);
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
