// GroupNorm (+ residual + activation) forward and backward for the CPU: the "cpu" backend.
//
// Layouts: x is dense either as (N, C, S) ("NCHW": contiguous, S = product of spatial dims) or as
// (N, S, C) ("NHWC": channels_last / channels_last_3d). y = act(GN(x) * w + b + r).
//
// Statistics are accumulated in the op-math type (fp32; fp64 for double inputs) and are robust:
//   NCHW: one group is a contiguous block; sums of (x - x[group start]) and its square (the
//         shifted-data variance) in one pass, fp32 blocks added in double.
//   NHWC: per-channel sums of shifted values (x - x[n, 0, c]) over row chunks, combined in
//         double with Chan's formula into the group variance: one streaming pass, no
//         E[x^2] - E[x]^2 cancellation.
// Backward (see kernels/README in triton_kernels.py for the same derivation):
//   dz = dy * act'(z),  z = xhat * w + b + r,  xhat = (x - mean) * rstd
//   c1 = mean_group(dz * w * xhat),  c2 = mean_group(dz * w)
//   dx = rstd * (dz * w - c1 * xhat - c2)   = a_c * dz + B_g * (x - mean) + D_g
//   dw_c = sum_{n,s} dz * xhat,  db_c = sum_{n,s} dz   (per-(n, c) partials, reduced in a fixed
//   order: bit-identical across calls and thread counts). Sums use (x - mean), never x alone,
//   so inputs with a large offset lose no digits to cancellation.
// Large outputs (y, dx) are written with non-temporal stores through a small L1 buffer
// (write_row), NHWC rows read from DRAM are prefetched 4 KB ahead (prefetch_ahead): both
// measured, see there. The NHWC schedule (single DRAM pass of the statistics when a sample fits
// in the cache, blocked two passes otherwise) is described at nhwc_plan. The activations'
// exponentials are a vectorizable polynomial with a tested error bound (exp_nonpos).
// Work is split into fixed tasks (independent of the thread count) that the threads take from a
// shared counter (parallel_tasks): on a shared machine a descheduled thread does not hold up the
// others, and results do not depend on which thread ran which task.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <type_traits>
#include <unistd.h>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GN_X86 1
#endif

namespace {

enum Act : int { kNone = 0, kRelu = 1, kSilu = 2, kGelu = 3 };

// Everything called inside a vectorized loop must be inlined, or gcc gives up on the loop.
#define GN_INLINE inline __attribute__((always_inline))
#define GN_INLINE_LAMBDA __attribute__((always_inline))

// e^t for t <= 0 (every exp in this file has a non-positive argument: SiLU uses e^-|z|, GELU
// e^(-z^2/2) and e^(-x^2)), written so that gcc vectorizes loops calling it at the vector width
// of the build (-march=native: 8 floats with AVX2, 16 with AVX-512). Range reduction
// t = n ln2 + r with n = round(t / ln2) from the 1.5 * 2^23 shifter (n also sits in the low bits
// of f) and ln2 split in two (Cody-Waite: n * kLn2Hi is exact for |n| <= 2^13); e^r =
// 1 + r + r^2 P(r), P of degree 4 fitted for relative error on |r| <= ln2 / 2 (0.6 ulp in fp32
// arithmetic); 2^n from the exponent bits. Below t = -87.7 (n = -127) the scale is 0, so the
// result is 0 where e^t is under FLT_MIN / 2 (between, the product rounds to a denormal):
// computing those denormals right (2^n in two factors) cost 16% more per SiLU on the AVX2
// machine, for outputs below 1e-36. NaN stays NaN, -inf gives 0. The bound of SiLU and its
// derivative built on it is measured against float64 by tests/test_kernels_cpu.py::
// test_silu_error_bound.
GN_INLINE float exp_nonpos(float t) {
  constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  t = std::max(t, -88.0f);  // n >= -127; NaN stays NaN
  const float f = t * 1.44269504088896341f + kShifter;
  const float n = f - kShifter;
  const float r = (t - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.3814381090924144e-3f;
  p = p * r + 8.368747308850288e-3f;
  p = p * r + 4.166839271783829e-2f;
  p = p * r + 1.666651964187622e-1f;
  p = p * r + 4.999999403953552e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t ni = __builtin_bit_cast(int32_t, f) - __builtin_bit_cast(int32_t, kShifter);
  return p * __builtin_bit_cast(float, (ni + 127) << 23);
}
GN_INLINE double exp_nonpos(double t) { return std::exp(t); }

// sigmoid(z) = 1 / (1 + e^-z) from u = e^-|z| in [0, 1]: 1 / (1 + u) for z >= 0, u / (1 + u)
// below, so that neither side overflows.
template <typename T>
GN_INLINE T sigmoid(T z) {
  const T u = exp_nonpos(-std::fabs(z));
  const T r = T(1) / (T(1) + u);
  return z >= T(0) ? r : u * r;
}

// erf via Abramowitz & Stegun 7.1.26 (abs. error <= 1.5e-7, the same formula as ATen's
// vectorized erf); fp64 inputs use std::erf.
GN_INLINE float fast_erf(float x) {
  const float ax = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float y = 1.0f - p * t * exp_nonpos(-ax * ax);
  return std::copysign(y, x);
}
GN_INLINE double fast_erf(double x) { return std::erf(x); }

template <int A, typename T>
GN_INLINE T act_fwd(T z) {
  if constexpr (A == kRelu) {
    return z > T(0) ? z : T(0);
  } else if constexpr (A == kSilu) {
    return z * sigmoid(z);
  } else if constexpr (A == kGelu) {
    return T(0.5) * z * (T(1) + fast_erf(z * T(0.70710678118654752440)));
  } else {
    return z;
  }
}

// d act / dz
template <int A, typename T>
GN_INLINE T act_grad(T z) {
  if constexpr (A == kRelu) {
    return z > T(0) ? T(1) : T(0);
  } else if constexpr (A == kSilu) {
    const T s = sigmoid(z);
    return s * (T(1) + z * (T(1) - s));
  } else if constexpr (A == kGelu) {
    const T cdf = T(0.5) * (T(1) + fast_erf(z * T(0.70710678118654752440)));
    return cdf + z * T(0.39894228040143267794) * exp_nonpos(T(-0.5) * z * z);
  } else {
    return T(1);
  }
}

// Loads and stores with the conversion written so that gcc vectorizes it (c10's BFloat16 /
// Half conversions contain branches that stop the vectorizer). bf16 -> fp32 is a shift; fp32 ->
// bf16 rounds to nearest even (NaN stays NaN); fp16 goes through _Float16 (vcvtph2ps / vcvtps2ph).
template <typename T>
GN_INLINE at::opmath_type<T> ld(T v) {
  return static_cast<at::opmath_type<T>>(v);
}
template <>
GN_INLINE float ld(c10::BFloat16 v) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(v.x) << 16);
}
template <>
GN_INLINE float ld(c10::Half v) {
#ifdef __FLT16_MAX__  // _Float16 (x86 needs gcc >= 12); else c10's conversion (not vectorized)
  return static_cast<float>(__builtin_bit_cast(_Float16, v.x));
#else
  return static_cast<float>(v);
#endif
}
template <typename T>
GN_INLINE T st(at::opmath_type<T> v) {
  return static_cast<T>(v);
}
template <>
GN_INLINE c10::BFloat16 st<c10::BFloat16>(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint32_t r = v != v ? 0x7FC0u : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(r), c10::BFloat16::from_bits());
}
template <>
GN_INLINE c10::Half st<c10::Half>(float v) {
#ifdef __FLT16_MAX__
  return c10::Half(__builtin_bit_cast(uint16_t, static_cast<_Float16>(v)), c10::Half::from_bits());
#else
  return c10::Half(v);
#endif
}

