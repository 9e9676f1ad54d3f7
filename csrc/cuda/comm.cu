// Communication family on CUDA: bucket packing, top-k / sign / int8 gradient compression
// with error feedback, their decompressors and PowerSGD's Gram-Schmidt. The spec is
// accelops/reference/comm.py; csrc/cpu/comm.cpp is the same arithmetic on the CPU.
//
// Every fp32 step is one correctly rounded __f*_rn operation in the reference's order
// (nvcc would contract a plain a * b + c into an FMA), so outputs are bit-identical to the
// reference where it is exact. Nothing here synchronizes with the host: top-k's
// data-dependent decisions (the threshold, whether the sampled threshold let through more
// than k candidates) live in a small device-side state that later kernels read.
//
// Self-contained (no common.cuh): these are memory-bound elementwise and reduction
// kernels that share nothing with the GEMMs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "accelops_cuda.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr uint32_t kInfKey = 0x7F800000u;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride loops beyond this

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

inline unsigned grid_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return unsigned(imax(1, imin(blocks, kMaxBlocks)));
}

inline bool valid_dtype(int dt) {
  return dt == ACCELOPS_FLOAT32 || dt == ACCELOPS_BFLOAT16 || dt == ACCELOPS_FLOAT16 || dt == ACCELOPS_FLOAT64;
}

__device__ __forceinline__ int64_t global_thread() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_threads() { return int64_t(gridDim.x) * blockDim.x; }

// ---------------------------------------------------------------- element access

// x as fp32, as torch converts it: fp64 rounds once to fp32 (so fp64 -> bf16 rounds twice,
// through fp32, exactly as torch's static_cast<BFloat16>(double) does).
__device__ __forceinline__ float load_f32(const void* p, int dt, int64_t i) {
  switch (dt) {
    case ACCELOPS_BFLOAT16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case ACCELOPS_FLOAT16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case ACCELOPS_FLOAT64:
      return __double2float_rn(static_cast<const double*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_f32(void* p, int dt, int64_t i, float v) {
  switch (dt) {
    case ACCELOPS_BFLOAT16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      break;
    case ACCELOPS_FLOAT16:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      break;
    case ACCELOPS_FLOAT64:
      static_cast<double*>(p)[i] = static_cast<double>(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
      break;
  }
}

// acc = float(grad) + residual. `first` is the first pass over an element: it forms acc
// and writes it into the residual, which every later pass reads instead.
struct Acc {
  const void* grad;
  int dt;
  float* res;
  __device__ __forceinline__ float get(int64_t i) const { return res != nullptr ? res[i] : load_f32(grad, dt, i); }
  __device__ __forceinline__ float first(int64_t i) const {
    if (res == nullptr) return load_f32(grad, dt, i);
    const float a = __fadd_rn(load_f32(grad, dt, i), res[i]);
    res[i] = a;
    return a;
  }
};

// |v| as an ordered key (the bits without the sign); NaN counts as +Inf (the spec's rule).
__device__ __forceinline__ uint32_t mag_key(float v) {
  const uint32_t u = __float_as_uint(v) & 0x7FFFFFFFu;
  return u < kInfKey ? u : kInfKey;
}

// ---------------------------------------------------------------- block reductions and scans

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Every thread gets the block's sum; the trailing barrier lets `red` be reused at once.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* red) {
  v = warp_sum(v);
  if ((threadIdx.x & (kWarp - 1)) == 0) red[threadIdx.x / kWarp] = v;
  __syncthreads();
  T s = 0;
  for (int w = 0; w < int(blockDim.x / kWarp); ++w) s += red[w];
  __syncthreads();
  return s;
}

// Exclusive prefix sum over the block in thread order; *total gets the block's sum.
template <class T>
__device__ __forceinline__ T block_exclusive_scan(T v, T* total) {
  __shared__ T warp_tot[kWarp];
  const int lane = threadIdx.x & (kWarp - 1), w = threadIdx.x / kWarp, nw = blockDim.x / kWarp;
  T x = v;
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    const T y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  if (lane == kWarp - 1) warp_tot[w] = x;
  __syncthreads();
  if (w == 0) {
    T t = lane < nw ? warp_tot[lane] : T(0);
#pragma unroll
    for (int o = 1; o < kWarp; o <<= 1) {
      const T y = __shfl_up_sync(kFull, t, o);
      if (lane >= o) t += y;
    }
    if (lane < nw) warp_tot[lane] = t;  // inclusive prefix of the warp totals
  }
  __syncthreads();
  const T excl = x - v + (w > 0 ? warp_tot[w - 1] : T(0));
  *total = warp_tot[nw - 1];
  __syncthreads();
  return excl;
}

// ---------------------------------------------------------------- buckets

constexpr int64_t kCopyTile = 4096;

// Tiles of the concatenated range; each block finds the first piece of its tile by binary
// search, then walks the pieces the tile covers (many small tensors or part of a big one).
__global__ void __launch_bounds__(kThreads)
    bucket_copy_kernel(const accelops_bucket_piece* __restrict__ pieces, int64_t np, int64_t total, int has_div,
                       float div) {
  __shared__ int64_t first;
  const int64_t tiles = (total + kCopyTile - 1) / kCopyTile;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t t0 = t * kCopyTile, t1 = imin(total, t0 + kCopyTile);
    if (threadIdx.x == 0) {
      int64_t lo = 0, hi = np;  // the last piece starting at or before t0
      while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (pieces[mid].start <= t0)
          lo = mid;
        else
          hi = mid;
      }
      first = lo;
    }
    __syncthreads();
    for (int64_t p = first; p < np && pieces[p].start < t1; ++p) {
      const accelops_bucket_piece pc = pieces[p];
      const int64_t lo = imax(t0, pc.start), hi = imin(t1, pc.start + pc.numel);
      const bool raw64 = !has_div && pc.src_dtype == ACCELOPS_FLOAT64 && pc.dst_dtype == ACCELOPS_FLOAT64;
      for (int64_t e = lo + threadIdx.x; e < hi; e += blockDim.x) {
        const int64_t i = e - pc.start;
        if (raw64) {
          static_cast<double*>(pc.dst)[i] = static_cast<const double*>(pc.src)[i];
          continue;
        }
        float v = load_f32(pc.src, pc.src_dtype, i);
        if (has_div) v = __fdiv_rn(v, div);
        store_f32(pc.dst, pc.dst_dtype, i, v);
      }
    }
    __syncthreads();  // `first` is rewritten for the next tile
  }
}

__global__ void __launch_bounds__(kThreads)
    cast_div_kernel(const void* __restrict__ x, int xdt, int64_t n, float div, void* __restrict__ out, int odt) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) store_f32(out, odt, i, __fdiv_rn(load_f32(x, xdt, i), div));
}

