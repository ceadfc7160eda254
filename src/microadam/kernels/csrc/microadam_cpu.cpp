// One MicroAdam step on a CPU tensor: the same arithmetic as microadam.functional.microadam_step
// (impl="torch"), operation by operation in float32, so that state and parameters come out bit for
// bit identical (tests/test_cpu_kernel.py compares every bit after every step). Built by
// microadam/kernels/cpu.py with plain g++ (no torch headers; about 1 s) and called through ctypes
// with raw pointers.
//
// Work is cut into units of lcm(block, quant_block, 2) elements (a unit holds whole Top-K blocks,
// whole quantization blocks and whole code bytes), one unit per loop iteration, units in parallel
// with OpenMP (torch's own OpenMP runtime: libgomp is found by its soname, already loaded by torch).
// A unit's float32 working copy stays in L1 through every phase:
//   1. a = g + dequant(codes)
//   2. exact Top-K of |a| per block, write the window slot, zero the selected entries
//   3. re-quantize a per quantization block, pack the codes
//   4. moments of the block from the window, u, parameter update
// while the next unit's data is prefetched into L2 (see run_unit).
//
// Why each choice:
// - Compiled with -ffp-contract=off: torch computes `codes * scale + lo`, `c1 * m / den`, ... as
//   separate roundings; a fused multiply-add would change the last bit.
// - The square root is torch's own (MKL's vmsSqrt on x86 wheels), passed in by cpu.py: it is not
//   correctly rounded, and a correctly rounded sqrt differs from it in the last bit for ~16% of
//   inputs.
// - Top-K: a threshold below the block's largest magnitude keeps ~k..3k candidates (one vectorized
//   compress pass; the threshold adapts from block to block), then a binary search over the
//   candidates' float bits finds the exact k-th key. Ties at the k-th key go to the lower index,
//   which is block_topk's rule. Any threshold gives the same answer; it only changes the work.
// - Moments are summed into block-local scratch in the torch path's order (slots newest first,
//   entries in index order), which is what scatter_add_ does, so sums are bit-identical.
// - AVX-512 paths (with -march=native on a CPU that has it) and plain loops otherwise; both are
//   tested against the torch path.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__SSE2__)
#include <immintrin.h>
#endif

// Phase counters for benchmarks/cpu_phases.py (built with -DMICROADAM_PROFILE by cpu.py when
// MICROADAM_CPP_PROFILE=1; compiled out otherwise): each thread adds the time since its previous mark
// to the phase that just ended, in TSC ticks on x86 (nanoseconds elsewhere).
#ifdef MICROADAM_PROFILE
#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
static inline uint64_t profile_clock() { return __rdtsc(); }
#else
#include <chrono>
static inline uint64_t profile_clock() {
  return uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}
#endif
enum { PH_LOAD, PH_TOPK, PH_RELEASE, PH_QUANT, PH_MOMENTS, PH_DIVIDE, PH_UPDATE, PH_COUNT, PH_ELEMENTS = 15 };
static uint64_t PROFILE[64][16];
static inline int profile_thread() {
#ifdef _OPENMP
  return omp_get_thread_num() & 63;
#else
  return 0;
#endif
}
// The thread's last mark and row live in its scratch (S, in scope wherever a mark is), not in
// thread-locals: each use of one costs a call to __tls_get_addr in a dlopen-ed library.
#define PROFILE_START(len)                                                  \
  do {                                                                      \
    S.prof_thread = profile_thread();                                       \
    PROFILE[S.prof_thread][PH_ELEMENTS] += uint64_t(len);                   \
    S.prof_last = profile_clock();                                          \
  } while (0)
#define PROFILE_MARK(phase)                                                 \
  do {                                                                      \
    const uint64_t now_ = profile_clock();                                  \
    PROFILE[S.prof_thread][phase] += now_ - S.prof_last;                    \
    S.prof_last = now_;                                                     \
  } while (0)
#else
#define PROFILE_START(len) \
  do {                     \
  } while (0)
#define PROFILE_MARK(phase) \
  do {                      \
  } while (0)
#endif

