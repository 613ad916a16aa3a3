// river_ops.cpp: the two fused ops of river, declared once for every device, with their
// CPU kernels. river.py holds the plain PyTorch references they are tested against:
// vq_nearest_reference and euler_step_reference_.
//
//   vq_nearest(z (N, D), codebook (K, D)) -> (indices int64 (N,), squared distances (N,))
//     for each row z_n: k* = argmin_k ||z_n - e_k||^2 (ties -> lowest k), without ever
//     holding the (N, K) distance matrix. Distances come back in z's dtype. NaN and inf (the
//     rule of vq_nearest_reference): a code whose ||e||^2 is not finite is never chosen; a
//     row whose ||z||^2 is not finite, or that has no code to choose, gets index 0 and NaN.
//     A squared norm that overflows float32 (entries of ~1e19) counts as not finite.
//   euler_step_(x, v, dt): x += dt * v in place, one pass over memory. v may be x itself
//     (x <- (1 + dt) x); a v that overlaps x in part is refused, as add_ refuses it.
//   Both take float32, float16 or bfloat16, compute in float32 and round once at the end
//   (the reference too: float16 squares would overflow from entries of ~256).
//   Layouts: vq_nearest copies a strided z or codebook to a contiguous one (they are only
//   read); euler_step_ takes x and v contiguous, or dense with the same strides (e.g. both
//   channels_last), and refuses anything else rather than copy: it must write x in place.
//
// Work split on the CPU (cores x vector lanes):
//   vq_nearest  the codebook is packed once per call into panels of W codes, W = one vector
//     register of float32 (16 with AVX-512, 8 with AVX2, 4 in the default copy), each panel a
//     (D, W) block (code dim major) plus its W norms ||e||^2, so the loop over codes is
//     contiguous and one register wide. Cores take chunks of up to 128 vectors, at least 4
//     chunks per thread where N allows (so a small N still uses every core); inside a chunk
//     the panels are swept in 16 KB tiles that stay in L1, and the micro-kernel walks R=4
//     vectors at once along a tile: acc[r][j] = ||e_j||^2 - 2 z_r . e_j, then a running
//     min/argmin per (vector, lane), reduced over lanes at the end (lowest index on ties).
//     D = 1..8 have micro-kernels of their own, with the loop over d unrolled.
//   euler_step_  cores take chunks of 32K elements; the loop over elements is plain and the
//     compiler vectorises it (float16 uses F16C conversions, 8 at a time).
//   Both hand chunks to cores one at a time (parallel_chunks), so a core shared with
//   another process does less of the work instead of holding up the call.
// x86-64 builds carry a default (SSE2) and an AVX2+FMA+F16C copy of each inner kernel, and
// for vq_nearest an AVX-512 (F, BW, VL, DQ) copy too, picked at run time: a wheel built here
// runs on any x86-64 and still uses the widest vectors the CPU has. Other CPUs get the
// default copy. torch.ops.river.set_cpu_isa("default" | "avx2" | "avx512" | "auto") forces
// a copy (tests, benchmarks).
//
// Napkin math (what was measured against it: README.md, section Kernels):
//   vq_nearest  2*N*K*D FLOPs. Per panel and vector the micro-kernel issues D FMAs, then a
//     min, a compare and a masked move (and a 1/R share of an index increment), all on the
//     two vector pipes that run the FMAs: it can reach at most D/(D+3.25) of the FMA peak,
//     55% at D=4, 71% at D=8. (AMX would not help: it multiplies bfloat16 and int8, not
//     float32, and at D=4 the FMAs are not what limits.) The FMA peak is cores x 2 FMA pipes
//     x W lanes x 2 FLOPs x clock: 2 cores of AVX2 at 2.45 GHz, 157 GFLOP/s; 2 of AVX-512 at
//     2.6 GHz, 333 GFLOP/s (more under turbo). The memory is small: the packed codebook
//     streams through L1 once per chunk, z is read once.
//   euler_step_ 12 bytes per float32 element (read x, read v, write x) and one FMA: memory
//     bound, at best as fast as x.add_. 8M elements = 96 MB, ~3 ms at 30 GB/s.
//   For the GPU see vq_nearest.cu and euler_step.cu.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <Python.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "river_checks.h"

#define RIVER_STR_(x) #x
#define RIVER_STR(x) RIVER_STR_(x)