// Below this many elements a call runs on the calling thread alone: starting and joining the
// OpenMP team took 10-20 us on the 2-core AVX2 machine (2026-11-30, loaded), more than the
// work (an NCHW forward of 4K elements: 12 us on 1 thread, 35 us on 2). ATen's ops use the
// same grain (at::internal::GRAIN_SIZE).
constexpr int64_t kSerialElems = 32768;

// Runs body(next_task) once on each of up to ntasks threads (one, the caller, for a call of
// fewer than kSerialElems elements); next_task() hands out the task indices 0..ntasks-1
// dynamically and returns -1 when none are left.
template <typename F>
void parallel_tasks(int64_t ntasks, int64_t elems, const F& body) {
  std::atomic<int64_t> counter{0};
  const auto next_task = [&]() -> int64_t {
    const int64_t t = counter.fetch_add(1, std::memory_order_relaxed);
    return t < ntasks ? t : -1;
  };
  const int64_t nt = elems < kSerialElems
                         ? 1
                         : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  const auto run = [&]() {
    body(next_task);
#ifdef GN_X86
    _mm_sfence();  // order this thread's non-temporal stores (write_row) before the join
#endif
  };
  if (nt == 1) {
    run();
    return;
  }
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) { run(); });
}

// Bytes of the last-level cache that this CPU shares with the others, or 0 when unknown. Linux
// sysfs first (cpu0's unified level-3 cache, "32768K"): it describes the cache a core actually
// uses. sysconf(_SC_LEVEL3_CACHE_SIZE) only as the fallback: under a hypervisor it can report
// the whole socket's L3 (the 2-core AMD EPYC VM of 2026-11-30: 256 MiB from sysconf, 32 MiB in
// sysfs, the size of one Zen 3 CCX), which moved both thresholds below past every benchmark
// shape and cost the NHWC forward 1.1-1.2x (see stream_min_bytes).
inline int64_t l3_cache_bytes() {
  static const int64_t bytes = [] {
    for (int i = 0; i < 8; ++i) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i);
      std::ifstream level(dir + "/level"), type(dir + "/type"), size(dir + "/size");
      int lv = 0;
      std::string ty, sz;
      if (!(level >> lv) || !(type >> ty) || !(size >> sz)) continue;
      if (lv != 3 || ty != "Unified" || sz.empty()) continue;
      char* end = nullptr;
      const long long v = std::strtoll(sz.c_str(), &end, 10);
      const int64_t unit = (*end == 'K') ? (int64_t(1) << 10)
                           : (*end == 'M') ? (int64_t(1) << 20)
                           : (*end == 'G') ? (int64_t(1) << 30) : 1;
      if (v > 0) return static_cast<int64_t>(v) * unit;
    }
#ifdef _SC_LEVEL3_CACHE_SIZE
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (l3 > 0) return static_cast<int64_t>(l3);
#endif
    return int64_t(0);
  }();
  return bytes;
}

// Outputs of at least this many bytes are written with non-temporal (streaming) stores: such
// an output is unlikely to still be in the last-level cache when the next layer reads it, and
// a normal store first reads the line it writes. Measured on the Zen 4 machine of
// BENCHMARKS.md (2 threads, fp32, same process, A/B by this threshold): (8,256,56,56) NHWC
// forward 2.83 -> 1.87 ms, NCHW forward 1.61 -> 1.43 ms (a copy: 1.40), backward 3.65 -> 3.21 /
// 2.50 -> 2.02 ms; (8,256,32,32), 8 MB: 0.64 -> 0.51 / 0.71 -> 0.46 ms. On the AVX2 machine
// (Zen 3, 2 threads, 2026-11-30 23:07 UTC, idle, same process, 8 MiB against the 64 MiB that
// sysconf's L3 gave; benchmarks/bench_cache_thresholds.py): 1.08-1.27x faster forward, 1.11-1.22x
// forward + backward, on the five >= 2M-element shapes, both layouts. Default: a quarter of the L3
// (l3_cache_bytes; at least 4 MiB), else 8 MiB. GROUPNORM_CPU_STREAM_MIN_BYTES overrides it,
// read at every call (the tests set 0 to stream small tensors too).
inline int64_t stream_min_bytes() {
  if (const char* env = std::getenv("GROUPNORM_CPU_STREAM_MIN_BYTES")) {
    return std::strtoll(env, nullptr, 10);
  }
  const int64_t l3 = l3_cache_bytes();
  return l3 > 0 ? std::max<int64_t>(int64_t(4) << 20, l3 / 4) : int64_t(8) << 20;
}

template <typename scalar_t>
inline bool use_streaming_stores(int64_t numel) {
  return numel * static_cast<int64_t>(sizeof(scalar_t)) >= stream_min_bytes();
}

// NHWC output is streamed row by row: only rows of at least 256 bytes (shorter ones would be
// mostly unaligned head and tail).
template <typename scalar_t>
inline bool nhwc_streams(int64_t N, int64_t S, int64_t C) {
  return C * static_cast<int64_t>(sizeof(scalar_t)) >= 256 &&
         use_streaming_stores<scalar_t>(N * S * C);
}

// Stores the 32 bytes at blk (32-byte aligned, a register's worth of outputs) to dst with a
// non-temporal store.
#if defined(GN_X86) && defined(__AVX__)
GN_INLINE void stream32(float* dst, const float* blk) {
  _mm256_stream_ps(dst, _mm256_load_ps(blk));
}
GN_INLINE void stream32(double* dst, const double* blk) {
  _mm256_stream_pd(dst, _mm256_load_pd(blk));
}
template <typename T>
GN_INLINE void stream32(T* dst, const T* blk) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(dst),
                      _mm256_load_si256(reinterpret_cast<const __m256i*>(blk)));
}
#endif

