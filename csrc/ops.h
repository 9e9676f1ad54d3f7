// Tensor-level CPU implementations of the accelops ops; registered in csrc/ops.cpp.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace accelops {

// ternary family (csrc/cpu/ternary.cpp)
at::Tensor pack_ternary_cpu(const at::Tensor& wq);
at::Tensor unpack_ternary_cpu(const at::Tensor& w_packed, int64_t k);
std::tuple<at::Tensor, at::Tensor> quantize_weight_ternary_cpu(const at::Tensor& w, bool per_channel);
at::Tensor ternary_matmul_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                              const std::optional<at::Tensor>& bias);
// the lut3 lookup-table format (csrc/cpu/ternary_lut.cpp)
at::Tensor ternary_matmul_lut_cpu(const at::Tensor& x, const at::Tensor& w_lut, const at::Tensor& w_scale, int64_t n,
                                  const std::optional<at::Tensor>& bias);
// the base3 format, five weights a byte (csrc/cpu/ternary_base3.cpp)
at::Tensor ternary_matmul_base3_cpu(const at::Tensor& x, const at::Tensor& w_b3, const at::Tensor& w_scale,
                                    const std::optional<at::Tensor>& bias);

// one decode step of a ternary transformer block (csrc/cpu/decode.cpp)
at::Tensor ternary_decode_layer_cpu(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos,
                                    const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                                    const c10::List<std::optional<at::Tensor>>& norms, at::TensorList w_packed,
                                    at::TensorList w_scale, const c10::List<std::optional<at::Tensor>>& bias,
                                    at::IntArrayRef in_features, int64_t n_heads, double eps,
                                    c10::string_view activation, c10::string_view format);

// int8 family (csrc/cpu/int8.cpp)
std::tuple<at::Tensor, at::Tensor> quantize_activation_int8_cpu(const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor> quantize_weight_int8_cpu(const at::Tensor& w);
at::Tensor int8_matmul_cpu(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                           std::optional<at::ScalarType> out_dtype);
at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias);

// the same two ops with ATen's int8 GEMM for the sums (csrc/cpu/int_mm.cpp)
at::Tensor int8_linear_int_mm_cpu(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                                  const std::optional<at::Tensor>& bias);
at::Tensor ternary_matmul_int_mm_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                                     const std::optional<at::Tensor>& bias);

// fake-quant family (csrc/cpu/fake_quant.cpp)
std::tuple<at::Tensor, at::Tensor> fake_quantize_cpu(const at::Tensor& x, const at::Tensor& scale,
                                                     const at::Tensor& zero_point, int64_t quant_min,
                                                     int64_t quant_max, std::optional<int64_t> axis);
at::Tensor fake_quantize_backward_cpu(const at::Tensor& grad, const at::Tensor& mask);
at::Tensor fake_quantize_learnable_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                                       int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis,
                                       double grad_factor);
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_learnable_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis, double grad_factor);

// fused FFN (csrc/cpu/ffn.cpp)
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_ffn_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
    const std::optional<at::Tensor>& b_gate, const std::optional<at::Tensor>& b_up,
    const std::optional<at::Tensor>& b_down, c10::string_view activation, bool save, bool act_quant);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_ffn_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& g, const at::Tensor& u,
    const std::optional<at::Tensor>& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
    c10::string_view activation, bool has_b_gate, bool has_b_up, bool has_b_down, bool act_quant, bool need_dx,
    bool need_dw);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fused_ffn_backward_consume_cpu(const at::Tensor& dy, const at::Tensor& x, at::Tensor& g, at::Tensor& u,
                               const std::optional<at::Tensor>& w_gate, const at::Tensor& w_up,
                               const at::Tensor& w_down, c10::string_view activation, bool has_b_gate,
                               bool has_b_up, bool has_b_down, bool act_quant, bool need_dx, bool need_dw);