// ---------------------------------------------------------------- top-k: radix select

// Radix select progress and its result. The keys still in the running are those with
// (key & mask) == prefix; `remaining` of the largest of them are still to be taken.
struct SelectState {
  uint32_t prefix, mask;
  int64_t remaining;
  uint32_t thr;                 // the k-th largest key
  int64_t ties;                 // how many keys == thr are sent (first in index order)
  int64_t count;                // slots filled before the padding
  unsigned long long cand;      // sampled: elements with key >= the sample's threshold
  int active;                   // 0: the select kernels return at once
};

constexpr int kBins1 = 2048, kShift1 = 20;  // keys < 2^31: bits 30..20
constexpr int kBins2 = 1024, kShift2 = 10;
constexpr int kBins3 = 1024, kShift3 = 0;

// The select's source: element j is acc[off + j * stride] for j < len (the whole buffer,
// or the spec's strided sample).
struct View {
  int64_t off, stride, len;
};

__global__ void select_init_kernel(SelectState* st, int64_t remaining) {
  st->prefix = 0;
  st->mask = 0;
  st->remaining = remaining;
  st->thr = 0;
  st->ties = 0;
  st->count = remaining;
  st->cand = 0;
  st->active = 1;
}

__global__ void __launch_bounds__(kThreads)
    radix_hist_kernel(Acc acc, View v, const SelectState* __restrict__ st, int shift, int bins,
                      uint32_t* __restrict__ hist) {
  if (!st->active) return;  // uniform across the grid
  __shared__ uint32_t sh[kBins1];
  for (int b = threadIdx.x; b < bins; b += blockDim.x) sh[b] = 0;
  __syncthreads();
  const uint32_t prefix = st->prefix, mask = st->mask;
  for (int64_t j = global_thread(); j < v.len; j += grid_threads()) {
    const uint32_t key = mag_key(acc.get(v.off + j * v.stride));
    if ((key & mask) == prefix) atomicAdd(&sh[(key >> shift) & uint32_t(bins - 1)], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x)
    if (sh[b]) atomicAdd(&hist[b], sh[b]);
}

// One block: the bin holding the remaining-th largest key narrows the prefix; the
// histogram is zeroed for the next level.
__global__ void __launch_bounds__(kThreads)
    radix_pick_kernel(SelectState* st, uint32_t* hist, int shift, int bins, int last) {
  if (!st->active) return;
  if (threadIdx.x == 0) {
    const int64_t rem = st->remaining;
    int64_t above = 0;
    int b = bins - 1;
    for (; b > 0; --b) {
      if (above + int64_t(hist[b]) >= rem) break;
      above += hist[b];
    }
    st->prefix |= uint32_t(b) << shift;
    st->mask |= uint32_t(bins - 1) << shift;
    st->remaining = rem - above;
    if (last) {
      st->thr = st->prefix;
      st->ties = st->remaining;
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x) hist[b] = 0;
}

inline cudaError_t radix_select(Acc acc, View v, SelectState* st, uint32_t* hist, cudaStream_t stream) {
  const unsigned blocks = grid_for(v.len, int64_t(kThreads) * 16);
  const int shifts[3] = {kShift1, kShift2, kShift3}, bins[3] = {kBins1, kBins2, kBins3};
  for (int level = 0; level < 3; ++level) {
    radix_hist_kernel<<<blocks, kThreads, 0, stream>>>(acc, v, st, shifts[level], bins[level], hist);
    radix_pick_kernel<<<1, kThreads, 0, stream>>>(st, hist, shifts[level], bins[level], level == 2);
  }
  return cudaGetLastError();
}

__global__ void __launch_bounds__(kThreads) accumulate_kernel(Acc acc, int64_t n) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) acc.first(i);
}

