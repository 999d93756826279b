// One-pass loss and gradient over full-vocabulary rows, with Hopper thread-block clusters.
//
// Same semantics as _fused_loss_grad_kernel in _triton_kernels.py (TP = 1, KL family or
// cross-entropy), but every logit is read from global memory once: a cluster of C CTAs owns one row
// at a time and keeps it in shared memory between the statistics and the gradient.
//
// Per row, per CTA (rank j of the cluster):
//   1. its slice of the student (and teacher) row is copied into shared memory with cp.async, in
//      16-byte chunks; with two buffers the next row streams in while this one is computed;
//   2. every worker thread (warps 1..15) reduces its chunks to partial statistics with an online
//      softmax (maxima, sums of exp, the cross terms of full_vocab.py), the block reduces them and
//      thread 0 (warp 0 coordinates) publishes the CTA's partial in a shared-memory slot;
//   3. cluster barrier; every warp reads the C slots through distributed shared memory and combines
//      them (same order in every warp and CTA, so every CTA uses bit-identical row statistics);
//   4. every thread writes the gradient of its chunks straight from shared memory.
// Partial slots alternate between two copies, so one cluster barrier per row suffices: a slot is
// rewritten two rows later, after the next barrier, which every CTA passes only once it has read it.
//
// Rows are re-aligned to 16 bytes: chunk 0 starts at the row start rounded down to 16 bytes, `lead`
// elements before column 0 (the tail of the previous row, read and ignored; row 0 always has lead
// 0 since the base pointer is 16-byte aligned). The last chunk reads only the bytes of valid columns
// (cp.async src-size, the rest zero-filled), so nothing past the tensor is read. Gradient chunks
// that straddle the row edges are stored element by element, so the neighbouring rows are never
// written. Offsets are 64-bit: [32768, 151936] has more than 2**31 elements.
//
// The arithmetic helpers are __host__ __device__ and shared with `emulate`, a sequential CPU run of
// the same algorithm (same slicing, chunking, masking and combining) used by the CPU tests.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

namespace cg = cooperative_groups;

namespace sdzero_kl {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// Warp 0 coordinates (reductions, publishing the CTA's partial, the row value) and never copies or
// stores logits, so the release fence it issues before the cluster barrier has no cp.async or
// gradient store in flight to wait for; warps 1.. do the per-chunk work.
constexpr int kWorkers = kThreads - 32;
constexpr int kVec = 8;           // elements per 16-byte chunk (16-bit logits)
constexpr float kNegBig = -1.0e38f;  // finite stand-in for -inf as a running maximum (NEG_BIG)
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxCluster = 16;

static_assert(kThreads % 32 == 0 && kWarps <= 32, "one warp must be able to reduce the warp partials");

__host__ __device__ inline float neg_inf() { return -__builtin_huge_valf(); }
__host__ __device__ inline float pos_inf() { return __builtin_huge_valf(); }

// exp(x) as Triton's tl.exp computes it on the GPU: ex2.approx of x * log2(e).
__host__ __device__ inline float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x * kLog2e));
  return y;
#else
  return std::exp(x);
#endif
}

template <typename T>
__host__ __device__ inline float to_float(T v);
template <>
__host__ __device__ inline float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__host__ __device__ inline float to_float<__half>(__half v) {
  return __half2float(v);
}

template <typename T>
__host__ __device__ inline T from_float(float v);
template <>
__host__ __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__host__ __device__ inline __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// ---------------------------------------------------------------- row geometry

struct RowLayout {
  int lead;         // elements between the 16-byte aligned chunk origin and column 0 (0..7)
  int first_chunk;  // this rank's first chunk of the row
  int my_chunks;    // how many chunks this rank holds (0 when the row is shorter than the cluster)
};

__host__ __device__ inline int chunks_per_cta(int cols, int cluster) {
  const int max_chunks = (cols + 2 * kVec - 2) / kVec;  // ceil((7 + cols) / 8): any lead fits
  return (max_chunks + cluster - 1) / cluster;
}

__host__ __device__ inline RowLayout row_layout(int64_t row, int64_t row_stride, int cols, int rank,
                                                int cpc) {
  RowLayout layout;
  layout.lead = static_cast<int>((row * row_stride) & (kVec - 1));
  const int n_chunks = (layout.lead + cols + kVec - 1) / kVec;
  layout.first_chunk = rank * cpc;
  layout.my_chunks = std::min(std::max(n_chunks - layout.first_chunk, 0), cpc);
  return layout;
}

// Bytes of chunk `col0..col0+7` worth reading: up to the last valid column (0 when none is valid).
__host__ __device__ inline int chunk_read_bytes(int col0, int n_valid) {
  const int bytes = 2 * (n_valid - col0);
  return std::min(std::max(bytes, 0), 2 * kVec);
}

// ---------------------------------------------------------------- statistics