at::Tensor ffn_activation_cpu(const std::optional<at::Tensor>& g, const at::Tensor& u, c10::string_view activation);

// communication family (csrc/cpu/comm.cpp)
at::Tensor bucket_flatten_cpu(at::TensorList tensors, std::optional<at::ScalarType> dtype,
                              std::optional<double> divisor);
void bucket_unflatten_cpu(const at::Tensor& flat, at::TensorList tensors, std::optional<double> divisor);
at::Tensor cast_div_cpu(const at::Tensor& x, double divisor, at::ScalarType dtype);
std::tuple<at::Tensor, at::Tensor> topk_compress_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& residual,
                                                     int64_t k, c10::string_view method, int64_t sample_size,
                                                     int64_t seed);
at::Tensor topk_decompress_cpu(const at::Tensor& values, const at::Tensor& indices, int64_t numel);
std::tuple<at::Tensor, at::Tensor> sign_compress_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& residual,
                                                     int64_t chunk_size);
at::Tensor sign_decompress_cpu(const at::Tensor& bits, const at::Tensor& scales, int64_t numel, int64_t chunk_size);
std::tuple<at::Tensor, at::Tensor> int8_compress_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& residual,
                                                     int64_t chunk_size, int64_t seed);
at::Tensor int8_decompress_cpu(const at::Tensor& q, const at::Tensor& scales, int64_t chunk_size);
void orthogonalize_cpu(const at::Tensor& m, double eps);

// 8-bit optimizers (csrc/cpu/optim.cpp)
void adamw8bit_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                        const at::Tensor& m_absmax, const at::Tensor& v_codes, const at::Tensor& v_absmax,
                        const at::Tensor& m_map, const at::Tensor& v_map, double beta1, double c1, double beta2,
                        double c2, double decay, double step_size, double bc2_sqrt, double eps, int64_t block_size);
void sgd8bit_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& codes,
                      const at::Tensor& absmax, const at::Tensor& qmap, double lr, double momentum,
                      double dampening, double weight_decay, bool nesterov, bool first, int64_t block_size);
void adamw8bit_fp8_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                            const at::Tensor& m_absmax, const at::Tensor& v_codes, const at::Tensor& v_absmax,
                            double beta1, double c1, double beta2, double c2, double decay, double step_size,
                            double bc2_sqrt, double eps, int64_t block_size);

// shared helpers (csrc/cpu/fake_quant.cpp)
// A new contiguous tensor whose large pages are backed by transparent huge pages where the
// kernel allows it: first-touch 4 KiB page faults of a fresh large output cost more than a
// memory-bound kernel itself on a VM.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// shared helpers (csrc/cpu/int8.cpp)
// Quantizes x ([M, K], any float dtype) row by row into q ([M, k_padded] int8, zero padded),
// scale[M] and (if not null) qsum[M].
void quantize_rows(const at::Tensor& x2d, int64_t k_padded, int8_t* q, float* scale, int32_t* qsum);
// out[m, n] = (float(acc[m, n]) * x_scale[m]) * w_scale[n or 0] + bias[n], cast to out's dtype,
// for any sub-rectangle of the output (so GEMM drivers can apply it tile by tile).
class Epilogue {
 public:
  Epilogue(const float* x_scale, const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, at::Tensor& out2d);
  void apply(const int32_t* acc, int64_t m, int64_t n, int64_t m0, int64_t m1, int64_t n0, int64_t n1) const;

 private:
  const float* x_scale_;
  at::Tensor w_scale_, bias_;
  const float* ws_ = nullptr;
  const float* bias_ptr_ = nullptr;
  bool ws_per_row_ = false;
  at::Tensor out_;
};
void dequant_epilogue(const int32_t* acc, int64_t m, int64_t n, const float* x_scale, const at::Tensor& w_scale,
                      const std::optional<at::Tensor>& bias, at::Tensor& out2d);
const char* cpu_isa_name();

}  // namespace accelops