namespace {

enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

constexpr int LEVELS = 15;
constexpr uint32_t HASH_MUL = 0x045D9F3Bu;

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ------------------------------------------------------------------ conversions (torch's rules)

inline float bf16_to_f(uint16_t h) { return u2f(uint32_t(h) << 16); }

// c10::BFloat16's round-to-nearest-even.
inline uint16_t f_to_bf16(float f) {
  if (f != f) return 0x7FC0;
  uint32_t u = f2u(f);
  return uint16_t((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
}

inline float f16_to_f(uint16_t h) {
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  // Exact widening (c10's fp16_ieee_to_fp32_value).
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = u2f((two_w >> 4) + (0xE0u << 23)) * exp_scale;
  const float denormalized = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = sign | (two_w < (1u << 27) ? f2u(denormalized) : f2u(normalized));
  return u2f(result);
#endif
}

// Round to nearest even, as torch's .to(torch.float16).
inline uint16_t f_to_f16(float f) {
#ifdef __F16C__
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = f2u(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = u2f((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f2u(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
}

template <int D>
inline float load_f(const void* base, int64_t i);
template <>
inline float load_f<F32>(const void* base, int64_t i) {
  return static_cast<const float*>(base)[i];
}
template <>
inline float load_f<BF16>(const void* base, int64_t i) {
  return bf16_to_f(static_cast<const uint16_t*>(base)[i]);
}
template <>
inline float load_f<F16>(const void* base, int64_t i) {
  return f16_to_f(static_cast<const uint16_t*>(base)[i]);
}

// ops/random.py's hash_bits: a 32-bit mixer of (position + key) mod 2**32.
inline uint32_t hash_bits(int64_t pos, uint32_t key) {
  uint32_t x = uint32_t(uint64_t(pos)) + key;
  x ^= x >> 16;
  x *= HASH_MUL;
  x ^= x >> 16;
  x *= HASH_MUL;
  x ^= x >> 16;
  return x;
}

// ops/rounding.py's round_to_dtype: stochastic bf16 adds 16 random bits below the cut and
// truncates; everything else rounds to nearest even.
template <int D>
inline void store_f(void* base, int64_t i, float v, bool stochastic, uint32_t bits);
template <>
inline void store_f<F32>(void* base, int64_t i, float v, bool, uint32_t) {
  static_cast<float*>(base)[i] = v;
}
template <>
inline void store_f<BF16>(void* base, int64_t i, float v, bool stochastic, uint32_t bits) {
  uint16_t out;
  if (stochastic) {
    uint32_t u = (f2u(v) + (bits & 0xFFFFu)) & 0xFFFF0000u;
    out = f_to_bf16(u2f(u));  // exact: the low 16 bits are zero (a NaN stays NaN)
  } else {
    out = f_to_bf16(v);
  }
  static_cast<uint16_t*>(base)[i] = out;
}
template <>
inline void store_f<F16>(void* base, int64_t i, float v, bool, uint32_t) {
  static_cast<uint16_t*>(base)[i] = f_to_f16(v);
}

// ops/quant.py's bf16_floor / bf16_ceil: round to nearest, then step with nextafter's rules.
inline uint16_t bf16_floor(float x) {
  uint16_t y = f_to_bf16(x);
  if (bf16_to_f(y) > x) y = (y & 0x7FFF) == 0 ? 0x8001 : ((y & 0x8000) ? y + 1 : y - 1);
  return y;
}
inline uint16_t bf16_ceil(float x) {
  uint16_t y = f_to_bf16(x);
  if (bf16_to_f(y) < x) y = (y & 0x7FFF) == 0 ? 0x0001 : ((y & 0x8000) ? y - 1 : y + 1);
  return y;
}

// ------------------------------------------------------------------ torch's float32 sqrt

// MKL's vmsSqrt_64(n, in, out, mode) (the variant with a 64-bit n whatever MKL_INT is), with the
// mode torch's aten/src/ATen/cpu/vml.h passes: VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE.
typedef void (*VmlSqrt)(long long n, const float* in, float* out, long long mode);
constexpr long long VML_MODE = 0x2 | 0x140000 | 0x100;

// How to compute torch's sqrt (chosen by cpu.py, which checks the choice against torch.sqrt):
// SQRT_IEEE: the correctly rounded sqrt (torch without MKL); SQRT_MKL: call MKL's vmsSqrt;
// SQRT_RSQRT: the arithmetic of MKL's generic kernel (mkl_vml_kernel_sSqrt_EXHAynn, which MKL runs
// on AMD CPUs): rsqrtps, then one Newton-Raphson/Goldschmidt step and a final correction, each
// multiply and add rounded separately. Same instructions on the same CPU, so the same bits, without
// MKL's cost per call (0.6 us: 2 ms of a 16M-parameter step on 2 threads).
enum SqrtMode : int { SQRT_IEEE = 0, SQRT_MKL = 1, SQRT_RSQRT = 2 };

// SQRT_RSQRT in place; false (x untouched) if some x is outside MKL's fast path, which takes
// positive normal floats up to 0x7f7ff000 (and +0 here, whose square root is +0).
inline bool rsqrt_sqrt(float* x, int64_t n) {
#ifdef __SSE2__
  int64_t i = 0;
#ifdef __AVX2__
  // The range check 8 at a time (a scalar loop with a branch per value was a third of the phase).
  {
    const __m256i bias = _mm256_set1_epi32(int32_t(0x7f800000u)), limit = _mm256_set1_epi32(int32_t(0xfefff000u));
    const __m256i zero = _mm256_setzero_si256();
    for (; i + 8 <= n; i += 8) {
      const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
      const __m256i out = _mm256_andnot_si256(_mm256_cmpeq_epi32(u, zero),
                                              _mm256_cmpgt_epi32(_mm256_add_epi32(u, bias), limit));
      if (!_mm256_testz_si256(out, out)) return false;
    }
  }
#endif
  for (; i < n; ++i) {
    const uint32_t u = f2u(x[i]);
    if (u != 0 && int32_t(u + 0x7f800000u) > int32_t(0xfefff000u)) return false;
  }
  i = 0;
#ifdef __AVX__
  // 8 lanes with the 256-bit rsqrtps: the same approximation per lane as the 128-bit one (checked
  // against torch.sqrt when the library loads, and bit for bit by the tests).
  {
    const __m256 half = _mm256_set1_ps(0.5f), zero = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      const __m256 r = _mm256_rsqrt_ps(v);
      const __m256 g = _mm256_mul_ps(v, r), h = _mm256_mul_ps(r, half);
      const __m256 e = _mm256_sub_ps(half, _mm256_mul_ps(g, h));
      const __m256 g1 = _mm256_add_ps(_mm256_mul_ps(g, e), g);
      const __m256 h1 = _mm256_add_ps(_mm256_mul_ps(e, h), h);
      const __m256 d = _mm256_sub_ps(v, _mm256_mul_ps(g1, g1));
      const __m256 y = _mm256_add_ps(_mm256_mul_ps(d, h1), g1);
      _mm256_storeu_ps(x + i, _mm256_andnot_ps(_mm256_cmp_ps(v, zero, _CMP_EQ_OQ), y));
    }
  }
#endif
  const __m128 half = _mm_set1_ps(0.5f), zero = _mm_setzero_ps();
  auto step = [&](__m128 v) {
    const __m128 r = _mm_rsqrt_ps(v);
    const __m128 g = _mm_mul_ps(v, r), h = _mm_mul_ps(r, half);
    const __m128 e = _mm_sub_ps(half, _mm_mul_ps(g, h));
    const __m128 g1 = _mm_add_ps(_mm_mul_ps(g, e), g);
    const __m128 h1 = _mm_add_ps(_mm_mul_ps(e, h), h);
    const __m128 d = _mm_sub_ps(v, _mm_mul_ps(g1, g1));
    const __m128 y = _mm_add_ps(_mm_mul_ps(d, h1), g1);
    return _mm_andnot_ps(_mm_cmpeq_ps(v, zero), y);  // +0 -> +0 (rsqrt(0) is inf)
  };
  for (; i + 4 <= n; i += 4) _mm_storeu_ps(x + i, step(_mm_loadu_ps(x + i)));
  if (i < n) {
    float buf[4] = {1.f, 1.f, 1.f, 1.f};
    std::memcpy(buf, x + i, sizeof(float) * size_t(n - i));
    _mm_storeu_ps(buf, step(_mm_loadu_ps(buf)));
    std::memcpy(x + i, buf, sizeof(float) * size_t(n - i));
  }
  return true;
#else
  (void)x;
  (void)n;
  return false;
#endif
}

// torch.sqrt of x[0..n), in place, the way `mode` says.
inline void torch_sqrt(float* x, int64_t n, int mode, VmlSqrt vml) {
  if (mode == SQRT_RSQRT && rsqrt_sqrt(x, n)) return;
  if (mode != SQRT_IEEE && vml != nullptr) {
    // Pieces of at most 2**30: an older MKL (torch 2.4's) has only the LP64 vmsSqrt, whose count is
    // a 32-bit int that reads the low half of this 64-bit argument.
    for (int64_t i = 0; i < n; i += (int64_t(1) << 30)) {
      const int64_t m = n - i < (int64_t(1) << 30) ? n - i : (int64_t(1) << 30);
      vml(m, x + i, x + i, VML_MODE);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) x[i] = std::sqrt(x[i]);
  }
}

// ------------------------------------------------------------------ arguments and scratch

struct Args {
  void* param;
  int param_dtype;
  int64_t param_size;  // bytes per element
  int64_t grad_size;
  const void* grad;
  int grad_dtype;
  int16_t* win_idx;   // [window, num_blocks, k]
  uint16_t* win_val;  // bf16 [window, num_blocks, k]
  uint8_t* codes;     // [ceil(n / 2)]
  uint16_t* bounds;   // bf16 [num_quant_blocks, 2]
  int64_t n, block, k, qblock, num_blocks, unit;
  int64_t n_slots;          // valid ring slots, min(step, window)
  const int64_t* slot_of_age;  // [n_slots]
  const float* w1;          // float32(beta1 ** age)
  const float* w2;
  int64_t write_slot;
  float lr, c1, c2, eps, decay;
  bool weight_decay;
  bool release;        // release part of the residual as a dense move (functional.release_move)
  float keep, rscale;  // 1 - release, release_scale
  bool stochastic_error, stochastic_param;
  uint32_t err_key, par_key;
  int64_t position_offset;
  VmlSqrt vml_sqrt;  // MKL's sqrt, or nullptr
  int sqrt_mode;     // SqrtMode
};

// Per-thread buffers, grown on demand and kept across calls: no allocation per block or per step.
struct Scratch {
  std::vector<float> a;          // unit's working copy
  std::vector<uint8_t> c8;       // the unit's new codes, one per byte, before packing
  std::vector<uint32_t> bmax;    // largest |a| bits of each Top-K block of the unit
  std::vector<uint32_t> ckey;    // Top-K candidates: |a| bits
  std::vector<uint32_t> skey;    // kth_largest's narrowing set of candidates
  std::vector<int32_t> cidx;     //                   their block index
  std::vector<uint16_t> gmask16; // candidate mask of each 16-entry group of a block (AVX-512)
  std::vector<uint8_t> gmask;    // candidate mask of each 8-entry group (AVX2), padded to 32 groups
  std::vector<uint16_t> glist;   // 16-entry groups with a candidate (AVX-512)
  std::vector<float> qlo, qscale;  // per quantization block of the unit: min, max, then lo, scale
  std::vector<float> qinv;       // release: per quantization block, mean square, rms, then scale / rms
  std::vector<float> sq;         // release: one block's squares, padded to a power of two
  // The moment accumulators of each position side by side: first moment at 2i (+0 between blocks),
  // second at 2i + 1 (-0 between blocks, see update_block). Interleaved, a window entry touches one
  // cache line of them, not two.
  std::vector<float> mom;
  std::vector<int32_t> sel;      // selected indices of one block
  std::vector<int32_t> uniq;     // distinct window positions of one block, first-seen order
  std::vector<float> root;       // their sqrt(c2 * S)
  std::vector<float> num;        // their c1 * M, then lr * u
  uint32_t dist = 0x00800000u;   // Top-K threshold distance below the max key (adapts)
  // Cache lines still to prefetch: up to PF_MAX byte ranges, issued a few at a time by pump().
  static constexpr int PF_MAX = 32;
  uint64_t prof_last = 0;  // PROFILE_MARK's clock and counter row (profile builds only)
  int prof_thread = 0;
  const char* pf_ptr[PF_MAX];
  int64_t pf_left[PF_MAX];
  int64_t pf_unit = -1;  // the unit whose parameter the previous unit prefetched
  const void* pf_tensor = nullptr;  // ... and its tensor (Args::param)
  int pf_n = 0, pf_i = 0;
  void queue(const void* p, int64_t bytes) {
    if (bytes > 0) {
      pf_ptr[pf_n] = static_cast<const char*>(p);
      pf_left[pf_n++] = bytes;
    }
  }
  // Issue up to `lines` prefetches, a few at many points of the compute-bound phases (see run_unit).
  // The range's pointer and count stay in registers through the loop: updating them in the struct
  // per line made a store-to-load chain of ~8 cycles per prefetch (1.1 cycles per element of the
  // step, the same with the data in cache).
  inline void pump(int64_t lines) {
    while (lines > 0 && pf_i < pf_n) {
      const char* p = pf_ptr[pf_i];
      const int64_t left = pf_left[pf_i];
      const int64_t n = lines < (left + 63) / 64 ? lines : (left + 63) / 64;
      for (int64_t j = 0; j < n; ++j) __builtin_prefetch(p + 64 * j, 0, 2);  // prefetcht1
      lines -= n;
      pf_ptr[pf_i] = p + 64 * n;
      pf_left[pf_i] = left - 64 * n;
      if (left - 64 * n <= 0) ++pf_i;
    }
  }
  // nq, nb: the most quantization and Top-K blocks that one unit of the call's tensors holds (per
  // tensor, not the largest unit over the smallest block: tensors of one call may differ in both).
  // Each buffer is checked on its own size, so an allocation that failed (std::bad_alloc, caught by
  // the caller) leaves no buffer that passes the check smaller than it must be.
  void reserve(int64_t unit, int64_t block, int64_t k, int64_t window_k, bool release, int64_t qblock, int64_t nq,
               int64_t nb) {
    grow(a, unit + 16, 0.f);
    grow(c8, unit + 64, uint8_t(0));
    grow(qlo, nq + 16, 0.f);
    grow(qscale, nq + 16, 0.f);
    grow(bmax, nb + 16, 0u);
    if (release) {
      grow(qinv, nq + 16, 0.f);
      grow(sq, 2 * qblock, 0.f);
    }
    grow(ckey, block + 16, 0u);
    grow(skey, block + 32, 0u);
#ifdef __AVX512F__
    grow(gmask16, block / 16 + 1, uint16_t(0));
    grow(glist, block / 16 + 1, uint16_t(0));
#else
    grow(gmask, block / 8 + 32, uint8_t(0));
#endif
    grow(cidx, block + 16, 0);
    if ((int64_t)mom.size() < 2 * (block + 16)) {
      mom.assign(2 * (block + 16), 0.f);
      for (size_t i = 1; i < mom.size(); i += 2) mom[i] = -0.f;
    }
    grow(sel, k + 16, 0);
    grow(uniq, window_k + 1, 0);
    grow(root, window_k + 1, 0.f);
    grow(num, window_k + 1, 0.f);
  }
  template <typename T>
  static void grow(std::vector<T>& v, int64_t size, T value) {
    if ((int64_t)v.size() < size) v.assign(size, value);
  }
};

// ------------------------------------------------------------------ phase 1: a = g + dequant(e)

// The largest |a| bits of a[0..len) (select_topk's key).
inline uint32_t max_key(const float* a, int64_t len) {
  int64_t i = 0;
  uint32_t m = 0;
#ifdef __AVX512F__
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
  __m512i mv = _mm512_setzero_si512();
  for (; i + 16 <= len; i += 16) {
    __m512i kv = _mm512_and_si512(_mm512_loadu_si512(a + i), absmask);
    mv = _mm512_max_epu32(mv, kv);
  }
  m = _mm512_reduce_max_epu32(mv);
#elif defined(__AVX2__)
  const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i mv = _mm256_setzero_si256();
  for (; i + 8 <= len; i += 8)
    mv = _mm256_max_epu32(mv, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i)), absmask));
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), mv);
  for (int l = 0; l < 8; ++l) m = lanes[l] > m ? lanes[l] : m;
#endif
  int32_t ms = int32_t(m);  // signed, as in count_ge
  for (; i < len; ++i) {
    const int32_t kk = int32_t(f2u(a[i]) & 0x7FFFFFFFu);
    ms = kk > ms ? kk : ms;
  }
  return uint32_t(ms);
}

template <int G>
void load_sum(const Args& A, Scratch& S, int64_t start, int64_t len) {
  // Also each Top-K block's largest |a| bits into S.bmax (unit-relative blocks), taken while a is in
  // registers: a separate pass cost 0.07 cycles per element.
  const uint8_t* packed = A.codes + start / 2;  // start is even: the unit is a multiple of 2
  float* a = S.a.data();
  uint32_t* bmax = S.bmax.data();
  const int64_t q = A.qblock, B = A.block;
  for (int64_t b = 0; b * B < len; ++b) bmax[b] = 0;
  // Segments that lie in one quantization block and one Top-K block: cut at both kinds of boundary
  // (the unit starts on both; the functional API takes sizes where neither divides the other).
  for (int64_t s = 0, e = 0; s < len; s = e) {
    const int64_t qb = (start + s) / q;
    const int64_t b = s / B;
    e = (qb + 1) * q - start;
    e = (b + 1) * B < e ? (b + 1) * B : e;
    e = len < e ? len : e;
    const float lo = bf16_to_f(A.bounds[2 * qb]);
    const float hi = bf16_to_f(A.bounds[2 * qb + 1]);
    const float scale = (hi - lo) / float(LEVELS);
    int64_t i = s;
    uint32_t m = 0;
    if (i & 1) {
      // An odd start (odd sizes): this element alone, so that the vector loops below read whole code
      // bytes (the even element in the low nibble).
      a[i] = load_f<G>(A.grad, start + i) + (float(packed[i / 2] >> 4) * scale + lo);
      m = f2u(a[i]) & 0x7FFFFFFFu;
      ++i;
    }
#ifdef __AVX512F__
    const __m512 sv = _mm512_set1_ps(scale), lv = _mm512_set1_ps(lo);
    const __m128i nib = _mm_set1_epi8(0x0F);
    const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
    __m512i mv = _mm512_setzero_si512();
    for (; i + 16 <= e; i += 16) {
      // 8 code bytes -> 16 codes in index order (even index in the low nibble).
      const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + i / 2));
      const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(x, nib), _mm_and_si128(_mm_srli_epi16(x, 4), nib));
      const __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes));
      const __m512 err = _mm512_add_ps(_mm512_mul_ps(c, sv), lv);
      __m512 g;
      if (G == F32) {
        g = _mm512_loadu_ps(static_cast<const float*>(A.grad) + start + i);
      } else {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(A.grad) + start + i));
        g = G == BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
      }
      const __m512 sum = _mm512_add_ps(g, err);
      _mm512_storeu_ps(a + i, sum);
      mv = _mm512_max_epu32(mv, _mm512_and_si512(_mm512_castps_si512(sum), absmask));
    }
    const uint32_t mvec = _mm512_reduce_max_epu32(mv);
    m = mvec > m ? mvec : m;