// Writes the n elements of an output row: compute(out, i0, cnt) stores the values of elements
// [i0, i0 + cnt) at out[0 .. cnt). With stream (and AVX), the 64-byte-aligned body is computed
// 32 bytes at a time into a local block whose count is a compile-time constant
// (std::integral_constant), which gcc keeps in a register, and written with a non-temporal
// store; the unaligned head and the tail use ordinary stores. Measured against the previous
// form (a 4 KB L1 buffer, then a streaming copy of it; 1 thread, same process, 2026-11-30, AVX2
// machine): the channels-last forward 5-10% faster at C = 256 / 512.
template <typename scalar_t, typename F>
GN_INLINE void write_row(scalar_t* __restrict dst, int64_t n, bool stream, const F& compute) {
#if defined(GN_X86) && defined(__AVX__)
  constexpr int64_t kW = 32 / sizeof(scalar_t);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(dst);
  if (stream && addr % sizeof(scalar_t) == 0) {
    // to a 64-byte boundary: every cache line of the body is written whole by two stores
    const int64_t head =
        std::min<int64_t>(n, static_cast<int64_t>((64 - (addr & 63)) & 63) / sizeof(scalar_t));
    compute(dst, 0, head);
    int64_t i = head;
    for (; i + kW <= n; i += kW) {
      alignas(32) scalar_t blk[kW];
      compute(blk, i, std::integral_constant<int64_t, kW>{});
      stream32(dst + i, blk);
    }
    compute(dst + i, i, n - i);
    return;
  }
#endif
  compute(dst, 0, n);
}

constexpr int64_t kBlock = 2048;  // elements per fp32 partial sum before it is added in double

// Shifted sums over fp32 blocks added in double: S1 = sum(p[i] - k), S2 = sum((p[i] - k)^2).
// With k a value of the same data (the group's first element), S2 - S1^2 / n has no
// catastrophic cancellation (the "shifted data" variance), and it costs one pass.
template <typename scalar_t, typename acc_t>
void shifted_sums(const scalar_t* p, int64_t n, acc_t k, double& S1, double& S2) {
  S1 = 0;
  S2 = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t e = std::min(n, i0 + kBlock);
    acc_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t i = i0; i < e; ++i) {
      const acc_t d = ld(p[i]) - k;
      s1 += d;
      s2 += d * d;
    }
    S1 += s1;
    S2 += s2;
  }
}

// y[i] = act(x[i] * a + b (+ r[i])) with scalar a, b (NCHW: one channel row).
template <int A, bool R, typename scalar_t, typename acc_t>
inline void apply_row_scalar(const scalar_t* __restrict x, const scalar_t* __restrict r,
                             scalar_t* __restrict y, int64_t n, acc_t a, acc_t b, bool stream) {
  write_row(y, n, stream, [&](scalar_t* __restrict out, int64_t i0, auto cnt) {
#pragma omp simd
    for (int64_t j = 0; j < cnt; ++j) {
      const int64_t i = i0 + j;
      acc_t z = ld(x[i]) * a + b;
      if constexpr (R) z += ld(r[i]);
      out[j] = st<scalar_t>(act_fwd<A>(z));
    }
  });
}

// y[c] = act(x[c] * a[c] + b[c] (+ r[c])) for one NHWC row of C channels.
template <int A, bool R, typename scalar_t, typename acc_t>
inline void apply_row_vec(const scalar_t* __restrict x, const scalar_t* __restrict r,
                          scalar_t* __restrict y, int64_t C, const acc_t* __restrict a,
                          const acc_t* __restrict b, bool stream) {
  write_row(y, C, stream, [&](scalar_t* __restrict out, int64_t i0, auto cnt) {
#pragma omp simd
    for (int64_t j = 0; j < cnt; ++j) {
      const int64_t c = i0 + j;
      acc_t z = ld(x[c]) * a[c] + b[c];
      if constexpr (R) z += ld(r[c]);
      out[j] = st<scalar_t>(act_fwd<A>(z));
    }
  });
}

// ---------------------------------------------------------------- forward, NCHW
template <int A, bool R, typename scalar_t>
void fwd_nchw(const scalar_t* x, const scalar_t* r, const at::opmath_type<scalar_t>* w,
              const at::opmath_type<scalar_t>* b, scalar_t* y, at::opmath_type<scalar_t>* mean,
              at::opmath_type<scalar_t>* rstd, int64_t N, int64_t C, int64_t S, int64_t G,
              double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Cg = C / G;
  const int64_t M = Cg * S;
  const bool stream = use_streaming_stores<scalar_t>(N * C * S);
  parallel_tasks(N * G, N * C * S, [&](const auto& next_task) {
    for (int64_t ng = next_task(); ng >= 0; ng = next_task()) {
      const int64_t g = ng % G;
      const scalar_t* xg = x + ng * M;
      const acc_t k = ld(xg[0]);
      double S1, S2;
      shifted_sums(xg, M, k, S1, S2);
      // max(v, 0) keeps a NaN v (Inf or NaN in the group): the group's output is NaN, as torch's
      const double var = std::max(S2 - S1 * S1 / M, 0.0) / M;
      const acc_t m = static_cast<acc_t>(static_cast<double>(k) + S1 / M);
      const acc_t rs = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
      mean[ng] = m;
      rstd[ng] = rs;
      for (int64_t cc = 0; cc < Cg; ++cc) {
        const int64_t c = g * Cg + cc;
        const acc_t a = rs * w[c];
        const acc_t bb = b[c] - m * a;
        const int64_t off = ng * M + cc * S;
        apply_row_scalar<A, R>(x + off, R ? r + off : nullptr, y + off, S, a, bb, stream);
      }
    }
  });
}

// ---------------------------------------------------------------- NHWC schedule
// A sample of x is a slab of S rows of C channels; group g is channels [g Cg, (g + 1) Cg) of
// every row. Statistics are per-channel sums over row chunks (vector loads across the channels
// of a row), combined per group in double (Chan's formula), so no divide and no group index is
// computed per element. The output needs the statistics of the whole sample, so every element
// is read twice; the schedule (nhwc_plan) decides where the second read comes from:
//  - per-sample tasks (a thread takes a whole sample) when the samples balance over the threads
//    and one slab per thread fits in the cache budget (slab_cache_bytes): the statistics pass is
//    the single DRAM read of x, the output pass reads the slab back from L2 / L3;
//  - otherwise sweeps of nb samples whose row chunks all threads share (one parallel region for
//    the statistics, one for the output), nb samples fitting in the budget; or nb = 1 when one
//    sample does not fit: the blocked two-pass schedule, in which x is read twice from DRAM and
//    the output pass walks the chunks backwards, starting with the rows the statistics pass
//    read last (still in L2 / L3). From the cache, forwards measured faster (the hardware
//    prefetcher follows ascending streams).
// Not done: overlapping a thread's statistics pass over its next sample with the output pass of
// the previous one (row by row, so that DRAM reads and writes run together as in a copy). On
// the AVX2 machine of 2026-11-30 (1 thread, CPU time, same process) it left the forward where it
// was (0.90-1.04x) and made the backward 5-23% slower. Nor column tasks (one task = a block of
// whole groups, 256-byte row segments, of all rows of a sample: its second read would come from
// the thread's own cache, and a sample with N = 1 would need no second parallel region): in a
// C++ prototype (1 thread, 2026-11-30) they reached 0.35 of a memcpy from DRAM against 0.74 for
// whole rows (strided 256-byte reads), and only matched them from L3.
// Chunks depend on C only, partials of a chunk are summed in row order and chunks are combined
// in a fixed order: every schedule and thread count gives the same bits.

