// vq_nearest.cu: nearest codebook entry for every row of z on the GPU, without the (N, K)
// distance matrix: idx[n] = argmin_k ||z_n - e_k||^2 (ties -> lowest k), dist[n] = the
// squared distance, computed in float32 for every input dtype and rounded once. NaN/inf:
// a code with a non-finite ||e||^2 is never chosen; a row with a non-finite ||z||^2, or
// without a code to choose, gets index 0 and distance NaN (river.vq_nearest_reference's rule).
//
// Work split, in three kernels on the caller's stream:
//   pack    one thread per code: the codebook once as float32 rows of R = round_up(DP + 1,
//           4) floats, [||e||^2, e_0 .. e_{D-1}, zeros], 16-byte aligned, in a workspace.
//           DP is D rounded up to a compiled width (1..8, 12, 16, 24, 32, 48, 64; the zeros
//           add nothing to a dot product). A code with a non-finite ||e||^2 is packed as
//           zeros with norm +inf.
//   search  a grid of B x S blocks of 128 threads; each thread takes V vectors (V = 4 for
//           DP <= 8, 2 for DP <= 16, else 1), so block b covers 128 V vectors, and slice s
//           of the codebook (S > 1 only when N alone gives fewer than ~8 blocks per SM). A
//           block walks its slice in 8 KB tiles copied from the workspace into shared
//           memory with float4 loads; every thread of a warp then reads the same row at
//           once (a broadcast, no bank conflict), R / 4 float4 loads per code for its V
//           vectors. Each thread keeps -2 z of its vectors in registers and a running
//           min/argmin per vector (32-bit index), in code order, so a strict < leaves ties
//           at the lowest index. The S partial results of a vector meet in one 64-bit
//           atomicMin on (distance as order-preserving uint32, index): the smaller distance
//           wins and, on a tie, the lower index. The key lives in idx itself (int64).
//           D > 64 runs a plain loop instead: one vector per thread, codes read from the
//           workspace (L1/L2) and z_n from global memory for every code: slow, unused by
//           river's autoencoders (D = 4 or 8).
//   finish  one thread per vector unpacks the key into idx and dist = ||z||^2 + (||e||^2 -
//           2 z.e), clamped at 0, and applies the NaN/inf rule.
//
// Napkin math: 2 N K D FLOPs (one FMA per code dimension), plus per (vector, code) a
// compare and two selects and 1/V of the row loads and loop. At D = 4, V = 4: 4 FMAs + 3 +
// ~0.8 = ~8 instructions per pair, against ~15 for one vector per thread with 64-bit
// indices (the previous kernel). H100 SXM FP32: 132 SMs x 128 lanes x ~1.9 GHz = 32 T
// instructions/s; N = 16384, K = 16384 at D = 4: 2.1 G instructions, ~70 us once the SMs
// are full. Memory is negligible: z is read S times, the packed codebook (K R floats)
// B times, mostly from L2. Shared memory: 8 KB per block, so residency is set by registers
// (~60 per thread at D = 4, V = 4: ~8 blocks of 128 threads per SM), not by the tile.

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "float_convert.cuh"
#include "kernels.h"