#elif defined(__AVX2__) && defined(__F16C__)
    const __m256 sv = _mm256_set1_ps(scale), lv = _mm256_set1_ps(lo);
    const __m128i nib = _mm_set1_epi8(0x0F);
    const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i mv = _mm256_setzero_si256();
    for (; i + 16 <= e; i += 16) {
      const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + i / 2));
      const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(x, nib), _mm_and_si128(_mm_srli_epi16(x, 4), nib));
      for (int h = 0; h < 2; ++h) {
        const __m128i c8 = h ? _mm_srli_si128(codes, 8) : codes;
        const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c8));
        const __m256 err = _mm256_add_ps(_mm256_mul_ps(c, sv), lv);
        const int64_t j = i + 8 * h;
        __m256 g;
        if (G == F32) {
          g = _mm256_loadu_ps(static_cast<const float*>(A.grad) + start + j);
        } else {
          const __m128i hv = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(A.grad) + start + j));
          g = G == BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(hv), 16)) : _mm256_cvtph_ps(hv);
        }
        const __m256 sum = _mm256_add_ps(g, err);
        _mm256_storeu_ps(a + j, sum);
        mv = _mm256_max_epu32(mv, _mm256_and_si256(_mm256_castps_si256(sum), absmask));
      }
    }
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), mv);
    for (int l = 0; l < 8; ++l) m = lanes[l] > m ? lanes[l] : m;
#endif
    // The rest of the segment, and its maximum (the whole segment's without a vector loop above).
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__))
    const int64_t m0 = i;
#else
    const int64_t m0 = s;
#endif
    for (; i < e; ++i) {
      const uint8_t byte = packed[i / 2];
      const float code = float(i & 1 ? byte >> 4 : byte & 0x0F);
      a[i] = load_f<G>(A.grad, start + i) + (code * scale + lo);
    }
    if (e > m0) {
      const uint32_t mt = max_key(a + m0, e - m0);
      m = mt > m ? mt : m;
    }
    uint32_t& bm = bmax[b];
    bm = m > bm ? m : bm;
  }
}

// ------------------------------------------------------------------ phase 2: exact block Top-K

#if defined(__AVX2__) && !defined(__AVX512F__)
// LEFT_PACK[m]: the lanes whose bit is set in m, in order, then the rest (permutevar8x32 indices).
struct LeftPack {
  int32_t t[256][8];
  LeftPack() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int l = 0; l < 8; ++l)
        if (m & (1 << l)) t[m][n++] = l;
      for (int l = 0; l < 8; ++l)
        if (!(m & (1 << l))) t[m][n++] = l;
    }
  }
};
const LeftPack LEFT_PACK_TABLE;
const int32_t (*const LEFT_PACK)[8] = LEFT_PACK_TABLE.t;
#endif

// Entries with |a| bits >= t, in index order; returns their count. ckey and cidx need len + 16 slots.
inline int64_t compress_candidates(const float* a, int64_t len, uint32_t t, Scratch& S) {
  uint32_t* ckey = S.ckey.data();
  int32_t* cidx = S.cidx.data();
  int64_t c = 0, i = 0;
#ifdef __AVX512F__
  // Two passes over the 16-entry groups: their masks first, then a compress of the indices of the
  // groups that hold a candidate (about half of them). One pass that compresses every group, or that
  // tests the mask and mispredicts, took 1700-2500 cycles per 4096-block instead of 900 (Zen 5:
  // vpcompressd is slow, and compress-to-memory microcoded, hence register compress and plain
  // stores). The keys are read back through the indices, a scalar load each, rather than
  // compressed too: Top-K 0.49 -> 0.46 ticks per element (1M parameters, benchmarks/cpu_phases.py;
  // the AVX2 loop below gained nothing from the same change).
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i tv = _mm512_set1_epi32(int(t));
  uint16_t* masks = S.gmask16.data();
  uint16_t* groups = S.glist.data();
  const int64_t ng = len / 16;
  int64_t nl = 0;
  for (int64_t g = 0; g < ng; ++g) {
    const __mmask16 m = _mm512_cmpge_epu32_mask(_mm512_and_si512(_mm512_loadu_si512(a + 16 * g), absmask), tv);
    masks[g] = m;
    groups[nl] = uint16_t(g);
    nl += m != 0;
  }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j = 0; j < nl; ++j) {
    const int64_t g = groups[j];
    const __mmask16 m = masks[g];
    const __m512i iv = _mm512_add_epi32(lane, _mm512_set1_epi32(int(16 * g)));
    _mm512_storeu_si512(cidx + c, _mm512_maskz_compress_epi32(m, iv));
    c += __builtin_popcount(m);
  }
  for (int64_t j = 0; j < c; ++j) ckey[j] = f2u(a[cidx[j]]) & 0x7FFFFFFFu;
  i = 16 * ng;
#elif defined(__AVX2__)
  // Groups of 8, in two passes: first every group's mask (one byte each, four groups per store),
  // then, for each 32 groups, the bits of those whose mask is not zero; each such group is
  // left-packed by a permutation from a 256-entry table (AVX2 has no compress instruction; a loop
  // over the set bits of the masks mispredicted its way to 2.3 cycles per element for the whole
  // Top-K). The AVX-512 path's list of groups, one 16-bit store per group at an address that
  // depends on the previous group's mask, cost 4 TSC ticks per group on Zen 3 (0.5 per element of
  // a 4096-block, in L1, a third of the whole Top-K). This way the whole compress takes 1900 ticks
  // per 4096-block instead of 3500 in isolation (112 candidates), and benchmarks/cpu_phases.py's
  // Top-K went from 1.5 to 1.3 ticks per element (1M parameters, Zen 3, alternated runs).
  const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i tm1 = _mm256_set1_epi32(int(t) - 1);  // keys < 2**31: kk >= t is kk > t - 1, signed
  uint8_t* masks = S.gmask.data();
  const int64_t ng = len / 8;
  int64_t g = 0;
  for (; g + 4 <= ng; g += 4) {
    uint32_t m = 0;
    for (int h = 0; h < 4; ++h) {
      const __m256i kv =
          _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 8 * (g + h))), absmask);
      m |= unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(kv, tm1)))) << (8 * h);
    }
    std::memcpy(masks + g, &m, 4);
  }
  for (; g < ng; ++g) {
    const __m256i kv = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 8 * g)), absmask);
    masks[g] = uint8_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(kv, tm1))));
  }
  for (; g % 32 != 0; ++g) masks[g] = 0;  // the scan below reads whole 32-byte rows
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t g0 = 0; g0 < ng; g0 += 32) {
    uint32_t live = ~unsigned(
        _mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(masks + g0)), zero)));
    while (live != 0) {
      const int64_t gi = g0 + __builtin_ctz(live);
      live &= live - 1;
      const unsigned m = masks[gi];
      const __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(LEFT_PACK[m]));
      const __m256i kv =
          _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 8 * gi)), absmask);
      const __m256i iv = _mm256_add_epi32(lane, _mm256_set1_epi32(int(8 * gi)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ckey + c), _mm256_permutevar8x32_epi32(kv, perm));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(cidx + c), _mm256_permutevar8x32_epi32(iv, perm));
      c += __builtin_popcount(m);
    }
  }
  i = 8 * ng;
#endif
  for (; i < len; ++i) {
    uint32_t kk = f2u(a[i]) & 0x7FFFFFFFu;
    ckey[c] = kk;
    cidx[c] = int32_t(i);
    c += kk >= t;
  }
  return c;
}

// Number of keys >= v (v >= 1).
inline int64_t count_ge(const uint32_t* keys, int64_t n, uint32_t v) {
  int64_t cnt = 0, i = 0;
#ifdef __AVX512F__
  const __m512i vv = _mm512_set1_epi32(int(v));
  for (; i + 16 <= n; i += 16)
    cnt += __builtin_popcount(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(keys + i), vv));
  if (i < n) {
    const __mmask16 tail = __mmask16((1u << (n - i)) - 1);
    cnt += __builtin_popcount(_mm512_mask_cmpge_epu32_mask(tail, _mm512_maskz_loadu_epi32(tail, keys + i), vv));
  }
  return cnt;
#elif defined(__AVX2__)
  const __m256i vm1 = _mm256_set1_epi32(int(v - 1));  // keys < 2**31: kk >= v is kk > v - 1, signed
  for (; i + 8 <= n; i += 8)
    cnt += __builtin_popcount(unsigned(_mm256_movemask_ps(
        _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i)), vm1)))));
#endif
  // Keys are below 2**31 (sign bit cleared), so a signed compare, which SSE2 has, is exact.
  for (; i < n; ++i) cnt += int32_t(keys[i]) >= int32_t(v);
  return cnt;
}

// Helpers of kth_largest: how many of src[0..n) have `bit` set, and those with it set (take) or clear
// (!take) copied in order to dst (dst may be src: each store lands at or before what was just read).
inline int64_t count_bit(const uint32_t* src, int64_t n, uint32_t bit) {
  int64_t ones = 0, i = 0;
#ifdef __AVX512F__
  const __m512i bv = _mm512_set1_epi32(int(bit));
  for (; i < n; i += 16) {
    const __mmask16 valid = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    ones += __builtin_popcount(_mm512_mask_test_epi32_mask(valid, _mm512_maskz_loadu_epi32(valid, src + i), bv));
  }
#elif defined(__AVX2__)
  const __m256i bv = _mm256_set1_epi32(int(bit)), zero = _mm256_setzero_si256();
  for (; i + 8 <= n; i += 8) {
    const __m256i x = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)), bv);
    ones += 8 - __builtin_popcount(unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(x, zero)))));
  }
