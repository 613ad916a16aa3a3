// vq_nearest.cu: nearest codebook entry for every row of z on the GPU, without the (N, K)
// distance matrix: idx[n] = argmin_k ||z_n - e_k||^2 (ties -> lowest k), dist[n] = the
// squared distance, computed in float32 for every input dtype and rounded once.
//
// Work split: a grid of (N / 128) x S blocks. Block (b, s) takes 128 vectors, one per
// thread, and slice s of the codebook (K / S codes; S > 1 only when N alone gives too few
// blocks to fill the SMs). It walks its slice in tiles of TK codes staged in shared memory
// as float32 (TK * (D + 1) floats <= 32 KB: the codes and their norms ||e||^2). All threads
// of a warp read the same code at once, so each shared-memory read is a broadcast. Each
// thread keeps -2 z_n in registers (D a compile-time constant for D in {1, 2, 3, 4, 8, 16,
// 32, 64}; other D read z_n from global memory, L1 cached) and a running min/argmin over its
// codes in order, so a strict < leaves ties at the lowest index. The S partial results of a
// vector meet in one 64-bit atomicMin on (distance as order-preserving uint32, index): the
// smaller distance wins and, on a tie, the lower index. The key lives in idx itself (int64),
// and a second kernel unpacks it into idx and dist = ||z||^2 + (||e||^2 - 2 z.e), >= 0.
//
// Napkin math: 2 N K D FLOPs (one FMA per code dimension) plus ~3 instructions per code
// (compare, two selects). H100 SXM FP32: 132 SMs x 128 lanes x 2 x ~1.9 GHz ~ 64 TFLOP/s;
// N = 16384, D = 4, K = 16384 is 2.1 GFLOP of FMAs + ~0.8 G other instructions: ~50-100 us
// once the SMs are full. Memory is negligible: z is read S times and the codebook
// N / 128 times (N D S + (N / 128) K D elements), mostly from L2.

#include <cfloat>
#include <cstdint>

#include "float_convert.cuh"
#include "kernels.h"

namespace river {
namespace {

constexpr int THREADS = 128;                // vectors per block, one per thread
constexpr int TILE_FLOATS = 32 * 1024 / 4;  // shared memory tile: 32 KB of float32

// (distance, index) as one uint64 whose unsigned order is "smaller distance, then lower
// index". A float's bits, sign bit flipped for positives and all bits for negatives, sort
// as unsigned integers in the float's order.
__device__ __forceinline__ unsigned long long pack_key(float d, int64_t k) {
  const unsigned int u = __float_as_uint(d == 0.f ? 0.f : d);  // -0 would sort below +0
  const unsigned int ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<unsigned long long>(ordered) << 32) | static_cast<unsigned int>(k);
}
__device__ __forceinline__ float key_distance(unsigned long long key) {
  const unsigned int ordered = static_cast<unsigned int>(key >> 32);
  return __uint_as_float((ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered);
}

// Block (blockIdx.x, blockIdx.y): vectors [128 bx, 128 bx + 128) against codes
// [ks * by, ks * by + ks). DC = D as a compile-time constant, or 0 for "D at run time".
template <typename T, int DC>
__global__ void vq_nearest_partial(const T* __restrict__ z, const T* __restrict__ codebook,
                                   int64_t N, int64_t K, int64_t D_runtime, int64_t ks,
                                   unsigned long long* __restrict__ keys) {
  __shared__ float tile[TILE_FLOATS];  // (TK, D) codes, then TK norms
  const int D = DC > 0 ? DC : int(D_runtime);  // D + 1 <= TILE_FLOATS, checked at launch
  const int TK = TILE_FLOATS / (D + 1);
  float* norms = tile + TK * D;

  const int64_t n = int64_t(blockIdx.x) * THREADS + threadIdx.x;
  const bool active = n < N;  // inactive threads still help stage tiles
  const T* zn = z + (active ? n : 0) * D;
  float zm2[DC > 0 ? DC : 1];  // -2 z_n, in registers
  if (DC > 0) {
#pragma unroll
    for (int d = 0; d < DC; ++d) zm2[d] = -2.f * to_float(zn[d]);
  }

  const int64_t k_begin = ks * blockIdx.y;
  const int64_t k_end = k_begin + ks < K ? k_begin + ks : K;
  float best = INFINITY;  // a code at +inf or NaN (non-finite ||e||^2 or z) is never chosen
  int64_t best_k = k_begin;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += TK) {
    const int tk = int(k_end - k0 < TK ? k_end - k0 : TK);
    __syncthreads();  // the previous tile is no longer read
    for (int i = threadIdx.x; i < tk * D; i += THREADS) tile[i] = to_float(codebook[k0 * D + i]);
    __syncthreads();
    for (int k = threadIdx.x; k < tk; k += THREADS) {
      float e2 = 0.f;
      for (int d = 0; d < D; ++d) e2 += tile[k * D + d] * tile[k * D + d];
      norms[k] = e2;
    }
    __syncthreads();
    if (!active) continue;
    for (int k = 0; k < tk; ++k) {
      // ||e_k||^2 - 2 z.e_k
      float acc = norms[k];
      const float* e = tile + k * D;
      if (DC > 0) {
#pragma unroll
        for (int d = 0; d < DC; ++d) acc = fmaf(zm2[d], e[d], acc);
      } else {
        for (int d = 0; d < D; ++d) acc = fmaf(-2.f * to_float(zn[d]), e[d], acc);
      }
      if (acc < best) {  // strict: a tie keeps the lower k
        best = acc;
        best_k = k0 + k;
      }
    }
  }
  if (active && k_begin < k_end) atomicMin(keys + n, pack_key(best, best_k));
}

// One thread per vector: unpack the key left in idx[n] into idx[n] and dist[n].
template <typename T>
__global__ void vq_nearest_finish(const T* __restrict__ z, int64_t N, int64_t D,
                                  int64_t* __restrict__ idx, T* __restrict__ dist) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const unsigned long long key = static_cast<unsigned long long>(idx[n]);
  float z2 = 0.f;
  for (int64_t d = 0; d < D; ++d) z2 += to_float(z[n * D + d]) * to_float(z[n * D + d]);
  const float best = key_distance(key);
  const bool found = isfinite(z2) && best < INFINITY;  // else: the NaN/inf rule
  idx[n] = found ? static_cast<int64_t>(key & 0xffffffffu) : 0;
  // ||z||^2 + ||e||^2 - 2 z.e, clamped: rounding can dip below 0
  dist[n] = from_float<T>(found ? fmaxf(z2 + best, 0.f) : NAN);
}

