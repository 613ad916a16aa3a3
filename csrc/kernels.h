// kernels.h: the launchers of the CUDA kernels in euler_step.cu and vq_nearest.cu.
//
// Plain C++ and the CUDA runtime only, no torch: the .cu files compile with nothing but
// nvcc (the CPU torch wheel ships no c10/cuda headers), and river_ops_cuda.cpp turns
// tensors into the raw pointers, sizes and stream below. Every launcher returns the
// cudaError_t of its launch (cudaSuccess when there was nothing to do).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace river {

// Element types of x, v, z and the codebook; kernels compute in float32 for all three.
enum class Dtype : int { f32 = 0, f16 = 1, bf16 = 2 };

// x[i] += dt * v[i] for i < n, in place. x and v: n elements of `dtype`, same layout,
// either the same memory or apart. Any alignment of x and v (16-byte loads from the first
// aligned element on when both are equally misaligned).
cudaError_t launch_euler_step(void* x, const void* v, float dt, int64_t n, Dtype dtype,
                              cudaStream_t stream);

// For each row n of z (N, D): idx[n] = argmin_k ||z_n - e_k||^2 over codebook (K, D), ties
// to the lowest k; dist[n] = that squared distance (>= 0) in `dtype`. Row-major inputs,
// 1 <= K < 2^31. A code with a non-finite ||e||^2 is never chosen; a row with a non-finite
// ||z||^2, or without a code to choose, gets idx 0 and dist NaN. workspace: scratch of
// vq_nearest_workspace_floats(K, D) floats, 16-byte aligned, on the same device.
int64_t vq_nearest_workspace_floats(int64_t K, int64_t D);
cudaError_t launch_vq_nearest(const void* z, const void* codebook, int64_t N, int64_t K,
                              int64_t D, Dtype dtype, int64_t* idx, void* dist, float* workspace,
                              cudaStream_t stream);

}  // namespace river