#endif
  for (; i < n; ++i) ones += (src[i] & bit) != 0;
  return ones;
}

inline int64_t keep_bit(const uint32_t* src, int64_t n, uint32_t bit, bool take, uint32_t* dst) {
  int64_t out = 0, i = 0;
#ifdef __AVX512F__
  const __m512i bv = _mm512_set1_epi32(int(bit));
  for (; i < n; i += 16) {
    const __mmask16 valid = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512i kv = _mm512_maskz_loadu_epi32(valid, src + i);
    const __mmask16 m = take ? _mm512_mask_test_epi32_mask(valid, kv, bv) : _mm512_mask_testn_epi32_mask(valid, kv, bv);
    _mm512_storeu_si512(dst + out, _mm512_maskz_compress_epi32(m, kv));
    out += __builtin_popcount(m);
  }
#elif defined(__AVX2__)
  const __m256i bv = _mm256_set1_epi32(int(bit)), zero = _mm256_setzero_si256();
  for (; i + 8 <= n; i += 8) {
    const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const unsigned clear = unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(kv, bv), zero))));
    const unsigned m = take ? ~clear & 0xFFu : clear;
    const __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(LEFT_PACK[m]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + out), _mm256_permutevar8x32_epi32(kv, perm));
    out += __builtin_popcount(m);
  }
#endif
  for (; i < n; ++i) {
    const uint32_t x = src[i];
    dst[out] = x;
    out += ((x & bit) != 0) == take;
  }
  return out;
}

// The k-th largest of keys[0..c) (1 <= k <= c), all in [t, mkey]: a radix select, one bit at a time
// from the highest bit where t and mkey differ (the bits above it are the same in every key). The
// keys that match the bits decided so far are compressed into S.skey (each bit about halves them);
// with AVX-512, once they fit in one register, the rest runs on a lane mask. Per 4096-block this
// costs about a third of the binary search over [t, mkey] it replaced (23 counts over all the
// candidates, each ending in a mispredicted branch half the time).
inline uint32_t kth_largest(const uint32_t* keys, int64_t c, int64_t k, uint32_t t, uint32_t mkey, Scratch& S) {
  if (t == mkey) return t;
  int bit = 31 - __builtin_clz(t ^ mkey);
  uint32_t prefix = mkey & ~((2u << bit) - 1u);  // bit 31: 2u << 31 is 0, and the mask 0
  uint32_t* kept = S.skey.data();
  const uint32_t* src = keys;
  int64_t n = c, need = k;
#ifdef __AVX512F__
  constexpr int64_t IN_REGISTER = 16;
#else
  constexpr int64_t IN_REGISTER = 0;
#endif
  for (; bit >= 0 && n > IN_REGISTER; --bit) {
    const int64_t ones = count_bit(src, n, 1u << bit);
    const bool take = ones >= need;  // the k-th largest has this bit set
    if (take) {
      prefix |= 1u << bit;
    } else {
      need -= ones;
    }
    n = keep_bit(src, n, 1u << bit, take, kept);
    src = kept;
    if (n == need) {
      // Every kept key is among the k largest: the k-th is the smallest of them.
      uint32_t mn = 0xFFFFFFFFu;
      for (int64_t i = 0; i < n; ++i) mn = kept[i] < mn ? kept[i] : mn;
      return mn;
    }
  }
  if (bit < 0) return prefix;
#ifdef __AVX512F__
  // At most 16 keys left: one register, the live lanes as a mask, branch-free steps.
  const __mmask16 valid = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  const __m512i kv = _mm512_maskz_loadu_epi32(valid, src);
  uint32_t live = valid;
  for (; bit >= 0; --bit) {
    const uint32_t on = _mm512_mask_test_epi32_mask(__mmask16(live), kv, _mm512_set1_epi32(int(1u << bit)));
    const int64_t ones = __builtin_popcount(on);
    const uint32_t all = ones >= need ? 0xFFFFFFFFu : 0u;
    live = (on & all) | (live & ~on & ~all);
    need -= ones & ~int64_t(int32_t(all));
    prefix |= (1u << bit) & all;
  }
#endif
  return prefix;
}

// Writes the k selected block indices, ascending, to sel (k + 16 slots). Requires k < len and mkey
// the largest |a| bits of the block (load_sum's S.bmax): the search assumes no key above it.
void select_topk(const float* a, int64_t len, int64_t k, uint32_t mkey, Scratch& S, int32_t* sel) {
  S.pump(len / 64);
  if (mkey == 0) {  // all zeros: the lowest indices win
    for (int64_t j = 0; j < k; ++j) sel[j] = int32_t(j);
    return;
  }
  uint32_t* ckey = S.ckey.data();
  int32_t* cidx = S.cidx.data();
  int64_t c;
  uint32_t t;
  for (;;) {
    t = mkey > S.dist ? mkey - S.dist : 0;
    c = compress_candidates(a, len, t, S);
    if (c >= k) break;
    // Half as far again (then 0: every entry a candidate). Doubling overshot: 145 candidates per
    // try on average against 113, Top-K 0.445 -> 0.411 ticks per element at 1M parameters, with the
    // same retries (15% of blocks); growing by a quarter gained nothing more.
    S.dist = S.dist < 0x40000000u ? S.dist + S.dist / 2 : 0x80000000u;
  }
  S.pump(len / 128);
  const uint32_t v = kth_largest(ckey, c, k, t, mkey, S);
  S.pump(len / 128);
  // Keys above v are all taken; of the keys equal to v, the `need` of lowest index (block_topk's
  // tie rule). Candidates are in index order, so the output is ascending.
  int64_t need = k - count_ge(ckey, c, v + 1);
  int64_t out = 0, i = 0;
#if defined(__AVX512F__) && defined(__BMI2__)
  const __m512i vv = _mm512_set1_epi32(int(v));
  for (; i < c; i += 16) {
    const __mmask16 valid = c - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (c - i)) - 1);
    const __m512i kv = _mm512_maskz_loadu_epi32(valid, ckey + i);
    const __mmask16 gt = _mm512_mask_cmpgt_epu32_mask(valid, kv, vv);
    uint32_t eq = _mm512_mask_cmpeq_epu32_mask(valid, kv, vv);
    const int neq = __builtin_popcount(eq);
    if (neq > need) eq = _pdep_u32((1u << need) - 1u, eq);  // the lowest `need` of them
    need -= __builtin_popcount(eq);
    const __mmask16 take = gt | __mmask16(eq);
    _mm512_storeu_si512(sel + out, _mm512_maskz_compress_epi32(take, _mm512_maskz_loadu_epi32(valid, cidx + i)));
    out += __builtin_popcount(take);
  }
#elif defined(__AVX2__) && defined(__BMI2__)
  // As above, 8 at a time, left-packed by a permutation (keys < 2**31: signed compares are exact).
  const __m256i vv = _mm256_set1_epi32(int(v));
  for (; i + 8 <= c; i += 8) {
    const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ckey + i));
    const unsigned gt = unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(kv, vv))));
    unsigned eq = unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(kv, vv))));
    if (__builtin_popcount(eq) > need) eq = _pdep_u32((1u << need) - 1u, eq);
    need -= __builtin_popcount(eq);
    const unsigned take = gt | eq;
    const __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(LEFT_PACK[take]));
    const __m256i iv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cidx + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sel + out), _mm256_permutevar8x32_epi32(iv, perm));
    out += __builtin_popcount(take);
  }
#endif
  for (; i < c; ++i) {  // branch-free: whether a candidate is taken is a coin flip to the predictor
    const uint32_t kk = ckey[i];
    const int64_t tie = kk == v && need > 0;
    const int64_t take = (kk > v) | tie;
    need -= tie;
    sel[out] = cidx[i];  // out <= k: inside sel's k + 16 slots
    out += take;
  }
  // Next block: start from a threshold a quarter further below the max than this k-th key.
  const uint32_t d = mkey - v;
  S.dist = d + (d >> 2) + (1u << 16);
}

// Top-K of every block of the unit; writes the window slot and zeroes the selected entries.
void topk_unit(const Args& A, Scratch& S, int64_t start, int64_t len) {
  const int64_t B = A.block, k = A.k;
  float* a = S.a.data();
  int32_t* sel = S.sel.data();
  for (int64_t s = 0; s < len; s += B) {
    const int64_t b = (start + s) / B;
    const int64_t lb = s + B < len ? B : len - s;  // real entries of this block
    float* ab = a + s;
    int16_t* wi = A.win_idx + (A.write_slot * A.num_blocks + b) * k;
    uint16_t* wv = A.win_val + (A.write_slot * A.num_blocks + b) * k;
    if (lb <= k) {
      // Every real entry is taken (k >= block, or a last block shorter than k); the remaining
      // selections fall on padding and are stored as index 0, value 0.
      for (int64_t j = 0; j < k; ++j) {
        if (j < lb) {
          wi[j] = int16_t(j);
          wv[j] = f_to_bf16(ab[j]);
          ab[j] = 0.f;
        } else {
          wi[j] = 0;
          wv[j] = 0;
        }
      }
      continue;
    }
    select_topk(ab, lb, k, S.bmax[s / B], S, sel);
    S.pump(lb / 64);
    for (int64_t j = 0; j < k; ++j) {
      const int32_t i = sel[j];
      wi[j] = int16_t(i);
      wv[j] = f_to_bf16(ab[i]);
      ab[i] = 0.f;
    }
  }
}

// ------------------------------------------------------------------ phase 3: release, re-quantize