// Rows per NHWC chunk: about 16K elements, at least one row.
inline int64_t rows_per_chunk(int64_t C) { return std::max<int64_t>(1, 16384 / C); }

// Bytes of slabs that may be in flight for their second pass to hit the cache: half the L3
// (l3_cache_bytes; the other half for everything else: y, other processes), else 16 MiB.
// GROUPNORM_CPU_SLAB_CACHE_BYTES overrides it, read at every call (the tests force each
// schedule with it).
inline int64_t slab_cache_bytes() {
  if (const char* env = std::getenv("GROUPNORM_CPU_SLAB_CACHE_BYTES")) {
    return std::strtoll(env, nullptr, 10);
  }
  const int64_t l3 = l3_cache_bytes();
  return l3 > 0 ? l3 / 2 : int64_t(16) << 20;
}

struct NhwcPlan {
  bool per_sample;  // one task per sample
  int64_t nb;       // else: samples per sweep
  bool cached;      // the second pass reads from the cache (the slabs in flight fit the budget)
};

// slab_bytes: what the second pass reads back of one sample (x; x and dy, or x and the cached
// dz, which has the same size in fp32; + the residual).
inline NhwcPlan nhwc_plan(int64_t N, int64_t slab_bytes) {
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t budget = slab_cache_bytes();
  const int64_t slab = std::max<int64_t>(1, slab_bytes);
  const bool balanced = nt <= 1 || N % nt == 0 || N >= 4 * nt;
  if (balanced && std::min(N, nt) * slab <= budget) return {true, 1, true};
  const int64_t nb = std::min<int64_t>(N, std::max<int64_t>(1, budget / slab));
  return {false, nb, nb * slab <= budget};
}

// A per-thread buffer of at least n elements that lives as long as the thread (OpenMP workers
// and the calling thread are reused across calls): no allocation or page fault per call. It
// holds at most the slabs of one call (bounded by the cache budget when used for dz).
template <typename T>
T* thread_scratch(int64_t n) {
  thread_local std::vector<T> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// Software prefetch of the n elements kPrefetchBytes past the start of a row (NHWC loops that
// read from DRAM; a prefetch never faults, so running past the end of the tensor is harmless).
// In the row loops that also load and store per-channel accumulators, the hardware prefetcher
// alone left the per-channel sums at 10-20 GB/s per core for rows of 512 B and more (C >= 128 in
// fp32) on the Zen 4 machine of BENCHMARKS.md; prefetching 2-8 KB ahead gave 23-32 GB/s (a plain
// contiguous sum: ~40). Shorter rows already ran at 25-45 GB/s, and prefetching them made them
// slower. From the cache a prefetch only costs (the output pass of a cached plan skips it).
constexpr int64_t kPrefetchBytes = 4096;
constexpr int64_t kPrefetchMinRowBytes = 512;
template <typename T>
GN_INLINE void prefetch_ahead(const T* row, int64_t n) {
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  if (bytes < kPrefetchMinRowBytes) return;
  const char* p = reinterpret_cast<const char*>(row) + kPrefetchBytes;
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i);
}

// Chunks per block: a block (about 128K elements) is one statistics task of a sweep; its chunks'
// fp32 partials are added in double, in chunk order, into one partial per block, so that the
// serial finish (per sample) adds nblocks, not nchunks, partials per channel. Fixed by the shape.
inline int64_t chunks_per_block(int64_t rows, int64_t C) {
  return std::max<int64_t>(1, (int64_t(1) << 17) / (rows * C));
}

// The schedule the NHWC forward and backward share. For each sample n:
//   prep(n, coef) -> stats(n, s0, s1, p1, p2, coef, dz) over the rows [s0, s1) of every chunk
//   -> finish(n, q1, q2, nblocks, coef) -> apply(n, s0, s1, coef, dz, prefetch) over all rows,
// with coef ncoef arrays of C values per sample; stats adds one chunk's sums to p1, p2 (C values,
// zeroed here before each chunk), which are added in double to the (nblocks, C) block partials
// q1, q2; dz a buffer of dz_elems values per sample (nullptr when dz_elems is 0 or the plan is
// not cached: a buffer that does not stay in the cache costs more than recomputing what it
// holds).
template <typename acc_t, typename Prep, typename Stats, typename Finish, typename Apply>
void nhwc_two_sweeps(const NhwcPlan& plan, int64_t N, int64_t S, int64_t C, int64_t rows,
                     int64_t ncoef, int64_t dz_elems, const Prep& prep, const Stats& stats,
                     const Finish& finish, const Apply& apply) {
  const int64_t nchunks = (S + rows - 1) / rows;
  const int64_t kb = chunks_per_block(rows, C);
  const int64_t nblocks = (nchunks + kb - 1) / kb;
  const int64_t BC = nblocks * C;
  const int64_t dzn = plan.cached ? dz_elems : 0;
  // block j of sample n into q1, q2 (C doubles each), using p (2 C values) as scratch
  const auto block = [&](int64_t n, int64_t j, double* q1, double* q2, acc_t* p,
                         const acc_t* coef, acc_t* dz) {
    std::fill(q1, q1 + C, 0.0);
    std::fill(q2, q2 + C, 0.0);
    for (int64_t k = j * kb; k < std::min(nchunks, (j + 1) * kb); ++k) {
      std::fill(p, p + 2 * C, acc_t(0));
      stats(n, k * rows, std::min(S, (k + 1) * rows), p, p + C, coef, dz);
      for (int64_t c = 0; c < C; ++c) {
        q1[c] += p[c];
        q2[c] += p[C + c];
      }
    }
  };
  if (plan.per_sample) {
    parallel_tasks(N, N * S * C, [&](const auto& next_task) {
      std::vector<double> q1(BC), q2(BC);
      std::vector<acc_t> p(2 * C), coef(ncoef * C);
      acc_t* dz = dzn > 0 ? thread_scratch<acc_t>(dzn) : nullptr;
      for (int64_t n = next_task(); n >= 0; n = next_task()) {
        prep(n, coef.data());
        for (int64_t j = 0; j < nblocks; ++j) {
          block(n, j, q1.data() + j * C, q2.data() + j * C, p.data(), coef.data(), dz);
        }
        finish(n, q1.data(), q2.data(), nblocks, coef.data());
        apply(n, 0, S, coef.data(), dz, false);
      }
    });
    return;
  }
  const int64_t nb = plan.nb;
  std::vector<double> q1(nb * BC), q2(nb * BC);  // per sample of a sweep
  std::vector<acc_t> coef(nb * ncoef * C);
  acc_t* dz = dzn > 0 ? thread_scratch<acc_t>(nb * dzn) : nullptr;
  const auto dz_of = [&](int64_t i) { return dz != nullptr ? dz + i * dzn : nullptr; };
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t nn = std::min(nb, N - n0);
    for (int64_t i = 0; i < nn; ++i) prep(n0 + i, coef.data() + i * ncoef * C);
    parallel_tasks(nn * nblocks, nn * S * C, [&](const auto& next_task) {
      std::vector<acc_t> p(2 * C);
      for (int64_t t = next_task(); t >= 0; t = next_task()) {
        const int64_t i = t / nblocks, j = t % nblocks;
        block(n0 + i, j, q1.data() + t * C, q2.data() + t * C, p.data(),
              coef.data() + i * ncoef * C, dz_of(i));
      }
    });
    for (int64_t i = 0; i < nn; ++i) {
      finish(n0 + i, q1.data() + i * BC, q2.data() + i * BC, nblocks,
             coef.data() + i * ncoef * C);
    }
    parallel_tasks(nn * nchunks, nn * S * C, [&](const auto& next_task) {
      for (int64_t t = next_task(); t >= 0; t = next_task()) {
        // a slab larger than the cache: backwards, last read first used
        const int64_t tr = plan.cached ? t : nn * nchunks - 1 - t;
        const int64_t i = tr / nchunks, k = tr % nchunks;
        apply(n0 + i, k * rows, std::min(S, (k + 1) * rows), coef.data() + i * ncoef * C,
              dz_of(i), !plan.cached);
      }
    });
  }
}

