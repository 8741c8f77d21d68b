// The vectorised CPU kernels, compiled once per ISA: the including file defines CPU_CAPABILITY
// (DEFAULT, AVX2 or AVX512) and, for the x86 ISAs, the matching target pragma first.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "kernel_table.h"

namespace selfnorm::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// Kahan summation per lane. A lane whose sum turns infinite drops its compensation: (t - sum) - y
// would be inf - inf = NaN there, while the reference's plain sum stays +-inf.
template <typename V>
inline void kahan_add(V& sum, V& comp, const V& term) {
  const V y = term - comp;
  const V t = sum + y;
  const V zero(typename V::value_type(0));
  comp = V::blendv(zero, (t - sum) - y, (t - t) == zero);  // (t - t) == 0: t is finite
  sum = t;
}

// The family on acc_t lanes. kKappa = false drops kappa*x, so that x = -inf gives -lam*alpha as
// torch.nn.functional.selu does instead of 0 * -inf = NaN. Lanes that are NaN fail `x <= 0` and
// take the positive branch, so NaN propagates through f and f' gives grad*lam, also like F.selu.
template <typename acc_t, bool kKappa>
struct Family {
  using Vec = Vectorized<acc_t>;
  Vec lam, alpha, beta, kappa, alpha_beta, zero, one;

  explicit Family(const Coeffs& c)
      : lam(acc_t(c.lam)), alpha(acc_t(c.alpha)), beta(acc_t(c.beta)), kappa(acc_t(c.kappa)),
        alpha_beta(acc_t(c.alpha * c.beta)), zero(acc_t(0)), one(acc_t(1)) {}

  // e^t - 1, accurate near t = 0 like the reference's expm1. For float, Sleef's vector expm1
  // costs several times its exp, so: e^t - 1 where |t| >= 0.5 (the result is then >= 0.39 in
  // magnitude, so the subtraction loses nothing), else the degree-8 Taylor polynomial (remainder
  // below 1.1e-8 relative).
  static Vec expm1(const Vec& t) {
    if constexpr (std::is_same_v<acc_t, float>) {
      constexpr float c[] = {1.f / 40320, 1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24,
                             1.f / 6,     1.f / 2,    1.f};
      Vec p(c[0]);
      for (int i = 1; i < 8; ++i) p = at::vec::fmadd(p, t, Vec(c[i]));
      const Vec small = t.abs() < Vec(0.5f);
      return Vec::blendv(t.exp() - Vec(1.f), p * t, small);
    } else {
      return t.expm1();
    }
  }

  Vec forward(const Vec& x) const {
    Vec neg = alpha * expm1(beta * x);
    if constexpr (kKappa) neg = at::vec::fmadd(kappa, x, neg);
    return Vec::blendv(x, neg, x <= zero) * lam;
  }

  // Returns grad * f'(x) (kGradX; else zero). With kLam, also adds grad * f(x)/lam to the Kahan
  // pair (sum, comp); f(x)/lam uses e^{beta x} - 1 from the same exp: only its sum matters, and
  // the rounding of each term is unbiased, so the sum keeps float accuracy without a second
  // transcendental.
  template <bool kLam, bool kGradX>
  Vec backward(const Vec& grad, const Vec& x, Vec& sum, Vec& comp) const {
    const Vec is_neg = x <= zero;
    const Vec e = (beta * x).exp();
    if constexpr (kLam) {
      Vec neg = alpha * (e - one);
      if constexpr (kKappa) neg = at::vec::fmadd(kappa, x, neg);
      kahan_add(sum, comp, grad * Vec::blendv(x, neg, is_neg));
    }
    if constexpr (kGradX) {
      Vec slope = alpha_beta * e;
      if constexpr (kKappa) slope = slope + kappa;
      return grad * lam * Vec::blendv(one, slope, is_neg);
    } else {
      return zero;
    }
  }
};

template <typename V>
inline double lanes_sum(const V& sum, const V& comp) {
  using acc_t = typename V::value_type;
  std::array<acc_t, V::size()> s{}, c{};
  sum.store(s.data());
  comp.store(c.data());
  double total = 0;
  for (int i = 0; i < V::size(); ++i) total += double(s[i]) - double(c[i]);
  return total;
}

// Full-precision dtypes (float, double): one vector of T per step.
template <typename T, bool kKappa>
void forward_full(const T* x, T* y, int64_t n, const Coeffs& c) {
  using Vec = Vectorized<T>;
  const Family<T, kKappa> f(c);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) f.forward(Vec::loadu(x + i)).store(y + i);
  if (i < n) f.forward(Vec::loadu(x + i, n - i)).store(y + i, n - i);
}