// Sum of the squares of a[0..len) by halving, as functional.release_move: the squares padded with
// zeros to a power of two, then the two halves added until one is left (the torch path's order, so
// the sum is bit-identical). A full block of a power-of-two size >= 16 runs in AVX-512 registers:
// vector halves first, then the 16 lanes by 8, 4, 2, 1 (the same additions in the same order).
#ifdef __AVX512F__
// Halving sum of the squares of NV * 16 floats, in registers.
template <int NV>
inline float sum_squares_v(const float* a) {
  __m512 v[NV];
  for (int j = 0; j < NV; ++j) {
    const __m512 x = _mm512_loadu_ps(a + 16 * j);
    v[j] = _mm512_mul_ps(x, x);
  }
  for (int h = NV / 2; h >= 1; h /= 2)
    for (int j = 0; j < h; ++j) v[j] = _mm512_add_ps(v[j], v[j + h]);
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v[0]),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[0]), 1)));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
  return _mm_cvtss_f32(s1);
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// Halving sum of the squares of NV * 8 floats, in AVX2 registers (the same additions in the same order).
template <int NV>
inline float sum_squares_v8(const float* a) {
  __m256 v[NV];
  for (int j = 0; j < NV; ++j) {
    const __m256 x = _mm256_loadu_ps(a + 8 * j);
    v[j] = _mm256_mul_ps(x, x);
  }
  for (int h = NV / 2; h >= 1; h /= 2)
    for (int j = 0; j < h; ++j) v[j] = _mm256_add_ps(v[j], v[j + h]);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v[0]), _mm256_extractf128_ps(v[0], 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
#endif

inline float sum_squares(const float* a, int64_t len, int64_t width, float* sq) {
#if defined(__AVX512F__) || defined(__AVX2__)
  // A full block of 1 to 32 vectors: in registers (widths up to 256, as before both paths).
#ifdef __AVX512F__
  constexpr int64_t L = 16;
#define MICROADAM_SUM_SQUARES sum_squares_v
#else
  constexpr int64_t L = 8;
#define MICROADAM_SUM_SQUARES sum_squares_v8
#endif
  if (len == width && width <= 256 && width % L == 0) {
    switch (width / L) {
      case 1: return MICROADAM_SUM_SQUARES<1>(a);
      case 2: return MICROADAM_SUM_SQUARES<2>(a);
      case 4: return MICROADAM_SUM_SQUARES<4>(a);
      case 8: return MICROADAM_SUM_SQUARES<8>(a);
      case 16: return MICROADAM_SUM_SQUARES<16>(a);
      case 32: return MICROADAM_SUM_SQUARES<32>(a);
      default: break;
    }
  }
#undef MICROADAM_SUM_SQUARES
#endif
  for (int64_t i = 0; i < len; ++i) sq[i] = a[i] * a[i];
  for (int64_t i = len; i < width; ++i) sq[i] = 0.f;
  for (int64_t w = width / 2; w >= 1; w /= 2)
    for (int64_t i = 0; i < w; ++i) sq[i] = sq[i] + sq[i + w];
  return sq[0];
}

// The release scale of every quantization block of the unit (functional.release_move): the mean
// square, rms = sqrt(mean square) with torch's sqrt, then inv = (1 / rms) * scale (torch computes
// `scale / rms` as rms.reciprocal() * scale), 0 for an all-zero block. The move itself, (a * inv) *
// lr, is computed where it is used (update_block) and the kept part, a * keep, where it is quantized,
// so the unit's working copy is neither rewritten nor copied for the release.
void release_scales(const Args& A, Scratch& S, int64_t len) {
  const float* a = S.a.data();
  float* inv = S.qinv.data();
  float* sq = S.sq.data();
  const int64_t q = A.qblock;
  const int64_t nq = (len + q - 1) / q;
  int64_t width0 = 1;
  while (width0 < q) width0 <<= 1;
  for (int64_t j = 0; j < nq; ++j) {
    const int64_t s = j * q, lq = s + q < len ? q : len - s;
    inv[j] = sum_squares(a + s, lq, width0, sq) / float(lq);  // a short last block is zero-padded to width0
  }
  torch_sqrt(inv, nq, A.sqrt_mode, A.vml_sqrt);
  for (int64_t j = 0; j < nq; ++j) inv[j] = inv[j] > 0.f ? (1.f / inv[j]) * A.rscale : 0.f;
}

// Min and max of keep * a[0..len) (keep = 1 - release, 1 without release: x * 1 is x exactly).
inline void min_max(const float* a, int64_t len, float keep, float& mn, float& mx) {
  int64_t i = 0;
  float lo = a[0] * keep, hi = lo;
#ifdef __AVX512F__
  if (len >= 16) {
    const __m512 kv = _mm512_set1_ps(keep);
    __m512 vlo = _mm512_mul_ps(_mm512_loadu_ps(a), kv), vhi = vlo;
    for (i = 16; i + 16 <= len; i += 16) {
      __m512 x = _mm512_mul_ps(_mm512_loadu_ps(a + i), kv);
      vlo = _mm512_min_ps(vlo, x);
      vhi = _mm512_max_ps(vhi, x);
    }
    lo = _mm512_reduce_min_ps(vlo);
    hi = _mm512_reduce_max_ps(vhi);
  }
#elif defined(__AVX2__)
  if (len >= 8) {
    const __m256 kv = _mm256_set1_ps(keep);
    __m256 vlo = _mm256_mul_ps(_mm256_loadu_ps(a), kv), vhi = vlo;
    for (i = 8; i + 8 <= len; i += 8) {
      const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(a + i), kv);
      vlo = _mm256_min_ps(vlo, x);
      vhi = _mm256_max_ps(vhi, x);
    }
    __m128 l4 = _mm_min_ps(_mm256_castps256_ps128(vlo), _mm256_extractf128_ps(vlo, 1));
    __m128 h4 = _mm_max_ps(_mm256_castps256_ps128(vhi), _mm256_extractf128_ps(vhi, 1));
    l4 = _mm_min_ps(l4, _mm_movehl_ps(l4, l4));
    h4 = _mm_max_ps(h4, _mm_movehl_ps(h4, h4));
    lo = _mm_cvtss_f32(_mm_min_ss(l4, _mm_shuffle_ps(l4, l4, 1)));
    hi = _mm_cvtss_f32(_mm_max_ss(h4, _mm_shuffle_ps(h4, h4, 1)));
  }
#endif
  for (; i < len; ++i) {
    const float x = a[i] * keep;
    lo = x < lo ? x : lo;
    hi = x > hi ? x : hi;
  }
  // Which zero a block of signed zeros gives depends on the order of comparisons (the torch path's
  // amin and these lanes differ): the bounds take +0 for either, in every path (ops.quant).
  mn = lo == 0.f ? 0.f : lo;
  mx = hi == 0.f ? 0.f : hi;
}

// floor(x) clamped to [0, 15] for x = (a - lo) / scale + r >= 0 (lo <= a, scale > 0, r >= 0), where
// floor is truncation: a plain conversion that compilers vectorize, unlike std::floor before SSE4.1.
inline uint8_t clamp_code(float x) {
  const int c = x < 16.f ? int(x) : LEVELS;
  return uint8_t(c < LEVELS ? c : LEVELS);
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// Eight int32 codes in [0, 15] as eight bytes.
inline void store_codes8(uint8_t* out, __m256i c) {
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(w, w));
}
#endif

// floor((keep * a - lo) / scale + r) clamped to [0, 15], r = 0.5 or a uniform from the error stream.
inline void quantize_block(const Args& A, const float* a, uint8_t* c8, int64_t len, float keep, float lo,
                           float scale, int64_t pos0) {
  int64_t i = 0;
  if (!A.stochastic_error) {
#ifdef __AVX512F__
    const __m512 lov = _mm512_set1_ps(lo), sv = _mm512_set1_ps(scale), half = _mm512_set1_ps(0.5f);
    const __m512 zero = _mm512_setzero_ps(), top = _mm512_set1_ps(float(LEVELS)), kv = _mm512_set1_ps(keep);
    for (; i + 16 <= len; i += 16) {
      __m512 x = _mm512_div_ps(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(a + i), kv), lov), sv);
      x = _mm512_roundscale_ps(_mm512_add_ps(x, half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      x = _mm512_min_ps(_mm512_max_ps(x, zero), top);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(c8 + i), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(x)));
    }
#elif defined(__AVX2__)
    const __m256 lov = _mm256_set1_ps(lo), sv = _mm256_set1_ps(scale), half = _mm256_set1_ps(0.5f);
    const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(float(LEVELS)), kv = _mm256_set1_ps(keep);
    for (; i + 8 <= len; i += 8) {
      __m256 x = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(a + i), kv), lov), sv);
      x = _mm256_floor_ps(_mm256_add_ps(x, half));
      x = _mm256_min_ps(_mm256_max_ps(x, zero), top);
      store_codes8(c8 + i, _mm256_cvttps_epi32(x));
    }
#endif
    for (; i < len; ++i) c8[i] = clamp_code((a[i] * keep - lo) / scale + 0.5f);
    return;
  }
  const float two_m24 = 0x1.0p-24f;
#ifdef __AVX512F__
  const __m512 lov = _mm512_set1_ps(lo), sv = _mm512_set1_ps(scale), tm = _mm512_set1_ps(two_m24);
  const __m512 kv = _mm512_set1_ps(keep);
  const __m512 zero = _mm512_setzero_ps(), top = _mm512_set1_ps(float(LEVELS));
  const __m512i mul = _mm512_set1_epi32(int(HASH_MUL));
  __m512i pv = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(uint64_t(pos0)) + A.err_key)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512i step = _mm512_set1_epi32(16);
  for (; i + 16 <= len; i += 16) {
    __m512i h = pv;
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(h, mul);
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(h, mul);
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    __m512 r = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(h, 8)), tm);
    __m512 x = _mm512_div_ps(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(a + i), kv), lov), sv);
    x = _mm512_roundscale_ps(_mm512_add_ps(x, r), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_min_ps(_mm512_max_ps(x, zero), top);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(c8 + i), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(x)));
    pv = _mm512_add_epi32(pv, step);
  }
#elif defined(__AVX2__)
  const __m256 lov = _mm256_set1_ps(lo), sv = _mm256_set1_ps(scale), tm = _mm256_set1_ps(two_m24);
  const __m256 kv = _mm256_set1_ps(keep);
  const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(float(LEVELS));
  const __m256i mul = _mm256_set1_epi32(int(HASH_MUL));
  __m256i pv = _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(uint64_t(pos0)) + A.err_key)),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i step = _mm256_set1_epi32(8);
  for (; i + 8 <= len; i += 8) {
    __m256i h = pv;
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, mul);
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, mul);
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    const __m256 r = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), tm);
    __m256 x = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(a + i), kv), lov), sv);
    x = _mm256_floor_ps(_mm256_add_ps(x, r));
    x = _mm256_min_ps(_mm256_max_ps(x, zero), top);
    store_codes8(c8 + i, _mm256_cvttps_epi32(x));
    pv = _mm256_add_epi32(pv, step);
  }
#endif
  for (; i < len; ++i) {
    const float r = float(hash_bits(pos0 + i, A.err_key) >> 8) * two_m24;
    c8[i] = clamp_code((a[i] * keep - lo) / scale + r);
  }
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// The codes of a[i .. i + 8) as eight int32: quantize_block's arithmetic, in the same order.
template <bool STOCHASTIC>
inline __m256i codes8(const float* a, int64_t i, __m256 kv, __m256 lov, __m256 sv, __m256i pos) {
  __m256 r;
  if (STOCHASTIC) {
    const __m256i mul = _mm256_set1_epi32(int(HASH_MUL));
    __m256i h = _mm256_add_epi32(pos, _mm256_set1_epi32(int(uint32_t(uint64_t(i)))));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, mul);
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, mul);
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    r = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(0x1.0p-24f));
  } else {
    r = _mm256_set1_ps(0.5f);
  }
  __m256 x = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(a + i), kv), lov), sv);
  x = _mm256_floor_ps(_mm256_add_ps(x, r));
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_setzero_ps()), _mm256_set1_ps(float(LEVELS)));
  return _mm256_cvttps_epi32(x);
}

