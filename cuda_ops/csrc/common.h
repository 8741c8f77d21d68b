// Host-side checks and layout handling shared by the CPU and CUDA registrations.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

namespace selfnorm {

// The op a backward call stands for: grad_x and/or dL/dlam.
inline const char* backward_name(bool need_x, bool need_lam) {
  if (!need_x) return "selu_family_backward_lam_only";
  return need_lam ? "selu_family_backward_lam" : "selu_family_backward";
}

inline void check_inputs(const at::Tensor& x, const at::Tensor& lam, const char* op) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": x must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK(lam.numel() == 1 && lam.is_floating_point(), op,
              ": lam must be a one-element floating-point tensor, got shape ", lam.sizes(),
              " and dtype ", lam.scalar_type());
  TORCH_CHECK(lam.is_cpu() || lam.device() == x.device(), op, ": lam must be on ", x.device(),
              " or on the CPU, got ", lam.device());
}

inline void check_grad(const at::Tensor& grad, const at::Tensor& x, const char* op) {
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() &&
                  grad.device() == x.device(),
              op, ": grad must match x in shape, dtype and device");
}

// `t` with exactly `like`'s strides, so that both can be walked as one flat array. `like` is
// dense (from empty_like, or from dense() below); `t` is returned as is when it already matches
// (the common case: contiguous or channels_last activations), else copied once.
inline at::Tensor same_layout(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  at::Tensor out = at::empty_like(like);
  out.copy_(t);
  return out;
}

// `t` itself when it can be walked as one flat array (contiguous, channels_last or any other
// dense layout), else a dense copy.
inline at::Tensor dense(const at::Tensor& t) {
  if (t.is_non_overlapping_and_dense()) return t;
  at::Tensor out = at::empty_like(t);
  out.copy_(t);
  return out;
}

}  // namespace selfnorm