// Sampled: how many elements reach the sample's threshold.
__global__ void __launch_bounds__(kThreads) count_candidates_kernel(Acc acc, int64_t n, SelectState* st) {
  __shared__ unsigned long long red[kThreads / kWarp];
  const uint32_t lower = st->thr;
  unsigned long long c = 0;
  for (int64_t i = global_thread(); i < n; i += grid_threads()) c += mag_key(acc.get(i)) >= lower;
  c = block_sum(c, red);
  if (threadIdx.x == 0 && c) atomicAdd(&st->cand, c);
}

// Sampled: more candidates than k -> the k largest of them, which is the exact top-k (a
// fresh select); otherwise every candidate is sent and the rest is padding.
__global__ void sampled_decide_kernel(SelectState* st, int64_t k) {
  const int64_t cand = int64_t(st->cand);
  if (cand > k) {
    st->prefix = 0;
    st->mask = 0;
    st->remaining = k;
    st->count = k;
    st->active = 1;
  } else {
    st->ties = INT64_MAX;  // thr stays the sample's threshold: every key >= it is sent
    st->count = cand;
    st->active = 0;
  }
}

// ---------------------------------------------------------------- top-k: ordered compaction

constexpr int kPerThread = 16;
constexpr int64_t kSelTile = int64_t(kThreads) * kPerThread;

// This thread's elements [b, b + kPerThread) of acc above (gt) and at (eq) the threshold
// key: the count pass and the write pass must agree, so both use this.
__device__ __forceinline__ void count_vs_threshold(const Acc& acc, int64_t b, int64_t n, uint32_t thr, int& gt,
                                                   int& eq) {
  for (int e = 0; e < kPerThread; ++e) {
    if (b + e >= n) break;
    const uint32_t key = mag_key(acc.get(b + e));
    gt += key > thr;
    eq += key == thr;
  }
}

__global__ void __launch_bounds__(kThreads)
    tile_count_kernel(Acc acc, int64_t n, const SelectState* __restrict__ st, int32_t* __restrict__ tile_gt,
                      int32_t* __restrict__ tile_eq) {
  __shared__ int red[kThreads / kWarp];
  const uint32_t thr = st->thr;
  const int64_t tiles = (n + kSelTile - 1) / kSelTile;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t b = t * kSelTile + int64_t(threadIdx.x) * kPerThread;
    int gt = 0, eq = 0;
    count_vs_threshold(acc, b, n, thr, gt, eq);
    gt = block_sum(gt, red);
    eq = block_sum(eq, red);
    if (threadIdx.x == 0) {
      tile_gt[t] = gt;
      tile_eq[t] = eq;
    }
  }
}

