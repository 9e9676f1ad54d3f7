// int8_linear and ternary_matmul through ATen's int8 GEMM (at::_int_mm, oneDNN on x86):
// the same activation quantization and the same epilogue as the accelops kernels, with
// the int32 sums from ATen. Exact integer sums make the result identical to the kernel's
// whenever ATen's GEMM is exact, which `accelops tune` checks on extreme inputs before it
// lets a table choose this path (oneDNN without VNNI may saturate int16 pair sums).
//
// Why it exists: measured on this project's machine (AVX-512 VNNI, 2 threads), oneDNN's
// int8 GEMM beats the accelops dot-product kernel at M >= 32 on most shapes (1.6x at
// 4096x4096, M=512), while the accelops kernel wins elsewhere (the fused epilogue, M=1 on
// the ternary side, where unpacking the 2-bit weights costs more than the GEMM). Which
// wins is a property of the machine and the shape, so the tuned dispatch table picks it.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "kernels.h"

namespace accelops {

static at::Tensor output_for(const at::Tensor& x, int64_t n) {
  auto shape = x.sizes().vec();
  shape.back() = n;
  return at::empty(shape, x.options());
}

static void check_float_input(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension");
}

// Per-thread scratch that keeps its pages between calls. A fresh buffer above glibc's mmap
// threshold is a new mapping each call, and touching it costs a page fault per 4 KiB:
// measured here, a fresh 45 MB buffer took 15 ms to fill against 0.2 ms for a 16 MB one
// that the heap reused, more than the GEMM itself (1.5 ms for 11008x4096 at M=1). The
// calling thread alone uses it (the parallel loops below write disjoint parts), and it
// keeps the largest size seen: the unpacked weights and the sums of the largest layer.
template <typename T>
static T* scratch(std::vector<T>& buf, int64_t numel) {
  if (static_cast<int64_t>(buf.size()) < numel) buf.resize(numel);
  return buf.data();
}
static thread_local std::vector<int32_t> acc_scratch;
static thread_local std::vector<int8_t> weight_scratch;

// x [rows, k] -> q [rows, k] int8 (the kernels' quantization) and its per-row scales;
// acc = q @ w_q^T by ATen; then the shared epilogue into out2d.
static void int_mm_linear(const at::Tensor& x2, const at::Tensor& w_q, const at::Tensor& w_scale,
                          const std::optional<at::Tensor>& bias, at::Tensor& out2d) {
  const int64_t rows = x2.size(0), k = x2.size(1), n = w_q.size(0);
  at::Tensor q = at::empty({rows, k}, x2.options().dtype(at::kChar));
  std::vector<float> xs(rows, kQuantEps / 127.0f);
  at::Tensor acc = at::from_blob(scratch(acc_scratch, rows * n), {rows, n}, x2.options().dtype(at::kInt));
  if (k > 0) {
    quantize_rows(x2, k, q.data_ptr<int8_t>(), xs.data(), nullptr);
    at::_int_mm_out(acc, q, w_q.t());
  } else {
    acc.zero_();
  }
  dequant_epilogue(acc.data_ptr<int32_t>(), rows, n, xs.data(), w_scale, bias, out2d);
}

at::Tensor int8_linear_int_mm_cpu(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                                  const std::optional<at::Tensor>& bias) {
  check_float_input(x);
  TORCH_CHECK(w_q.scalar_type() == at::kChar, "w_q must be int8, got ", w_q.scalar_type());
  TORCH_CHECK(w_q.dim() == 2, "w_q must be 2-D [N, K], got shape ", w_q.sizes());
  TORCH_CHECK(x.size(-1) == w_q.size(1), "x's last dim must equal w_q's K=", w_q.size(1), ", got shape ",
              x.sizes());
  const int64_t k = w_q.size(1), n = w_q.size(0);
  at::Tensor out = output_for(x, n);
  at::Tensor out2d = out.view({-1, n});
  const int64_t rows = out2d.size(0);
  if (rows == 0 || n == 0) return out;
  int_mm_linear(x.reshape({rows, k}).contiguous(), w_q.contiguous(), w_scale, bias, out2d);
  return out;
}

// Packed ternary [n, nblocks * 32] -> int8 [n, k] in {-1, 0, 1}. Byte i of a block holds
// the codes (w + 1) of weights 32 q + i, q = 0..3, in bits 2q..2q+1; the loops over i are
// contiguous on both sides, so they vectorize (unpack_ternary_cpu is the readable version).
static at::Tensor unpack_ternary_fast(const at::Tensor& w_packed, int64_t k) {
  const int64_t n = w_packed.size(0), nblocks = (k + kTernaryBlockK - 1) / kTernaryBlockK;
  const int64_t kp = nblocks * kTernaryBlockK;
  at::Tensor p = w_packed.contiguous();
  // Rows kp long (whole blocks), viewed as [n, k]: _int_mm takes the row stride as it is.
  int8_t* dst = scratch(weight_scratch, n * kp);
  const uint8_t* src = p.data_ptr<uint8_t>();
  at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(nblocks, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const uint8_t* s = src + (r * nblocks + blk) * kTernaryBlockBytes;
        int8_t* d = dst + r * kp + blk * kTernaryBlockK;
        for (int q = 0; q < 4; ++q)
          for (int i = 0; i < kTernaryBlockBytes; ++i) d[q * 32 + i] = int8_t((s[i] >> (2 * q)) & 3) - 1;
      }
  });
  return at::from_blob(dst, {n, k}, {kp, 1}, w_packed.options().dtype(at::kChar));
}

at::Tensor ternary_matmul_int_mm_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                                     const std::optional<at::Tensor>& bias) {
  check_float_input(x);
  const int64_t k = x.size(-1);
  TORCH_CHECK(w_packed.scalar_type() == at::kByte, "w_packed must be uint8, got ", w_packed.scalar_type());
  const int64_t nblocks = (k + kTernaryBlockK - 1) / kTernaryBlockK;
  TORCH_CHECK(w_packed.dim() == 2 && w_packed.size(1) == nblocks * kTernaryBlockBytes, "w_packed must be [N, ",
              nblocks * kTernaryBlockBytes, "] to hold K=", k, ", got shape ", w_packed.sizes());
  const int64_t n = w_packed.size(0);
  TORCH_CHECK(w_scale.numel() == 1 || w_scale.numel() == n, "w_scale must hold 1 or N=", n, " scales, got shape ",
              w_scale.sizes());
  at::Tensor out = output_for(x, n);
  at::Tensor out2d = out.view({-1, n});
  const int64_t rows = out2d.size(0);
  if (rows == 0 || n == 0) return out;
  int_mm_linear(x.reshape({rows, k}).contiguous(), unpack_ternary_fast(w_packed, k), w_scale, bias, out2d);
  return out;
}

}  // namespace accelops