template <typename T, bool kKappa, bool kLam, bool kGradX>
double backward_full(const T* g, const T* x, T* gx, int64_t n, const Coeffs& c) {
  using Vec = Vectorized<T>;
  const Family<T, kKappa> f(c);
  Vec sum(T(0)), comp(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec r = f.template backward<kLam, kGradX>(Vec::loadu(g + i), Vec::loadu(x + i), sum,
                                                    comp);
    if constexpr (kGradX) r.store(gx + i);
  }
  if (i < n) {
    // Lanes past n load as 0 (grad 0, x 0) and so add exactly 0 to the sum.
    const int64_t k = n - i;
    const Vec r = f.template backward<kLam, kGradX>(Vec::loadu(g + i, k), Vec::loadu(x + i, k),
                                                    sum, comp);
    if constexpr (kGradX) r.store(gx + i, k);
  }
  return kLam ? lanes_sum(sum, comp) : 0.0;
}

// Reduced dtypes (Half, BFloat16): one vector of T holds two float vectors; math in float.
template <typename T, bool kKappa>
void forward_reduced(const T* x, T* y, int64_t n, const Coeffs& c) {
  using VecT = Vectorized<T>;
  const Family<float, kKappa> f(c);
  auto step = [&](const VecT& v) {
    auto [a, b] = at::vec::convert_to_float<T>(v);
    return at::vec::convert_from_float<T>(f.forward(a), f.forward(b));
  };
  int64_t i = 0;
  for (; i + VecT::size() <= n; i += VecT::size()) step(VecT::loadu(x + i)).store(y + i);
  if (i < n) step(VecT::loadu(x + i, n - i)).store(y + i, n - i);
}

template <typename T, bool kKappa, bool kLam, bool kGradX>
double backward_reduced(const T* g, const T* x, T* gx, int64_t n, const Coeffs& c) {
  using VecT = Vectorized<T>;
  using Vec = Vectorized<float>;
  const Family<float, kKappa> f(c);
  Vec sum(0.f), comp(0.f);
  auto step = [&](const VecT& gv, const VecT& xv, T* out, int64_t count) {
    auto [g0, g1] = at::vec::convert_to_float<T>(gv);
    auto [x0, x1] = at::vec::convert_to_float<T>(xv);
    const Vec r0 = f.template backward<kLam, kGradX>(g0, x0, sum, comp);
    const Vec r1 = f.template backward<kLam, kGradX>(g1, x1, sum, comp);
    if constexpr (kGradX) at::vec::convert_from_float<T>(r0, r1).store(out, count);
  };
  int64_t i = 0;
  for (; i + VecT::size() <= n; i += VecT::size()) {
    step(VecT::loadu(g + i), VecT::loadu(x + i), kGradX ? gx + i : nullptr, VecT::size());
  }
  if (i < n) {
    const int64_t r = n - i;
    step(VecT::loadu(g + i, r), VecT::loadu(x + i, r), kGradX ? gx + i : nullptr, r);
  }
  return kLam ? lanes_sum(sum, comp) : 0.0;
}

template <typename T>
constexpr bool kFull = std::is_same_v<at::opmath_type<T>, T>;

template <typename T>
void forward(const T* x, T* y, int64_t n, const Coeffs& c) {
  if constexpr (kFull<T>) {
    c.kappa != 0 ? forward_full<T, true>(x, y, n, c) : forward_full<T, false>(x, y, n, c);
  } else {
    c.kappa != 0 ? forward_reduced<T, true>(x, y, n, c) : forward_reduced<T, false>(x, y, n, c);
  }
}

template <typename T, bool kLam, bool kGradX>
double backward_as(const T* g, const T* x, T* gx, int64_t n, const Coeffs& c) {
  if constexpr (kFull<T>) {
    return c.kappa != 0 ? backward_full<T, true, kLam, kGradX>(g, x, gx, n, c)
                        : backward_full<T, false, kLam, kGradX>(g, x, gx, n, c);
  } else {
    return c.kappa != 0 ? backward_reduced<T, true, kLam, kGradX>(g, x, gx, n, c)
                        : backward_reduced<T, false, kLam, kGradX>(g, x, gx, n, c);
  }
}

template <typename T>
double backward(const T* g, const T* x, T* gx, int64_t n, const Coeffs& c, bool need_lam) {
  if (gx == nullptr) return backward_as<T, true, false>(g, x, gx, n, c);
  return need_lam ? backward_as<T, true, true>(g, x, gx, n, c)
                  : backward_as<T, false, true>(g, x, gx, n, c);
}

template <typename T>
Kernel<T> kernel() {
  return {&forward<T>, &backward<T>};
}

template Kernel<float> kernel<float>();
template Kernel<double> kernel<double>();
template Kernel<c10::Half> kernel<c10::Half>();
template Kernel<c10::BFloat16> kernel<c10::BFloat16>();

}  // namespace selfnorm::cpu::CPU_CAPABILITY
