// euler_step.cu: x += dt * v in place on the GPU, the Euler update of river's sampler.
//
// Work split: a grid-stride loop; each thread moves 16 bytes of x and 16 of v per step
// (4 float32 or 8 float16/bfloat16, one 128-bit load each) when both pointers are
// 16-byte aligned, else one element at a time. Blocks of 256 threads, at most 8 blocks
// per SM resident (2048 threads), so the loop, not the launch, covers large tensors.
// float16/bfloat16 are widened to float, updated, and rounded once (round to nearest).
//
// Napkin math: 3 x 4 bytes per float32 element (read x, read v, write x) and one FMA, so
// the limit is memory bandwidth. H100 SXM, HBM3 ~3.35 TB/s: 8M float32 elements = 96 MB
// in ~30 us; below ~1M elements the ~5 us of launch latency dominates. (The 2-core CPU
// of river's dev machine moves the same 96 MB in ~10 ms: see river_ops.cpp.)

#include <cstdint>

#include "float_convert.cuh"
#include "kernels.h"

namespace river {
namespace {

// VEC elements that move as one 16-byte load or store
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T val[VEC];
};

template <typename T, int VEC>
__global__ void euler_step_kernel(T* x, const T* v, float dt,
                                  int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / VEC;
  auto* xp = reinterpret_cast<Pack<T, VEC>*>(x);
  const auto* vp = reinterpret_cast<const Pack<T, VEC>*>(v);
  for (int64_t i = first; i < packs; i += stride) {
    // x <- round(x + dt * v), in float
    Pack<T, VEC> a = xp[i];
    const Pack<T, VEC> b = vp[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      a.val[j] = from_float<T>(to_float(a.val[j]) + dt * to_float(b.val[j]));
    xp[i] = a;
  }
  // the last n % VEC elements
  for (int64_t i = packs * VEC + first; i < n; i += stride)
    x[i] = from_float<T>(to_float(x[i]) + dt * to_float(v[i]));
}

template <typename T>
cudaError_t launch_typed(T* x, const T* v, float dt, int64_t n, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int THREADS = 256;
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const bool aligned = (reinterpret_cast<uintptr_t>(x) % 16 == 0) &&
                       (reinterpret_cast<uintptr_t>(v) % 16 == 0);
  const int64_t work = aligned ? (n + VEC - 1) / VEC : n;
  const int64_t want = (work + THREADS - 1) / THREADS;
  const int64_t resident = sms > 0 ? int64_t(sms) * 8 : 1024;  // 8 x 256 threads per SM
  const int blocks = int(want < resident ? want : resident);
  if (aligned)
    euler_step_kernel<T, VEC><<<blocks, THREADS, 0, stream>>>(x, v, dt, n);
  else
    euler_step_kernel<T, 1><<<blocks, THREADS, 0, stream>>>(x, v, dt, n);
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