// Statistics of a set of columns, relative to its own maxima (see full_vocab.py):
// sum_s = sum exp(s - max_s), cross_rev = sum exp(s - max_s) ((s - max_s) - (t - max_t)), etc.
// `label` carries the cross-entropy target's logit (max-combined, -inf where absent).
struct alignas(16) Partial {
  float max_s, sum_s, max_t, sum_t, cross_rev, cross_fwd, label, unused;
};

__host__ __device__ inline Partial empty_partial() {
  Partial p;
  p.max_s = kNegBig;
  p.sum_s = 0.f;
  p.max_t = kNegBig;
  p.sum_t = 0.f;
  p.cross_rev = 0.f;
  p.cross_fwd = 0.f;
  p.label = neg_inf();
  p.unused = 0.f;
  return p;
}

// Statistics of the union of two disjoint column sets: rescale both to the larger maxima.
__host__ __device__ inline Partial combine(const Partial& a, const Partial& b) {
  Partial r;
  r.max_s = fmaxf(a.max_s, b.max_s);
  r.max_t = fmaxf(a.max_t, b.max_t);
  const float gap_sa = a.max_s - r.max_s, gap_sb = b.max_s - r.max_s;
  const float gap_ta = a.max_t - r.max_t, gap_tb = b.max_t - r.max_t;
  const float scale_sa = fast_exp(gap_sa), scale_sb = fast_exp(gap_sb);
  const float scale_ta = fast_exp(gap_ta), scale_tb = fast_exp(gap_tb);
  const float shift_a = gap_sa - gap_ta, shift_b = gap_sb - gap_tb;
  r.sum_s = scale_sa * a.sum_s + scale_sb * b.sum_s;
  r.sum_t = scale_ta * a.sum_t + scale_tb * b.sum_t;
  r.cross_rev = scale_sa * (a.cross_rev + a.sum_s * shift_a) + scale_sb * (b.cross_rev + b.sum_s * shift_b);
  r.cross_fwd = scale_ta * (a.cross_fwd - a.sum_t * shift_a) + scale_tb * (b.cross_fwd - b.sum_t * shift_b);
  r.label = fmaxf(a.label, b.label);
  r.unused = 0.f;
  return r;
}

// One chunk of the online softmax (the scalar form of _online_update in _triton_kernels.py).
template <bool HAS_T>
__host__ __device__ inline void accumulate_chunk(Partial& p, const float (&s)[kVec], const float (&t)[kVec]) {
  float chunk_max_s = s[0], chunk_max_t = t[0];
#pragma unroll
  for (int i = 1; i < kVec; ++i) {
    chunk_max_s = fmaxf(chunk_max_s, s[i]);
    if (HAS_T) chunk_max_t = fmaxf(chunk_max_t, t[i]);
  }
  const float max_s = fmaxf(p.max_s, chunk_max_s);
  const float max_t = HAS_T ? fmaxf(p.max_t, chunk_max_t) : p.max_t;
  if (max_s > p.max_s || max_t > p.max_t) {
    const float gap_s = p.max_s - max_s, gap_t = p.max_t - max_t;
    const float scale_s = fast_exp(gap_s), scale_t = fast_exp(gap_t);
    const float shift = gap_s - gap_t;  // cross terms are relative to both maxima
    p.cross_rev = scale_s * (p.cross_rev + p.sum_s * shift);
    p.cross_fwd = scale_t * (p.cross_fwd - p.sum_t * shift);
    p.sum_s *= scale_s;
    p.sum_t *= scale_t;
    p.max_s = max_s;
    p.max_t = max_t;
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const float ds = s[i] - p.max_s;
    const float es = fast_exp(ds);
    p.sum_s += es;
    if (HAS_T) {
      const float dt = t[i] - p.max_t;
      const float et = fast_exp(dt);
      p.sum_t += et;
      p.cross_rev += es > 0.f ? es * (ds - dt) : 0.f;
      p.cross_fwd += et > 0.f ? et * (dt - ds) : 0.f;
    }
  }
}

// ---------------------------------------------------------------- chunks in shared memory

// 8 logits of a 16-byte aligned chunk, as float32 times 1/T.
template <typename T>
__host__ __device__ inline void load_chunk(const T* src, float inv_temp, float (&out)[kVec]) {
  static_assert(sizeof(T) == 2, "16-bit logits");
  T v[kVec];
#if defined(__CUDA_ARCH__)
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  memcpy(v, &raw, sizeof(raw));
#else
  memcpy(v, src, sizeof(v));
#endif
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = to_float(v[i]) * inv_temp;
}

// Columns outside [0, n_valid) (previous row, vocabulary padding, past the row) become -inf.
__host__ __device__ inline void mask_columns(float (&x)[kVec], int col0, int n_valid) {
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int col = col0 + i;
    if (col < 0 || col >= n_valid) x[i] = neg_inf();
  }
}