// One block over all tiles in order: how many of each tile's ties it sends (the first
// `ties` in index order) and where its output starts.
__global__ void __launch_bounds__(1024)
    tile_scan_kernel(const int32_t* __restrict__ tile_gt, const int32_t* __restrict__ tile_eq, int64_t tiles,
                     const SelectState* __restrict__ st, int32_t* __restrict__ tile_take,
                     int32_t* __restrict__ tile_off) {
  const int64_t ties = st->ties;
  long long eq_carry = 0, off_carry = 0;
  for (int64_t t0 = 0; t0 < tiles; t0 += blockDim.x) {
    const int64_t t = t0 + threadIdx.x;
    const long long eq = t < tiles ? tile_eq[t] : 0, gt = t < tiles ? tile_gt[t] : 0;
    long long eq_total, sel_total;
    const long long eq_before = eq_carry + block_exclusive_scan(eq, &eq_total);
    const long long take = ties <= eq_before ? 0 : (ties - eq_before < eq ? ties - eq_before : eq);
    const long long sel_before = off_carry + block_exclusive_scan(gt + take, &sel_total);
    if (t < tiles) {
      tile_take[t] = int32_t(take);
      tile_off[t] = int32_t(sel_before);
    }
    eq_carry += eq_total;
    off_carry += sel_total;
  }
}

__global__ void __launch_bounds__(kThreads)
    tile_write_kernel(Acc acc, int64_t n, const SelectState* __restrict__ st, const int32_t* __restrict__ tile_take,
                      const int32_t* __restrict__ tile_off, float* __restrict__ values, int32_t* __restrict__ indices) {
  const uint32_t thr = st->thr;
  const int64_t tiles = (n + kSelTile - 1) / kSelTile;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t b = t * kSelTile + int64_t(threadIdx.x) * kPerThread;
    int gt = 0, eq = 0;
    count_vs_threshold(acc, b, n, thr, gt, eq);
    const int take = tile_take[t];
    int total;
    const int eq_base = block_exclusive_scan(eq, &total);
    const int my_take = take <= eq_base ? 0 : (take - eq_base < eq ? take - eq_base : eq);
    int pos = tile_off[t] + block_exclusive_scan(gt + my_take, &total);
    int eq_seen = 0;
    for (int e = 0; e < kPerThread; ++e) {
      const int64_t i = b + e;
      if (i >= n) break;
      const float a = acc.get(i);
      const uint32_t key = mag_key(a);
      bool send = key > thr;
      if (key == thr) send = eq_seen++ < my_take;
      if (!send) continue;
      values[pos] = a;
      indices[pos] = int32_t(i);
      if (acc.res != nullptr) acc.res[i] = __fsub_rn(a, a);  // acc - sent: 0, or NaN for Inf/NaN
      ++pos;
    }
  }
}

__global__ void topk_pad_kernel(const SelectState* __restrict__ st, int64_t k, float* __restrict__ values,
                                int32_t* __restrict__ indices) {
  const int64_t count = st->count;
  for (int64_t j = count + global_thread(); j < k; j += grid_threads()) {
    values[j] = 0.f;
    indices[j] = indices[0];
  }
}

inline size_t align256(size_t b) { return (b + 255) / 256 * 256; }

// ---------------------------------------------------------------- top-k decompression

__global__ void __launch_bounds__(kThreads)
    scatter_add_kernel(const float* __restrict__ values, const int32_t* __restrict__ indices, int64_t k,
                       float* __restrict__ out) {
  for (int64_t j = global_thread(); j < k; j += grid_threads()) {
    const float v = values[j];
    if (v != 0.f) atomicAdd(out + indices[j], v);  // a zero (padding) changes no partial sum
  }
}

__global__ void __launch_bounds__(kThreads) divide_kernel(float* __restrict__ out, int64_t n, float w) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) out[i] = __fdiv_rn(out[i], w);
}

// ---------------------------------------------------------------- sign and int8: chunk statistics

// Sum of |acc| per chunk in fp64. A warp takes 32 consecutive elements at a time: one
// atomic per warp when they share a chunk, one per element otherwise (small chunks).
__global__ void __launch_bounds__(kThreads)
    sign_stat_kernel(Acc acc, int64_t n, int64_t cs, double* __restrict__ sums) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t warps = grid_threads() / kWarp;
  for (int64_t base = global_thread() / kWarp * kWarp; base < n; base += warps * kWarp) {
    const int64_t i = base + lane;
    const double v = i < n ? static_cast<double>(fabsf(acc.first(i))) : 0.0;
    const int64_t last = imin(n, base + kWarp) - 1;
    if (base / cs == last / cs) {
      const double s = warp_sum(v);
      if (lane == 0) atomicAdd(sums + base / cs, s);
    } else if (i < n) {
      atomicAdd(sums + i / cs, v);
    }
  }
}

__global__ void sign_scale_kernel(const double* __restrict__ sums, int64_t n, int64_t cs, float* __restrict__ scales) {
  const int64_t chunks = (n + cs - 1) / cs;
  for (int64_t c = global_thread(); c < chunks; c += grid_threads()) {
    const int64_t len = imin(n, (c + 1) * cs) - c * cs;
    const float s = __double2float_rn(__ddiv_rn(sums[c], static_cast<double>(len)));
    scales[c] = isfinite(s) ? s : __int_as_float(0x7fc00000);
  }
}