// quantize_block and the packing of its codes in one pass, for a block of a multiple of 32 entries
// that starts on a code byte: 32 codes at a time become 16 bytes (even index in the low nibble)
// with a few shuffles, where the byte-per-code buffer and the packing loop after it cost 0.6 TSC
// ticks per element in isolation against 0.43 this way (Zen 3).
template <bool STOCHASTIC>
void quantize_packed(const Args& A, const float* a, uint8_t* packed, int64_t len, float keep, float lo, float scale,
                     int64_t pos0) {
  const __m256 kv = _mm256_set1_ps(keep), lov = _mm256_set1_ps(lo), sv = _mm256_set1_ps(scale);
  const __m256i pos = _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(uint64_t(pos0)) + A.err_key)),
                                       _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i nibbles = _mm256_set1_epi16(0x1001);  // a byte pair (even, odd) -> even + 16 * odd
  const __m128i order = _mm_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15);
  for (int64_t i = 0; i < len; i += 32) {
    // Codes are in [0, 15], so the saturating packs keep them. Both packs work within 128-bit lanes:
    // the bytes come out as four entries of each vector per lane, whose pairs never straddle two
    // vectors; the final shuffle puts the byte pairs back in index order.
    const __m256i w01 = _mm256_packs_epi32(codes8<STOCHASTIC>(a, i, kv, lov, sv, pos),
                                           codes8<STOCHASTIC>(a, i + 8, kv, lov, sv, pos));
    const __m256i w23 = _mm256_packs_epi32(codes8<STOCHASTIC>(a, i + 16, kv, lov, sv, pos),
                                           codes8<STOCHASTIC>(a, i + 24, kv, lov, sv, pos));
    const __m256i p = _mm256_maddubs_epi16(_mm256_packs_epi16(w01, w23), nibbles);
    const __m128i q = _mm_packus_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + i / 2), _mm_shuffle_epi8(q, order));
  }
}
#endif

#ifdef __AVX512F__
// bf16_floor (up = false) or bf16_ceil (up = true) of 16 floats, as 16 uint32 < 2**16: the scalar
// functions' steps lane by lane (round to nearest even, NaN to 0x7FC0, then one bf16 step toward
// x if that went past it, with nextafter's rules at zero).
// UP is a template argument: the comparison predicate must be an immediate.
template <bool up>
inline __m512i bf16_round_dir16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i one = _mm512_set1_epi32(1);
  __m512i b = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), one), _mm512_set1_epi32(0x7FFF))),
      16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  b = _mm512_mask_mov_epi32(b, nan, _mm512_set1_epi32(0x7FC0));
  const __m512 y = _mm512_castsi512_ps(_mm512_slli_epi32(b, 16));
  const __mmask16 past = _mm512_cmp_ps_mask(y, x, up ? _CMP_LT_OQ : _CMP_GT_OQ);
  const __mmask16 zero = _mm512_cmpeq_epi32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7FFF)), _mm512_setzero_si512());
  const __mmask16 neg = _mm512_test_epi32_mask(b, _mm512_set1_epi32(0x8000));
  // Away from zero for the sign of the step: floor steps a negative down (b + 1) and a positive
  // down (b - 1); ceil the other way. At zero: floor gives -min subnormal (0x8001), ceil +min (0x0001).
  const __mmask16 plus = up ? __mmask16(~neg) : neg;
  __m512i stepped = _mm512_mask_blend_epi32(plus, _mm512_sub_epi32(b, one), _mm512_add_epi32(b, one));
  stepped = _mm512_mask_mov_epi32(stepped, zero, _mm512_set1_epi32(up ? 0x0001 : 0x8001));
  return _mm512_mask_mov_epi32(b, past, stepped);
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// bf16_round_dir16 for 8 floats with AVX2 (blends instead of mask registers).
template <bool up>
inline __m256i bf16_round_dir8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i one = _mm256_set1_epi32(1);
  __m256i b = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), one), _mm256_set1_epi32(0x7FFF))),
      16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  b = _mm256_blendv_epi8(b, _mm256_set1_epi32(0x7FC0), nan);
  const __m256 y = _mm256_castsi256_ps(_mm256_slli_epi32(b, 16));
  const __m256i past = _mm256_castps_si256(_mm256_cmp_ps(y, x, up ? _CMP_LT_OQ : _CMP_GT_OQ));
  const __m256i zero = _mm256_cmpeq_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7FFF)), _mm256_setzero_si256());
  const __m256i neg = _mm256_cmpeq_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x8000)), _mm256_set1_epi32(0x8000));
  const __m256i plus = up ? _mm256_xor_si256(neg, _mm256_set1_epi32(-1)) : neg;
  __m256i stepped = _mm256_blendv_epi8(_mm256_sub_epi32(b, one), _mm256_add_epi32(b, one), plus);
  stepped = _mm256_blendv_epi8(stepped, _mm256_set1_epi32(up ? 0x0001 : 0x8001), zero);
  return _mm256_blendv_epi8(b, stepped, past);
}
#endif

// Bounds of quantization blocks j0 .. j0 + count of the unit from their min (qlo) and max (qscale):
// stored as bf16 (lo, hi) pairs at bounds[2 * qb0 ..], and replaced in qlo / qscale by the float lo
// and the scale (hi - lo) / 15 the codes are computed with.
inline void block_bounds(const Args& A, float* qlo, float* qscale, int64_t qb0, int64_t nq) {
  int64_t j = 0;
#ifdef __AVX512F__
  // 16 blocks at a time: the scalar chain (two roundings with branches, a division) cost 0.27
  // cycles per element of the 4096-element unit, a quarter of the quantization pass.
  for (; j + 16 <= nq; j += 16) {
    const __m512i lo16 = bf16_round_dir16<false>(_mm512_loadu_ps(qlo + j));
    const __m512i hi16 = bf16_round_dir16<true>(_mm512_loadu_ps(qscale + j));
    // (lo, hi) pairs of uint16, lo first: one uint32 per block, little-endian.
    _mm512_storeu_si512(A.bounds + 2 * (qb0 + j), _mm512_or_si512(lo16, _mm512_slli_epi32(hi16, 16)));
    const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(lo16, 16));
    const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(hi16, 16));
    _mm512_storeu_ps(qlo + j, lo);
    _mm512_storeu_ps(qscale + j, _mm512_div_ps(_mm512_sub_ps(hi, lo), _mm512_set1_ps(float(LEVELS))));
  }
#elif defined(__AVX2__)
  for (; j + 8 <= nq; j += 8) {
    const __m256i lo16 = bf16_round_dir8<false>(_mm256_loadu_ps(qlo + j));
    const __m256i hi16 = bf16_round_dir8<true>(_mm256_loadu_ps(qscale + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(A.bounds + 2 * (qb0 + j)),
                        _mm256_or_si256(lo16, _mm256_slli_epi32(hi16, 16)));
    const __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(lo16, 16));
    const __m256 hi = _mm256_castsi256_ps(_mm256_slli_epi32(hi16, 16));
    _mm256_storeu_ps(qlo + j, lo);
    _mm256_storeu_ps(qscale + j, _mm256_div_ps(_mm256_sub_ps(hi, lo), _mm256_set1_ps(float(LEVELS))));
  }
#endif
  for (; j < nq; ++j) {
    const int64_t qb = qb0 + j;
    const uint16_t lo16 = bf16_floor(qlo[j]), hi16 = bf16_ceil(qscale[j]);
    A.bounds[2 * qb] = lo16;
    A.bounds[2 * qb + 1] = hi16;
    const float lo = bf16_to_f(lo16);
    qlo[j] = lo;
    qscale[j] = (bf16_to_f(hi16) - lo) / float(LEVELS);
  }
}

// Block j's codes, one per byte, into c8 + s (zeros for a block of scale 0: every entry equals lo).
inline void block_codes(const Args& A, const float* a, uint8_t* c8, int64_t s, int64_t lq, float keep, float lo,
                        float scale, int64_t start) {
  if (scale > 0.f) {
    quantize_block(A, a + s, c8 + s, lq, keep, lo, scale, start + s + A.position_offset);
  } else {
    std::memset(c8 + s, 0, size_t(lq));
  }
}

// Bytes [b0, b1) of the packed codes from c8, even index in the low nibble.
inline void pack_codes(const uint8_t* c8, uint8_t* packed, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) packed[b] = uint8_t(c8[2 * b] | (c8[2 * b + 1] << 4));
}

void quantize_unit(const Args& A, Scratch& S, int64_t start, int64_t len) {
  const float* a = S.a.data();
  uint8_t* c8 = S.c8.data();
  float* qlo = S.qlo.data();
  float* qscale = S.qscale.data();
  const int64_t q = A.qblock;
  const int64_t nq = (len + q - 1) / q;
  // The stored error is keep * a (computed here, not stored back); keep == 0 stores exact zeros, as
  // the torch path does (keep * a would give -0 for negative entries): bounds 0 and codes 0.
  const float keep = A.release ? A.keep : 1.f;
  const bool zero = A.release && A.keep == 0.f;
  // Three passes (min/max, bounds, codes) rather than one per block: each block's chain of
  // reduction -> bf16 rounding -> scale -> codes is long, and separate passes let the core overlap
  // the blocks' chains (measured: 1850 -> 1000 cycles per 4096 elements).
  for (int64_t j = 0; j < nq; ++j) {
    const int64_t s = j * q, lq = s + q < len ? q : len - s;
    if (zero) {
      qlo[j] = qscale[j] = 0.f;
    } else {
      min_max(a + s, lq, keep, qlo[j], qscale[j]);
      S.pump(lq / 32);
    }
  }
  block_bounds(A, qlo, qscale, start / q, nq);
  uint8_t* packed = A.codes + start / 2;
#if defined(__AVX2__) && !defined(__AVX512F__)
  if (q % 32 == 0) {
    // Every block starts on a code byte (the unit starts on an even entry): full blocks are
    // quantized straight into the packed codes, a short last block through c8 as below.
    for (int64_t j = 0; j < nq; ++j) {
      const int64_t s = j * q, lq = s + q < len ? q : len - s;
      if (lq == q && qscale[j] > 0.f) {
        const int64_t pos0 = start + s + A.position_offset;
        if (A.stochastic_error) {
          quantize_packed<true>(A, a + s, packed + s / 2, q, keep, qlo[j], qscale[j], pos0);
        } else {
          quantize_packed<false>(A, a + s, packed + s / 2, q, keep, qlo[j], qscale[j], pos0);
        }
      } else {
        block_codes(A, a, c8, s, lq, keep, qlo[j], qscale[j], start);
        if (lq & 1) c8[s + lq] = 0;
        pack_codes(c8, packed, s / 2, (s + lq + 1) / 2);
      }
      S.pump(lq / 32);
    }
    return;
  }
#endif
  for (int64_t j = 0; j < nq; ++j) {
    const int64_t s = j * q, lq = s + q < len ? q : len - s;
    block_codes(A, a, c8, s, lq, keep, qlo[j], qscale[j], start);
    S.pump(lq / 32);
  }
  if (len & 1) c8[len] = 0;  // an odd tail gets a zero high nibble
  pack_codes(c8, packed, 0, (len + 1) / 2);
}

