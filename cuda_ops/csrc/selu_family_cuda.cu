// CUDA kernels of the SELU family (paper, Appendix B): a grid-stride forward with 16-byte
// vector loads, and a backward that writes grad_x and, when lam is trainable, reduces
// dL/dlam = sum(grad * f(x) / lam) on chip.
//
// The dL/dlam reduction is deterministic and two-stage: each thread keeps a Kahan-compensated
// partial sum (Algorithm 2), cub::BlockReduce combines a block's threads, each block writes its
// partial to a buffer (no atomics), and one block adds those partials in a fixed order, in
// float64. For a given tensor size, GPU and pointer alignment (which picks the vector or the
// scalar loop, and so how elements are split over threads) the result is bitwise reproducible.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <tuple>

#include "common.h"

namespace selfnorm::cuda {

constexpr int kThreads = 256;

template <typename T>
using Acc = at::opmath_type<T>;

// 16 bytes of T, moved with one vector load or store: 4 floats, 8 halves or 2 doubles.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

__device__ __forceinline__ float expm1_(float x) { return expm1f(x); }
__device__ __forceinline__ double expm1_(double x) { return expm1(x); }
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }

// Kahan summation. Once the sum is infinite the compensation is dropped: (t - sum) - y would be
// inf - inf = NaN, while the reference's plain sum stays +-inf.
template <typename A>
__device__ __forceinline__ void kahan_add(A& sum, A& comp, A term) {
  const A y = term - comp;
  const A t = sum + y;
  comp = isfinite(t) ? (t - sum) - y : A(0);
  sum = t;
}

// lam is read on the device when it lives there (a trainable parameter: no host sync), and
// passed by value when it is a CPU constant.
template <typename A>
struct Lam {
  const A* ptr;
  A value;
  __device__ __forceinline__ A get() const { return ptr ? *ptr : value; }
};

// As in the CPU kernels: kKappa = false drops kappa*x, so x = -inf gives -lam*alpha as
// torch.nn.functional.selu does; NaN fails `x <= 0` and takes the positive branch, like F.selu.
template <typename A, bool kKappa>
struct Family {
  A alpha, beta, kappa;

  // f(x) / lam; expm1 keeps alpha*(e^{beta x} - 1) accurate near 0-, as the reference does.
  __device__ __forceinline__ A value(A x) const {
    if (!(x <= A(0))) return x;
    A r = alpha * expm1_(beta * x);
    if constexpr (kKappa) r += kappa * x;
    return r;
  }

  // f'(x) / lam, and f(x) / lam in `fx` from the same exp: only the sum of grad * f(x) is
  // needed, and the rounding of e - 1 is unbiased, so the sum keeps full accuracy.
  __device__ __forceinline__ A slope(A x, A& fx) const {
    if (!(x <= A(0))) {
      fx = x;
      return A(1);
    }
    const A e = exp_(beta * x);
    fx = alpha * (e - A(1));
    A d = alpha * beta * e;
    if constexpr (kKappa) {
      fx += kappa * x;
      d += kappa;
    }
    return d;
  }
};

template <typename T, bool kKappa>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, bool vec,
                   Lam<Acc<T>> lam, Family<Acc<T>, kKappa> f) {
  using A = Acc<T>;
  const A l = lam.get();
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  const int64_t tid = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  int64_t head = 0;
  if (vec) {
    constexpr int V = Pack<T>::kSize;
    const int64_t packs = n / V;
    const auto* xv = reinterpret_cast<const Pack<T>*>(x);
    auto* yv = reinterpret_cast<Pack<T>*>(y);
    for (int64_t i = tid; i < packs; i += stride) {
      Pack<T> p = xv[i];
#pragma unroll
      for (int k = 0; k < V; ++k) p.v[k] = T(l * f.value(A(p.v[k])));
      yv[i] = p;
    }
    head = packs * V;
  }
  for (int64_t i = head + tid; i < n; i += stride) y[i] = T(l * f.value(A(x[i])));
}