// One thread per byte of bits: bit e for acc >= 0 or NaN; residual = acc - (+-scale).
__global__ void __launch_bounds__(kThreads)
    sign_apply_kernel(Acc acc, int64_t n, int64_t cs, const float* __restrict__ scales, uint8_t* __restrict__ bits) {
  const int64_t nbytes = (n + 7) / 8;
  for (int64_t byte = global_thread(); byte < nbytes; byte += grid_threads()) {
    unsigned out = 0;
    for (int e = 0; e < 8; ++e) {
      const int64_t i = byte * 8 + e;
      if (i >= n) break;
      const float a = acc.get(i), s = scales[i / cs];
      const bool pos = !(a < 0.f);
      out |= unsigned(pos) << e;
      if (acc.res != nullptr) acc.res[i] = __fsub_rn(a, pos ? s : -s);
    }
    bits[byte] = uint8_t(out);
  }
}

// Max |acc| per chunk as the bits of |acc| (NaN's bits exceed +Inf's, which flags the chunk).
__global__ void __launch_bounds__(kThreads)
    int8_stat_kernel(Acc acc, int64_t n, int64_t cs, uint32_t* __restrict__ amax) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t warps = grid_threads() / kWarp;
  for (int64_t base = global_thread() / kWarp * kWarp; base < n; base += warps * kWarp) {
    const int64_t i = base + lane;
    const uint32_t v = i < n ? (__float_as_uint(acc.first(i)) & 0x7FFFFFFFu) : 0u;
    const int64_t last = imin(n, base + kWarp) - 1;
    if (base / cs == last / cs) {
      uint32_t m = v;
#pragma unroll
      for (int o = kWarp / 2; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(kFull, m, o));
      if (lane == 0) atomicMax(amax + base / cs, m);
    } else if (i < n) {
      atomicMax(amax + i / cs, v);
    }
  }
}

// The spec's counter hash: murmur3's fmix32 over (i mod 2^32) ^ key, 24 bits kept.
__device__ __forceinline__ float uniform_hash(uint32_t key, int64_t i) {
  uint32_t x = uint32_t(uint64_t(i) & 0xFFFFFFFFull) ^ key;
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return __fmul_rn(static_cast<float>(x >> 8), 5.9604644775390625e-08f);  // * 2^-24, exact
}

__global__ void __launch_bounds__(kThreads)
    int8_apply_kernel(Acc acc, int64_t n, int64_t cs, uint32_t key, const uint32_t* __restrict__ amax,
                      int8_t* __restrict__ q, float* __restrict__ scales) {
  const float nan = __int_as_float(0x7fc00000);
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    const int64_t c = i / cs;
    const uint32_t bits = amax[c];
    const bool bad = bits >= kInfKey;
    const float a_max = __uint_as_float(bits);
    const float scale = bad ? nan : __fdiv_rn(a_max, 127.0f);
    const float inv = (bad || !(a_max > 0.f)) ? 0.f : __fdiv_rn(127.0f, a_max);
    const float a = acc.get(i);
    float qf = 0.f;
    if (!bad) qf = fminf(fmaxf(floorf(__fadd_rn(__fmul_rn(a, inv), uniform_hash(key, i))), -127.0f), 127.0f);
    q[i] = static_cast<int8_t>(qf);
    if (acc.res != nullptr) acc.res[i] = __fsub_rn(a, __fmul_rn(qf, scale));
    if (i == c * cs) scales[c] = scale;
  }
}

// ---------------------------------------------------------------- decompressors

__global__ void __launch_bounds__(kThreads)
    sign_decode_kernel(const uint8_t* __restrict__ bits, const float* __restrict__ scales, int64_t ranks,
                       int64_t numel, int64_t cs, float* __restrict__ out) {
  const int64_t nbytes = (numel + 7) / 8, chunks = (numel + cs - 1) / cs;
  const float w = static_cast<float>(ranks);
  for (int64_t i = global_thread(); i < numel; i += grid_threads()) {
    const int64_t c = i / cs;
    float total = 0.f;
    for (int64_t r = 0; r < ranks; ++r) {
      const float s = scales[r * chunks + c];
      const float v = ((bits[r * nbytes + i / 8] >> (i % 8)) & 1) ? s : -s;
      total = r == 0 ? v : __fadd_rn(total, v);
    }
    out[i] = ranks > 1 ? __fdiv_rn(total, w) : total;
  }
}