__host__ __device__ inline bool chunk_inside(int col0, int n) { return col0 >= 0 && col0 + kVec <= n; }

// Gradient chunk `chunk` of a row whose aligned origin is `origin`: one 16-byte store when the chunk
// lies inside the row, else only the columns in [0, cols).
template <typename T>
__host__ __device__ inline void store_chunk(T* origin, int64_t chunk, const float (&g)[kVec], int col0, int cols) {
  T* dst = origin + chunk * kVec;
  if (chunk_inside(col0, cols)) {
    T v[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = from_float<T>(g[i]);
#if defined(__CUDA_ARCH__)
    uint4 raw;
    memcpy(&raw, v, sizeof(raw));
    *reinterpret_cast<uint4*>(dst) = raw;
#else
    memcpy(dst, v, sizeof(v));
#endif
    return;
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int col = col0 + i;
    if (col >= 0 && col < cols) dst[i] = from_float<T>(g[i]);
  }
}

// ---------------------------------------------------------------- per-thread passes

struct LossWeights {
  float w_rev, w_fwd;  // (1 - forward_weight), forward_weight
  bool has_rev, has_fwd;
};

struct RowStats {
  float max_s, log_sum_s, max_t, log_sum_t, reverse, forward, label;
};

__host__ __device__ inline RowStats finish_row(const Partial& p) {
  RowStats r;
  r.max_s = p.max_s;
  r.log_sum_s = logf(p.sum_s);
  r.max_t = p.max_t;
  r.log_sum_t = logf(p.sum_t);
  const float gap = r.log_sum_s - r.log_sum_t;
  r.reverse = p.cross_rev / p.sum_s - gap;
  r.forward = p.cross_fwd / p.sum_t + gap;
  r.label = p.label;
  return r;
}

template <bool IS_CE>
__host__ __device__ inline float row_value(const RowStats& r, int64_t target, const LossWeights& w) {
  if (IS_CE) return target >= 0 ? r.log_sum_s - (r.label - r.max_s) : pos_inf();
  if (w.has_rev && w.has_fwd) return w.w_rev * r.reverse + w.w_fwd * r.forward;
  return w.has_fwd ? r.forward : r.reverse;
}

// Statistics of this thread's chunks: c = tid, tid + nthreads, ... of the rank's slice.
template <typename T, bool HAS_T, bool IS_CE>
__host__ __device__ inline Partial thread_stats(const T* s_buf, const T* t_buf, const RowLayout& layout,
                                                int n_valid, float inv_temp, int64_t target, int tid,
                                                int nthreads) {
  Partial p = empty_partial();
  for (int c = tid; c < layout.my_chunks; c += nthreads) {
    const int col0 = (layout.first_chunk + c) * kVec - layout.lead;
    float s[kVec], t[kVec];
    load_chunk(s_buf + static_cast<int64_t>(c) * kVec, inv_temp, s);
    if (HAS_T) load_chunk(t_buf + static_cast<int64_t>(c) * kVec, inv_temp, t);
    if (!chunk_inside(col0, n_valid)) {
      mask_columns(s, col0, n_valid);
      if (HAS_T) mask_columns(t, col0, n_valid);
    }
    if (IS_CE) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        if (col0 + i == target) p.label = s[i];
      }
    }
    accumulate_chunk<HAS_T>(p, s, HAS_T ? t : s);
  }
  return p;
}

// coef * d value / d (s / T) for 8 columns (the 1/T factor is part of coef).
template <bool IS_CE>
__host__ __device__ inline void chunk_grad(const float (&s)[kVec], const float (&t)[kVec], int col0,
                                           const RowStats& r, const LossWeights& w, int64_t target, float coef,
                                           float (&g)[kVec]) {
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const float lp = (s[i] - r.max_s) - r.log_sum_s;
    const float p = fast_exp(lp);
    float grad;
    if (IS_CE) {
      grad = p - (col0 + i == target ? 1.f : 0.f);
    } else {
      const float lq = (t[i] - r.max_t) - r.log_sum_t;
      grad = 0.f;
      if (w.has_rev) grad += w.w_rev * (p > 0.f ? p * ((lp - lq) - r.reverse) : 0.f);
      if (w.has_fwd) grad += w.w_fwd * (p - fast_exp(lq));
    }
    g[i] = grad * coef;
  }
}