namespace river {
namespace {

constexpr int THREADS = 128;          // threads per search block
constexpr int TILE_BYTES = 8 * 1024;  // shared memory tile of packed codes per block
constexpr int MIN_CODES_PER_SLICE = 256;

__host__ __device__ __forceinline__ bool finite(float x) { return fabsf(x) <= FLT_MAX; }

// D rounded up to the widths compiled as constants; 0 (the plain loop) above 64
__host__ __device__ constexpr int padded_dim(int64_t D) {
  return D <= 8 ? int(D) : D <= 16 ? int((D + 3) / 4 * 4) : D <= 32 ? int((D + 7) / 8 * 8)
       : D <= 64 ? int((D + 15) / 16 * 16) : 0;
}
// floats per packed code: the norm, D values, zeros up to a multiple of 4 (16 bytes)
__host__ __device__ constexpr int64_t row_floats(int64_t DP) { return (DP + 1 + 3) / 4 * 4; }
__host__ __device__ constexpr int vectors_per_thread(int DP) {
  return DP == 0 ? 1 : DP <= 8 ? 4 : DP <= 16 ? 2 : 1;
}
__host__ __device__ constexpr int tile_codes(int DP) {
  return int(TILE_BYTES / (4 * row_floats(DP)));
}

// The grid of one search: blocks x slices blocks, ks codes per slice (no slice empty).
struct VqPlan {
  int dp;             // padded_dim(D)
  int64_t row;        // row_floats of the packed codebook
  int vectors;        // vectors per thread
  int64_t blocks, slices, ks;
};

VqPlan vq_plan(int64_t N, int64_t K, int64_t D, int sms) {
  VqPlan p;
  p.dp = padded_dim(D);
  p.row = row_floats(p.dp > 0 ? p.dp : D);
  p.vectors = vectors_per_thread(p.dp);
  p.blocks = (N + THREADS * p.vectors - 1) / (THREADS * p.vectors);
  // split the codebook only as far as it takes to give every SM ~8 blocks, and keep at
  // least MIN_CODES_PER_SLICE codes per slice so staging a tile stays cheap next to using it
  const int64_t want = (8 * int64_t(sms > 0 ? sms : 1) + p.blocks - 1) / p.blocks;
  int64_t slices = (K + MIN_CODES_PER_SLICE - 1) / MIN_CODES_PER_SLICE;
  slices = want < slices ? want : slices;
  slices = slices < 1 ? 1 : slices > 65535 ? 65535 : slices;
  p.ks = (K + slices - 1) / slices;
  p.slices = (K + p.ks - 1) / p.ks;
  return p;
}

// (distance, index) as one uint64 whose unsigned order is "smaller distance, then lower
// index". A float's bits, sign bit flipped for positives and all bits for negatives, sort
// as unsigned integers in the float's order.
__host__ __device__ __forceinline__ unsigned int float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  unsigned int u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}
__host__ __device__ __forceinline__ float bits_float(unsigned int u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}
__host__ __device__ __forceinline__ unsigned long long pack_key(float d, int k) {
  const unsigned int u = float_bits(d == 0.f ? 0.f : d);  // -0 would sort below +0
  const unsigned int ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<unsigned long long>(ordered) << 32) | static_cast<unsigned int>(k);
}
__host__ __device__ __forceinline__ float key_distance(unsigned long long key) {
  const unsigned int ordered = static_cast<unsigned int>(key >> 32);
  return bits_float((ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered);
}
__host__ __device__ __forceinline__ void publish(unsigned long long* key, unsigned long long k) {
#ifdef __CUDA_ARCH__
  atomicMin(key, k);
#else
  *key = k < *key ? k : *key;  // the host replay of a launch runs one thread at a time
#endif
}

// pack: code k as [||e||^2, e_0 .. e_{D-1}, 0 ...] (row floats), or zeros with norm +inf
template <typename T>
__host__ __device__ __forceinline__ void pack_code(const T* e, int64_t D, int64_t row,
                                                   float* out) {
  float norm = 0.f;
  for (int64_t d = 0; d < D; ++d) norm += to_float(e[d]) * to_float(e[d]);
  const bool ok = finite(norm);
  out[0] = ok ? norm : INFINITY;
  for (int64_t c = 1; c < row; ++c) out[c] = ok && c <= D ? to_float(e[c - 1]) : 0.f;
}

template <typename T>
__global__ void vq_pack_codebook(const T* __restrict__ codebook, int64_t K, int64_t D,
                                 int64_t row, float* __restrict__ packed) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < K) pack_code(codebook + k * D, D, row, packed + k * row);
}

// copies codes [k0, k0 + tk) of the packed codebook into the tile; thread tid's share
__host__ __device__ __forceinline__ void stage_tile(float4* tile, const float4* packed,
                                                    int64_t k0, int tk, int64_t row4, int tid) {
  for (int64_t i = tid; i < tk * row4; i += THREADS) tile[i] = packed[k0 * row4 + i];
}

// One search thread: vectors first, first + THREADS, ... (V of them) of a block, -2 z of
// each in registers (zero-padded to DP), and their running minimum of ||e||^2 - 2 z.e
// with its code.
template <int DP>
struct SearchThread {
  static constexpr int V = vectors_per_thread(DP);
  static constexpr int ROW = int(row_floats(DP));
  float zm2[V][DP];
  float best[V];
  int arg[V];

