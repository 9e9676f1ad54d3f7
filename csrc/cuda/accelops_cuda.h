/* accelops CUDA kernels behind a plain C ABI.
 *
 * Only device pointers, sizes, an element-type tag and a cudaStream_t cross this boundary:
 * no torch types. That is what lets `nvcc -c` compile the .cu files in csrc/cuda on a machine whose
 * torch has no CUDA headers (tests/test_cuda_sources.py does exactly that), while
 * csrc/cuda_ops.cpp wraps these functions as torch ops in CUDA builds.
 *
 * Conventions shared by every function below:
 *   - all pointers are device pointers; matrices are row-major and dense (row stride =
 *     row length, except x_q/q's stride `ldq` where stated);
 *   - nothing allocates memory or synchronizes: work is queued on `stream`, and the caller
 *     owns every buffer (the torch glue takes them from the caching allocator);
 *   - the return value is cudaSuccess, cudaErrorInvalidValue for bad sizes / pointers /
 *     dtypes (nothing is launched then), or the launch error;
 *   - the arithmetic is the spec's (accelops/reference/int8.py, ternary.py), op for op in
 *     fp32, so results are bit-identical to the reference: exact int32 dot products, then
 *     y = (float(acc) * x_scale[m]) * w_scale[n or 0] + bias[n], rounded once to the output
 *     type. Build without --use_fast_math / -ftz=true, which would change that rounding.
 *
 * This header is C as well as C++ (the test compiles it as both).
 */
#ifndef ACCELOPS_CUDA_H_
#define ACCELOPS_CUDA_H_

#include <stdint.h>

#include <cuda_runtime_api.h> /* cudaError_t, cudaStream_t */

#ifdef __cplusplus
extern "C" {
#endif

/* Element type of a floating-point input or output buffer. bf16 / fp16 buffers hold the
 * raw 16-bit patterns (c10::BFloat16 / c10::Half have the same layout). */
typedef enum accelops_dtype {
  ACCELOPS_FLOAT32 = 0,
  ACCELOPS_BFLOAT16 = 1,
  ACCELOPS_FLOAT16 = 2
} accelops_dtype;

/* ---------------------------------------------------------------- int8 family (int8.cu) */

/* Per-row (per-token) symmetric absmax quantization of x [m, k] (dtype x_dtype, dense):
 *   a = max(max|x[r, :]|, 1e-5);  q[r, i] = clamp(rint(x[r, i] * (127 / a)), -127, 127);
 *   scale[r] = a / 127.
 * q has row stride ldq >= k and q[r, k:ldq) is written as zeros (the ternary GEMM wants
 * its activations padded to whole 128-weight blocks). If qsum is not NULL, qsum[r] =
 * sum_i q[r, i]. A row holding NaN or +-Inf gets q = 0, qsum = 0 and scale = NaN.
 * k = 0 is allowed: zero rows of q, scale = 1e-5 / 127. */
cudaError_t accelops_quantize_activation_int8(const void* x, accelops_dtype x_dtype, int64_t m, int64_t k,
                                              int8_t* q, int64_t ldq, float* scale, int32_t* qsum,
                                              cudaStream_t stream);

/* Per-output-channel symmetric quantization of w [n, k] into w_q [n, k] and w_scale [n]:
 * the same arithmetic as the activation quantizer, row by row. The caller rejects
 * non-finite weights first (the reference raises on them). */
cudaError_t accelops_quantize_weight_int8(const void* w, accelops_dtype w_dtype, int64_t n, int64_t k, int8_t* w_q,
                                          float* w_scale, cudaStream_t stream);

/* W8A8 matmul with the dequantization fused:
 *   out[r, c] = (float(sum_i x_q[r, i] * w_q[c, i]) * x_scale[r]) * w_scale[w_scale_per_row ? c : 0]
 *               (+ bias[c] when bias is not NULL),
 * x_q [m, k], w_q [n, k] int8 (dense, any alignment: 16-byte aligned rows take the vector
 * path), x_scale [m], w_scale [n] or [1], bias [n] fp32, out [m, n] of out_dtype. */
cudaError_t accelops_int8_gemm(const int8_t* x_q, const float* x_scale, int64_t m, const int8_t* w_q, int64_t n,
                               int64_t k, const float* w_scale, int w_scale_per_row, const float* bias, void* out,
                               accelops_dtype out_dtype, cudaStream_t stream);

/* ------------------------------------------------------------ ternary family (ternary.cu) */

/* int8 activations x packed ternary weights with the dequantization fused:
 *   out[r, c] = (float(sum_i x_q[r, i] * W[c, i]) * x_scale[r]) * w_scale[w_scale_per_row ? c : 0]
 *               (+ bias[c] when bias is not NULL).
 * w_packed [n, nblocks * 32] uint8 in the layout of accelops/reference/ternary.py (weight
 * i = 128 b + 32 j + t sits in byte 32 b + t, bits 2 j .. 2 j + 1, as the code W + 1).
 * x_q [m, nblocks * 128] int8 zero padded past K, with x_sum[r] = sum_i x_q[r, i] (both
 * as written by accelops_quantize_activation_int8 with ldq = nblocks * 128).
 * x_q and w_packed must be 16-byte aligned (cudaErrorInvalidValue otherwise). */
cudaError_t accelops_ternary_gemm(const int8_t* x_q, const int32_t* x_sum, const float* x_scale, int64_t m,
                                  const uint8_t* w_packed, int64_t n, int64_t nblocks, const float* w_scale,
                                  int w_scale_per_row, const float* bias, void* out, accelops_dtype out_dtype,
                                  cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* ACCELOPS_CUDA_H_ */