template <typename T, bool HAS_T, bool IS_CE>
__host__ __device__ inline void thread_grad(const T* s_buf, const T* t_buf, T* grad_origin, const RowLayout& layout,
                                            int cols, int n_valid, float inv_temp, const RowStats& r,
                                            const LossWeights& w, int64_t target, float coef, int tid,
                                            int nthreads) {
  for (int c = tid; c < layout.my_chunks; c += nthreads) {
    const int64_t chunk = layout.first_chunk + c;
    const int col0 = static_cast<int>(chunk) * kVec - layout.lead;
    float s[kVec], t[kVec], g[kVec];
    load_chunk(s_buf + static_cast<int64_t>(c) * kVec, inv_temp, s);
    if (HAS_T) load_chunk(t_buf + static_cast<int64_t>(c) * kVec, inv_temp, t);
    const bool inside = chunk_inside(col0, n_valid);
    if (!inside) {
      mask_columns(s, col0, n_valid);
      if (HAS_T) mask_columns(t, col0, n_valid);
    }
    chunk_grad<IS_CE>(s, HAS_T ? t : s, col0, r, w, target, coef, g);
    if (!inside) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        if (col0 + i < 0 || col0 + i >= n_valid) g[i] = 0.f;
      }
    }
    store_chunk(grad_origin, chunk, g, col0, cols);
  }
}

template <typename T>
__host__ __device__ inline void thread_zero_grad(T* grad_origin, const RowLayout& layout, int cols, int tid,
                                                 int nthreads) {
  const float zeros[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int c = tid; c < layout.my_chunks; c += nthreads) {
    const int64_t chunk = layout.first_chunk + c;
    store_chunk(grad_origin, chunk, zeros, static_cast<int>(chunk) * kVec - layout.lead, cols);
  }
}

// ---------------------------------------------------------------- device-only pieces

template <typename T>
struct KernelArgs {
  const T* student;
  const T* teacher;  // the student again for cross-entropy (never read)
  T* grad;           // may alias student (gradient written in place)
  float* values;
  const float* coef;
  const int64_t* target;  // cross-entropy only
  int64_t n_rows;
  int64_t row_stride;
  int cols;
  int n_valid;
  int chunks_per_cta;
  float inv_temp;
  LossWeights weights;
};

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const size_t src = __cvta_generic_to_global(gmem_src);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ Partial shfl_xor(const Partial& p, int mask) {
  Partial r;
  r.max_s = __shfl_xor_sync(0xffffffffu, p.max_s, mask);
  r.sum_s = __shfl_xor_sync(0xffffffffu, p.sum_s, mask);
  r.max_t = __shfl_xor_sync(0xffffffffu, p.max_t, mask);
  r.sum_t = __shfl_xor_sync(0xffffffffu, p.sum_t, mask);
  r.cross_rev = __shfl_xor_sync(0xffffffffu, p.cross_rev, mask);
  r.cross_fwd = __shfl_xor_sync(0xffffffffu, p.cross_fwd, mask);
  r.label = __shfl_xor_sync(0xffffffffu, p.label, mask);
  r.unused = 0.f;
  return r;
}

__device__ __forceinline__ Partial shfl_lane0(const Partial& p) {
  Partial r;
  r.max_s = __shfl_sync(0xffffffffu, p.max_s, 0);
  r.sum_s = __shfl_sync(0xffffffffu, p.sum_s, 0);
  r.max_t = __shfl_sync(0xffffffffu, p.max_t, 0);
  r.sum_t = __shfl_sync(0xffffffffu, p.sum_t, 0);
  r.cross_rev = __shfl_sync(0xffffffffu, p.cross_rev, 0);
  r.cross_fwd = __shfl_sync(0xffffffffu, p.cross_fwd, 0);
  r.label = __shfl_sync(0xffffffffu, p.label, 0);
  r.unused = 0.f;
  return r;
}

__device__ __forceinline__ Partial warp_reduce(Partial p) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) p = combine(p, shfl_xor(p, mask));
  return p;
}

// The CTA's statistics, valid in thread 0. Every thread must call it.
__device__ __forceinline__ Partial block_reduce(const Partial& mine, Partial* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Partial in_warp = warp_reduce(mine);
  if (lane == 0) scratch[warp] = in_warp;
  __syncthreads();
  Partial total = empty_partial();
  if (warp == 0) total = warp_reduce(lane < kWarps ? scratch[lane] : empty_partial());
  return total;
}

// Thread 0 publishes the CTA's partial, then the cluster barrier. Only thread 0 wrote what the peers
// will read, so only it fences (a release fence compiles to MEMBAR.ALL.GPU, which would otherwise
// stall every warp on its in-flight copies and stores); the arrive is relaxed, the wait acquires.
__device__ __forceinline__ void publish_and_sync(Partial* slot, const Partial& block) {
  if (threadIdx.x == 0) {
    *slot = block;
    asm volatile("fence.acq_rel.cluster;\n" ::: "memory");
  }
  asm volatile("barrier.cluster.arrive.relaxed;\n" ::: "memory");
  asm volatile("barrier.cluster.wait;\n" ::: "memory");
}

// The row's statistics from every rank's slot, read through distributed shared memory; every warp
// computes them in the same order and broadcasts lane 0's result.
__device__ __forceinline__ Partial cluster_reduce(Partial* slot, int n_ranks) {
  const int lane = threadIdx.x % 32;
  Partial p = empty_partial();
  if (lane < n_ranks) p = *cg::this_cluster().map_shared_rank(slot, lane);
  return shfl_lane0(warp_reduce(p));
}

