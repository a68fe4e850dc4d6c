// Weight-only fp16 / bf16 / int8 linear layer for MindSpore ops.Custom(func_type="aot") on CPU
// (visual_mllm.cpu_kernels builds it with g++ on first use; layers.Linear calls it at inference).
//   y[M, N] (fp32) = x[M, K] (fp32) . W[N, K]^T  (* scale[N] for int8)
// Portable build: no -march flags needed.  On x86-64 AVX-512 and AVX2+FMA+F16C code paths are compiled
// via "#pragma GCC target" regions and chosen at run time (__builtin_cpu_supports); everything else
// (aarch64, old x86) uses a GCC-vector-extension path (NEON / SSE2).
// always_inline: the small SIMD helpers must inline whatever the optimisation flags.
#define WQ_INLINE __attribute__((always_inline)) inline
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define WQ_X86 1
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif



namespace wq {

struct f16_t { uint16_t v; };
struct bf16_t { uint16_t v; };

static int64_t wq_kc() {   // K-block for the M > MR path; default 0 = off (blocking to L1 measured no faster). Env WQ_KC.
  static int64_t v = [] { const char *e = std::getenv("WQ_KC"); long long k = e ? std::atoll(e) : 0; return (int64_t)(k <= 0 ? (1ll << 40) : k); }();
  return v;
}
static inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline float to_f32(float v) { return v; }
static inline float to_f32(int8_t v) { return (float)v; }
static inline float to_f32(bf16_t v) { return bits_f32((uint32_t)v.v << 16); }
static inline float to_f32(f16_t v) {
#if defined(__aarch64__)
  __fp16 h; std::memcpy(&h, &v.v, 2); return (float)h;   // fcvt, vectorises to fcvtl
#else
  // branch-free IEEE half -> float (handles subnormals, inf, nan)
  uint32_t h = v.v, sign = (h & 0x8000u) << 16, em = h & 0x7fffu;
  float mag = bits_f32(em << 13) * 0x1p112f;
  uint32_t r = em >= 0x7c00u ? (0x7f800000u | (em << 13)) : 0u;
  uint32_t mb; std::memcpy(&mb, &mag, 4);
  return bits_f32(sign | (r ? r : mb));
#endif
}

// ---------------------------------------------------------------- generic (NEON / SSE2) path
namespace generic {
struct V {
  typedef float reg __attribute__((vector_size(16)));
  typedef uint32_t ureg __attribute__((vector_size(16)));
  typedef int32_t ireg __attribute__((vector_size(16)));
  static constexpr int W = 4, MR = 4, MR_WIDE = 4, NR = 4, NR8 = 4;
  static WQ_INLINE reg zero() { return reg{0.f, 0.f, 0.f, 0.f}; }
  static WQ_INLINE reg loadx(const float *p) { reg r; std::memcpy(&r, p, sizeof r); return r; }
  static WQ_INLINE reg loadw(const float *p) { return loadx(p); }
#if defined(__aarch64__)
  // baseline ARMv8-A NEON: fcvtl / ushll / sxtl+scvtf
  static WQ_INLINE reg loadw(const f16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)p))); }
  static WQ_INLINE reg loadw(const bf16_t *p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16((const uint16_t *)p), 16)); }
  static WQ_INLINE reg loadw(const int8_t *p) {
    int8x8_t b = vreinterpret_s8_u32(vdup_n_u32(0));
    int32_t t; std::memcpy(&t, p, 4);
    b = vreinterpret_s8_s32(vset_lane_s32(t, vreinterpret_s32_s8(b), 0));
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(b))));
  }