// The SHA-256 of csrc/ this library was built from (csrc/build.py passes it), kept as a
// plain string in the binary: river.py reads it from the file to tell a stale build.
#ifdef RIVER_SOURCE_HASH
extern "C" __attribute__((used)) const char river_source_hash[] =
    "river-source-hash:" RIVER_STR(RIVER_SOURCE_HASH);
#endif

// `import river_kernels` (the setup.py build) needs a module init; the ops register when
// the library is loaded, so the module itself is empty. A JIT build loaded with
// is_python_module=False never calls it.
#ifdef TORCH_EXTENSION_NAME
#define RIVER_CAT_(a, b) a##b
#define RIVER_CAT(a, b) RIVER_CAT_(a, b)
PyMODINIT_FUNC RIVER_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, RIVER_STR(TORCH_EXTENSION_NAME),
                               "river's fused ops; importing registers torch.ops.river.*",
                               -1, nullptr};
  return PyModule_Create(&module);
}
#endif

TORCH_LIBRARY(river, m) {
  m.def("vq_nearest(Tensor z, Tensor codebook) -> (Tensor, Tensor)");
  m.def("euler_step_(Tensor(a!) x, Tensor v, float dt) -> ()");
  // which copy of the CPU inner kernels runs; see river::set_cpu_isa below
  m.def("set_cpu_isa(str isa) -> str");
}

namespace river {
namespace {

// Each inner kernel is written once as an always-inline body and compiled once per
// instruction set under __attribute__((target(...))); cpu_isa() picks the copy at run time.
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define RIVER_X86_DISPATCH 1
#define RIVER_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
// the x86-64-v4 set, which every AVX-512 CPU but Xeon Phi has: the compiler may then use
// all 32 vector registers and masks at every width, not only in 512-bit code
#define RIVER_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#endif

// The CPU instruction sets that inner kernels have copies for, narrowest first. A kernel
// without a copy for the selected set runs its widest copy below it.
enum class Isa : int { base = 0, avx2 = 1, avx512 = 2 };
constexpr const char* ISA_NAMES[] = {"default", "avx2", "avx512"};
constexpr int ISA_COUNT = sizeof(ISA_NAMES) / sizeof(ISA_NAMES[0]);

// The widest set this CPU (and OS: __builtin_cpu_supports checks the saved register
// state too) can run. Asked on first use, not at load time: libgcc's CPU probe must have
// run first.
Isa best_isa() {
  static const Isa best = [] {
#ifdef RIVER_X86_DISPATCH
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::avx512;
    if (avx2) return Isa::avx2;
#endif
    return Isa::base;
  }();
  return best;
}

std::atomic<Isa>& selected_isa() {
  static std::atomic<Isa> isa{best_isa()};
  return isa;
}

Isa cpu_isa() { return selected_isa().load(std::memory_order_relaxed); }

// torch.ops.river.set_cpu_isa(name): from now on, every CPU call of the ops in this process
// uses the copies of its inner kernels for `name` ("default", "avx2", "avx512"), or the
// best this CPU has ("auto", the setting at load time). Returns the name of the set in use.
// A set the CPU cannot run is an error, not a silent fallback. For tests and benchmarks.
std::string set_cpu_isa(const std::string& name) {
  int want = -1;
  for (int i = 0; i < ISA_COUNT; ++i)
    if (name == ISA_NAMES[i]) want = i;
  std::string choices = "auto";
  for (int i = 0; i <= int(best_isa()); ++i) choices = choices + ", " + ISA_NAMES[i];
  TORCH_CHECK(name == "auto" || want >= 0, "set_cpu_isa: unknown instruction set '", name,
              "'; this CPU can run: ", choices);
  TORCH_CHECK(want <= int(best_isa()), "set_cpu_isa: this CPU cannot run ", name,
              "; it can run: ", choices);
  const Isa isa = name == "auto" ? best_isa() : Isa(want);
  selected_isa().store(isa);
  return ISA_NAMES[int(isa)];
}

#define RIVER_INLINE inline __attribute__((always_inline))

// fn(c) for every chunk c in [0, chunks) on torch's intra-op threads (at::parallel_for,
// i.e. OpenMP). Threads take chunks one at a time from a shared counter instead of equal
// shares fixed up front: on a shared machine, a core that is busy elsewhere takes fewer
// chunks rather than holding the others up. `serial` keeps small jobs on the calling thread.
template <typename F>
void parallel_chunks(int64_t chunks, bool serial, const F& fn) {
  if (serial || chunks == 1 || at::get_num_threads() == 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < chunks; ++c) fn(c);
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next++; c < chunks; c = next++) fn(c);
  });
}