template <typename T, bool HAS_T>
__device__ __forceinline__ void issue_row_loads(const KernelArgs<T>& a, int64_t row, int rank, T* s_dst,
                                                T* t_dst) {
  const RowLayout layout = row_layout(row, a.row_stride, a.cols, rank, a.chunks_per_cta);
  const int64_t origin = row * a.row_stride - layout.lead;
  const int worker = static_cast<int>(threadIdx.x) - 32;
  if (worker < 0) return;
  for (int c = worker; c < layout.my_chunks; c += kWorkers) {
    const int64_t chunk = layout.first_chunk + c;
    const int bytes = chunk_read_bytes(static_cast<int>(chunk) * kVec - layout.lead, a.n_valid);
    if (bytes == 0) continue;  // only padding columns: masked by column index, never by content
    const int64_t offset = origin + chunk * kVec;
    cp_async_16(s_dst + static_cast<int64_t>(c) * kVec, a.student + offset, bytes);
    if (HAS_T) cp_async_16(t_dst + static_cast<int64_t>(c) * kVec, a.teacher + offset, bytes);
  }
}

template <typename T, bool IS_CE, int NBUF>
__device__ __forceinline__ void process_active_row(const KernelArgs<T>& a, int64_t row, int rank, int n_ranks,
                                                   const T* s_buf, const T* t_buf, Partial* slot,
                                                   Partial* scratch, float coef, int64_t target) {
  constexpr bool HAS_T = !IS_CE;
  cp_async_wait<NBUF - 1>();  // this row's copies (all but the NBUF - 1 most recent groups)
  __syncthreads();
  const RowLayout layout = row_layout(row, a.row_stride, a.cols, rank, a.chunks_per_cta);
  const int worker = static_cast<int>(threadIdx.x) - 32;  // warp 0: no chunks, an empty partial
  const Partial mine = worker < 0 ? empty_partial()
                                  : thread_stats<T, HAS_T, IS_CE>(s_buf, t_buf, layout, a.n_valid, a.inv_temp,
                                                                  target, worker, kWorkers);
  publish_and_sync(slot, block_reduce(mine, scratch));
  const RowStats stats = finish_row(cluster_reduce(slot, n_ranks));
  if (worker < 0) {
    if (rank == 0 && threadIdx.x == 0) a.values[row] = row_value<IS_CE>(stats, target, a.weights);
    return;
  }
  T* grad_origin = a.grad + (row * a.row_stride - layout.lead);
  thread_grad<T, HAS_T, IS_CE>(s_buf, t_buf, grad_origin, layout, a.cols, a.n_valid, a.inv_temp, stats, a.weights,
                               target, coef, worker, kWorkers);
}

template <typename T>
__device__ __forceinline__ void process_inactive_row(const KernelArgs<T>& a, int64_t row, int rank) {
  const RowLayout layout = row_layout(row, a.row_stride, a.cols, rank, a.chunks_per_cta);
  const int worker = static_cast<int>(threadIdx.x) - 32;
  if (worker >= 0) thread_zero_grad(a.grad + (row * a.row_stride - layout.lead), layout, a.cols, worker, kWorkers);
  if (rank == 0 && threadIdx.x == 0) a.values[row] = 0.f;
}

