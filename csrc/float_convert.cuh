// float_convert.cuh: float32 <-> float16/bfloat16 for the CUDA kernels, which widen every
// element to float, compute in float, and round once (to nearest even) on the way out.
// Explicit intrinsics: torch's CUDA builds define __CUDA_NO_HALF_CONVERSIONS__. Host and
// device alike, so the kernels' per-thread code also runs on the host (the tests replay a
// launch there: tests/test_cuda_compile.py).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace river {

__host__ __device__ __forceinline__ float to_float(float a) { return a; }
__host__ __device__ __forceinline__ float to_float(__half a) { return __half2float(a); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 a) {
  return __bfloat162float(a);
}

template <typename T> __host__ __device__ __forceinline__ T from_float(float a);
template <> __host__ __device__ __forceinline__ float from_float<float>(float a) { return a; }
template <> __host__ __device__ __forceinline__ __half from_float<__half>(float a) {
  return __float2half_rn(a);
}
template <> __host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float a) {
  return __float2bfloat16_rn(a);
}

}  // namespace river