// ------------------------------------------------------------------ phase 4: moments and update

// res: the block's residual after Top-K (the unit's working copy at offset s), whose released move
// (res * inv) * lr is computed here (inv = S.qinv per quantization block of the unit).
template <int P>
void update_block(const Args& A, Scratch& S, int64_t block_start, int64_t s, int64_t lb, int64_t b, float* res,
                  int& bad) {
  const int64_t k = A.k;
  float* mom = S.mom.data();
  int32_t* uniq = S.uniq.data();
  float* root = S.root.data();
  // scatter_add_ order: slots newest first, entries in order. Positions are listed once each, in
  // first-seen order, for the square root and the update. The second moment's accumulator starts at
  // -0 rather than +0: -0 + x is x exactly for every x, as +0 + x is for the x >= +0 added here, so the
  // sums are unchanged, and a set sign bit means "not seen yet" (a byte array of flags, read and
  // written per entry and cleared per position, cost 0.05 more TSC ticks per element of the step:
  // moments and update 0.67 against 0.62 at 1M parameters, benchmarks/cpu_phases.py). It needs the
  // terms (v * v) * w2 >= +0 or NaN: kernels/cpu.py refuses a beta2 with a sign bit (-0.0 or
  // negative), whose odd powers would keep a sum at -0 or take it below zero.
  int64_t nu = 0;
  for (int64_t age = 0; age < A.n_slots; ++age) {
    const int64_t off = (A.slot_of_age[age] * A.num_blocks + b) * k;
    const int16_t* wi = A.win_idx + off;
    const uint16_t* wv = A.win_val + off;
    const float w1 = A.w1[age], w2 = A.w2[age];
    S.pump(8);
    for (int64_t j = 0; j < k; ++j) {
      const int32_t i = wi[j];
      if (i < 0 || i >= lb) {  // a corrupt state; torch's indexing raises on it too
        bad = 1;
        // Leave the thread's scratch zero for the next call.
        for (int64_t r = 0; r < A.block; ++r) {
          mom[2 * r] = 0.f;
          mom[2 * r + 1] = -0.f;
        }
        return;
      }
      const float v = bf16_to_f(wv[j]);
      const float old = mom[2 * i + 1];
      mom[2 * i] = mom[2 * i] + v * w1;
      mom[2 * i + 1] = old + (v * v) * w2;
      uniq[nu] = i;
      nu += f2u(old) >> 31;
    }
  }
  PROFILE_MARK(PH_MOMENTS);
  // Gathered into compact arrays so that the square root and the division run vectorized (a
  // scalar divss per position cost 1400 cycles per 4096-block).
  float* num = S.num.data();
  for (int64_t j = 0; j < nu; ++j) {
    const int32_t i = uniq[j];
    root[j] = A.c2 * mom[2 * i + 1];
    num[j] = A.c1 * mom[2 * i];
  }
  // den = sqrt(c2 * S) + eps. torch computes float32 sqrt with the math library it was built with
  // (MKL's vmsSqrt in x86 wheels: not correctly rounded, 1 ulp off for ~16% of inputs on this Zen 5).
  torch_sqrt(root, nu, A.sqrt_mode, A.vml_sqrt);
  S.pump(16);
  const float eps = A.eps, lr = A.lr;
  for (int64_t j = 0; j < nu; ++j) {
    const float den = root[j] + eps;
    const float u = num[j] / den;
    // den == 0 only with eps == 0 at a position whose entries are all zero: no move, not 0/0.
    num[j] = lr * (den > 0.f ? u : 0.f);
  }
  void* p = A.param;
  const bool sto = A.stochastic_param;
  const int64_t gpos = block_start + A.position_offset;
  PROFILE_MARK(PH_DIVIDE);
  // Without weight decay or release only the window's positions move: p - lr * u there, rounded to
  // the parameter's dtype (its cache lines were prefetched during the previous unit). Otherwise a
  // dense pass over the block first computes the torch path's (p [* decay]) [- lr * move] in float32
  // (into p itself for a float32 parameter, else into res), then the window's positions subtract
  // lr * u: the torch path's last subtraction, of +0 elsewhere, which leaves x exactly x (-0 and NaN
  // included). (A dense pass for the plain float32 case too was measured slower at 16M: 12.2 against
  // 11.4 ms a step, as it writes back every cache line.)
  const bool dense = A.weight_decay || A.release;
  if (!dense) {
    for (int64_t j = 0; j < nu; ++j) {
      const int32_t i = uniq[j];
      mom[2 * i] = 0.f;
      mom[2 * i + 1] = -0.f;
      store_f<P>(p, block_start + i, load_f<P>(p, block_start + i) - num[j], sto,
                 sto ? hash_bits(gpos + i, A.par_key) : 0u);
    }
    return;
  }
  const float decay = A.decay;
  const bool has_wd = A.weight_decay, rel = A.release;
  const int64_t q = A.qblock;
  const float* inv = rel ? S.qinv.data() : nullptr;
  float* pf = static_cast<float*>(p) + block_start;  // used for a float32 parameter only
  // Segments of the block inside one quantization block share the release scale.
  for (int64_t i0 = 0; i0 < lb;) {
    const int64_t qi = (s + i0) / q;
    const int64_t i1 = (qi + 1) * q - s < lb ? (qi + 1) * q - s : lb;
    const float iv = rel ? inv[qi] : 0.f;
    if (P == F32) {
      if (rel && has_wd) {
        for (int64_t i = i0; i < i1; ++i) pf[i] = pf[i] * decay - (res[i] * iv) * lr;
      } else if (rel) {
        for (int64_t i = i0; i < i1; ++i) pf[i] = pf[i] - (res[i] * iv) * lr;
      } else {
        for (int64_t i = i0; i < i1; ++i) pf[i] = pf[i] * decay;
      }
    } else {
      // Into res (each element read before it is overwritten), rounded once below.
      for (int64_t i = i0; i < i1; ++i) {
        float base = load_f<P>(p, block_start + i);
        if (has_wd) base = base * decay;
        if (rel) base = base - (res[i] * iv) * lr;
        res[i] = base;
      }
    }
    i0 = i1;
  }
  float* out = P == F32 ? pf : res;
  for (int64_t j = 0; j < nu; ++j) {
    const int32_t i = uniq[j];
    mom[2 * i] = 0.f;
    mom[2 * i + 1] = -0.f;
    out[i] = out[i] - num[j];
  }
  if (P != F32) {
    for (int64_t i = 0; i < lb; ++i)
      store_f<P>(p, block_start + i, res[i], sto, sto ? hash_bits(gpos + i, A.par_key) : 0u);
  }
}

template <int P>
void update_unit(const Args& A, Scratch& S, int64_t start, int64_t len, int& bad) {
  const int64_t B = A.block;
  for (int64_t s = 0; s < len && !bad; s += B) {
    const int64_t lb = s + B < len ? B : len - s;
    S.pump(16);
    update_block<P>(A, S, start + s, s, lb, (start + s) / B, S.a.data() + s, bad);
  }
}

// Each thread's scratch, kept across calls (torch's OpenMP threads live as long as the process).
// On the heap, reached through a thread-local pointer: with a thread-local object, GCC propagated
// its address into the functions it is passed to, and each use of the scratch there became a call
// to __tls_get_addr (the library is loaded with dlopen): 88 calls in run_unit, 3% of a 16M step's
// samples under perf.
Scratch& thread_scratch() {
  thread_local std::unique_ptr<Scratch> S;
  if (!S) S.reset(new Scratch());
  return *S;
}

void run_unit(const Args& A, Scratch& S, int64_t u, int& bad) {
  const int64_t start = u * A.unit;
  const int64_t len = start + A.unit < A.n ? A.unit : A.n - start;
  // While this unit computes, the next unit's data (gradient, codes, parameter, window entries) is
  // prefetched into L2 a few lines at a time (S.pump), and this unit's parameter too unless the
  // previous unit of this thread already did. The phases come in bursts of 16 KB loads between long
  // stretches of computation, which the hardware prefetchers do not run ahead of. The prefetches are
  // spread over the phases a few at a time (a burst of a hundred stalls the core as a demand miss
  // would). Measured on the 2-core dev machine at 16M parameters, cycles per element per thread:
  // 3.25 without software prefetch, 3.05 with it in bursts of 128 lines, 2.3-2.4 spread as now
  // (and 2.5 with the data in cache and no prefetch at all: the memory traffic is hidden).
  S.pf_n = S.pf_i = 0;
  if (S.pf_unit != u || S.pf_tensor != A.param)
    S.queue(static_cast<const char*>(A.param) + start * A.param_size, len * A.param_size);
  const int64_t next = start + len, next_len = next + A.unit < A.n ? A.unit : A.n - next;
  if (next < A.n) {
    S.queue(static_cast<const char*>(A.grad) + next * A.grad_size, next_len * A.grad_size);
    S.queue(A.codes + next / 2, (next_len + 1) / 2);
    S.queue(static_cast<const char*>(A.param) + next * A.param_size, next_len * A.param_size);
    const int64_t b0 = next / A.block, b1 = (next + next_len + A.block - 1) / A.block;
    for (int64_t age = 0; age < A.n_slots && S.pf_n + 2 <= Scratch::PF_MAX; ++age) {
      const int64_t off = (A.slot_of_age[age] * A.num_blocks + b0) * A.k;
      S.queue(A.win_idx + off, (b1 - b0) * A.k * 2);
      S.queue(A.win_val + off, (b1 - b0) * A.k * 2);
    }
    S.pf_unit = u + 1;
    S.pf_tensor = A.param;
  }
  PROFILE_START(len);
  switch (A.grad_dtype) {
    case F32: load_sum<F32>(A, S, start, len); break;
    case BF16: load_sum<BF16>(A, S, start, len); break;
    default: load_sum<F16>(A, S, start, len); break;
  }
  PROFILE_MARK(PH_LOAD);
  topk_unit(A, S, start, len);
  PROFILE_MARK(PH_TOPK);
  if (A.release) release_scales(A, S, len);
  PROFILE_MARK(PH_RELEASE);
  quantize_unit(A, S, start, len);
  PROFILE_MARK(PH_QUANT);
  switch (A.param_dtype) {
    case F32: update_unit<F32>(A, S, start, len, bad); break;
    case BF16: update_unit<BF16>(A, S, start, len, bad); break;
    default: update_unit<F16>(A, S, start, len, bad); break;
  }
  S.pump(INT64_MAX);  // whatever the phases left: the next unit needs it
  PROFILE_MARK(PH_UPDATE);
}

}  // namespace