// ---------------------------------------------------------------- forward, NHWC
// Adds the per-channel sums of (x - x[row 0]) and its square over rows [s0, s1) of one sample to
// p1, p2. One row per step: four rows per step (the accumulators loaded and stored once per four
// rows of x) ran 0-10% slower in the kernel (2026-11-30, AVX2 machine; faster only from L3 in a
// microbenchmark): four interleaved streams confuse the hardware prefetcher more than the extra
// L1 traffic costs.
template <typename scalar_t, typename acc_t>
void nhwc_stats_rows(const scalar_t* xn, int64_t C, int64_t s0, int64_t s1,
                     acc_t* __restrict p1, acc_t* __restrict p2) {
  const scalar_t* __restrict k = xn;
  for (int64_t s = s0; s < s1; ++s) {
    const scalar_t* __restrict xr = xn + s * C;
    prefetch_ahead(xr, C);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = ld(xr[c]) - ld(k[c]);
      p1[c] += d;
      p2[c] += d * d;
    }
  }
}

// Block partials (nblocks, C) of one sample -> its groups' mean/rstd (Chan's formula in double)
// and the per-channel affine coefficients y = x * a + bc.
template <typename scalar_t, typename acc_t>
void nhwc_finish_stats(const scalar_t* xn, const double* part1, const double* part2,
                       int64_t nblocks, int64_t S, int64_t C, int64_t G, double eps,
                       const acc_t* w, const acc_t* b, acc_t* mean_n, acc_t* rstd_n, acc_t* a,
                       acc_t* bc) {
  const int64_t Cg = C / G;
  std::vector<double> mc(Cg), m2c(Cg);
  for (int64_t g = 0; g < G; ++g) {
    double gm = 0;
    for (int64_t cc = 0; cc < Cg; ++cc) {
      const int64_t c = g * Cg + cc;
      double S1 = 0, S2 = 0;
      for (int64_t k = 0; k < nblocks; ++k) {
        S1 += part1[k * C + c];
        S2 += part2[k * C + c];
      }
      mc[cc] = static_cast<double>(ld(xn[c])) + S1 / S;
      m2c[cc] = std::max(S2 - S1 * S1 / S, 0.0);  // keeps NaN, see fwd_nchw
      gm += mc[cc];
    }
    gm /= Cg;
    double m2 = 0;
    for (int64_t cc = 0; cc < Cg; ++cc) {
      const double d = mc[cc] - gm;
      m2 += m2c[cc] + S * d * d;
    }
    const acc_t rs = static_cast<acc_t>(1.0 / std::sqrt(m2 / (Cg * S) + eps));
    const acc_t m = static_cast<acc_t>(gm);
    mean_n[g] = m;
    rstd_n[g] = rs;
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
      a[c] = rs * w[c];
      bc[c] = b[c] - m * a[c];
    }
  }
}

// y over rows [s0, s1) of one sample.
template <int A, bool R, typename scalar_t, typename acc_t>
void nhwc_apply_rows(const scalar_t* xn, const scalar_t* rn, scalar_t* yn, int64_t C, int64_t s0,
                     int64_t s1, const acc_t* a, const acc_t* bc, bool stream, bool prefetch) {
  for (int64_t s = s0; s < s1; ++s) {
    if (prefetch) {
      prefetch_ahead(xn + s * C, C);
      if constexpr (R) prefetch_ahead(rn + s * C, C);
    }
    apply_row_vec<A, R>(xn + s * C, R ? rn + s * C : nullptr, yn + s * C, C, a, bc, stream);
  }
}

template <int A, bool R, typename scalar_t>
void fwd_nhwc(const scalar_t* x, const scalar_t* r, const at::opmath_type<scalar_t>* w,
              const at::opmath_type<scalar_t>* b, scalar_t* y, at::opmath_type<scalar_t>* mean,
              at::opmath_type<scalar_t>* rstd, int64_t N, int64_t C, int64_t S, int64_t G,
              double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = rows_per_chunk(C);
  const int64_t SC = S * C;
  const bool stream = nhwc_streams<scalar_t>(N, S, C);
  const NhwcPlan plan = nhwc_plan(N, SC * static_cast<int64_t>(sizeof(scalar_t)) * (R ? 2 : 1));
  // coef: a (C), bc (C) with y = act(x * a + bc (+ r))
  nhwc_two_sweeps<acc_t>(
      plan, N, S, C, rows, 2, 0, [&](int64_t, acc_t*) {},
      [&](int64_t n, int64_t s0, int64_t s1, acc_t* p1, acc_t* p2, const acc_t*, acc_t*) {
        nhwc_stats_rows(x + n * SC, C, s0, s1, p1, p2);
      },
      [&](int64_t n, const double* q1, const double* q2, int64_t nblocks, acc_t* coef) {
        nhwc_finish_stats(x + n * SC, q1, q2, nblocks, S, C, G, eps, w, b, mean + n * G,
                          rstd + n * G, coef, coef + C);
      },
      [&](int64_t n, int64_t s0, int64_t s1, const acc_t* coef, acc_t*, bool prefetch) {
        nhwc_apply_rows<A, R>(x + n * SC, R ? r + n * SC : nullptr, y + n * SC, C, s0, s1, coef,
                              coef + C, stream, prefetch);
      });
}


