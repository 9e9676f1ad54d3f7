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

#include <stddef.h> /* size_t */
#include <stdint.h>

#include <cuda_runtime_api.h> /* cudaError_t, cudaStream_t */

#ifdef __cplusplus
extern "C" {
#endif

/* Element type of a floating-point input or output buffer. bf16 / fp16 buffers hold the
 * raw 16-bit patterns (c10::BFloat16 / c10::Half have the same layout). float64 is taken
 * by the comm family only (gradients may be fp64); the other families reject it. */
typedef enum accelops_dtype {
  ACCELOPS_FLOAT32 = 0,
  ACCELOPS_BFLOAT16 = 1,
  ACCELOPS_FLOAT16 = 2,
  ACCELOPS_FLOAT64 = 3
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

/* ---------------------------------------------------------------- comm family (comm.cu)
 *
 * The per-rank pieces of a (compressed) gradient all-reduce; the spec is
 * accelops/reference/comm.py and csrc/cpu/comm.cpp is the same arithmetic on the CPU.
 * Gradients are dense 1-D buffers of n elements (fp32/bf16/fp16/fp64); `residual`, when
 * not NULL, is the fp32 error-feedback buffer of n elements, updated in place:
 * acc = float(grad) + residual is formed (and written back to it) by the first pass, and
 * it ends holding acc - decompress(compress(acc)). The arithmetic is the reference's,
 * with correctly rounded __f*_rn operations (no FMA contraction), so outputs are
 * bit-identical to it, except where a function says otherwise. Workspaces are the
 * caller's: their sizes are given below. */

/* One tensor of a bucket: `numel` elements that occupy [start, start + numel) of the
 * concatenated element range, copied from src (src_dtype) to dst (dst_dtype). */
typedef struct accelops_bucket_piece {
  const void* src;
  void* dst;
  int64_t start;
  int64_t numel;
  int32_t src_dtype; /* an accelops_dtype */
  int32_t dst_dtype;
} accelops_bucket_piece;

/* bucket_flatten / bucket_unflatten_ in one: every piece's elements converted through
 * fp32, as torch converts (fp64 -> fp64 is copied exactly); with has_divisor, each value
 * becomes float32(x) / divisor (one IEEE division) before its single rounding to dst.
 * pieces[npieces] is a DEVICE array sorted by start, the starts contiguous from 0 up to
 * total. NaN payloads may differ from torch's CPU conversion (bf16 NaN is 0x7FFF here). */
cudaError_t accelops_bucket_copy(const accelops_bucket_piece* pieces, int64_t npieces, int64_t total,
                                 int has_divisor, float divisor, cudaStream_t stream);

/* out[i] = dst_dtype(float32(x[i]) / divisor) for i < n. */
cudaError_t accelops_cast_div(const void* x, accelops_dtype x_dtype, int64_t n, float divisor, void* out,
                              accelops_dtype out_dtype, cudaStream_t stream);

/* Workspace bytes accelops_topk_compress needs for n elements and a sample of up to
 * sample_size (256-byte aligned pointer). */
cudaError_t accelops_topk_workspace_size(int64_t n, int64_t sample_size, size_t* bytes);

/* Top-k of |acc| with error feedback -> values[k] (fp32), indices[k] (int32, ascending).
 * sampled = 0: the exact top-k (NaN counts as +Inf; which of equal magnitudes at the
 * boundary is sent: the lowest indices). sampled = 1: the threshold from the strided
 * sample of the spec, the candidates |acc| >= t, the k largest of them if more than k,
 * else all of them and padding slots (value 0, index = indices[0]). A 3-level radix
 * select on the magnitudes' bit patterns; nothing is synchronized with the host.
 * 1 <= k <= n < 2^31. */
cudaError_t accelops_topk_compress(const void* grad, accelops_dtype grad_dtype, float* residual, int64_t n, int64_t k,
                                   int sampled, int64_t sample_size, int64_t seed, float* values, int32_t* indices,
                                   void* workspace, size_t workspace_bytes, cudaStream_t stream);

/* out[numel] = the mean over `ranks` payloads (values/indices [ranks, k]) of each rank's
 * values scattered (added) at its indices, ranks summed in rank order. Exact when each
 * rank's indices are distinct apart from zero values (what topk_compress writes); other
 * repeated indices within a rank are summed in an unspecified order. */
cudaError_t accelops_topk_decompress(const float* values, const int32_t* indices, int64_t ranks, int64_t k,
                                     int64_t numel, float* out, cudaStream_t stream);

/* 1-bit sign compression: bits[ceil(n / 8)] (bit i % 8 of byte i / 8 is 1 for acc >= 0 or
 * NaN), scales[ceil(n / chunk_size)] = mean |acc| of the chunk (summed in fp64, rounded
 * once; NaN for a chunk holding NaN/Inf). chunk_sums: workspace of ceil(n / chunk_size)
 * doubles. The fp64 sums are atomic (any order): the spec's fp32 rounding of them is
 * order-independent in practice. */
cudaError_t accelops_sign_compress(const void* grad, accelops_dtype grad_dtype, float* residual, int64_t n,
                                   int64_t chunk_size, uint8_t* bits, float* scales, double* chunk_sums,
                                   cudaStream_t stream);

/* out[numel] = the mean over ranks of +-scale per element (bits [ranks, ceil(numel / 8)],
 * scales [ranks, ceil(numel / chunk_size)]). */
cudaError_t accelops_sign_decompress(const uint8_t* bits, const float* scales, int64_t ranks, int64_t numel,
                                     int64_t chunk_size, float* out, cudaStream_t stream);

/* INT8 with stochastic rounding: q[n] = clamp(floor(acc * (127 / a) + u), -127, 127) with
 * a = the chunk's max |acc| and u the spec's counter hash of (seed, i); scales[chunks] =
 * a / 127 (NaN, and q = 0, for a chunk holding NaN/Inf). chunk_amax: workspace of
 * ceil(n / chunk_size) uint32. */
cudaError_t accelops_int8_compress(const void* grad, accelops_dtype grad_dtype, float* residual, int64_t n,
                                   int64_t chunk_size, int64_t seed, int8_t* q, float* scales, uint32_t* chunk_amax,
                                   cudaStream_t stream);

/* out[n] = the mean over ranks of q * scale (q [ranks, n], scales [ranks, chunks]). */
cudaError_t accelops_int8_decompress(const int8_t* q, const float* scales, int64_t ranks, int64_t n,
                                     int64_t chunk_size, float* out, cudaStream_t stream);

/* Modified Gram-Schmidt over the columns of each of `batch` row-major matrices m [n, r]
 * (fp32 or fp64), in place: column i / (its norm + eps), then removed from every later
 * column; norms and dot products summed in fp64. One block per matrix. Judged by error
 * against fp64, not bitwise. */
cudaError_t accelops_orthogonalize(void* m, accelops_dtype dtype, int64_t batch, int64_t n, int64_t r, double eps,
                                   cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* ACCELOPS_CUDA_H_ */