__global__ void __launch_bounds__(kThreads)
    int8_decode_kernel(const int8_t* __restrict__ q, const float* __restrict__ scales, int64_t ranks, int64_t n,
                       int64_t cs, float* __restrict__ out) {
  const int64_t chunks = (n + cs - 1) / cs;
  const float w = static_cast<float>(ranks);
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    const int64_t c = i / cs;
    float total = 0.f;
    for (int64_t r = 0; r < ranks; ++r) {
      const float v = __fmul_rn(static_cast<float>(q[r * n + i]), scales[r * chunks + c]);
      total = r == 0 ? v : __fadd_rn(total, v);
    }
    out[i] = ranks > 1 ? __fdiv_rn(total, w) : total;
  }
}

// ---------------------------------------------------------------- PowerSGD: Gram-Schmidt

// One block per matrix [n, r] (row-major): each thread keeps the same rows throughout, so
// the only cross-thread traffic is the fp64 block sums.
template <class T>
__global__ void __launch_bounds__(kThreads) orthogonalize_kernel(T* __restrict__ m, int64_t batch, int64_t n,
                                                                 int64_t r, double eps) {
  __shared__ double red[kThreads / kWarp];
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    T* mb = m + b * n * r;
    for (int64_t i = 0; i < r; ++i) {
      double s = 0.0;
      for (int64_t row = threadIdx.x; row < n; row += blockDim.x) {
        const double x = static_cast<double>(mb[row * r + i]);
        s += x * x;
      }
      const double d = sqrt(block_sum(s, red)) + eps;
      for (int64_t row = threadIdx.x; row < n; row += blockDim.x)
        mb[row * r + i] = static_cast<T>(static_cast<double>(mb[row * r + i]) / d);
      for (int64_t j = i + 1; j < r; ++j) {
        double dot = 0.0;
        for (int64_t row = threadIdx.x; row < n; row += blockDim.x)
          dot += static_cast<double>(mb[row * r + i]) * static_cast<double>(mb[row * r + j]);
        dot = block_sum(dot, red);
        for (int64_t row = threadIdx.x; row < n; row += blockDim.x)
          mb[row * r + j] =
              static_cast<T>(static_cast<double>(mb[row * r + j]) - dot * static_cast<double>(mb[row * r + i]));
      }
    }
  }
}

}  // namespace

// ---------------------------------------------------------------- C ABI

extern "C" cudaError_t accelops_bucket_copy(const accelops_bucket_piece* pieces, int64_t npieces, int64_t total,
                                            int has_divisor, float divisor, cudaStream_t stream) {
  if (npieces < 0 || total < 0) return cudaErrorInvalidValue;
  if (total == 0) return cudaSuccess;
  if (pieces == nullptr || npieces == 0) return cudaErrorInvalidValue;
  if (has_divisor && !(divisor > 0.f)) return cudaErrorInvalidValue;
  bucket_copy_kernel<<<grid_for(total, kCopyTile), kThreads, 0, stream>>>(pieces, npieces, total, has_divisor != 0,
                                                                           divisor);
  return cudaGetLastError();
}