// ---------------------------------------------------------------- backward, NCHW
// ds/db: (N, C) per-(n, c) partial sums of dz * xhat and dz, for dw/db and for c1/c2.
template <int A, bool R, typename scalar_t>
void bwd_nchw(const scalar_t* dy, const scalar_t* x, const scalar_t* r,
              const at::opmath_type<scalar_t>* w, const at::opmath_type<scalar_t>* b,
              const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* rstd,
              scalar_t* dx, scalar_t* dz_out, double* ds, double* db, int64_t N, int64_t C,
              int64_t S, int64_t G) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Cg = C / G;
  const int64_t M = Cg * S;
  const bool stream = use_streaming_stores<scalar_t>(N * C * S);
  parallel_tasks(N * G, N * C * S, [&](const auto& next_task) {
    // With an activation, dz = dy * act'(z) of one group is kept (in L2) between the two passes
    // instead of being recomputed: act' costs an exp per element.
    std::vector<acc_t> dzbuf(A != kNone ? M : 0);
    for (int64_t ng = next_task(); ng >= 0; ng = next_task()) {
      const int64_t n = ng / G, g = ng % G;
      const acc_t m = mean[ng], rs = rstd[ng];
      double sum1 = 0, sum2 = 0;  // sum_c w_c * ds_c, sum_c w_c * db_c
      for (int64_t cc = 0; cc < Cg; ++cc) {
        const int64_t c = g * Cg + cc;
        const int64_t off = ng * M + cc * S;
        const scalar_t* xr = x + off;
        const scalar_t* dyr = dy + off;
        const scalar_t* rr = R ? r + off : nullptr;
        const acc_t a = rs * w[c];
        const acc_t bb = b[c] - m * a;
        acc_t* __restrict dzb = A != kNone ? dzbuf.data() + cc * S : nullptr;
        double dsc = 0, dbc = 0;
        for (int64_t i0 = 0; i0 < S; i0 += kBlock) {
          const int64_t e = std::min(S, i0 + kBlock);
          acc_t s_ds = 0, s_db = 0;
#pragma omp simd reduction(+ : s_ds, s_db)
          for (int64_t i = i0; i < e; ++i) {
            const acc_t xv = ld(xr[i]);
            acc_t dz = ld(dyr[i]);
            if constexpr (A != kNone) {
              acc_t z = xv * a + bb;
              if constexpr (R) z += ld(rr[i]);
              dz *= act_grad<A>(z);
              dzb[i] = dz;
            }
            s_ds += dz * (xv - m);
            s_db += dz;
          }
          dsc += s_ds;
          dbc += s_db;
        }
        dsc *= rs;
        ds[n * C + c] = dsc;
        db[n * C + c] = dbc;
        sum1 += static_cast<double>(w[c]) * dsc;
        sum2 += static_cast<double>(w[c]) * dbc;
      }
      const double c1 = sum1 / M;  // mean(dz * w * xhat)
      const double c2 = sum2 / M;  // mean(dz * w)
      const acc_t B = static_cast<acc_t>(-static_cast<double>(rs) * rs * c1);
      const acc_t D = static_cast<acc_t>(-rs * c2);
      for (int64_t cc = 0; cc < Cg; ++cc) {
        const int64_t c = g * Cg + cc;
        const int64_t off = ng * M + cc * S;
        const scalar_t* xr = x + off;
        const scalar_t* dyr = dy + off;
        const scalar_t* rr = R ? r + off : nullptr;
        scalar_t* dxr = dx + off;
        scalar_t* dzr = dz_out ? dz_out + off : nullptr;
        const acc_t a = rs * w[c];
        if constexpr (A != kNone) {
          const acc_t* __restrict dzb = dzbuf.data() + cc * S;
          if (dzr != nullptr) {
#pragma omp simd
            for (int64_t i = 0; i < S; ++i) dzr[i] = st<scalar_t>(dzb[i]);
          }
          write_row(dxr, S, stream, [&](scalar_t* __restrict out, int64_t i0, auto cnt) {
#pragma omp simd
            for (int64_t j = 0; j < cnt; ++j) {
              const int64_t i = i0 + j;
              out[j] = st<scalar_t>(a * dzb[i] + B * (ld(xr[i]) - m) + D);
            }
          });
        } else {
          write_row(dxr, S, stream, [&](scalar_t* __restrict out, int64_t i0, auto cnt) {
#pragma omp simd
            for (int64_t j = 0; j < cnt; ++j) {
              const int64_t i = i0 + j;
              out[j] = st<scalar_t>(a * ld(dyr[i]) + B * (ld(xr[i]) - m) + D);
            }
          });
        }
      }
    }
  });
}

// ---------------------------------------------------------------- backward, NHWC
// Per-sample coefficients: z = x * a + bz (pre-activation), dx = a * dz + B * (x - mc) + D.
template <typename acc_t>
void nhwc_bwd_coef(const acc_t* w, const acc_t* b, const acc_t* mean_n, const acc_t* rstd_n,
                   int64_t C, int64_t G, acc_t* a, acc_t* bz, acc_t* mc) {
  const int64_t Cg = C / G;
  for (int64_t c = 0; c < C; ++c) {
    mc[c] = mean_n[c / Cg];
    a[c] = rstd_n[c / Cg] * w[c];
    bz[c] = b[c] - mean_n[c / Cg] * a[c];
  }
}

// dz = dy * act'(z) at channel c of one NHWC row, z = x * a + bz (+ r) the pre-activation.
template <int A, bool R, typename scalar_t, typename acc_t>
GN_INLINE acc_t nhwc_dz(acc_t xv, const scalar_t* dyr, const scalar_t* rr, const acc_t* a,
                        const acc_t* bz, int64_t c) {
  acc_t dz = ld(dyr[c]);
  if constexpr (A != kNone) {
    acc_t z = xv * a[c] + bz[c];
    if constexpr (R) z += ld(rr[c]);
    dz *= act_grad<A>(z);
  }
  return dz;
}

// Adds the per-channel sums of dz * (x - mean) and dz over rows [s0, s1) of one sample to p1, p2
// (one row per step, as nhwc_stats_rows). With DZ (an activation, cached plan), dz is also
// stored in dzb (indexed like the sample) so that the output pass does not compute act' again.
template <int A, bool R, bool DZ, typename scalar_t, typename acc_t>
void nhwc_bwd_stats_rows(const scalar_t* xn, const scalar_t* dyn, const scalar_t* rn, int64_t C,
                         int64_t s0, int64_t s1, const acc_t* __restrict a,
                         const acc_t* __restrict bz, const acc_t* __restrict mc,
                         acc_t* __restrict dzb, acc_t* __restrict p1, acc_t* __restrict p2) {
  for (int64_t s = s0; s < s1; ++s) {
    const scalar_t* __restrict xr = xn + s * C;
    const scalar_t* __restrict dyr = dyn + s * C;
    const scalar_t* __restrict rr = R ? rn + s * C : nullptr;
    acc_t* __restrict dzr = DZ ? dzb + s * C : nullptr;
    prefetch_ahead(xr, C);
    prefetch_ahead(dyr, C);
    if constexpr (R) prefetch_ahead(rr, C);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const acc_t xv = ld(xr[c]);
      const acc_t dz = nhwc_dz<A, R>(xv, dyr, rr, a, bz, c);
      if constexpr (DZ) dzr[c] = dz;
      p1[c] += dz * (xv - mc[c]);
      p2[c] += dz;
    }
  }
}