// Persistent: cluster k handles rows k, k + n_clusters, ...; every CTA of a cluster walks the same
// rows and reads the same coefficients, so all of them meet every cluster barrier.
// Shared memory: NBUF x (student slice, teacher slice), then 2 partial slots, then kWarps scratch.
template <typename T, bool IS_CE, int NBUF>
__global__ void __launch_bounds__(kThreads, 1) kl_cluster_kernel(const KernelArgs<T> a) {
  constexpr int kTensors = IS_CE ? 1 : 2;
  extern __shared__ __align__(16) unsigned char smem[];
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int n_ranks = static_cast<int>(cluster.num_blocks());
  const int64_t cluster_id = blockIdx.x / n_ranks;
  const int64_t n_clusters = gridDim.x / n_ranks;
  const int64_t slice = static_cast<int64_t>(a.chunks_per_cta) * kVec;
  T* data = reinterpret_cast<T*>(smem);
  Partial* slots = reinterpret_cast<Partial*>(smem + NBUF * kTensors * slice * sizeof(T));
  Partial* scratch = slots + 2;

  // Coefficients (and targets) of the NBUF rows in the buffers, oldest first, plus the coefficient
  // of the row after them, loaded one iteration before it is needed so its latency is hidden.
  float coef_q[NBUF];
  int64_t target_q[NBUF];
#pragma unroll
  for (int b = 0; b < NBUF; ++b) {
    const int64_t row = cluster_id + b * n_clusters;
    coef_q[b] = row < a.n_rows ? a.coef[row] : 0.f;
    target_q[b] = (IS_CE && coef_q[b] != 0.f) ? a.target[row] : -1;
    if (coef_q[b] != 0.f) {
      T* s_dst = data + (b * kTensors) * slice;
      issue_row_loads<T, !IS_CE>(a, row, rank, s_dst, s_dst + (kTensors - 1) * slice);
    }
    cp_async_commit();  // one group per row, empty or not: group k always belongs to row k
  }
  const int64_t ahead = cluster_id + NBUF * n_clusters;
  float coef_ahead = ahead < a.n_rows ? a.coef[ahead] : 0.f;

  unsigned phase = 0;  // active rows so far: picks the partial slot
  for (int64_t k = 0;; ++k) {
    const int64_t row = cluster_id + k * n_clusters;
    if (row >= a.n_rows) break;
    T* s_buf = data + ((k % NBUF) * kTensors) * slice;
    T* t_buf = s_buf + (kTensors - 1) * slice;
    if (coef_q[0] != 0.f) {
      process_active_row<T, IS_CE, NBUF>(a, row, rank, n_ranks, s_buf, t_buf, slots + (phase & 1u), scratch,
                                         coef_q[0], target_q[0]);
      ++phase;
    } else {
      process_inactive_row(a, row, rank);
    }
    __syncthreads();  // every thread is done with this buffer before it is refilled
    const int64_t next = row + NBUF * n_clusters;
    const float coef_next = coef_ahead;  // 0 when next >= n_rows
    const int64_t target_next = (IS_CE && coef_next != 0.f) ? a.target[next] : -1;
    if (coef_next != 0.f) issue_row_loads<T, !IS_CE>(a, next, rank, s_buf, t_buf);
    cp_async_commit();
#pragma unroll
    for (int b = 0; b + 1 < NBUF; ++b) {
      coef_q[b] = coef_q[b + 1];
      target_q[b] = target_q[b + 1];
    }
    coef_q[NBUF - 1] = coef_next;
    target_q[NBUF - 1] = target_next;
    const int64_t after = next + n_clusters;
    coef_ahead = after < a.n_rows ? a.coef[after] : 0.f;
  }
  cp_async_wait<0>();
  cluster.sync();  // peers may still be reading this CTA's slots: keep its shared memory alive
}

// ---------------------------------------------------------------- host side

size_t shared_bytes(int cols, int n_tensors, int cluster, int nbuf) {
  const size_t slice_bytes = static_cast<size_t>(chunks_per_cta(cols, cluster)) * kVec * 2;
  return nbuf * n_tensors * slice_bytes + (2 + kWarps) * sizeof(Partial);
}

LossWeights make_weights(double forward_weight, bool is_ce) {
  LossWeights w;
  w.w_fwd = static_cast<float>(forward_weight);
  w.w_rev = 1.0f - w.w_fwd;
  w.has_rev = !is_ce && forward_weight < 1.0;
  w.has_fwd = !is_ce && forward_weight > 0.0;
  return w;
}

// cudaOccupancyMaxActiveClusters, cached per device, kernel, cluster size and shared memory.
int max_active_clusters(const void* kernel, const cudaLaunchConfig_t& config, int device, int cluster,
                        size_t smem) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int, size_t>, int> cache;
  const auto key = std::make_tuple(device, kernel, cluster, smem);
  std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  int n_clusters = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&n_clusters, kernel, &config));
  cache[key] = n_clusters;
  return n_clusters;
}

template <typename T, bool IS_CE, int NBUF>
void launch_typed(const KernelArgs<T>& args, int cluster, size_t smem, int device, cudaStream_t stream) {
  auto kernel = kl_cluster_kernel<T, IS_CE, NBUF>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  if (cluster > 8) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(cluster);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(cluster));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  const int fit = max_active_clusters(reinterpret_cast<const void*>(kernel), config, device, cluster, smem);
  TORCH_CHECK(fit > 0, "kl_cluster: no cluster of ", cluster, " CTAs with ", smem,
              " bytes of shared memory each can be scheduled on this device");
  const int64_t n_clusters = std::min<int64_t>(fit, args.n_rows);
  config.gridDim = dim3(static_cast<unsigned>(n_clusters * cluster));
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args));
}