#else
  // portable integer-vector conversions (SSE2 on old x86, or any other target)
  static WQ_INLINE ureg load_u16x4(const void *p) {
    uint16_t t[4]; std::memcpy(t, p, 8); return ureg{t[0], t[1], t[2], t[3]};
  }
  static WQ_INLINE reg loadw(const f16_t *p) {
    ureg h = load_u16x4(p), sign = (h & 0x8000u) << 16, em = h & 0x7fffu;
    reg mag = (reg)(em << 13) * 0x1p112f;
    ureg special = (ureg)(em >= 0x7c00u);                 // inf / nan lanes: all-ones mask
    ureg bits = ((ureg)mag & ~special) | ((0x7f800000u | (em << 13)) & special) | sign;
    return (reg)bits;
  }
  static WQ_INLINE reg loadw(const bf16_t *p) { return (reg)(load_u16x4(p) << 16); }
  static WQ_INLINE reg loadw(const int8_t *p) {
    return __builtin_convertvector((ireg{p[0], p[1], p[2], p[3]}), reg);
  }
#endif
  static WQ_INLINE void storeu(float *p, reg v) { std::memcpy(p, &v, sizeof v); }
  static WQ_INLINE reg fma(reg a, reg b, reg c) { return a * b + c; }
  static WQ_INLINE float hsum(reg v) { return (v[0] + v[2]) + (v[1] + v[3]); }
};
#include "weight_only_kernel.inc"
}  // namespace generic