// One tensor's step as Python describes it (kernels/cpu.py's _StepArgs mirrors this layout). The
// fields that stay the same from step to step come first and those of this step after `grad`, so
// that Python builds a row from two cached byte strings and this step's gradient address (its
// per-tensor cost is most of a step of many small tensors). Within each part: pointers, 64-bit
// integers, doubles, 32-bit integers, so that neither side pads differently.
struct StepArgs {
  void* param;
  int16_t* win_idx;
  uint16_t* win_val;
  uint8_t* codes;
  uint16_t* bounds;
  int64_t n, block, k, qblock, num_blocks, unit, position_offset;
  int32_t param_dtype, grad_dtype, weight_decay, stochastic_error, stochastic_param, release;
  // This step's:
  const void* grad;
  const int64_t* slot_of_age;
  const float* w1;
  const float* w2;
  int64_t n_slots, write_slot;
  double lr, c1, c2, eps, decay, keep, release_scale;
  uint32_t err_key, par_key;
};

static Args make_args(const StepArgs& s, void* vml_sqrt, int sqrt_mode) {
  Args A;
  A.param = s.param;
  A.param_dtype = s.param_dtype;
  A.param_size = s.param_dtype == F32 ? 4 : 2;
  A.grad_size = s.grad_dtype == F32 ? 4 : 2;
  A.grad = s.grad;
  A.grad_dtype = s.grad_dtype;
  A.win_idx = s.win_idx;
  A.win_val = s.win_val;
  A.codes = s.codes;
  A.bounds = s.bounds;
  A.n = s.n;
  A.block = s.block;
  A.k = s.k;
  A.qblock = s.qblock;
  A.num_blocks = s.num_blocks;
  A.unit = s.unit;
  A.n_slots = s.n_slots;
  A.slot_of_age = s.slot_of_age;
  A.w1 = s.w1;
  A.w2 = s.w2;
  A.write_slot = s.write_slot;
  // Python floats meet float32 tensors in the torch path as float32 scalars.
  A.lr = float(s.lr);
  A.c1 = float(s.c1);
  A.c2 = float(s.c2);
  A.eps = float(s.eps);
  A.decay = float(s.decay);
  A.weight_decay = s.weight_decay != 0;
  A.release = s.release != 0;
  A.keep = float(s.keep);
  A.rscale = float(s.release_scale);
  A.stochastic_error = s.stochastic_error != 0;
  A.stochastic_param = s.stochastic_param != 0 && s.param_dtype == BF16;
  A.err_key = s.err_key;
  A.par_key = s.par_key;
  A.position_offset = s.position_offset;
  A.vml_sqrt = reinterpret_cast<VmlSqrt>(vml_sqrt);
  A.sqrt_mode = sqrt_mode;
  return A;
}

extern "C" {

// The row's size and where its per-step part starts, which cpu.py compares with its own _StepArgs
// when it loads the library: a mismatch would have the kernel read the wrong fields.
int64_t microadam_step_args_size() { return int64_t(sizeof(StepArgs)); }
int64_t microadam_step_args_step_offset() { return int64_t(offsetof(StepArgs, grad)); }

// One step of `count` tensors. Their units form one list (tensor by tensor, each in order), cut
// into contiguous runs, one per thread: small tensors share threads and launch one parallel region
// in all, instead of a call (and a region, or one thread) each. bad[t] = 1 where tensor t's
// window_indices holds an index outside its block (a corrupt state); returns their count, or -1 if
// a thread could not allocate its scratch (then nothing was written).
int64_t microadam_step_cpu_multi(int64_t count, const StepArgs* items, int32_t* bad, void* vml_sqrt, int sqrt_mode,
                                 int num_threads) {
  std::vector<Args> As;
  std::vector<int64_t> first(1, 0);  // first global unit of each tensor, then the total
  int64_t unit = 1, block = 1, k = 1, window_k = 1, qblock = 1, nq = 1, nb = 1;
  bool release = false;
  for (int64_t t = 0; t < count; ++t) {
    bad[t] = 0;
    As.push_back(make_args(items[t], vml_sqrt, sqrt_mode));
    const Args& A = As.back();
    first.push_back(first.back() + (A.n > 0 ? (A.n + A.unit - 1) / A.unit : 0));
    unit = A.unit > unit ? A.unit : unit;
    block = A.block > block ? A.block : block;
    k = A.k > k ? A.k : k;
    window_k = A.n_slots * A.k > window_k ? A.n_slots * A.k : window_k;
    qblock = A.qblock > qblock ? A.qblock : qblock;
    const int64_t unit_nq = (A.unit + A.qblock - 1) / A.qblock, unit_nb = (A.unit + A.block - 1) / A.block;
    nq = unit_nq > nq ? unit_nq : nq;
    nb = unit_nb > nb ? unit_nb : nb;
    release = release || A.release;
  }
  // The scratch is reserved by every thread before any unit is stepped: an allocation that fails
  // (std::bad_alloc, which must not leave a parallel region nor this C function) then fails the
  // whole call with nothing written, instead of leaving some units stepped.
  int alloc_failed = 0;
  auto reserve = [&]() -> Scratch* {
    try {
      Scratch& S = thread_scratch();
      S.reserve(unit, block, k, window_k, release, qblock, nq, nb);
      S.pf_unit = -1;
      S.pf_tensor = nullptr;
      return &S;
    } catch (const std::bad_alloc&) {
      __atomic_store_n(&alloc_failed, 1, __ATOMIC_RELAXED);
      return nullptr;
    }
  };
  const int64_t total = first.back();
  // The tensor of global unit g, by binary search over the prefix sums (skips empty tensors).
  auto tensor_of = [&](int64_t g) {
    int64_t lo = 0, hi = count - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (first[mid] <= g) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return lo;
  };
  auto run = [&](Scratch& S, int64_t g) {
    const int64_t t = tensor_of(g);
    if (__atomic_load_n(&bad[t], __ATOMIC_RELAXED)) return;
    int b = 0;
    run_unit(As[t], S, g - first[t], b);
    if (b) __atomic_store_n(&bad[t], 1, __ATOMIC_RELAXED);
  };
#ifdef _OPENMP
  const int threads = total > 1 && num_threads > 1 ? num_threads : 1;
#else
  (void)num_threads;
  const int threads = 1;
#endif
  if (threads == 1) {
    // No parallel region at all, not a region of one thread: MKL's sqrt, called from inside an
    // inactive region, starts threads of its own on every call (measured: 24 us per call of 400
    // values, against 0.6 us outside a region or inside an active one; 5 ms per step for a bias).
    Scratch* S = reserve();
    if (S == nullptr) return -1;
    for (int64_t g = 0; g < total; ++g) run(*S, g);
  } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    {
      Scratch* S = reserve();
      // Every thread reads the flag after the barrier, so all of them skip the loop or none does.
#pragma omp barrier
      if (!__atomic_load_n(&alloc_failed, __ATOMIC_RELAXED)) {
#pragma omp for schedule(static)
        for (int64_t g = 0; g < total; ++g) run(*S, g);
      }
    }
#endif
    if (alloc_failed) return -1;
  }
  int64_t nbad = 0;
  for (int64_t t = 0; t < count; ++t) nbad += bad[t];
  return nbad;
}

#ifdef MICROADAM_PROFILE
// The counters of threads 0 .. threads - 1 ([thread][16]: the phases, then elements at 15) into out,
// then zeroed.
void microadam_profile_read(uint64_t* out, int threads) {
  for (int t = 0; t < threads && t < 64; ++t)
    for (int j = 0; j < 16; ++j) {
      out[16 * t + j] = PROFILE[t][j];
      PROFILE[t][j] = 0;
    }
}
#endif

// Whether every one of `count` tensors (contiguous; dtypes F32, BF16, F16) has a float32 sum of
// absolute values of at most `limit`: the optimizer's range check (optimizer.grads_in_range), which
// the torch path takes as one norm per tensor. Every element is at most that sum and a NaN or Inf
// makes it NaN or Inf, so 1 means every element is finite and within the limit; 0 may also be
// elements within it whose sum is not, which Python then checks element by element. One parallel
// region for all tensors, cut into chunks: a model's hundreds of small gradients cost one call
// instead of a reduction each. Each chunk sums in 64 float32 lanes; then the chunks of a tensor are
// added in order.
int32_t microadam_grads_in_range(int64_t count, const void* const* ptrs, const int64_t* numels, const int32_t* dtypes,
                                 float limit, int num_threads) {
  constexpr int64_t CHUNK = 1 << 16;
  std::vector<int64_t> first(1, 0);  // first chunk of each tensor, then the total
  for (int64_t t = 0; t < count; ++t) first.push_back(first.back() + (numels[t] + CHUNK - 1) / CHUNK);
  const int64_t total = first.back();
  std::vector<float> partial(size_t(total), 0.f);
  std::vector<int64_t> owner(static_cast<size_t>(total));
  for (int64_t t = 0; t < count; ++t)
    for (int64_t c = first[t]; c < first[t + 1]; ++c) owner[size_t(c)] = t;
  auto run = [&](int64_t c) {
    const int64_t t = owner[size_t(c)];
    const int64_t b = (c - first[t]) * CHUNK, e = b + CHUNK < numels[t] ? b + CHUNK : numels[t];
    float acc[64] = {0.f};
    int64_t i = b;
    switch (dtypes[t]) {
      case F32: {
        const float* x = static_cast<const float*>(ptrs[t]);
        for (; i + 64 <= e; i += 64)
          for (int l = 0; l < 64; ++l) acc[l] += std::fabs(x[i + l]);
        break;
      }
      case BF16:
        for (; i + 64 <= e; i += 64)
          for (int l = 0; l < 64; ++l) acc[l] += std::fabs(load_f<BF16>(ptrs[t], i + l));
        break;
      default:
        for (; i + 64 <= e; i += 64)
          for (int l = 0; l < 64; ++l) acc[l] += std::fabs(load_f<F16>(ptrs[t], i + l));
        break;
    }
    for (; i < e; ++i) {
      const int d = dtypes[t];
      acc[i & 63] += std::fabs(d == F32    ? load_f<F32>(ptrs[t], i)
                               : d == BF16 ? load_f<BF16>(ptrs[t], i)
                                           : load_f<F16>(ptrs[t], i));
    }
    float sum = 0.f;
    for (int l = 0; l < 64; ++l) sum += acc[l];
    partial[size_t(c)] = sum;
  };
#ifdef _OPENMP
  const int threads = total > 1 && num_threads > 1 ? num_threads : 1;
  if (threads > 1) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < total; ++c) run(c);
  } else {
    for (int64_t c = 0; c < total; ++c) run(c);
  }
#else
  (void)num_threads;
  for (int64_t c = 0; c < total; ++c) run(c);
#endif
  for (int64_t t = 0; t < count; ++t) {
    float sum = 0.f;
    for (int64_t c = first[t]; c < first[t + 1]; ++c) sum += partial[size_t(c)];
    if (!(sum <= limit)) return 0;  // beyond the limit, NaN or infinite
  }
  return 1;
}

// sqrt(in) into out as update_block computes it: Python checks a mode against torch.sqrt once,
// when it loads the library.
void microadam_sqrt_probe(const float* in, float* out, int64_t n, void* vml_sqrt, int sqrt_mode) {
  std::memcpy(out, in, sizeof(float) * size_t(n));
  torch_sqrt(out, n, sqrt_mode, reinterpret_cast<VmlSqrt>(vml_sqrt));
}

}  // extern "C"