// ---------------------------------------------------------------------------------------
// euler_step_: x += dt * v
// ---------------------------------------------------------------------------------------

template <typename T>
RIVER_INLINE void euler_range(T* x, const T* v, float dt, int64_t n) {  // x may be v
#pragma GCC unroll 4
  for (int64_t i = 0; i < n; ++i) {
    // x <- round(x + dt * v), computed in float
    x[i] = static_cast<T>(static_cast<float>(x[i]) + dt * static_cast<float>(v[i]));
  }
}

template <typename T>
void euler_range_default(T* x, const T* v, float dt, int64_t n) { euler_range(x, v, dt, n); }

#ifdef RIVER_X86_DISPATCH
template <typename T>
RIVER_TARGET_AVX2 void euler_range_avx2(T* x, const T* v, float dt, int64_t n) {
  euler_range(x, v, dt, n);
}

// float16 one element at a time is a software conversion (~25x slower than float32 here);
// F16C converts 8 at once: vcvtph2ps, one fused x + dt * v in float, vcvtps2ph (to nearest).
template <>
RIVER_TARGET_AVX2 void euler_range_avx2<at::Half>(at::Half* x, const at::Half* v, float dt,
                                                   int64_t n) {
  const __m256 dt8 = _mm256_set1_ps(dt);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    const __m256 v8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + i)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(x + i),
                     _mm256_cvtps_ph(_mm256_fmadd_ps(dt8, v8, x8), _MM_FROUND_TO_NEAREST_INT));
  }
  euler_range(x + i, v + i, dt, n - i);
}
#endif

template <typename T>
void euler_step_typed(T* x, const T* v, float dt, int64_t n) {
  auto range = &euler_range_default<T>;
#ifdef RIVER_X86_DISPATCH
  if (cpu_isa() >= Isa::avx2) range = &euler_range_avx2<T>;
#endif
  // chunks of 32K elements (384 KB of float32 traffic), torch's own grain for pointwise
  // ops: below that, waking a second core costs more than it saves
  constexpr int64_t CHUNK = 1 << 15;
  parallel_chunks((n + CHUNK - 1) / CHUNK, false, [&](int64_t c) {
    range(x + c * CHUNK, v + c * CHUNK, dt, std::min(CHUNK, n - c * CHUNK));
  });
}

void euler_step_cpu(at::Tensor& x, const at::Tensor& v, double dt) {
  check_euler_step_args(x, v);
  TORCH_CHECK(x.device().is_cpu(), "euler_step_: CPU kernel got a tensor on ", x.device());
  const int64_t n = x.numel();
  if (n == 0) return;
  switch (x.scalar_type()) {
    case at::kFloat:
      euler_step_typed(x.data_ptr<float>(), v.data_ptr<float>(), float(dt), n);
      break;
    case at::kHalf:
      euler_step_typed(x.data_ptr<at::Half>(), v.data_ptr<at::Half>(), float(dt), n);
      break;
    default:
      euler_step_typed(x.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(), float(dt), n);
  }
}

// ---------------------------------------------------------------------------------------
// vq_nearest: argmin_k ||z_n - e_k||^2
// ---------------------------------------------------------------------------------------

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int R = 4;         // vectors per micro-kernel call (R accumulators of W lanes)
constexpr int NC_MAX = 128;  // most vectors per chunk, the unit of work of one core
// panels swept per tile: half of a 32 KB L1d (AMD Zen), a third of a 48 KB one (Intel)
constexpr int64_t TILE_BYTES = 16 * 1024;

// The codebook packed for the micro-kernel, W codes per panel (W = one vector register of
// float32: 4 for the default copy (SSE2, NEON), 8 for AVX2, 16 for AVX-512): panel p holds codes
// [p*W, p*W + W) as a (D, W) block, norms[p*W + j] = ||e_{p*W+j}||^2. Padding codes, and
// codes whose ||e||^2 is not finite (a NaN or inf entry), are zeros with norm +inf: every
// ||e||^2 - 2 z.e of theirs is +inf (NaN for a non-finite z), never below the running
// minimum, which starts at +inf: they are never chosen.
template <int W>
struct PackedCodebook {
  int64_t D, panels;
  std::vector<float> data;   // (panels, D, W)
  std::vector<float> norms;  // (panels * W)
};

