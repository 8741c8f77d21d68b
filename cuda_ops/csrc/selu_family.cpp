// The op schema (torch.ops.selfnorm.*) and its CPU kernels.
//
//   selu_family(x, lam, alpha, beta, kappa) = lam*x (x > 0), lam*(alpha*expm1(beta*x) + kappa*x)
//
// lam is a one-element tensor (a trainable parameter, or a CPU constant). The backward is split
// in three ops, so that a fixed lam pays nothing for the dL/dlam reduction and an x without
// grad nothing for grad_x.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "cpu/kernel_table.h"
#include "fast_expm1.h"

namespace selfnorm::cpu {

namespace DEFAULT {
template <typename T>
Kernel<T> kernel();
}
#if SELFNORM_X86_VARIANTS
namespace AVX2 {
template <typename T>
Kernel<T> kernel();
}
namespace AVX512 {
template <typename T>
Kernel<T> kernel();
}
#endif

// The widest ISA build ATen itself uses on this machine (so ATEN_CPU_CAPABILITY applies too).
const std::string& variant() {
  static const std::string name = [] {
    const std::string aten = at::get_cpu_capability();
#if SELFNORM_X86_VARIANTS
    if (aten == "AVX512" || aten == "AVX2") return aten;
#endif
    return std::string("DEFAULT");
  }();
  return name;
}

template <typename T>
Kernel<T> select() {
#if SELFNORM_X86_VARIANTS
  if (variant() == "AVX512") return AVX512::kernel<T>();
  if (variant() == "AVX2") return AVX2::kernel<T>();
#endif
  return DEFAULT::kernel<T>();
}

// Elements per task: big enough to amortise a task, small enough to split a layer over cores.
constexpr int64_t kGrain = 32768;

at::Tensor forward(const at::Tensor& x, const at::Tensor& lam, double alpha, double beta,
                   double kappa) {
  check_inputs(x, lam, "selu_family");
  at::Tensor y = at::empty_like(x);
  const at::Tensor xd = same_layout(x, y);
  const Coeffs c{lam.item<double>(), alpha, beta, kappa};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "selu_family", [&] {
    static const Kernel<scalar_t> k = select<scalar_t>();
    const scalar_t* xp = xd.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, y.numel(), kGrain, [&](int64_t begin, int64_t end) {
      k.forward(xp + begin, yp + begin, end - begin, c);
    });
  });
  return y;
}

// dL/dlam is summed per fixed kGrain-element chunk and the chunks are added in order, so the
// result does not depend on the number of threads (deterministic two-stage reduction; each
// chunk itself uses Kahan summation per vector lane). need_x: compute grad_x; need_lam: compute
// dL/dlam (one of them at least).
std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad, const at::Tensor& x,
                                                 const at::Tensor& lam, double alpha,
                                                 double beta, double kappa, bool need_x,
                                                 bool need_lam) {
  const char* op = backward_name(need_x, need_lam);
  check_inputs(x, lam, op);
  check_grad(grad, x, op);
  at::Tensor grad_x = need_x ? at::empty_like(x) : at::Tensor();
  // Walked as one flat array: in grad_x's memory order, or x's when there is no grad_x.
  const at::Tensor xd = need_x ? same_layout(x, grad_x) : dense(x);
  const at::Tensor gd = same_layout(grad, need_x ? grad_x : xd);
  const Coeffs c{lam.item<double>(), alpha, beta, kappa};
  const int64_t n = x.numel();
  double lam_sum = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "selu_family_backward", [&] {
    static const Kernel<scalar_t> k = select<scalar_t>();
    const scalar_t* gp = gd.const_data_ptr<scalar_t>();
    const scalar_t* xp = xd.const_data_ptr<scalar_t>();
    scalar_t* gxp = need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    if (!need_lam) {
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        k.backward(gp + begin, xp + begin, gxp + begin, end - begin, c, false);
      });
      return;
    }
    const int64_t chunks = (n + kGrain - 1) / kGrain;
    std::vector<double> partial(chunks, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t off = i * kGrain;
        partial[i] = k.backward(gp + off, xp + off, need_x ? gxp + off : nullptr,
                                std::min(kGrain, n - off), c, true);
      }
    });
    for (const double p : partial) lam_sum += p;
  });
  at::Tensor grad_lam = need_lam ? at::empty_like(lam).fill_(lam_sum) : at::Tensor();
  return {grad_x, grad_lam};
}

at::Tensor backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& lam,
                    double alpha, double beta, double kappa) {
  return std::get<0>(backward_impl(grad, x, lam, alpha, beta, kappa, true, false));
}

std::tuple<at::Tensor, at::Tensor> backward_lam(const at::Tensor& grad, const at::Tensor& x,
                                                const at::Tensor& lam, double alpha, double beta,
                                                double kappa) {
  return backward_impl(grad, x, lam, alpha, beta, kappa, true, true);
}

at::Tensor backward_lam_only(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& lam,
                             double alpha, double beta, double kappa) {
  return std::get<1>(backward_impl(grad, x, lam, alpha, beta, kappa, false, true));
}

// Test hook: the 16-bit CUDA forward's e^t - 1 (fast_expm1.h), run here so that a CPU test can
// measure the error of the very formula the GPU runs. float32 in, float32 out.
at::Tensor fast_expm1(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "_fast_expm1: t must be float32, got ",
              t.scalar_type());
  const at::Tensor in = t.contiguous();
  at::Tensor out = at::empty_like(in);
  const float* ip = in.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, in.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) op[i] = selfnorm::fast_expm1(ip[i]);
  });
  return out;
}

}  // namespace selfnorm::cpu

TORCH_LIBRARY(selfnorm, m) {
  m.def("selu_family(Tensor x, Tensor lam, float alpha, float beta, float kappa) -> Tensor");
  m.def(
      "selu_family_backward(Tensor grad, Tensor x, Tensor lam, float alpha, float beta, "
      "float kappa) -> Tensor");
  m.def(
      "selu_family_backward_lam(Tensor grad, Tensor x, Tensor lam, float alpha, float beta, "
      "float kappa) -> (Tensor, Tensor)");
  m.def(
      "selu_family_backward_lam_only(Tensor grad, Tensor x, Tensor lam, float alpha, float beta, "
      "float kappa) -> Tensor");
  // Test hook (CPU only): the CUDA kernels' 16-bit e^t - 1, for its error test.
  m.def("_fast_expm1(Tensor t) -> Tensor");
  // Which ISA build of the CPU kernels runs here (DEFAULT, AVX2, AVX512), for `cuda_ops info`.
  m.def("cpu_variant() -> str", [] { return selfnorm::cpu::variant(); });
}

TORCH_LIBRARY_IMPL(selfnorm, CPU, m) {
  m.impl("selu_family", &selfnorm::cpu::forward);
  m.impl("selu_family_backward", &selfnorm::cpu::backward);
  m.impl("selu_family_backward_lam", &selfnorm::cpu::backward_lam);
  m.impl("selu_family_backward_lam_only", &selfnorm::cpu::backward_lam_only);
  m.impl("_fast_expm1", &selfnorm::cpu::fast_expm1);
}