// Block partials -> ds/db of sample n (double, kept for dw/db) and the dx coefficients B, D.
template <typename acc_t>
void nhwc_bwd_finish(const double* part1, const double* part2, int64_t nblocks, int64_t S,
                     int64_t C, int64_t G, const acc_t* w, const acc_t* mean_n,
                     const acc_t* rstd_n, double* ds_n, double* db_n, acc_t* Bc, acc_t* Dc) {
  const int64_t Cg = C / G;
  for (int64_t c = 0; c < C; ++c) {
    double S1 = 0, S2 = 0;
    for (int64_t k = 0; k < nblocks; ++k) {
      S1 += part1[k * C + c];
      S2 += part2[k * C + c];
    }
    ds_n[c] = S1 * static_cast<double>(rstd_n[c / Cg]);
    db_n[c] = S2;
  }
  for (int64_t g = 0; g < G; ++g) {
    const double rs = rstd_n[g];
    double sum1 = 0, sum2 = 0;
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
      sum1 += static_cast<double>(w[c]) * ds_n[c];
      sum2 += static_cast<double>(w[c]) * db_n[c];
    }
    const double c1 = sum1 / (Cg * S), c2 = sum2 / (Cg * S);
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
      Bc[c] = static_cast<acc_t>(-rs * rs * c1);
      Dc[c] = static_cast<acc_t>(-rs * c2);
    }
  }
}

// dx (and dz_out, the residual's gradient) over rows [s0, s1) of one sample; dz from dzb when
// the statistics pass stored it (DZ), else recomputed from dy.
template <int A, bool R, bool DZ, typename scalar_t, typename acc_t>
void nhwc_bwd_apply_rows(const scalar_t* xn, const scalar_t* dyn, const scalar_t* rn,
                          const acc_t* dzb, scalar_t* dxn, scalar_t* dzn, int64_t C, int64_t s0,
                          int64_t s1, const acc_t* __restrict a,
                          const acc_t* __restrict bz, const acc_t* __restrict mc,
                          const acc_t* __restrict Bc, const acc_t* __restrict Dc, bool stream,
                          bool prefetch) {
  for (int64_t s = s0; s < s1; ++s) {
    const scalar_t* __restrict xr = xn + s * C;
    const scalar_t* __restrict dyr = dyn + s * C;
    const scalar_t* __restrict rr = R ? rn + s * C : nullptr;
    const acc_t* __restrict dzr = DZ ? dzb + s * C : nullptr;
    scalar_t* __restrict dxr = dxn + s * C;
    if (prefetch) {
      prefetch_ahead(xr, C);
      if constexpr (!DZ) prefetch_ahead(dyr, C);
      if constexpr (R) prefetch_ahead(rr, C);
    }
    const auto dz_at = [&](acc_t xv, int64_t c) GN_INLINE_LAMBDA {
      if constexpr (DZ) return dzr[c];
      else return nhwc_dz<A, R>(xv, dyr, rr, a, bz, c);
    };
    if (dzn != nullptr) {
      scalar_t* __restrict dzo = dzn + s * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const acc_t xv = ld(xr[c]);
        const acc_t dz = dz_at(xv, c);
        dzo[c] = st<scalar_t>(dz);
        dxr[c] = st<scalar_t>(a[c] * dz + Bc[c] * (xv - mc[c]) + Dc[c]);
      }
    } else {
      write_row(dxr, C, stream, [&](scalar_t* __restrict out, int64_t i0, auto cnt) {
#pragma omp simd
        for (int64_t j = 0; j < cnt; ++j) {
          const int64_t c = i0 + j;
          const acc_t xv = ld(xr[c]);
          const acc_t dz = dz_at(xv, c);
          out[j] = st<scalar_t>(a[c] * dz + Bc[c] * (xv - mc[c]) + Dc[c]);
        }
      });
    }
  }
}

template <int A, bool R, typename scalar_t>
void bwd_nhwc(const scalar_t* dy, const scalar_t* x, const scalar_t* r,
              const at::opmath_type<scalar_t>* w, const at::opmath_type<scalar_t>* b,
              const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* rstd,
              scalar_t* dx, scalar_t* dz_out, double* ds, double* db, int64_t N, int64_t C,
              int64_t S, int64_t G) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = rows_per_chunk(C);
  const int64_t SC = S * C;
  const bool stream = nhwc_streams<scalar_t>(N, S, C);
  const NhwcPlan plan = nhwc_plan(N, SC * static_cast<int64_t>(sizeof(scalar_t)) * (R ? 3 : 2));
  // coef: a, bz, mc (from the saved statistics), then Bc, Dc (from the chunk sums), C each
  nhwc_two_sweeps<acc_t>(
      plan, N, S, C, rows, 5, A != kNone ? SC : 0,
      [&](int64_t n, acc_t* coef) {
        nhwc_bwd_coef(w, b, mean + n * G, rstd + n * G, C, G, coef, coef + C, coef + 2 * C);
      },
      [&](int64_t n, int64_t s0, int64_t s1, acc_t* p1, acc_t* p2, const acc_t* coef,
          acc_t* dzb) {
        const int64_t o = n * SC;
        const auto run = [&](auto dz) {
          nhwc_bwd_stats_rows<A, R, decltype(dz)::value>(
              x + o, dy + o, R ? r + o : nullptr, C, s0, s1, coef, coef + C, coef + 2 * C, dzb,
              p1, p2);
        };
        if constexpr (A != kNone) {
          if (dzb != nullptr) return run(std::true_type{});
        }
        run(std::false_type{});
      },
      [&](int64_t n, const double* q1, const double* q2, int64_t nblocks, acc_t* coef) {
        nhwc_bwd_finish(q1, q2, nblocks, S, C, G, w, mean + n * G, rstd + n * G, ds + n * C,
                        db + n * C, coef + 3 * C, coef + 4 * C);
      },
      [&](int64_t n, int64_t s0, int64_t s1, const acc_t* coef, acc_t* dzb, bool prefetch) {
        const int64_t o = n * SC;
        const auto run = [&](auto dz) {
          nhwc_bwd_apply_rows<A, R, decltype(dz)::value>(
              x + o, dy + o, R ? r + o : nullptr, dzb, dx + o, dz_out ? dz_out + o : nullptr, C,
              s0, s1, coef, coef + C, coef + 2 * C, coef + 3 * C, coef + 4 * C, stream,
              prefetch);
        };
        if constexpr (A != kNone) {
          if (dzb != nullptr) return run(std::true_type{});
        }
        run(std::false_type{});
      });
}


