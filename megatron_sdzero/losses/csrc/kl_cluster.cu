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
// Two CTAs per SM where their shared memory fits (one row buffer of a 151936-wide row, or two of a
// 100278-wide one): while one waits at its cluster barrier the other computes. Caps registers at 64.
constexpr int kMinBlocks = 2;
constexpr int kVec = 8;           // elements per 16-byte chunk (16-bit logits)
constexpr float kNegBig = -1.0e38f;  // finite stand-in for -inf as a running maximum (NEG_BIG)
constexpr int kMaxCluster = 16;

static_assert(kThreads % 32 == 0 && kWarps <= 32, "one warp must be able to reduce the warp partials");

__host__ __device__ inline float neg_inf() { return -__builtin_huge_valf(); }
__host__ __device__ inline float pos_inf() { return __builtin_huge_valf(); }

// 2^x with the hardware's ex2.approx.ftz (what Triton's tl.exp lowers to, after scaling by log2(e));
// results below 2^-126 flush to zero, which no sum or probability here can tell apart from zero.
__host__ __device__ inline float exp2_fast(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
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

// ---------------------------------------------------------------- loss kinds

// Which terms a launch computes: the statistics and the gradient skip what the kind does not use.
enum Mode : int { kReverse = 0, kForward = 1, kMixed = 2, kCrossEntropy = 3 };

template <int MODE>
struct Traits {
  static constexpr bool kCE = MODE == kCrossEntropy;
  static constexpr bool kHasT = !kCE;
  static constexpr bool kRev = MODE == kReverse || MODE == kMixed;
  static constexpr bool kFwd = MODE == kForward || MODE == kMixed;
};

// ---------------------------------------------------------------- statistics

// Statistics of a set of columns in the logits' own units (before 1/T), relative to the set's maxima:
// sum_s = sum exp((s - max_s) / T), cross_rev = sum exp((s - max_s) / T) ((s - max_s) - (t - max_t)),
// cross_fwd likewise with the roles swapped (see full_vocab.py). 1/T is applied to differences only
// (`k2` = log2(e) / T scales exponents), never to the logits: differences of 16-bit logits are exact in
// float32, so for a one-hot row the gradient's (s - t) - E_p[s - t] cancels exactly whatever T is.
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
template <int MODE>
__host__ __device__ inline Partial combine(const Partial& a, const Partial& b, float k2) {
  using K = Traits<MODE>;
  Partial r = empty_partial();
  r.max_s = fmaxf(a.max_s, b.max_s);
  const float gap_sa = a.max_s - r.max_s, gap_sb = b.max_s - r.max_s;
  const float scale_sa = exp2_fast(gap_sa * k2), scale_sb = exp2_fast(gap_sb * k2);
  r.sum_s = scale_sa * a.sum_s + scale_sb * b.sum_s;
  r.label = fmaxf(a.label, b.label);
  if (!K::kHasT) return r;
  r.max_t = fmaxf(a.max_t, b.max_t);
  const float gap_ta = a.max_t - r.max_t, gap_tb = b.max_t - r.max_t;
  const float scale_ta = exp2_fast(gap_ta * k2), scale_tb = exp2_fast(gap_tb * k2);
  const float shift_a = gap_sa - gap_ta, shift_b = gap_sb - gap_tb;
  r.sum_t = scale_ta * a.sum_t + scale_tb * b.sum_t;
  if (K::kRev) {
    r.cross_rev = scale_sa * (a.cross_rev + a.sum_s * shift_a) + scale_sb * (b.cross_rev + b.sum_s * shift_b);
  }
  if (K::kFwd) {
    r.cross_fwd = scale_ta * (a.cross_fwd - a.sum_t * shift_a) + scale_tb * (b.cross_fwd - b.sum_t * shift_b);
  }
  return r;
}

// Pairwise: a dependent chain 3 additions deep rather than 8. Cross-entropy only (its chunks have no
// other chain to overlap it with): 5% faster at 100278 columns on an H100; the KL kinds gain nothing.
__host__ __device__ inline float tree_sum(const float (&x)[kVec]) {
  return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
}

__host__ __device__ inline float tree_max(const float (&x)[kVec]) {
  return fmaxf(fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3])), fmaxf(fmaxf(x[4], x[5]), fmaxf(x[6], x[7])));
}