template <int W, typename T>
PackedCodebook<W> pack_codebook(const T* e, int64_t K, int64_t D) {
  PackedCodebook<W> cb{D, (K + W - 1) / W, {}, {}};
  cb.data.assign(cb.panels * D * W, 0.f);
  cb.norms.assign(cb.panels * W, std::numeric_limits<float>::infinity());
  for (int64_t k = 0; k < K; ++k) {
    const T* code = e + k * D;
    float norm = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      const float val = static_cast<float>(code[d]);
      norm += val * val;
    }
    if (!std::isfinite(norm)) continue;  // stays a padding code
    float* panel = cb.data.data() + (k / W) * D * W + k % W;
    for (int64_t d = 0; d < D; ++d) panel[d * W] = static_cast<float>(code[d]);  // (D, W) block
    cb.norms[k] = norm;
  }
  return cb;
}

// GCC/Clang vector type of W lanes of S, one register wide: wider than the target's
// registers, GCC splits the loads but turns the compares and selects into scalar code (8x
// slower with W=8 on SSE2). (A typedef in a class template: GCC drops vector_size on an
// alias template.) They never cross a call boundary (all users are inlined), so GCC's note
// that passing them by value changes the ABI does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename S, int W>
struct Vec {
  typedef S type __attribute__((vector_size(W * sizeof(S))));
  static_assert(sizeof(type) == W * sizeof(S));
};

// unaligned loads and stores of a whole vector (memcpy compiles to one vmovups)
template <typename V, typename S>
RIVER_INLINE V load_v(const S* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V, typename S>
RIVER_INLINE void store_v(S* p, const V& v) { __builtin_memcpy(p, &v, sizeof(v)); }

// The smallest of the W lanes of v: halves folded onto each other, log2(W) vector mins.
template <typename S, int W>
RIVER_INLINE S min_lane(const typename Vec<S, W>::type& v) {
  if constexpr (W > 4) {
    typedef typename Vec<S, W / 2>::type Half;
    const Half lo = load_v<Half>(reinterpret_cast<const S*>(&v));
    const Half hi = load_v<Half>(reinterpret_cast<const S*>(&v) + W / 2);
    return min_lane<S, W / 2>(hi < lo ? hi : lo);
  } else {
    S m = v[0];
    for (int j = 1; j < W; ++j) m = v[j] < m ? v[j] : m;
    return m;
  }
}

// One micro-kernel call: R vectors (rows of zm2 = -2 z, D apart) against panels [p0, p1).
// best/arg hold each (vector, lane)'s running minimum of ||e||^2 - 2 z.e and its panel.
// DC > 0 is D known at compile time: the loop over d unrolls, and the R*D broadcasts of z
// are made once per call instead of once per panel.
template <int W, int DC>
RIVER_INLINE void vq_micro(const float* __restrict zm2, int64_t D_, const PackedCodebook<W>& cb,
                           int64_t p0, int64_t p1, float* __restrict best_io,
                           int32_t* __restrict arg_io) {
  typedef typename Vec<float, W>::type f32v;
  typedef typename Vec<int32_t, W>::type i32v;
  const int64_t D = DC > 0 ? DC : D_;
  f32v best[R];
  i32v arg[R];
  for (int r = 0; r < R; ++r) {
    best[r] = load_v<f32v>(best_io + r * W);
    arg[r] = load_v<i32v>(arg_io + r * W);
  }
  const float* panel = cb.data.data() + p0 * D * W;
  i32v here = i32v{} + int32_t(p0);
  for (int64_t p = p0; p < p1; ++p, panel += D * W, here += 1) {
    const f32v norms = load_v<f32v>(cb.norms.data() + p * W);
    f32v acc[R];
    for (int r = 0; r < R; ++r) acc[r] = norms;
    // acc[r] = ||e_j||^2 - 2 z_r . e_j for the W codes j of this panel
    for (int64_t d = 0; d < D; ++d) {
      const f32v e = load_v<f32v>(panel + d * W);
      for (int r = 0; r < R; ++r) acc[r] += zm2[r * D + d] * e;
    }
    // strict < keeps the earlier code on a tie, so each lane holds its lowest index. The
    // mask comes from comparing the new minimum (one vminps) with the old: blending floats
    // by the compare instead costs 3 micro-ops per blend on Intel cores without AVX-512
    for (int r = 0; r < R; ++r) {
      const f32v m = acc[r] < best[r] ? acc[r] : best[r];
      const i32v lt = m != best[r];
      best[r] = m;
      arg[r] = lt ? here : arg[r];
    }
  }
  for (int r = 0; r < R; ++r) {
    store_v(best_io + r * W, best[r]);
    store_v(arg_io + r * W, arg[r]);
  }
}

// rows <= NC_MAX vectors (a multiple of R), given as zm2 = -2 z (rows, D), against the
// whole packed codebook: val[i] = min_k ||e_k||^2 - 2 z_i.e_k and code[i] = its k, the
// lowest k on ties.
template <int W, int DC>
RIVER_INLINE void vq_rows(const float* zm2, int64_t rows, const PackedCodebook<W>& cb,
                          float* val, int64_t* code) {
  typedef typename Vec<float, W>::type f32v;
  typedef typename Vec<uint32_t, W>::type u32v;
  alignas(64) float best[NC_MAX * W];
  alignas(64) int32_t arg[NC_MAX * W];
  std::fill_n(best, rows * W, std::numeric_limits<float>::infinity());
  std::fill_n(arg, rows * W, 0);
  // the panels in equal tiles of at most TILE_BYTES, each swept by all rows while in L1
  const int64_t per_tile = std::max<int64_t>(1, TILE_BYTES / ((cb.D + 1) * W * 4));
  const int64_t tiles = (cb.panels + per_tile - 1) / per_tile;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t p0 = cb.panels * t / tiles, p1 = cb.panels * (t + 1) / tiles;
    for (int64_t r0 = 0; r0 < rows; r0 += R)
      vq_micro<W, DC>(zm2 + r0 * cb.D, cb.D, cb, p0, p1, best + r0 * W, arg + r0 * W);
  }
  // reduce over lanes: the smallest value, then the lowest code among the lanes holding it
  u32v lane;
  for (int j = 0; j < W; ++j) lane[j] = j;
  for (int64_t i = 0; i < rows; ++i) {
    const f32v b = load_v<f32v>(best + i * W);
    const float m = min_lane<float, W>(b);
    // codes < K + W <= 2^31 + W: no overflow in uint32
    const u32v codes = load_v<u32v>(arg + i * W) * uint32_t(W) + lane;
    const u32v none = u32v{} + std::numeric_limits<uint32_t>::max();
    val[i] = m;
    code[i] = min_lane<uint32_t, W>(b == m ? codes : none);
  }
}