void check_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& grad,
                  const at::Tensor& values, const at::Tensor& coef, const at::Tensor& target, bool is_ce) {
  const auto dtype = student.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "kl_cluster: logits must be bf16 or fp16");
  TORCH_CHECK(student.dim() == 2, "kl_cluster: logits must be [rows, cols]");
  TORCH_CHECK(is_ce || (teacher.sizes() == student.sizes() && teacher.scalar_type() == dtype),
              "kl_cluster: the teacher must match the student's shape and dtype");
  TORCH_CHECK(grad.sizes() == student.sizes() && grad.scalar_type() == dtype,
              "kl_cluster: the gradient must match the student's shape and dtype");
  for (const at::Tensor* t : {&student, &teacher, &grad}) {
    TORCH_CHECK(t->is_contiguous(), "kl_cluster: logits and gradient must be contiguous");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "kl_cluster: tensors must be 16-byte aligned");
    TORCH_CHECK(t->device() == student.device(), "kl_cluster: tensors must be on one device");
  }
  const int64_t rows = student.size(0);
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.numel() == rows && values.is_contiguous(),
              "kl_cluster: values must be float32 [rows]");
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.numel() == rows && coef.is_contiguous(),
              "kl_cluster: coef must be float32 [rows]");
  TORCH_CHECK(!is_ce || (target.scalar_type() == at::kLong && target.numel() == rows && target.is_contiguous()),
              "kl_cluster: targets must be int64 [rows]");
  TORCH_CHECK(student.size(1) >= 1 && student.size(1) < (int64_t{1} << 30), "kl_cluster: unsupported width");
}

template <typename T>
KernelArgs<T> make_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& grad,
                        const at::Tensor& values, const at::Tensor& coef, const at::Tensor& target, int64_t n_valid,
                        double inv_temp, double forward_weight, bool is_ce, int cluster) {
  KernelArgs<T> a;
  a.student = reinterpret_cast<const T*>(student.data_ptr());
  a.teacher = reinterpret_cast<const T*>((is_ce ? student : teacher).data_ptr());
  a.grad = reinterpret_cast<T*>(grad.data_ptr());
  a.values = values.data_ptr<float>();
  a.coef = coef.data_ptr<float>();
  a.target = is_ce ? target.data_ptr<int64_t>() : nullptr;
  a.n_rows = student.size(0);
  a.row_stride = student.stride(0);
  a.cols = static_cast<int>(student.size(1));
  a.n_valid = static_cast<int>(std::min<int64_t>(std::max<int64_t>(n_valid, 0), student.size(1)));
  a.chunks_per_cta = chunks_per_cta(a.cols, cluster);
  a.inv_temp = static_cast<float>(inv_temp);
  a.weights = make_weights(forward_weight, is_ce);
  return a;
}

template <typename T, bool IS_CE>
void launch_kind(const KernelArgs<T>& args, int cluster, int nbuf, size_t smem, int device, cudaStream_t stream) {
  if (nbuf == 2) {
    launch_typed<T, IS_CE, 2>(args, cluster, smem, device, stream);
  } else {
    launch_typed<T, IS_CE, 1>(args, cluster, smem, device, stream);
  }
}

template <typename T>
void launch_dtype(const KernelArgs<T>& args, bool is_ce, int cluster, int nbuf, size_t smem, int device,
                  cudaStream_t stream) {
  if (is_ce) {
    launch_kind<T, true>(args, cluster, nbuf, smem, device, stream);
  } else {
    launch_kind<T, false>(args, cluster, nbuf, smem, device, stream);
  }
}

