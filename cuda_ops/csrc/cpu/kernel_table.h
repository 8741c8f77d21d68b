// The CPU kernels' interface, shared by the dispatcher (selu_family.cpp) and the per-ISA kernel
// files. Deliberately free of ATen headers: the ISA files include it before their target pragma.
#pragma once

#include <cstdint>

// The x86 ISA variants rely on GCC's `#pragma GCC target`; other compilers and architectures get
// the portable build of at::vec only.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define SELFNORM_X86_VARIANTS 1
#else
#define SELFNORM_X86_VARIANTS 0
#endif

namespace selfnorm::cpu {

// f(x) = lam*x (x > 0), lam*(alpha*e^{beta*x} + kappa*x - alpha) (x <= 0), in float64 so that
// every dtype's kernel rounds them once, to its own accumulation type.
struct Coeffs {
  double lam, alpha, beta, kappa;
};

// One ISA's kernels for one dtype, over a contiguous run of n elements.
template <typename T>
struct Kernel {
  void (*forward)(const T* x, T* y, int64_t n, const Coeffs& c);
  // Writes grad_x = grad * f'(x) unless grad_x is null; when need_lam, returns
  // sum(grad * f(x) / lam) over the run (the run's share of dL/dlam, eq. 41 of the paper), else 0.
  // A null grad_x needs need_lam.
  double (*backward)(const T* grad, const T* x, T* grad_x, int64_t n, const Coeffs& c,
                     bool need_lam);
};

}  // namespace selfnorm::cpu