// One chunk of the online softmax (the scalar form of _online_update in _triton_kernels.py).
template <int MODE>
__host__ __device__ inline void accumulate_chunk(Partial& p, const float (&s)[kVec], const float (&t)[kVec],
                                                 float k2) {
  using K = Traits<MODE>;
  const float max_s = fmaxf(p.max_s, tree_max(s));
  const float max_t = K::kHasT ? fmaxf(p.max_t, tree_max(t)) : p.max_t;
  if (max_s > p.max_s || max_t > p.max_t) {
    const float gap_s = p.max_s - max_s, gap_t = p.max_t - max_t;
    const float scale_s = exp2_fast(gap_s * k2), scale_t = exp2_fast(gap_t * k2);
    const float shift = gap_s - gap_t;  // cross terms are relative to both maxima
    if (K::kRev) p.cross_rev = scale_s * (p.cross_rev + p.sum_s * shift);
    if (K::kFwd) p.cross_fwd = scale_t * (p.cross_fwd - p.sum_t * shift);
    p.sum_s *= scale_s;
    p.sum_t *= scale_t;
    p.max_s = max_s;
    p.max_t = max_t;
  }
  if (K::kCE) {
    float es[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) es[i] = exp2_fast((s[i] - p.max_s) * k2);
    p.sum_s += tree_sum(es);
    return;
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const float ds = s[i] - p.max_s, dt = t[i] - p.max_t;
    const float es = exp2_fast(ds * k2), et = exp2_fast(dt * k2);
    p.sum_s += es;
    p.sum_t += et;
    if (K::kRev) p.cross_rev += es > 0.f ? es * (ds - dt) : 0.f;
    if (K::kFwd) p.cross_fwd += et > 0.f ? et * (dt - ds) : 0.f;
  }
}

// ---------------------------------------------------------------- chunks in shared memory

// The 8 logits of a 16-byte aligned chunk, as stored (one 16-byte shared-memory load). Prefetching
// the next chunk's before computing this one made the KL kinds 7-17% slower on an H100.
template <typename T>
struct alignas(16) RawChunk {
  T v[kVec];
};

template <typename T>
__host__ __device__ inline RawChunk<T> load_raw(const T* src) {
  static_assert(sizeof(T) == 2, "16-bit logits");
  RawChunk<T> r;
#if defined(__CUDA_ARCH__)
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  memcpy(&r, &raw, sizeof(raw));
#else
  memcpy(&r, src, sizeof(r));
#endif
  return r;
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

// A chunk as float32, columns outside [0, n_valid) masked.
template <typename T>
__host__ __device__ inline void to_floats(const RawChunk<T>& raw, int col0, int n_valid, float (&out)[kVec]) {
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = to_float(raw.v[i]);
  if (!chunk_inside(col0, n_valid)) mask_columns(out, col0, n_valid);
}

// The cross-entropy target's logit when it falls in this chunk.
__host__ __device__ inline void take_label(float& label, const float (&s)[kVec], int col0, int64_t target) {
  const int64_t at = target - col0;
  if (at < 0 || at >= kVec) return;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    if (i == at) label = s[i];
  }
}

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
};

struct Scale {
  float inv_temp;
  float k2;  // log2(e) / T: exp(x / T) = exp2(x * k2)
};

struct RowStats {
  float max_s, max_t;
  float log2_sum_s, log2_sum_t;  // exponent offsets of p and q
  float log_sum_s, reverse, forward, label;
  float mean_gap;  // E_p[(s - max_s) - (t - max_t)] = cross_rev / sum_s, in the logits' units
};

template <int MODE>
__host__ __device__ inline RowStats finish_row(const Partial& p, const Scale& sc) {
  RowStats r;
  r.max_s = p.max_s;
  r.max_t = p.max_t;
  r.log_sum_s = logf(p.sum_s);
  r.log2_sum_s = log2f(p.sum_s);
  r.label = p.label;
  r.reverse = r.forward = r.mean_gap = r.log2_sum_t = 0.f;
  if (!Traits<MODE>::kHasT) return r;
  const float log_sum_t = logf(p.sum_t);
  r.log2_sum_t = log2f(p.sum_t);
  const float gap = r.log_sum_s - log_sum_t;
  r.mean_gap = p.cross_rev / p.sum_s;
  r.reverse = sc.inv_temp * r.mean_gap - gap;
  r.forward = sc.inv_temp * (p.cross_fwd / p.sum_t) + gap;
  return r;
}

template <int MODE>
__host__ __device__ inline float row_value(const RowStats& r, int64_t target, const LossWeights& w,
                                           const Scale& sc) {
  if (MODE == kCrossEntropy) return target >= 0 ? r.log_sum_s - sc.inv_temp * (r.label - r.max_s) : pos_inf();
  if (MODE == kMixed) return w.w_rev * r.reverse + w.w_fwd * r.forward;
  return MODE == kForward ? r.forward : r.reverse;
}