// vq_rows with D fixed at compile time for D = 1..8, where the loop over d and the
// broadcasts of z per panel are a sizeable part of the work (5-15% faster at D = 4 and 8);
// the general copy for larger D
template <int W>
RIVER_INLINE void vq_rows_any_d(const float* zm2, int64_t rows, const PackedCodebook<W>& cb,
                                float* val, int64_t* code) {
  switch (cb.D) {
#define RIVER_D_CASE(d) \
  case d:               \
    return vq_rows<W, d>(zm2, rows, cb, val, code);
    RIVER_D_CASE(1) RIVER_D_CASE(2) RIVER_D_CASE(3) RIVER_D_CASE(4)
    RIVER_D_CASE(5) RIVER_D_CASE(6) RIVER_D_CASE(7) RIVER_D_CASE(8)
#undef RIVER_D_CASE
    default:
      return vq_rows<W, 0>(zm2, rows, cb, val, code);
  }
}

void vq_rows_default(const float* zm2, int64_t rows, const PackedCodebook<4>& cb, float* val,
                     int64_t* code) {
  vq_rows_any_d(zm2, rows, cb, val, code);
}

#ifdef RIVER_X86_DISPATCH
RIVER_TARGET_AVX2 void vq_rows_avx2(const float* zm2, int64_t rows, const PackedCodebook<8>& cb,
                                    float* val, int64_t* code) {
  vq_rows_any_d(zm2, rows, cb, val, code);
}

RIVER_TARGET_AVX512 void vq_rows_avx512(const float* zm2, int64_t rows,
                                        const PackedCodebook<16>& cb, float* val,
                                        int64_t* code) {
  vq_rows_any_d(zm2, rows, cb, val, code);
}
#endif

template <int W>
using VqRows = void (*)(const float*, int64_t, const PackedCodebook<W>&, float*, int64_t*);