template <typename T, bool kKappa, bool kLam>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ gx,
                    int64_t n, bool vec, Lam<Acc<T>> lam, Family<Acc<T>, kKappa> f,
                    Acc<T>* __restrict__ partial) {
  using A = Acc<T>;
  const A l = lam.get();
  A sum = 0, comp = 0;
  auto one = [&](T gt, T xt) -> T {
    const A g = A(gt);
    A fx;
    const A d = f.slope(A(xt), fx);
    if constexpr (kLam) kahan_add(sum, comp, g * fx);
    return T(g * l * d);
  };
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  const int64_t tid = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  int64_t head = 0;
  if (vec) {
    constexpr int V = Pack<T>::kSize;
    const int64_t packs = n / V;
    const auto* gv = reinterpret_cast<const Pack<T>*>(grad);
    const auto* xv = reinterpret_cast<const Pack<T>*>(x);
    auto* ov = reinterpret_cast<Pack<T>*>(gx);
    for (int64_t i = tid; i < packs; i += stride) {
      const Pack<T> gp = gv[i];
      const Pack<T> xp = xv[i];
      Pack<T> o;
#pragma unroll
      for (int k = 0; k < V; ++k) o.v[k] = one(gp.v[k], xp.v[k]);
      ov[i] = o;
    }
    head = packs * V;
  }
  for (int64_t i = head + tid; i < n; i += stride) gx[i] = one(grad[i], x[i]);
  if constexpr (kLam) {
    using Reduce = cub::BlockReduce<A, kThreads>;
    __shared__ typename Reduce::TempStorage tmp;
    const A block = Reduce(tmp).Sum(sum - comp);
    if (threadIdx.x == 0) partial[blockIdx.x] = block;
  }
}

// The second stage: one block adds the per-block partials in a fixed order, in float64.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    sum_partials(const A* __restrict__ partial, int64_t count, A* __restrict__ out) {
  double sum = 0, comp = 0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) kahan_add(sum, comp, double(partial[i]));
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const double total = Reduce(tmp).Sum(sum - comp);
  if (threadIdx.x == 0) *out = A(total);
}

using WaveCache = std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS>;