// The reverse KL is +inf (student mass where the teacher has none): +inf for every finite student,
// so its gradient is 0, for the mixed KL too (_torch_kernels.infinite_reverse).
template <int MODE>
__host__ __device__ inline bool infinite_reverse(const RowStats& r) {
  return Traits<MODE>::kRev && r.reverse == pos_inf();
}

// Statistics of this thread's chunks: c = tid, tid + nthreads, ... of the rank's slice.
template <typename T, int MODE>
__host__ __device__ inline Partial thread_stats(const T* s_buf, const T* t_buf, const RowLayout& layout,
                                                int n_valid, float k2, int64_t target, int tid, int nthreads) {
  using K = Traits<MODE>;
  Partial p = empty_partial();
  for (int c = tid; c < layout.my_chunks; c += nthreads) {
    const int col0 = (layout.first_chunk + c) * kVec - layout.lead;
    float s[kVec], t[kVec];
    to_floats(load_raw(s_buf + static_cast<int64_t>(c) * kVec), col0, n_valid, s);
    if (K::kHasT) to_floats(load_raw(t_buf + static_cast<int64_t>(c) * kVec), col0, n_valid, t);
    if (K::kCE) take_label(p.label, s, col0, target);
    accumulate_chunk<MODE>(p, s, K::kHasT ? t : s, k2);
  }
  return p;
}

// Per-row factors of the gradient: coef * d value / d (s / T) = p * a_rev * (gap - mean_gap)
// + a_fwd * (p - q), or a_ce * (p - onehot), where gap = (s - max_s) - (t - max_t).
struct GradCoef {
  float a_rev, a_fwd, a_ce;
};

__host__ __device__ inline GradCoef grad_coef(const LossWeights& w, const Scale& sc, float coef) {
  GradCoef g;
  g.a_rev = w.w_rev * sc.inv_temp * coef;
  g.a_fwd = w.w_fwd * coef;
  g.a_ce = coef;
  return g;
}

template <int MODE>
__host__ __device__ inline void chunk_grad(const float (&s)[kVec], const float (&t)[kVec], int col0,
                                           const RowStats& r, const GradCoef& a, float k2, int64_t target,
                                           float (&g)[kVec]) {
  using K = Traits<MODE>;
  if (K::kCE) {
    float p[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      p[i] = exp2_fast((s[i] - r.max_s) * k2 - r.log2_sum_s);
      g[i] = a.a_ce * p[i];
    }
    const int64_t at = target - col0;
    if (at >= 0 && at < kVec) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        if (i == at) g[i] = a.a_ce * (p[i] - 1.f);
      }
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const float ds = s[i] - r.max_s;
    const float p = exp2_fast(ds * k2 - r.log2_sum_s);
    const float dt = t[i] - r.max_t;
    float grad = 0.f;
    if (K::kRev) grad = p > 0.f ? a.a_rev * (p * ((ds - dt) - r.mean_gap)) : 0.f;
    if (K::kFwd) grad += a.a_fwd * (p - exp2_fast(dt * k2 - r.log2_sum_t));
    g[i] = grad;
  }
}

