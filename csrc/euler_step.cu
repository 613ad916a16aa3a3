// euler_step.cu: x += dt * v in place on the GPU, the Euler update of river's sampler.
//
// Work split: a grid-stride loop; each thread moves 16 bytes of x and 16 of v per step
// (4 float32 or 8 float16/bfloat16, one 128-bit load each). A tensor that does not start on
// 16 bytes (a slice such as buf[1:]) first has its head, the elements before the first
// 16-byte boundary, done one by one by the first threads, then goes on 16 bytes at a time;
// the last n % VEC elements too are done one by one. Only when x and v sit differently
// against 16 bytes (say x = a[1:], v = b[2:]) is every element moved singly. Blocks of
// 256 threads, at most 8 blocks per SM resident (2048 threads), so the loop, not the
// launch, covers large tensors. float16/bfloat16 are widened to float, updated, and
// rounded once (round to nearest). x and v may be the same memory: each element is read
// and written by one thread.
//
// Napkin math: 3 x 4 bytes per float32 element (read x, read v, write x) and one FMA, so
// the limit is memory bandwidth. H100 SXM, HBM3 ~3.35 TB/s: 8M float32 elements = 96 MB
// in ~30 us; below ~1M elements the ~5 us of launch latency dominates.

#include <cstdint>

#include "float_convert.cuh"
#include "kernels.h"

namespace river {
namespace {

constexpr int THREADS = 256;

// VEC elements that move as one 16-byte load or store
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T val[VEC];
};

template <typename T>
__host__ __device__ __forceinline__ void update(T* x, const T* v, float dt) {
  *x = from_float<T>(to_float(*x) + dt * to_float(*v));  // x <- round(x + dt * v), in float
}

// The launch of one euler step: VEC elements per 16-byte move (1: one at a time), the
// head of elements before x + head (and v + head) are 16-byte aligned, and the blocks.
struct EulerPlan {
  int vec, head;
  int64_t blocks;
};

EulerPlan euler_plan(uintptr_t x, uintptr_t v, int64_t n, int size, int sms) {
  EulerPlan p{16 / size, 0, 1};
  if (x % 16 != v % 16 || x % size) {
    p.vec = 1;  // no common 16-byte boundary
  } else {
    const int64_t head = int64_t((16 - x % 16) % 16) / size;
    p.head = int(head < n ? head : n);
  }
  // threads that have work: the head, the 16-byte packs, the tail (each < VEC <= THREADS)
  const int64_t work = (n - p.head + p.vec - 1) / p.vec;
  const int64_t want = (work + THREADS - 1) / THREADS;
  const int64_t resident = int64_t(sms > 0 ? sms : 128) * 8;  // 8 x 256 threads per SM
  p.blocks = want < 1 ? 1 : want < resident ? want : resident;
  return p;
}

// Thread `first` of `stride` threads: its head element, then every stride-th pack and tail
// element. head < VEC <= stride.
template <typename T, int VEC>
__host__ __device__ __forceinline__ void euler_thread(T* x, const T* v, float dt, int64_t n,
                                                      int head, int64_t first, int64_t stride) {
  if (first < head) update(x + first, v + first, dt);
  x += head;
  v += head;
  n -= head;
  const int64_t packs = n / VEC;
  auto* xp = reinterpret_cast<Pack<T, VEC>*>(x);
  const auto* vp = reinterpret_cast<const Pack<T, VEC>*>(v);
  for (int64_t i = first; i < packs; i += stride) {
    Pack<T, VEC> a = xp[i];
    const Pack<T, VEC> b = vp[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) update(&a.val[j], &b.val[j], dt);
    xp[i] = a;
  }
  for (int64_t i = packs * VEC + first; i < n; i += stride) update(x + i, v + i, dt);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(THREADS)
euler_step_kernel(T* x, const T* v, float dt, int64_t n, int head) {
  euler_thread<T, VEC>(x, v, dt, n, head, int64_t(blockIdx.x) * blockDim.x + threadIdx.x,
                       int64_t(gridDim.x) * blockDim.x);
}

template <typename T>
cudaError_t launch_typed(T* x, const T* v, float dt, int64_t n, cudaStream_t stream) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const EulerPlan p = euler_plan(reinterpret_cast<uintptr_t>(x), reinterpret_cast<uintptr_t>(v),
                                 n, int(sizeof(T)), sms);
  const unsigned blocks = static_cast<unsigned>(p.blocks);
  if (p.vec > 1)
    euler_step_kernel<T, 16 / sizeof(T)><<<blocks, THREADS, 0, stream>>>(x, v, dt, n, p.head);
  else
    euler_step_kernel<T, 1><<<blocks, THREADS, 0, stream>>>(x, v, dt, n, 0);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_euler_step(void* x, const void* v, float dt, int64_t n, Dtype dtype,
                              cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case Dtype::f32:
      return launch_typed(static_cast<float*>(x), static_cast<const float*>(v), dt, n, stream);
    case Dtype::f16:
      return launch_typed(static_cast<__half*>(x), static_cast<const __half*>(v), dt, n, stream);
    default:
      return launch_typed(static_cast<__nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(v),
                          dt, n, stream);
  }
}

}  // namespace river
