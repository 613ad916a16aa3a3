// river_ops_cuda.cpp: the CUDA implementations of torch.ops.river.vq_nearest and
// euler_step_ (declared in river_ops.cpp). Only the torch side lives here: the same checks
// as on the CPU, the device guard and current stream, tensors turned into raw pointers for
// the launchers of kernels.h, and the launch error turned into an exception. The kernels
// themselves (and their work split and napkin math) are in vq_nearest.cu and euler_step.cu.
// Compiled only in CUDA builds (setup.py's CUDAExtension, river.py's JIT with CUDA).

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernels.h"
#include "river_checks.h"

namespace river {
namespace {

Dtype dtype_of(at::ScalarType t) {
  return t == at::kFloat ? Dtype::f32 : t == at::kHalf ? Dtype::f16 : Dtype::bf16;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> vq_nearest_cuda(const at::Tensor& z_in,
                                                   const at::Tensor& codebook_in) {
  check_vq_nearest_args(z_in, codebook_in);
  TORCH_CHECK(z_in.is_cuda(), "vq_nearest: CUDA kernel got a tensor on ", z_in.device());
  const c10::cuda::CUDAGuard guard(z_in.device());
  // read-only inputs: a strided view is copied once rather than refused
  const at::Tensor z = z_in.contiguous(), codebook = codebook_in.contiguous();
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  at::Tensor idx = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor dist = at::empty({N}, z.options());
  // the codebook packed as float32 rows with their norms (the caching allocator's blocks
  // are 512-byte aligned)
  at::Tensor workspace = at::empty({vq_nearest_workspace_floats(K, D)},
                                   z.options().dtype(at::kFloat));
  check_launch(launch_vq_nearest(z.const_data_ptr(), codebook.const_data_ptr(), N, K, D,
                                 dtype_of(z.scalar_type()), idx.mutable_data_ptr<int64_t>(),
                                 dist.mutable_data_ptr(), workspace.mutable_data_ptr<float>(),
                                 at::cuda::getCurrentCUDAStream()),
               "vq_nearest");
  return {idx, dist};
}

void euler_step_cuda(at::Tensor& x, const at::Tensor& v, double dt) {
  check_euler_step_args(x, v);
  TORCH_CHECK(x.is_cuda(), "euler_step_: CUDA kernel got a tensor on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(launch_euler_step(x.mutable_data_ptr(), v.const_data_ptr(), float(dt), x.numel(),
                                 dtype_of(x.scalar_type()), at::cuda::getCurrentCUDAStream()),
               "euler_step_");
}

}  // namespace
}  // namespace river

TORCH_LIBRARY_IMPL(river, CUDA, m) {
  m.impl("vq_nearest", &river::vq_nearest_cuda);
  m.impl("euler_step_", &river::euler_step_cuda);
}