  template <typename T>
  __host__ __device__ __forceinline__ void load(const T* z, int64_t N, int64_t D,
                                                int64_t first, int64_t k_begin) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t n = first + int64_t(j) * THREADS;
#pragma unroll
      for (int d = 0; d < DP; ++d) zm2[j][d] = n < N && d < D ? -2.f * to_float(z[n * D + d]) : 0.f;
      best[j] = INFINITY;  // a code at +inf (or NaN: a non-finite row) is never chosen
      arg[j] = int(k_begin);
    }
  }

  // codes [k0, k0 + tk), packed rows in `tile`
  __host__ __device__ __forceinline__ void scan(const float4* tile, int tk, int k0) {
#pragma unroll 4
    for (int k = 0; k < tk; ++k) {
      const float4* e = tile + k * (ROW / 4);
      float acc[V];
#pragma unroll
      for (int q = 0; q < ROW / 4; ++q) {
        const float4 f = e[q];
        const float c[4] = {f.x, f.y, f.z, f.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int col = 4 * q + i;  // a constant once unrolled
          if (col == 0) {
#pragma unroll
            for (int j = 0; j < V; ++j) acc[j] = c[i];  // ||e_k||^2
          } else if (col <= DP) {
#pragma unroll
            for (int j = 0; j < V; ++j) acc[j] = fmaf(zm2[j][col - 1], c[i], acc[j]);  // -2 z.e
          }
        }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const bool lt = acc[j] < best[j];  // strict: a tie keeps the lower k
        best[j] = lt ? acc[j] : best[j];
        arg[j] = lt ? k0 + k : arg[j];
      }
    }
  }

  __host__ __device__ __forceinline__ void publish_all(unsigned long long* keys, int64_t N,
                                                       int64_t first) const {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t n = first + int64_t(j) * THREADS;
      if (n < N) publish(keys + n, pack_key(best[j], arg[j]));
    }
  }
};

// Block (blockIdx.x, blockIdx.y): vectors [128 V bx, 128 V (bx + 1)) against codes
// [ks by, ks (by + 1)), D <= DP <= 64.
template <typename T, int DP>
__global__ void __launch_bounds__(THREADS)
vq_nearest_search(const T* __restrict__ z, const float4* __restrict__ packed, int64_t N,
                  int64_t K, int64_t D, int64_t ks, unsigned long long* __restrict__ keys) {
  constexpr int TK = tile_codes(DP);
  __shared__ float4 tile[TK * (SearchThread<DP>::ROW / 4)];
  const int64_t first = int64_t(blockIdx.x) * THREADS * SearchThread<DP>::V + threadIdx.x;
  const int64_t k_begin = ks * blockIdx.y;
  const int64_t k_end = k_begin + ks < K ? k_begin + ks : K;
  SearchThread<DP> t;
  t.load(z, N, D, first, k_begin);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += TK) {
    const int tk = int(k_end - k0 < TK ? k_end - k0 : TK);
    __syncthreads();  // the previous tile is no longer read
    stage_tile(tile, packed, k0, tk, SearchThread<DP>::ROW / 4, threadIdx.x);
    __syncthreads();
    t.scan(tile, tk, int(k0));
  }
  t.publish_all(keys, N, first);
}

// D > 64: one vector per thread, -2 z_n read again for every code, codes from the workspace
template <typename T>
__host__ __device__ __forceinline__ void search_any_d(const T* zn, int64_t D, const float* packed,
                                                      int64_t row, int64_t k_begin,
                                                      int64_t k_end, unsigned long long* key) {
  float best = INFINITY;
  int arg = int(k_begin);
  for (int64_t k = k_begin; k < k_end; ++k) {
    const float* e = packed + k * row;
    float acc = e[0];
    for (int64_t d = 0; d < D; ++d) acc = fmaf(-2.f * to_float(zn[d]), e[1 + d], acc);
    const bool lt = acc < best;
    best = lt ? acc : best;
    arg = lt ? int(k) : arg;
  }
  publish(key, pack_key(best, arg));
}

template <typename T>
__global__ void vq_nearest_search_any_d(const T* __restrict__ z, const float* __restrict__ packed,
                                        int64_t N, int64_t K, int64_t D, int64_t row, int64_t ks,
                                        unsigned long long* __restrict__ keys) {
  const int64_t n = int64_t(blockIdx.x) * THREADS + threadIdx.x;
  const int64_t k_begin = ks * blockIdx.y;
  const int64_t k_end = k_begin + ks < K ? k_begin + ks : K;
  if (n < N) search_any_d(z + n * D, D, packed, row, k_begin, k_end, keys + n);
}