// Packs the codebook W codes per panel and hands chunks of vectors to the cores; each chunk
// goes to float as -2 z, through `vq_rows_isa` (the copy of vq_rows picked), and back.
template <int W, typename T>
void vq_nearest_with(VqRows<W> vq_rows_isa, const T* z, const T* e, int64_t N, int64_t K,
                     int64_t D, int64_t* idx, T* dist) {
  const PackedCodebook<W> cb = pack_codebook<W>(e, K, D);
  // at least 4 chunks per thread where N allows, so that a small N still spreads over the
  // cores and a core slowed by another process hands its share on; but no fewer than 4R
  // vectors per chunk, each of which streams the whole codebook through L1
  const int64_t per_thread = (N + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads());
  const int64_t nc = std::clamp<int64_t>((per_thread + R - 1) / R * R, 4 * R, NC_MAX);
  // a problem under ~100K FLOPs is not worth waking a second core for
  parallel_chunks((N + nc - 1) / nc, 2 * N * K * D < 100000, [&](int64_t c) {
    const int64_t n0 = c * nc, n = std::min<int64_t>(nc, N - n0);
    const int64_t rows = (n + R - 1) / R * R;  // padded with zero vectors, results dropped
    std::vector<float> zm2(rows * D, 0.f);
    float val[NC_MAX];
    int64_t code[NC_MAX];
    for (int64_t i = 0; i < n * D; ++i) zm2[i] = -2.f * static_cast<float>(z[n0 * D + i]);
    vq_rows_isa(zm2.data(), rows, cb, val, code);
    for (int64_t i = 0; i < n; ++i) {
      float z2 = 0.f;
      for (int64_t d = 0; d < D; ++d)
        z2 += static_cast<float>(z[(n0 + i) * D + d]) * static_cast<float>(z[(n0 + i) * D + d]);
      const bool found = std::isfinite(z2) && val[i] < kInf;  // else: the NaN/inf rule
      idx[n0 + i] = found ? code[i] : 0;
      // ||z - e||^2 = ||z||^2 + (||e||^2 - 2 z.e), clamped: rounding can dip below 0
      dist[n0 + i] = static_cast<T>(found ? std::max(z2 + val[i], 0.f) : kNaN);
    }
  });
}

template <typename T>
void vq_nearest_typed(const T* z, const T* e, int64_t N, int64_t K, int64_t D, int64_t* idx,
                      T* dist) {
#ifdef RIVER_X86_DISPATCH
  const Isa isa = cpu_isa();
  if (isa >= Isa::avx512) return vq_nearest_with<16>(&vq_rows_avx512, z, e, N, K, D, idx, dist);
  if (isa >= Isa::avx2) return vq_nearest_with<8>(&vq_rows_avx2, z, e, N, K, D, idx, dist);
#endif
  vq_nearest_with<4>(&vq_rows_default, z, e, N, K, D, idx, dist);
}

std::tuple<at::Tensor, at::Tensor> vq_nearest_cpu(const at::Tensor& z_in,
                                                  const at::Tensor& codebook_in) {
  check_vq_nearest_args(z_in, codebook_in);
  TORCH_CHECK(z_in.device().is_cpu(), "vq_nearest: CPU kernel got a tensor on ", z_in.device());
  // read-only inputs: a strided view is copied once rather than refused
  const at::Tensor z = z_in.contiguous(), codebook = codebook_in.contiguous();
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  at::Tensor idx = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor dist = at::empty({N}, z.options());
  if (N == 0) return {idx, dist};
  switch (z.scalar_type()) {
    case at::kFloat:
      vq_nearest_typed(z.data_ptr<float>(), codebook.data_ptr<float>(), N, K, D,
                       idx.data_ptr<int64_t>(), dist.data_ptr<float>());
      break;
    case at::kHalf:
      vq_nearest_typed(z.data_ptr<at::Half>(), codebook.data_ptr<at::Half>(), N, K, D,
                       idx.data_ptr<int64_t>(), dist.data_ptr<at::Half>());
      break;
    default:
      vq_nearest_typed(z.data_ptr<at::BFloat16>(), codebook.data_ptr<at::BFloat16>(), N, K, D,
                       idx.data_ptr<int64_t>(), dist.data_ptr<at::BFloat16>());
  }
  return {idx, dist};
}

}  // namespace

}  // namespace river

// set_cpu_isa has no tensor arguments to dispatch on: one kernel for every backend
TORCH_LIBRARY_IMPL(river, CatchAll, m) { m.impl("set_cpu_isa", &river::set_cpu_isa); }

TORCH_LIBRARY_IMPL(river, CPU, m) {
  m.impl("vq_nearest", &river::vq_nearest_cpu);
  m.impl("euler_step_", &river::euler_step_cpu);
}