// Calls F<A, R>() for the runtime activation code and residual flag.
template <typename F>
void dispatch_act(int64_t act, bool has_res, F&& f) {
  TORCH_CHECK(act >= 0 && act <= 3, "groupnorm_cpu: activation code ", act, " not in 0..3");
#define GN_CASE(A)                                          \
  if (act == A) {                                           \
    if (has_res) f(std::integral_constant<int, A>{}, std::true_type{}); \
    else f(std::integral_constant<int, A>{}, std::false_type{});        \
    return;                                                 \
  }
  GN_CASE(kNone) GN_CASE(kRelu) GN_CASE(kSilu) GN_CASE(kGelu)
#undef GN_CASE
}

void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t G,
                  bool cl) {
  TORCH_CHECK(x.device().is_cpu(), "groupnorm_cpu: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 2, "groupnorm_cpu: x must be (N, C, *spatial), got ", x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK(G > 0 && C % G == 0, "groupnorm_cpu: C (", C, ") not divisible by G (", G, ")");
  const auto fmt = !cl ? at::MemoryFormat::Contiguous
                       : (x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                       : at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(x.is_contiguous(fmt), "groupnorm_cpu: x is not dense in the layout asked for");
  TORCH_CHECK(w.numel() == C && b.numel() == C && w.is_contiguous() && b.is_contiguous(),
              "groupnorm_cpu: weight/bias must be contiguous with C (", C, ") elements");
  TORCH_CHECK(w.scalar_type() == at::toOpMathType(x.scalar_type()) &&
                  b.scalar_type() == w.scalar_type(),
              "groupnorm_cpu: weight/bias must be in the op-math dtype of x");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_fwd(const at::Tensor& x, const at::Tensor& w,
                                                      const at::Tensor& b,
                                                      const std::optional<at::Tensor>& residual,
                                                      int64_t G, double eps, int64_t act,
                                                      bool cl) {
  check_inputs(x, w, b, G, cl);
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = C == 0 || N == 0 ? 0 : x.numel() / (N * C);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->strides() == x.strides() &&
                    residual->scalar_type() == x.scalar_type(),
                "groupnorm_cpu: residual must match x in shape, strides and dtype");
  }
  at::Tensor y = at::empty_like(x);
  const auto stat_opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
  at::Tensor mean = at::empty({N, G}, stat_opts.memory_format(at::MemoryFormat::Contiguous));
  at::Tensor rstd = at::empty({N, G}, stat_opts.memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return {y, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gn_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* rp = has_res ? residual->const_data_ptr<scalar_t>() : nullptr;
    dispatch_act(act, has_res, [&](auto A, auto R) {
      auto fn = cl ? fwd_nhwc<decltype(A)::value, decltype(R)::value, scalar_t>
                   : fwd_nchw<decltype(A)::value, decltype(R)::value, scalar_t>;
      fn(x.const_data_ptr<scalar_t>(), rp, w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
         y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(),
         rstd.mutable_data_ptr<acc_t>(), N, C, S, G, eps);
    });
  });
  return {y, mean, rstd};
}

// Returns (dx, dw, db, dz); dz is empty unless need_dz (the residual's gradient when an
// activation is fused; without one it is dy itself).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gn_bwd(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
    const std::optional<at::Tensor>& residual, const at::Tensor& mean, const at::Tensor& rstd,
    int64_t G, int64_t act, bool cl, bool need_dz) {
  check_inputs(x, w, b, G, cl);
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = C == 0 || N == 0 ? 0 : x.numel() / (N * C);
  const bool has_res = residual.has_value() && residual->defined() && act != kNone;
  const auto fmt = !cl ? at::MemoryFormat::Contiguous
                       : (x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                       : at::MemoryFormat::ChannelsLast);
  const at::Tensor dy = dy_in.contiguous(fmt);
  TORCH_CHECK(dy.strides() == x.strides(), "groupnorm_cpu: dy must match x's layout");
  if (has_res) {
    TORCH_CHECK(residual->strides() == x.strides(), "groupnorm_cpu: residual must match x");
  }
  at::Tensor dx = at::empty_like(x);
  at::Tensor dz = need_dz ? at::empty_like(x) : at::empty({0}, x.options());
  const auto dopts = x.options().dtype(at::kDouble).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor ds = at::empty({N, C}, dopts), dbs = at::empty({N, C}, dopts);
  at::Tensor dw = at::empty({C}, w.options()), db = at::empty({C}, w.options());
  if (x.numel() == 0) return {dx, dw.zero_(), db.zero_(), dz};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gn_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* rp = has_res ? residual->const_data_ptr<scalar_t>() : nullptr;
    dispatch_act(act, has_res, [&](auto A, auto R) {
      auto fn = cl ? bwd_nhwc<decltype(A)::value, decltype(R)::value, scalar_t>
                   : bwd_nchw<decltype(A)::value, decltype(R)::value, scalar_t>;
      fn(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), rp,
         w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(),
         rstd.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(),
         need_dz ? dz.mutable_data_ptr<scalar_t>() : nullptr, ds.mutable_data_ptr<double>(),
         dbs.mutable_data_ptr<double>(), N, C, S, G);
    });
    // dw_c = sum_n ds, db_c = sum_n db: fixed order over n.
    const double* dsp = ds.const_data_ptr<double>();
    const double* dbp = dbs.const_data_ptr<double>();
    acc_t* dwp = dw.mutable_data_ptr<acc_t>();
    acc_t* dbo = db.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      double sw = 0, sb = 0;
      for (int64_t n = 0; n < N; ++n) {
        sw += dsp[n * C + c];
        sb += dbp[n * C + c];
      }
      dwp[c] = static_cast<acc_t>(sw);
      dbo[c] = static_cast<acc_t>(sb);
    }
  });
  return {dx, dw, db, dz};
}

}  // namespace

// The cache sizes the kernels plan with, in bytes: {L3 (0: unknown), streaming-store threshold,
// NHWC slab budget}, after the environment overrides (benchmarks record them; tests check them).
std::vector<int64_t> cache_config() {
  return {l3_cache_bytes(), stream_min_bytes(), slab_cache_bytes()};
}

TORCH_LIBRARY(groupnorm_cpu, m) {
  m.def("cache_config() -> int[]", &cache_config);
  m.def("fwd(Tensor x, Tensor weight, Tensor bias, Tensor? residual, int G, float eps, int act, "
        "bool channels_last) -> (Tensor, Tensor, Tensor)");
  m.def("bwd(Tensor dy, Tensor x, Tensor weight, Tensor bias, Tensor? residual, Tensor mean, "
        "Tensor rstd, int G, int act, bool channels_last, bool need_dz) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(groupnorm_cpu, CPU, m) {
  m.impl("fwd", &gn_fwd);
  m.impl("bwd", &gn_bwd);
}
