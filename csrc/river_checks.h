// river_checks.h: the argument checks shared by the CPU (river_ops.cpp) and CUDA
// (river_ops_cuda.cpp) bindings, so both devices refuse bad input with the same words.
// Nothing here computes; every check names the op, the argument and what was wrong.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace river {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// z (N, D) and codebook (K, D): float32/float16/bfloat16, same dtype and device.
inline void check_vq_nearest_args(const at::Tensor& z, const at::Tensor& codebook) {
  TORCH_CHECK(z.dim() == 2, "vq_nearest: z must be 2-D (N, D), got ", z.dim(), "-D");
  TORCH_CHECK(codebook.dim() == 2,
              "vq_nearest: codebook must be 2-D (K, D), got ", codebook.dim(), "-D");
  TORCH_CHECK(is_float_type(z.scalar_type()),
              "vq_nearest: z must be float32, float16 or bfloat16, got ", z.scalar_type());
  TORCH_CHECK(z.scalar_type() == codebook.scalar_type(), "vq_nearest: z is ",
              z.scalar_type(), " but codebook is ", codebook.scalar_type(), " (they must match)");
  TORCH_CHECK(z.device() == codebook.device(), "vq_nearest: z is on ", z.device(),
              " but codebook is on ", codebook.device());
  TORCH_CHECK(z.size(1) == codebook.size(1), "vq_nearest: z has D=", z.size(1),
              " but codebook has D=", codebook.size(1));
  TORCH_CHECK(codebook.size(0) > 0, "vq_nearest: codebook is empty (K=0)");
  TORCH_CHECK(codebook.size(0) <= INT32_MAX, "vq_nearest: codebook has K=",
              codebook.size(0), " codes, more than 2^31 - 1");
}

// x += dt * v needs x and v alike, and one flat pass over memory: both contiguous, or both
// dense with the same strides (channels_last, a permuted tensor), and v either x's very
// elements or apart from them. Anything else is refused.
inline void check_euler_step_args(const at::Tensor& x, const at::Tensor& v) {
  // as add_ does: autograd would not see the change of a leaf it computes a gradient for
  // (the op has no autograd formula; the sampler runs it under no_grad)
  TORCH_CHECK(!(at::GradMode::is_enabled() && x.requires_grad() && x.is_leaf()),
              "euler_step_: a leaf Variable that requires grad is being used in an in-place "
              "operation (run it under torch.no_grad())");
  TORCH_CHECK(is_float_type(x.scalar_type()),
              "euler_step_: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.scalar_type() == v.scalar_type(), "euler_step_: x is ", x.scalar_type(),
              " but v is ", v.scalar_type(), " (they must match)");
  TORCH_CHECK(x.device() == v.device(), "euler_step_: x is on ", x.device(),
              " but v is on ", v.device());
  TORCH_CHECK(x.sizes() == v.sizes(), "euler_step_: x and v must have the same shape, got ",
              x.sizes(), " and ", v.sizes());
  bool flat = (x.is_contiguous() && v.is_contiguous()) ||
              (x.is_non_overlapping_and_dense() && x.strides() == v.strides());
  TORCH_CHECK(flat, "euler_step_: x and v must be contiguous, or dense with the same strides; "
              "got strides ", x.strides(), " and ", v.strides(), " (call .contiguous())");
  // v may be x itself (each element reads its own old value: x <- (1 + dt) x), but not
  // overlap x shifted: threads would read elements of v that others already overwrote
  TORCH_CHECK(at::get_overlap_status(x, v) != at::MemOverlapStatus::Partial,
              "euler_step_: x and v partially overlap in memory, so writing x would change v "
              "while it is read; pass v.clone() (v may be x itself)");
}

}  // namespace river