// values[rows] and grad[rows, cols] (grad may be the student itself) on the current CUDA stream.
void loss_and_grad(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& grad,
                   const at::Tensor& values, const at::Tensor& coef, const at::Tensor& target, int64_t n_valid,
                   double inv_temp, double forward_weight, bool is_ce, int64_t cluster, int64_t nbuf) {
  TORCH_CHECK(student.is_cuda(), "kl_cluster: CUDA tensors only");
  check_inputs(student, teacher, grad, values, coef, target, is_ce);
  TORCH_CHECK(cluster >= 1 && cluster <= kMaxCluster, "kl_cluster: cluster size must be 1..16");
  TORCH_CHECK(nbuf == 1 || nbuf == 2, "kl_cluster: 1 or 2 buffers");
  if (student.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(student.device());
  const int device = student.get_device();
  const int cols = static_cast<int>(student.size(1));
  const size_t smem = shared_bytes(cols, is_ce ? 1 : 2, static_cast<int>(cluster), static_cast<int>(nbuf));
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(smem <= static_cast<size_t>(optin), "kl_cluster: ", cols, " columns need ", smem,
              " bytes of shared memory per CTA, the device allows ", optin);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int c = static_cast<int>(cluster), b = static_cast<int>(nbuf);
  if (student.scalar_type() == at::kBFloat16) {
    const auto args = make_args<__nv_bfloat16>(student, teacher, grad, values, coef, target, n_valid, inv_temp,
                                               forward_weight, is_ce, c);
    launch_dtype(args, is_ce, c, b, smem, device, stream);
  } else {
    const auto args =
        make_args<__half>(student, teacher, grad, values, coef, target, n_valid, inv_temp, forward_weight, is_ce, c);
    launch_dtype(args, is_ce, c, b, smem, device, stream);
  }
}

// ---------------------------------------------------------------- CPU emulation (tests)

// The kernel's algorithm run sequentially on CPU tensors: `cluster` ranks, each a CTA of `threads`
// threads; chunk slicing, masking, per-thread online statistics, combining and gradient stores are
// the device code's own functions. Unread chunk bytes are filled with NaN, as stale shared memory
// could hold anything. Reduction order differs from the GPU (sequential here).
template <typename T, bool IS_CE>
void emulate_typed(const KernelArgs<T>& a, int cluster, int threads) {
  constexpr bool HAS_T = !IS_CE;
  const int64_t slice = static_cast<int64_t>(a.chunks_per_cta) * kVec;
  std::vector<T> s_buf(cluster * slice), t_buf(cluster * slice);
  for (int64_t row = 0; row < a.n_rows; ++row) {
    const float coef = a.coef[row];
    const int64_t target = IS_CE ? a.target[row] : -1;
    if (coef == 0.f) {
      for (int rank = 0; rank < cluster; ++rank) {
        const RowLayout layout = row_layout(row, a.row_stride, a.cols, rank, a.chunks_per_cta);
        for (int tid = 0; tid < threads; ++tid) {
          thread_zero_grad(a.grad + (row * a.row_stride - layout.lead), layout, a.cols, tid, threads);
        }
      }
      a.values[row] = 0.f;
      continue;
    }
    for (int rank = 0; rank < cluster; ++rank) {  // every copy completes before any gradient store
      const RowLayout layout = row_layout(row, a.row_stride, a.cols, rank, a.chunks_per_cta);
      const int64_t origin = row * a.row_stride - layout.lead;
      for (int c = 0; c < layout.my_chunks; ++c) {
        const int64_t chunk = layout.first_chunk + c;
        const int bytes = chunk_read_bytes(static_cast<int>(chunk) * kVec - layout.lead, a.n_valid);
        for (int i = 0; i < kVec; ++i) {
          const int64_t at = rank * slice + c * kVec + i;
          const bool read = 2 * i < bytes;
          s_buf[at] = read ? a.student[origin + chunk * kVec + i] : from_float<T>(std::nanf(""));
          t_buf[at] = read && HAS_T ? a.teacher[origin + chunk * kVec + i] : from_float<T>(std::nanf(""));
        }
      }
    }
    Partial all = empty_partial();
    for (int rank = 0; rank < cluster; ++rank) {
      const RowLayout layout = row_layout(row, a.row_stride, a.cols, rank, a.chunks_per_cta);
      for (int tid = 0; tid < threads; ++tid) {
        all = combine(all, thread_stats<T, HAS_T, IS_CE>(&s_buf[rank * slice], &t_buf[rank * slice], layout,
                                                          a.n_valid, a.inv_temp, target, tid, threads));
      }
    }
    const RowStats stats = finish_row(all);
    a.values[row] = row_value<IS_CE>(stats, target, a.weights);
    for (int rank = 0; rank < cluster; ++rank) {
      const RowLayout layout = row_layout(row, a.row_stride, a.cols, rank, a.chunks_per_cta);
      for (int tid = 0; tid < threads; ++tid) {
        thread_grad<T, HAS_T, IS_CE>(&s_buf[rank * slice], &t_buf[rank * slice],
                                     a.grad + (row * a.row_stride - layout.lead), layout, a.cols, a.n_valid,
                                     a.inv_temp, stats, a.weights, target, coef, tid, threads);
      }
    }
  }
}

void emulate(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& grad, const at::Tensor& values,
             const at::Tensor& coef, const at::Tensor& target, int64_t n_valid, double inv_temp, double forward_weight,
             bool is_ce, int64_t cluster, int64_t threads) {
  TORCH_CHECK(student.is_cpu(), "kl_cluster.emulate: CPU tensors only");
  check_inputs(student, teacher, grad, values, coef, target, is_ce);
  TORCH_CHECK(cluster >= 1 && threads >= 1, "kl_cluster.emulate: cluster and threads must be positive");
  const int c = static_cast<int>(cluster), n = static_cast<int>(threads);
  if (student.scalar_type() == at::kBFloat16) {
    const auto a = make_args<__nv_bfloat16>(student, teacher, grad, values, coef, target, n_valid, inv_temp,
                                            forward_weight, is_ce, c);
    is_ce ? emulate_typed<__nv_bfloat16, true>(a, c, n) : emulate_typed<__nv_bfloat16, false>(a, c, n);
  } else {
    const auto a =
        make_args<__half>(student, teacher, grad, values, coef, target, n_valid, inv_temp, forward_weight, is_ce, c);
    is_ce ? emulate_typed<__half, true>(a, c, n) : emulate_typed<__half, false>(a, c, n);
  }
}

int64_t shared_memory_bytes(int64_t cols, int64_t n_tensors, int64_t cluster, int64_t nbuf) {
  return static_cast<int64_t>(
      shared_bytes(static_cast<int>(cols), static_cast<int>(n_tensors), static_cast<int>(cluster), static_cast<int>(nbuf)));
}

}  // namespace sdzero_kl