// Blocks in one full wave of `kernel`: the grid-stride loops cover any n with them, and the
// backward's reduction then has one partial per resident block (a few thousand at most).
template <typename Kernel>
int64_t wave_blocks(Kernel kernel, WaveCache& cache, int device) {
  int blocks = cache[device].load(std::memory_order_relaxed);
  if (blocks == 0) {
    int per_sm = 0, sms = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    blocks = std::max(per_sm, 1) * sms;
    cache[device].store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}

template <typename T>
int64_t grid_for(int64_t n, bool vec, int64_t wave) {
  const int64_t items = vec ? (n + Pack<T>::kSize - 1) / Pack<T>::kSize : n;
  return std::max<int64_t>(1, std::min(wave, (items + kThreads - 1) / kThreads));
}

template <typename T>
Lam<Acc<T>> lam_arg(const at::Tensor& lam, at::Tensor& keep) {
  using A = Acc<T>;
  if (lam.is_cpu()) return {nullptr, A(lam.item<double>())};
  constexpr auto acc_type = c10::CppTypeToScalarType<A>::value;
  keep = lam.scalar_type() == acc_type ? lam : lam.to(acc_type);
  return {keep.const_data_ptr<A>(), A(0)};
}

template <typename T, bool kKappa>
void launch_forward(const T* x, T* y, int64_t n, Lam<Acc<T>> lam, double alpha, double beta,
                    double kappa, int device, cudaStream_t stream) {
  static WaveCache wave{};
  const auto kernel = forward_kernel<T, kKappa>;
  const bool vec = aligned16(x) && aligned16(y);
  const int64_t blocks = grid_for<T>(n, vec, wave_blocks(kernel, wave, device));
  const Family<Acc<T>, kKappa> f{Acc<T>(alpha), Acc<T>(beta), Acc<T>(kappa)};
  kernel<<<blocks, kThreads, 0, stream>>>(x, y, n, vec, lam, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Returns sum(grad * f(x) / lam) as a 0-d tensor of the accumulation type when kLam.
template <typename T, bool kKappa, bool kLam>
at::Tensor launch_backward(const T* g, const T* x, T* gx, int64_t n, Lam<Acc<T>> lam,
                           double alpha, double beta, double kappa,
                           const at::TensorOptions& acc_options, int device,
                           cudaStream_t stream) {
  using A = Acc<T>;
  static WaveCache wave{};
  const auto kernel = backward_kernel<T, kKappa, kLam>;
  const bool vec = aligned16(g) && aligned16(x) && aligned16(gx);
  const int64_t blocks = grid_for<T>(n, vec, wave_blocks(kernel, wave, device));
  const Family<A, kKappa> f{A(alpha), A(beta), A(kappa)};
  at::Tensor partial, total;
  if constexpr (kLam) {
    partial = at::empty({blocks}, acc_options);
    total = at::empty({}, acc_options);
  }
  kernel<<<blocks, kThreads, 0, stream>>>(g, x, gx, n, vec, lam, f,
                                          kLam ? partial.mutable_data_ptr<A>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (kLam) {
    sum_partials<A><<<1, kThreads, 0, stream>>>(partial.const_data_ptr<A>(), blocks,
                                                total.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return total;
}

void check_cuda(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor when lam is one, got ", x.device());
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& lam, double alpha, double beta,
                   double kappa) {
  check_inputs(x, lam, "selu_family");
  check_cuda(x, "selu_family");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  const int64_t n = y.numel();
  if (n == 0) return y;
  const at::Tensor xd = same_layout(x, y);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "selu_family", [&] {
    at::Tensor keep;
    const auto l = lam_arg<scalar_t>(lam, keep);
    const scalar_t* xp = xd.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int device = x.get_device();
    if (kappa != 0) {
      launch_forward<scalar_t, true>(xp, yp, n, l, alpha, beta, kappa, device, stream);
    } else {
      launch_forward<scalar_t, false>(xp, yp, n, l, alpha, beta, kappa, device, stream);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad, const at::Tensor& x,
                                                 const at::Tensor& lam, double alpha,
                                                 double beta, double kappa, bool need_lam) {
  const char* op = need_lam ? "selu_family_backward_lam" : "selu_family_backward";
  check_inputs(x, lam, op);
  check_grad(grad, x, op);
  check_cuda(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return {grad_x, need_lam ? at::empty_like(lam).zero_() : at::Tensor()};
  const at::Tensor xd = same_layout(x, grad_x);
  const at::Tensor gd = same_layout(grad, grad_x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor total;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "selu_family_backward", [&] {
    using A = Acc<scalar_t>;
    at::Tensor keep;
    const auto l = lam_arg<scalar_t>(lam, keep);
    const scalar_t* gp = gd.const_data_ptr<scalar_t>();
    const scalar_t* xp = xd.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    const auto acc = x.options().dtype(c10::CppTypeToScalarType<A>::value);
    const int device = x.get_device();
    const bool k = kappa != 0;
    if (need_lam) {
      total = k ? launch_backward<scalar_t, true, true>(gp, xp, gxp, n, l, alpha, beta, kappa,
                                                        acc, device, stream)
                : launch_backward<scalar_t, false, true>(gp, xp, gxp, n, l, alpha, beta,
                                                         kappa, acc, device, stream);
    } else if (k) {
      launch_backward<scalar_t, true, false>(gp, xp, gxp, n, l, alpha, beta, kappa, acc, device,
                                             stream);
    } else {
      launch_backward<scalar_t, false, false>(gp, xp, gxp, n, l, alpha, beta, kappa, acc,
                                              device, stream);
    }
  });
  if (!need_lam) return {grad_x, at::Tensor()};
  return {grad_x, total.reshape(lam.sizes()).to(lam.device(), lam.scalar_type())};
}

at::Tensor backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& lam,
                    double alpha, double beta, double kappa) {
  return std::get<0>(backward_impl(grad, x, lam, alpha, beta, kappa, false));
}

std::tuple<at::Tensor, at::Tensor> backward_lam(const at::Tensor& grad, const at::Tensor& x,
                                                const at::Tensor& lam, double alpha, double beta,
                                                double kappa) {
  return backward_impl(grad, x, lam, alpha, beta, kappa, true);
}

}  // namespace selfnorm::cuda

TORCH_LIBRARY_IMPL(selfnorm, CUDA, m) {
  m.impl("selu_family", &selfnorm::cuda::forward);
  m.impl("selu_family_backward", &selfnorm::cuda::backward);
  m.impl("selu_family_backward_lam", &selfnorm::cuda::backward_lam);
}