// finish: the key of row n (in idx[n]) into idx[n] and dist[n], with the NaN/inf rule
template <typename T>
__host__ __device__ __forceinline__ void finish_row(const T* zn, int64_t D, int64_t* idx, T* dist) {
  const unsigned long long key = static_cast<unsigned long long>(*idx);
  float z2 = 0.f;
  for (int64_t d = 0; d < D; ++d) z2 += to_float(zn[d]) * to_float(zn[d]);
  const float best = key_distance(key);  // NaN for a key no search wrote (all ones)
  const bool found = finite(z2) && best < INFINITY;
  *idx = found ? static_cast<int64_t>(key & 0xffffffffu) : 0;
  // ||z||^2 + (||e||^2 - 2 z.e), clamped: rounding can dip below 0
  *dist = from_float<T>(found ? fmaxf(z2 + best, 0.f) : NAN);
}

template <typename T>
__global__ void vq_nearest_finish(const T* __restrict__ z, int64_t N, int64_t D,
                                  int64_t* __restrict__ idx, T* __restrict__ dist) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n < N) finish_row(z + n * D, D, idx + n, dist + n);
}

template <typename T>
cudaError_t launch_typed(const T* z, const T* codebook, int64_t N, int64_t K, int64_t D,
                         int64_t* idx, T* dist, float* workspace, cudaStream_t stream) {
  if (K < 1 || K > 0x7fffffffLL || D < 0 || reinterpret_cast<uintptr_t>(workspace) % 16)
    return cudaErrorInvalidValue;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const VqPlan p = vq_plan(N, K, D, sms);

  vq_pack_codebook<T><<<unsigned((K + 255) / 256), 256, 0, stream>>>(codebook, K, D, p.row,
                                                                       workspace);
  // every key starts at the largest uint64: any (distance, index) is smaller
  err = cudaMemsetAsync(idx, 0xff, N * sizeof(int64_t), stream);
  if (err != cudaSuccess) return err;
  auto* keys = reinterpret_cast<unsigned long long*>(idx);
  const auto* packed4 = reinterpret_cast<const float4*>(workspace);
  const dim3 grid(static_cast<unsigned>(p.blocks), static_cast<unsigned>(p.slices));
#define RIVER_VQ_SEARCH(DP)                                                                   \
  case DP:                                                                                    \
    vq_nearest_search<T, DP><<<grid, THREADS, 0, stream>>>(z, packed4, N, K, D, p.ks, keys); \
    break;
  switch (p.dp) {
    RIVER_VQ_SEARCH(1) RIVER_VQ_SEARCH(2) RIVER_VQ_SEARCH(3) RIVER_VQ_SEARCH(4)
    RIVER_VQ_SEARCH(5) RIVER_VQ_SEARCH(6) RIVER_VQ_SEARCH(7) RIVER_VQ_SEARCH(8)
    RIVER_VQ_SEARCH(12) RIVER_VQ_SEARCH(16) RIVER_VQ_SEARCH(24) RIVER_VQ_SEARCH(32)
    RIVER_VQ_SEARCH(48) RIVER_VQ_SEARCH(64)
    default:
      vq_nearest_search_any_d<T><<<grid, THREADS, 0, stream>>>(z, workspace, N, K, D, p.row,
                                                               p.ks, keys);
  }
#undef RIVER_VQ_SEARCH
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  vq_nearest_finish<T><<<unsigned((N + 255) / 256), 256, 0, stream>>>(z, N, D, idx, dist);
  return cudaGetLastError();
}

}  // namespace

int64_t vq_nearest_workspace_floats(int64_t K, int64_t D) {
  const int dp = padded_dim(D);
  return K * row_floats(dp > 0 ? dp : D);
}

cudaError_t launch_vq_nearest(const void* z, const void* codebook, int64_t N, int64_t K,
                              int64_t D, Dtype dtype, int64_t* idx, void* dist, float* workspace,
                              cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  switch (dtype) {
    case Dtype::f32:
      return launch_typed(static_cast<const float*>(z), static_cast<const float*>(codebook),
                          N, K, D, idx, static_cast<float*>(dist), workspace, stream);
    case Dtype::f16:
      return launch_typed(static_cast<const __half*>(z), static_cast<const __half*>(codebook),
                          N, K, D, idx, static_cast<__half*>(dist), workspace, stream);
    default:
      return launch_typed(static_cast<const __nv_bfloat16*>(z),
                          static_cast<const __nv_bfloat16*>(codebook), N, K, D, idx,
                          static_cast<__nv_bfloat16*>(dist), workspace, stream);
  }
}

}  // namespace river