template <typename T>
cudaError_t launch_typed(const T* z, const T* codebook, int64_t N, int64_t K, int64_t D,
                         int64_t* idx, T* dist, cudaStream_t stream) {
  if (D + 1 > TILE_FLOATS || K > 0xffffffffLL) return cudaErrorInvalidValue;
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // split the codebook only as far as it takes to give every SM ~4 blocks, and keep
  // at least 256 codes per slice so staging a tile stays cheap next to using it
  const int64_t blocks = (N + THREADS - 1) / THREADS;
  const int64_t want = (4 * int64_t(sms > 0 ? sms : 1) + blocks - 1) / blocks;
  int64_t slices = (K + 255) / 256;
  slices = want < slices ? want : slices;
  slices = slices < 1 ? 1 : slices > 65535 ? 65535 : slices;
  const int64_t ks = (K + slices - 1) / slices;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(slices));

  // every key starts at the largest uint64: any (distance, index) is smaller
  cudaError_t err = cudaMemsetAsync(idx, 0xff, N * sizeof(int64_t), stream);
  if (err != cudaSuccess) return err;
  auto* keys = reinterpret_cast<unsigned long long*>(idx);
#define RIVER_VQ_LAUNCH(DC) \
  vq_nearest_partial<T, DC><<<grid, THREADS, 0, stream>>>(z, codebook, N, K, D, ks, keys)
  switch (D) {
    case 1: RIVER_VQ_LAUNCH(1); break;
    case 2: RIVER_VQ_LAUNCH(2); break;
    case 3: RIVER_VQ_LAUNCH(3); break;
    case 4: RIVER_VQ_LAUNCH(4); break;
    case 8: RIVER_VQ_LAUNCH(8); break;
    case 16: RIVER_VQ_LAUNCH(16); break;
    case 32: RIVER_VQ_LAUNCH(32); break;
    case 64: RIVER_VQ_LAUNCH(64); break;
    default: RIVER_VQ_LAUNCH(0);
  }
#undef RIVER_VQ_LAUNCH
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  vq_nearest_finish<T><<<unsigned((N + 255) / 256), 256, 0, stream>>>(z, N, D, idx, dist);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_vq_nearest(const void* z, const void* codebook, int64_t N, int64_t K,
                              int64_t D, Dtype dtype, int64_t* idx, void* dist,
                              cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  switch (dtype) {
    case Dtype::f32:
      return launch_typed(static_cast<const float*>(z), static_cast<const float*>(codebook),
                          N, K, D, idx, static_cast<float*>(dist), stream);
    case Dtype::f16:
      return launch_typed(static_cast<const __half*>(z), static_cast<const __half*>(codebook),
                          N, K, D, idx, static_cast<__half*>(dist), stream);
    default:
      return launch_typed(static_cast<const __nv_bfloat16*>(z),
                          static_cast<const __nv_bfloat16*>(codebook), N, K, D, idx,
                          static_cast<__nv_bfloat16*>(dist), stream);
  }
}

}  // namespace river