template <typename T, int MODE>
__host__ __device__ inline void thread_grad(const T* s_buf, const T* t_buf, T* grad_origin, const RowLayout& layout,
                                            int cols, int n_valid, float k2, const RowStats& r, const GradCoef& a,
                                            int64_t target, int tid, int nthreads) {
  using K = Traits<MODE>;
  for (int c = tid; c < layout.my_chunks; c += nthreads) {
    const int64_t chunk = layout.first_chunk + c;
    const int col0 = static_cast<int>(chunk) * kVec - layout.lead;
    float s[kVec], t[kVec], g[kVec];
    to_floats(load_raw(s_buf + static_cast<int64_t>(c) * kVec), col0, n_valid, s);
    if (K::kHasT) to_floats(load_raw(t_buf + static_cast<int64_t>(c) * kVec), col0, n_valid, t);
    chunk_grad<MODE>(s, K::kHasT ? t : s, col0, r, a, k2, target, g);
    if (!chunk_inside(col0, n_valid)) {
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
  Scale scale;
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

template <int MODE>
__device__ __forceinline__ Partial warp_reduce(Partial p, float k2) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) p = combine<MODE>(p, shfl_xor(p, mask), k2);
  return p;
}

// The CTA's statistics, valid in thread 0. Every thread must call it.
template <int MODE>
__device__ __forceinline__ Partial block_reduce(const Partial& mine, Partial* scratch, float k2) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Partial in_warp = warp_reduce<MODE>(mine, k2);
  if (lane == 0) scratch[warp] = in_warp;
  __syncthreads();
  Partial total = empty_partial();
  if (warp == 0) total = warp_reduce<MODE>(lane < kWarps ? scratch[lane] : empty_partial(), k2);
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
template <int MODE>
__device__ __forceinline__ Partial cluster_reduce(Partial* slot, int n_ranks, float k2) {
  const int lane = threadIdx.x % 32;
  Partial p = empty_partial();
  if (lane < n_ranks) p = *cg::this_cluster().map_shared_rank(slot, lane);
  return shfl_lane0(warp_reduce<MODE>(p, k2));
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

template <typename T, int MODE, int NBUF>
__device__ __forceinline__ void process_active_row(const KernelArgs<T>& a, int64_t row, int rank, int n_ranks,
                                                   const T* s_buf, const T* t_buf, Partial* slot,
                                                   Partial* scratch, float coef, int64_t target) {
  const float k2 = a.scale.k2;
  cp_async_wait<NBUF - 1>();  // this row's copies (all but the NBUF - 1 most recent groups)
  __syncthreads();
  const RowLayout layout = row_layout(row, a.row_stride, a.cols, rank, a.chunks_per_cta);
  const int worker = static_cast<int>(threadIdx.x) - 32;  // warp 0: no chunks, an empty partial
  const Partial mine =
      worker < 0 ? empty_partial()
                 : thread_stats<T, MODE>(s_buf, t_buf, layout, a.n_valid, k2, target, worker, kWorkers);
  publish_and_sync(slot, block_reduce<MODE>(mine, scratch, k2));
  const RowStats stats = finish_row<MODE>(cluster_reduce<MODE>(slot, n_ranks, k2), a.scale);
  if (worker < 0) {
    if (rank == 0 && threadIdx.x == 0) a.values[row] = row_value<MODE>(stats, target, a.weights, a.scale);
    return;
  }
  T* grad_origin = a.grad + (row * a.row_stride - layout.lead);
  if (infinite_reverse<MODE>(stats)) {
    thread_zero_grad(grad_origin, layout, a.cols, worker, kWorkers);
    return;
  }
  thread_grad<T, MODE>(s_buf, t_buf, grad_origin, layout, a.cols, a.n_valid, k2, stats,
                       grad_coef(a.weights, a.scale, coef), target, worker, kWorkers);
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
template <typename T, int MODE, int NBUF>
__global__ void __launch_bounds__(kThreads, kMinBlocks) kl_cluster_kernel(const KernelArgs<T> a) {
  constexpr bool IS_CE = Traits<MODE>::kCE;
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
      process_active_row<T, MODE, NBUF>(a, row, rank, n_ranks, s_buf, t_buf, slots + (phase & 1u), scratch,
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

LossWeights make_weights(double forward_weight) {
  LossWeights w;
  w.w_fwd = static_cast<float>(forward_weight);
  w.w_rev = 1.0f - w.w_fwd;
  return w;
}

int loss_mode(bool is_ce, double forward_weight) {
  if (is_ce) return kCrossEntropy;
  if (forward_weight <= 0.0) return kReverse;
  return forward_weight >= 1.0 ? kForward : kMixed;
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

template <typename T, int MODE, int NBUF>
void launch_typed(const KernelArgs<T>& args, int cluster, size_t smem, int device, cudaStream_t stream) {
  auto kernel = kl_cluster_kernel<T, MODE, NBUF>;
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
  a.scale.inv_temp = static_cast<float>(inv_temp);
  a.scale.k2 = static_cast<float>(inv_temp * 1.4426950408889634);
  a.weights = make_weights(forward_weight);
  return a;
}

template <typename T, int MODE>
void launch_buffers(const KernelArgs<T>& args, int cluster, int nbuf, size_t smem, int device, cudaStream_t stream) {
  if (nbuf == 2) {
    launch_typed<T, MODE, 2>(args, cluster, smem, device, stream);
  } else {
    launch_typed<T, MODE, 1>(args, cluster, smem, device, stream);
  }
}

template <typename T>
void launch_mode(const KernelArgs<T>& args, int mode, int cluster, int nbuf, size_t smem, int device,
                 cudaStream_t stream) {
  switch (mode) {
    case kReverse:
      return launch_buffers<T, kReverse>(args, cluster, nbuf, smem, device, stream);
    case kForward:
      return launch_buffers<T, kForward>(args, cluster, nbuf, smem, device, stream);
    case kMixed:
      return launch_buffers<T, kMixed>(args, cluster, nbuf, smem, device, stream);
    default:
      return launch_buffers<T, kCrossEntropy>(args, cluster, nbuf, smem, device, stream);
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
  const int mode = loss_mode(is_ce, forward_weight);
  if (student.scalar_type() == at::kBFloat16) {
    const auto args = make_args<__nv_bfloat16>(student, teacher, grad, values, coef, target, n_valid, inv_temp,
                                               forward_weight, is_ce, c);
    launch_mode(args, mode, c, b, smem, device, stream);
  } else {
    const auto args =
        make_args<__half>(student, teacher, grad, values, coef, target, n_valid, inv_temp, forward_weight, is_ce, c);
    launch_mode(args, mode, c, b, smem, device, stream);
  }
}

// ---------------------------------------------------------------- CPU emulation (tests)

// The kernel's algorithm run sequentially on CPU tensors: `cluster` ranks, each a CTA of `threads`
// threads; chunk slicing, masking, per-thread online statistics, combining and gradient stores are
// the device code's own functions. Unread chunk bytes are filled with NaN, as stale shared memory
// could hold anything. Reduction order differs from the GPU (sequential here).
template <typename T, int MODE>
void emulate_typed(const KernelArgs<T>& a, int cluster, int threads) {
  constexpr bool IS_CE = Traits<MODE>::kCE, HAS_T = !IS_CE;
  const float k2 = a.scale.k2;
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
        const Partial mine =
            thread_stats<T, MODE>(&s_buf[rank * slice], &t_buf[rank * slice], layout, a.n_valid, k2, target, tid, threads);
        all = combine<MODE>(all, mine, k2);
      }
    }
    const RowStats stats = finish_row<MODE>(all, a.scale);
    a.values[row] = row_value<MODE>(stats, target, a.weights, a.scale);
    const GradCoef factors = grad_coef(a.weights, a.scale, coef);
    for (int rank = 0; rank < cluster; ++rank) {
      const RowLayout layout = row_layout(row, a.row_stride, a.cols, rank, a.chunks_per_cta);
      for (int tid = 0; tid < threads; ++tid) {
        if (infinite_reverse<MODE>(stats)) {
          thread_zero_grad(a.grad + (row * a.row_stride - layout.lead), layout, a.cols, tid, threads);
          continue;
        }
        thread_grad<T, MODE>(&s_buf[rank * slice], &t_buf[rank * slice], a.grad + (row * a.row_stride - layout.lead),
                             layout, a.cols, a.n_valid, k2, stats, factors, target, tid, threads);
      }
    }
  }
}

template <typename T>
void emulate_mode(const KernelArgs<T>& a, int mode, int cluster, int threads) {
  switch (mode) {
    case kReverse:
      return emulate_typed<T, kReverse>(a, cluster, threads);
    case kForward:
      return emulate_typed<T, kForward>(a, cluster, threads);
    case kMixed:
      return emulate_typed<T, kMixed>(a, cluster, threads);
    default:
      return emulate_typed<T, kCrossEntropy>(a, cluster, threads);
  }
}

void emulate(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& grad, const at::Tensor& values,
             const at::Tensor& coef, const at::Tensor& target, int64_t n_valid, double inv_temp, double forward_weight,
             bool is_ce, int64_t cluster, int64_t threads) {
  TORCH_CHECK(student.is_cpu(), "kl_cluster.emulate: CPU tensors only");
  check_inputs(student, teacher, grad, values, coef, target, is_ce);
  TORCH_CHECK(cluster >= 1 && threads >= 1, "kl_cluster.emulate: cluster and threads must be positive");
  const int c = static_cast<int>(cluster), n = static_cast<int>(threads);
  const int mode = loss_mode(is_ce, forward_weight);
  if (student.scalar_type() == at::kBFloat16) {
    const auto a = make_args<__nv_bfloat16>(student, teacher, grad, values, coef, target, n_valid, inv_temp,
                                            forward_weight, is_ce, c);
    emulate_mode(a, mode, c, n);
  } else {
    const auto a =
        make_args<__half>(student, teacher, grad, values, coef, target, n_valid, inv_temp, forward_weight, is_ce, c);
    emulate_mode(a, mode, c, n);
  }
}

int64_t shared_memory_bytes(int64_t cols, int64_t n_tensors, int64_t cluster, int64_t nbuf) {
  return static_cast<int64_t>(
      shared_bytes(static_cast<int>(cols), static_cast<int>(n_tensors), static_cast<int>(cluster), static_cast<int>(nbuf)));
}

}  // namespace sdzero_kl