extern "C" cudaError_t accelops_cast_div(const void* x, accelops_dtype x_dtype, int64_t n, float divisor, void* out,
                                         accelops_dtype out_dtype, cudaStream_t stream) {
  if (n < 0 || !valid_dtype(x_dtype) || !valid_dtype(out_dtype) || !(divisor > 0.f)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (x == nullptr || out == nullptr) return cudaErrorInvalidValue;
  cast_div_kernel<<<grid_for(n, kThreads * 4), kThreads, 0, stream>>>(x, x_dtype, n, divisor, out, out_dtype);
  return cudaGetLastError();
}

extern "C" cudaError_t accelops_topk_workspace_size(int64_t n, int64_t sample_size, size_t* bytes) {
  if (n < 1 || sample_size < 1 || bytes == nullptr) return cudaErrorInvalidValue;
  const size_t tiles = size_t((n + kSelTile - 1) / kSelTile);
  *bytes = align256(sizeof(SelectState)) + align256(sizeof(uint32_t) * kBins1) + 4 * align256(sizeof(int32_t) * tiles);
  return cudaSuccess;
}

extern "C" cudaError_t accelops_topk_compress(const void* grad, accelops_dtype grad_dtype, float* residual, int64_t n,
                                              int64_t k, int sampled, int64_t sample_size, int64_t seed, float* values,
                                              int32_t* indices, void* workspace, size_t workspace_bytes,
                                              cudaStream_t stream) {
  if (n < 1 || n >= (int64_t(1) << 31) || k < 1 || k > n || sample_size < 1 || seed < 0) return cudaErrorInvalidValue;
  if (!valid_dtype(grad_dtype) || grad == nullptr || values == nullptr || indices == nullptr || workspace == nullptr)
    return cudaErrorInvalidValue;
  size_t need = 0;
  accelops_topk_workspace_size(n, sample_size, &need);
  if (workspace_bytes < need) return cudaErrorInvalidValue;
  const int64_t tiles = (n + kSelTile - 1) / kSelTile;
  char* ws = static_cast<char*>(workspace);
  SelectState* st = reinterpret_cast<SelectState*>(ws);
  ws += align256(sizeof(SelectState));
  uint32_t* hist = reinterpret_cast<uint32_t*>(ws);
  ws += align256(sizeof(uint32_t) * kBins1);
  int32_t* tile_arrays[4];
  for (int a = 0; a < 4; ++a) {
    tile_arrays[a] = reinterpret_cast<int32_t*>(ws);
    ws += align256(sizeof(int32_t) * size_t(tiles));
  }
  cudaError_t err = cudaMemsetAsync(hist, 0, sizeof(uint32_t) * kBins1, stream);
  if (err != cudaSuccess) return err;
  const Acc acc{grad, int(grad_dtype), residual};
  const unsigned blocks = grid_for(n, int64_t(kThreads) * 4);
  if (residual != nullptr) accumulate_kernel<<<blocks, kThreads, 0, stream>>>(acc, n);
  const View all{0, 1, n};
  if (!sampled) {
    select_init_kernel<<<1, 1, 0, stream>>>(st, k);
  } else {
    // The spec's strided sample and its ks (exact integer ceil): known on the host.
    const int64_t stride = imax(1, n / sample_size), offset = seed % stride;
    const int64_t len = imin(sample_size, (n - offset + stride - 1) / stride);
    const int64_t ks = imax(1, (k * len + n - 1) / n);
    select_init_kernel<<<1, 1, 0, stream>>>(st, ks);
    if ((err = radix_select(acc, View{offset, stride, len}, st, hist, stream)) != cudaSuccess) return err;
    count_candidates_kernel<<<blocks, kThreads, 0, stream>>>(acc, n, st);
    sampled_decide_kernel<<<1, 1, 0, stream>>>(st, k);
  }
  if ((err = radix_select(acc, all, st, hist, stream)) != cudaSuccess) return err;  // no-op when inactive
  const unsigned tblocks = unsigned(imin(tiles, kMaxBlocks));
  tile_count_kernel<<<tblocks, kThreads, 0, stream>>>(acc, n, st, tile_arrays[0], tile_arrays[1]);
  tile_scan_kernel<<<1, 1024, 0, stream>>>(tile_arrays[0], tile_arrays[1], tiles, st, tile_arrays[2], tile_arrays[3]);
  tile_write_kernel<<<tblocks, kThreads, 0, stream>>>(acc, n, st, tile_arrays[2], tile_arrays[3], values, indices);
  topk_pad_kernel<<<grid_for(k, kThreads), kThreads, 0, stream>>>(st, k, values, indices);
  return cudaGetLastError();
}

extern "C" cudaError_t accelops_topk_decompress(const float* values, const int32_t* indices, int64_t ranks, int64_t k,
                                                int64_t numel, float* out, cudaStream_t stream) {
  if (ranks < 1 || k < 0 || numel < 1 || out == nullptr) return cudaErrorInvalidValue;
  if (k > 0 && (values == nullptr || indices == nullptr)) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(out, 0, sizeof(float) * size_t(numel), stream);
  if (err != cudaSuccess) return err;
  // One launch per rank, in rank order on the stream: the spec's rank-order sum.
  for (int64_t r = 0; r < ranks && k > 0; ++r)
    scatter_add_kernel<<<grid_for(k, kThreads), kThreads, 0, stream>>>(values + r * k, indices + r * k, k, out);
  if (ranks > 1)
    divide_kernel<<<grid_for(numel, kThreads * 4), kThreads, 0, stream>>>(out, numel, static_cast<float>(ranks));
  return cudaGetLastError();
}

extern "C" cudaError_t accelops_sign_compress(const void* grad, accelops_dtype grad_dtype, float* residual, int64_t n,
                                              int64_t chunk_size, uint8_t* bits, float* scales, double* chunk_sums,
                                              cudaStream_t stream) {
  if (n < 1 || chunk_size < 1 || !valid_dtype(grad_dtype)) return cudaErrorInvalidValue;
  if (grad == nullptr || bits == nullptr || scales == nullptr || chunk_sums == nullptr) return cudaErrorInvalidValue;
  const int64_t chunks = (n + chunk_size - 1) / chunk_size;
  cudaError_t err = cudaMemsetAsync(chunk_sums, 0, sizeof(double) * size_t(chunks), stream);
  if (err != cudaSuccess) return err;
  const Acc acc{grad, int(grad_dtype), residual};
  sign_stat_kernel<<<grid_for(n, kThreads * 4), kThreads, 0, stream>>>(acc, n, chunk_size, chunk_sums);
  sign_scale_kernel<<<grid_for(chunks, kThreads), kThreads, 0, stream>>>(chunk_sums, n, chunk_size, scales);
  sign_apply_kernel<<<grid_for((n + 7) / 8, kThreads), kThreads, 0, stream>>>(acc, n, chunk_size, scales, bits);
  return cudaGetLastError();
}

extern "C" cudaError_t accelops_sign_decompress(const uint8_t* bits, const float* scales, int64_t ranks, int64_t numel,
                                                int64_t chunk_size, float* out, cudaStream_t stream) {
  if (ranks < 1 || numel < 1 || chunk_size < 1) return cudaErrorInvalidValue;
  if (bits == nullptr || scales == nullptr || out == nullptr) return cudaErrorInvalidValue;
  sign_decode_kernel<<<grid_for(numel, kThreads * 4), kThreads, 0, stream>>>(bits, scales, ranks, numel, chunk_size,
                                                                               out);
  return cudaGetLastError();
}

extern "C" cudaError_t accelops_int8_compress(const void* grad, accelops_dtype grad_dtype, float* residual, int64_t n,
                                              int64_t chunk_size, int64_t seed, int8_t* q, float* scales,
                                              uint32_t* chunk_amax, cudaStream_t stream) {
  if (n < 1 || chunk_size < 1 || seed < 0 || !valid_dtype(grad_dtype)) return cudaErrorInvalidValue;
  if (grad == nullptr || q == nullptr || scales == nullptr || chunk_amax == nullptr) return cudaErrorInvalidValue;
  const int64_t chunks = (n + chunk_size - 1) / chunk_size;
  cudaError_t err = cudaMemsetAsync(chunk_amax, 0, sizeof(uint32_t) * size_t(chunks), stream);
  if (err != cudaSuccess) return err;
  const Acc acc{grad, int(grad_dtype), residual};
  const uint32_t key = uint32_t((uint64_t(seed) * 0x9E3779B9ull + 0x7F4A7C15ull) & 0xFFFFFFFFull);
  int8_stat_kernel<<<grid_for(n, kThreads * 4), kThreads, 0, stream>>>(acc, n, chunk_size, chunk_amax);
  int8_apply_kernel<<<grid_for(n, kThreads * 4), kThreads, 0, stream>>>(acc, n, chunk_size, key, chunk_amax, q,
                                                                          scales);
  return cudaGetLastError();
}

extern "C" cudaError_t accelops_int8_decompress(const int8_t* q, const float* scales, int64_t ranks, int64_t n,
                                                int64_t chunk_size, float* out, cudaStream_t stream) {
  if (ranks < 1 || n < 1 || chunk_size < 1) return cudaErrorInvalidValue;
  if (q == nullptr || scales == nullptr || out == nullptr) return cudaErrorInvalidValue;
  int8_decode_kernel<<<grid_for(n, kThreads * 4), kThreads, 0, stream>>>(q, scales, ranks, n, chunk_size, out);
  return cudaGetLastError();
}

extern "C" cudaError_t accelops_orthogonalize(void* m, accelops_dtype dtype, int64_t batch, int64_t n, int64_t r,
                                              double eps, cudaStream_t stream) {
  if (batch < 0 || n < 0 || r < 0 || !(eps >= 0.0)) return cudaErrorInvalidValue;
  if (batch == 0 || n == 0 || r == 0) return cudaSuccess;
  if (m == nullptr) return cudaErrorInvalidValue;
  const unsigned blocks = unsigned(imin(batch, kMaxBlocks));
  if (dtype == ACCELOPS_FLOAT32)
    orthogonalize_kernel<float><<<blocks, kThreads, 0, stream>>>(static_cast<float*>(m), batch, n, r, eps);
  else if (dtype == ACCELOPS_FLOAT64)
    orthogonalize_kernel<double><<<blocks, kThreads, 0, stream>>>(static_cast<double*>(m), batch, n, r, eps);
  else
    return cudaErrorInvalidValue;
  return cudaGetLastError();
}