#ifdef WQ_X86
// ---------------------------------------------------------------- AVX2 + FMA + F16C path
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
struct V {
  typedef __m256 reg;
  static constexpr int W = 8, MR = 4, MR_WIDE = 2, NR = 4, NR8 = 3;  // 4x3 tile = 12 acc of 16 ymm
  static WQ_INLINE reg zero() { return _mm256_setzero_ps(); }
  static WQ_INLINE reg loadx(const float *p) { return _mm256_loadu_ps(p); }
  static WQ_INLINE reg loadw(const float *p) { return _mm256_loadu_ps(p); }
  static WQ_INLINE reg loadw(const f16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
  static WQ_INLINE reg loadw(const bf16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
  }
  static WQ_INLINE reg loadw(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
  }
  static WQ_INLINE void storeu(float *p, reg v) { _mm256_storeu_ps(p, v); }
  static WQ_INLINE reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static WQ_INLINE float hsum(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#include "weight_only_kernel.inc"
}  // namespace avx2
#pragma GCC pop_options

// ---------------------------------------------------------------- AVX-512F path
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
namespace avx512 {
struct V {
  typedef __m512 reg;
  static constexpr int W = 16, MR = 4, MR_WIDE = 4, NR = 4, NR8 = 4;
  static WQ_INLINE reg zero() { return _mm512_setzero_ps(); }
  static WQ_INLINE reg loadx(const float *p) { return _mm512_loadu_ps(p); }
  static WQ_INLINE reg loadw(const float *p) { return _mm512_loadu_ps(p); }
  static WQ_INLINE reg loadw(const f16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
  static WQ_INLINE reg loadw(const bf16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
  }
  static WQ_INLINE reg loadw(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
  }
  static WQ_INLINE void storeu(float *p, reg v) { _mm512_storeu_ps(p, v); }
  static WQ_INLINE reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static WQ_INLINE float hsum(reg v) { return _mm512_reduce_add_ps(v); }
};
#include "weight_only_kernel.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif  // WQ_X86

// ---------------------------------------------------------------- dispatch + threading
enum Isa { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

static int detect_isa() {
  const char *e = std::getenv("WQ_ISA");
  int best = ISA_GENERIC;
#ifdef WQ_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    best = ISA_AVX2;
  if (best == ISA_AVX2 && __builtin_cpu_supports("avx512f")) best = ISA_AVX512;
#endif
  if (e) {
    int want = !std::strcmp(e, "avx512") ? ISA_AVX512 : !std::strcmp(e, "avx2") ? ISA_AVX2 : ISA_GENERIC;
    if (want < best) best = want;
  }
  return best;
}
static int isa() { static int v = detect_isa(); return v; }

static int num_threads() {
  const char *e = std::getenv("WQ_NUM_THREADS");   // default: every core (read every call: cheap)
  int n = e ? std::atoi(e) : (int)std::thread::hardware_concurrency();
  return n < 1 ? 1 : (n > 64 ? 64 : n);
}

// Split rows [0, N) into nt contiguous chunks aligned to `align` rows; run f(n0, n1) on each.
template <class F>
static void parallel_rows(int64_t N, int64_t align, int64_t min_rows, F &&f) {
  int64_t nt = std::min<int64_t>(num_threads(), std::max<int64_t>(1, N / std::max<int64_t>(min_rows, 1)));
  if (nt <= 1) { f((int64_t)0, N); return; }
  int64_t units = (N + align - 1) / align;
  auto bound = [&](int64_t t) { return std::min<int64_t>(N, (units * t / nt) * align); };
  std::vector<std::thread> th;
  th.reserve(nt - 1);
  for (int64_t t = 1; t < nt; ++t) th.emplace_back([&, t] { f(bound(t), bound(t + 1)); });
  f(bound(0), bound(1));
  for (auto &t : th) t.join();
}

template <class T>
static void gemm(const float *x, int64_t M, int64_t K, const T *w, const float *scale, float *y, int64_t N) {
  // ~64k weight elements per thread minimum so tiny layers stay single-threaded
  int64_t min_rows = std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1));
  switch (isa()) {
#ifdef WQ_X86
    case ISA_AVX512:
      parallel_rows(N, 16, min_rows, [&](int64_t a, int64_t b) { avx512::gemm_range<T>(x, M, K, w, scale, y, N, a, b); });
      return;
    case ISA_AVX2:
      parallel_rows(N, 16, min_rows, [&](int64_t a, int64_t b) { avx2::gemm_range<T>(x, M, K, w, scale, y, N, a, b); });
      return;
#endif
    default:
      parallel_rows(N, 16, min_rows, [&](int64_t a, int64_t b) { generic::gemm_range<T>(x, M, K, w, scale, y, N, a, b); });
  }
}

static int64_t numel(int nd, const int64_t *s) { int64_t n = 1; for (int i = 0; i < nd; ++i) n *= s[i]; return n; }

}  // namespace wq

extern "C" {

// Inputs: x float32 [..., K]; w [N, K] float16 | bfloat16 | int8 | float32; (int8 only) scale float32 [N].
// Output: y float32 [..., N].   Returns 0 on success, non-zero on bad arguments.
int WqLinear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
             void *extra) {
  (void)stream; (void)extra;
  using namespace wq;
  if (nparam != 3 && nparam != 4) return 1;
  const int out = nparam - 1;
  if (std::strcmp(dtypes[0], "float32") != 0 || std::strcmp(dtypes[out], "float32") != 0) return 2;
  if (ndims[0] < 1 || ndims[1] != 2) return 3;
  const int64_t K = shapes[0][ndims[0] - 1], M = numel(ndims[0] - 1, shapes[0]);
  const int64_t N = shapes[1][0];
  if (shapes[1][1] != K || numel(ndims[out], shapes[out]) != M * N) return 4;
  const float *x = (const float *)params[0];
  float *y = (float *)params[out];
  const float *scale = nullptr;
  if (nparam == 4) {
    if (std::strcmp(dtypes[2], "float32") != 0 || numel(ndims[2], shapes[2]) != N) return 5;
    scale = (const float *)params[2];
  }
  const char *wt = dtypes[1];
  if (!std::strcmp(wt, "float16")) gemm(x, M, K, (const f16_t *)params[1], scale, y, N);
  else if (!std::strcmp(wt, "bfloat16")) gemm(x, M, K, (const bf16_t *)params[1], scale, y, N);
  else if (!std::strcmp(wt, "int8")) gemm(x, M, K, (const int8_t *)params[1], scale, y, N);
  else if (!std::strcmp(wt, "float32")) gemm(x, M, K, (const float *)params[1], scale, y, N);
  else return 6;
  return 0;
}

}  // extern "C"
