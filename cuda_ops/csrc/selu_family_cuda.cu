// CUDA kernels of the SELU family (paper, Appendix B): a grid-stride forward with 16-byte
// vector loads and stores, and a backward that writes grad_x and/or, when lam is trainable,
// reduces dL/dlam = sum(grad * f(x) / lam) on chip.
//
// Vector access: the stored tensor (for the lam-only backward: x) is walked in aligned 16-byte
// packs after a short scalar prologue; an input that shares its misalignment is read the same
// way, any other input by two aligned loads and a funnel shift. So only tensors whose pointers
// are not even aligned to their element size take the scalar loop throughout.
//
// The dL/dlam reduction is deterministic and two-stage: each thread keeps a Kahan-compensated
// partial sum (Algorithm 2), cub::BlockReduce combines a block's threads, each block writes its
// partial to a buffer (no atomics), and one block adds those partials in a fixed order, in
// float64, and stores the result in lam's dtype. For a given tensor size, GPU and pointer
// alignment (which decide how elements are split over threads) the result is bitwise
// reproducible.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common.h"
#include "fast_expm1.h"

namespace selfnorm::cuda {

constexpr int kThreads = 256;

template <typename T>
using Acc = at::opmath_type<T>;

// bfloat16 and float16: computed in float, rounded to 8 or 11 significant bits at the end.
template <typename T>
constexpr bool kReduced = !std::is_same_v<Acc<T>, T>;

// 16 bytes, moved with one vector load or store, as four 32-bit words: 4 floats, 8 halves or
// 2 doubles. Kernels convert whole words, so that a pair of 16-bit values costs one instruction
// each way per element (a shift or mask in, one packing conversion per pair out).
struct alignas(16) Words {
  uint32_t w[4];
};

template <typename T>
constexpr int kPack = 16 / sizeof(T);

// The low and high 16-bit value of a word, in float. bfloat16 is the top half of a float, so
// one shift or mask converts it.
template <typename T>
__device__ __forceinline__ float low_half(uint32_t w) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return __uint_as_float(w << 16);
  return float(T(static_cast<uint16_t>(w & 0xffffu), T::from_bits()));
}

template <typename T>
__device__ __forceinline__ float high_half(uint32_t w) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return __uint_as_float(w & 0xffff0000u);
  return float(T(static_cast<uint16_t>(w >> 16), T::from_bits()));
}

// Two results rounded to T and packed into one word (one conversion instruction).
template <typename T>
__device__ __forceinline__ uint32_t pack_halves(float lo, float hi) {
  return uint32_t(T(lo).x) | (uint32_t(T(hi).x) << 16);
}

// f (A -> A) applied to the kPack<T> elements of a pack, in memory order.
template <typename T, typename F>
__device__ __forceinline__ Words map(const Words& in, F&& f) {
  Words out;
  if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float lo = f(low_half<T>(in.w[i]));
      const float hi = f(high_half<T>(in.w[i]));
      out.w[i] = pack_halves<T>(lo, hi);
    }
  } else if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) out.w[i] = __float_as_uint(f(__uint_as_float(in.w[i])));
  } else {
#pragma unroll
    for (int i = 0; i < 4; i += 2) {
      const double r = f(__hiloint2double(int(in.w[i + 1]), int(in.w[i])));
      out.w[i] = uint32_t(__double2loint(r));
      out.w[i + 1] = uint32_t(__double2hiint(r));
    }
  }
  return out;
}

// The same for f(a, b) over two packs, element by element, in memory order.
template <typename T, typename F>
__device__ __forceinline__ Words map2(const Words& a, const Words& b, F&& f) {
  Words out;
  if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float lo = f(low_half<T>(a.w[i]), low_half<T>(b.w[i]));
      const float hi = f(high_half<T>(a.w[i]), high_half<T>(b.w[i]));
      out.w[i] = pack_halves<T>(lo, hi);
    }
  } else if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out.w[i] = __float_as_uint(f(__uint_as_float(a.w[i]), __uint_as_float(b.w[i])));
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; i += 2) {
      const double r = f(__hiloint2double(int(a.w[i + 1]), int(a.w[i])),
                         __hiloint2double(int(b.w[i + 1]), int(b.w[i])));
      out.w[i] = uint32_t(__double2loint(r));
      out.w[i + 1] = uint32_t(__double2hiint(r));
    }
  }
  return out;
}

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

// The dtypes lam is read and dL/dlam written in on the device, without a cast kernel.
enum class LamType : int { kFloat, kDouble, kHalf, kBFloat16 };

std::optional<LamType> lam_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return LamType::kFloat;
    case at::kDouble: return LamType::kDouble;
    case at::kHalf: return LamType::kHalf;
    case at::kBFloat16: return LamType::kBFloat16;
    default: return std::nullopt;
  }
}

// lam is read on the device, in its own dtype, when it lives there (a trainable parameter: no
// host sync), and passed by value when it is a CPU constant.
template <typename A>
struct Lam {
  const void* ptr;
  LamType type;
  A value;

  __device__ __forceinline__ A get() const {
    if (ptr == nullptr) return value;
    switch (type) {  // the same for every thread: no divergence
      case LamType::kFloat: return A(*static_cast<const float*>(ptr));
      case LamType::kDouble: return A(*static_cast<const double*>(ptr));
      case LamType::kHalf: return A(float(*static_cast<const c10::Half*>(ptr)));
      default: return A(float(*static_cast<const c10::BFloat16*>(ptr)));
    }
  }
};

template <typename A>
__device__ __forceinline__ void store_lam(void* out, LamType type, A v) {
  switch (type) {
    case LamType::kFloat: *static_cast<float*>(out) = float(v); break;
    case LamType::kDouble: *static_cast<double*>(out) = double(v); break;
    case LamType::kHalf: *static_cast<c10::Half*>(out) = c10::Half(float(v)); break;
    default: *static_cast<c10::BFloat16*>(out) = c10::BFloat16(float(v)); break;
  }
}

// As in the CPU kernels: kKappa = false drops kappa*x, so x = -inf gives -lam*alpha as
// torch.nn.functional.selu does; NaN fails `x <= 0` and takes the positive branch, like F.selu.
template <typename T, bool kKappa>
struct Family {
  using A = Acc<T>;
  A alpha, beta, kappa;

  // f(x) / lam; expm1 keeps alpha*(e^{beta x} - 1) accurate near 0-, as the reference does.
  __device__ __forceinline__ A value(A x) const {
    if constexpr (kReduced<T>) {
      // Branchless and cheap (fast_expm1.h): the 16-bit forward is otherwise issue-bound.
      A r = alpha * fast_expm1(beta * x);
      if constexpr (kKappa) r += kappa * x;
      return x <= A(0) ? r : x;
    } else {
      if (!(x <= A(0))) return x;
      A r = alpha * expm1_(beta * x);
      if constexpr (kKappa) r += kappa * x;
      return r;
    }
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

// How a launch splits the n elements: [begin, begin + packs * V) in 16-byte packs, the rest
// ([0, begin) and the tail) in the scalar loop. At `begin` the stored tensor is 16-byte aligned;
// input i sits shift[i] bytes past a 16-byte boundary there (0: it shares the misalignment).
struct Split {
  int64_t begin = 0;
  int64_t packs = 0;
  int shift[2] = {0, 0};
};

template <typename T>
Split split_for(int64_t n, const void* anchor, std::initializer_list<const void*> inputs) {
  constexpr int64_t V = kPack<T>;
  constexpr auto size = static_cast<std::uintptr_t>(sizeof(T));
  auto addr = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p); };
  TORCH_INTERNAL_ASSERT(inputs.size() <= 2);
  if (addr(anchor) % size != 0) return {};
  for (const void* p : inputs) {
    if (addr(p) % size != 0) return {};
  }
  Split s;
  s.begin = static_cast<int64_t>(((16 - addr(anchor) % 16) % 16) / size);
  int count = 0;
  bool shifted = false;
  for (const void* p : inputs) {
    s.shift[count] = static_cast<int>((addr(p) + s.begin * size) % 16);
    shifted = shifted || s.shift[count] != 0;
    ++count;
  }
  // A shifted input reads the aligned chunk that starts up to 15 bytes before `begin`: one more
  // pack of prologue keeps that chunk inside the tensor.
  if (shifted) s.begin += V;
  if (s.begin >= n) return {};
  s.packs = (n - s.begin) / V;
  for (int k = 0; k < count; ++k) {
    // A shifted input's pack j also reads chunk j + 1, which must end inside the tensor.
    if (s.shift[k] != 0) {
      s.packs = std::min(s.packs, ((n - s.begin) * int64_t(size) + s.shift[k]) / 16 - 1);
    }
  }
  if (s.packs <= 0) return {};
  return s;
}

template <int S>
__device__ __forceinline__ void funnel(const Words& a, const Words& b, int bits, Words& o) {
  const uint32_t w[8] = {a.w[0], a.w[1], a.w[2], a.w[3], b.w[0], b.w[1], b.w[2], b.w[3]};
#pragma unroll
  for (int i = 0; i < 4; ++i) o.w[i] = __funnelshift_r(w[S + i], w[S + i + 1], bits);
}

// Pack j of an input that starts `shift` bytes past the 16-byte aligned `chunks` (chunks j and
// j + 1 hold its 16 bytes); shift = 0 is a plain vector load.
__device__ __forceinline__ Words load(const Words* __restrict__ chunks, int64_t j, int shift) {
  if (shift == 0) return chunks[j];
  const Words a = chunks[j];
  const Words b = chunks[j + 1];
  const int bits = 8 * (shift % 4);
  Words o;
  switch (shift / 4) {  // one shift per launch: no divergence
    case 0: funnel<0>(a, b, bits, o); break;
    case 1: funnel<1>(a, b, bits, o); break;
    case 2: funnel<2>(a, b, bits, o); break;
    default: funnel<3>(a, b, bits, o); break;
  }
  return o;
}

template <typename T>
__device__ __forceinline__ const Words* chunks_of(const T* p, int64_t begin, int shift) {
  return reinterpret_cast<const Words*>(reinterpret_cast<const char*>(p + begin) - shift);
}

// The scalar elements of a split, [0, begin) and [begin + packs * V, n), as one index range.
struct Scalars {
  int64_t begin, end, count;
  __device__ __forceinline__ int64_t operator[](int64_t j) const {
    return j < begin ? j : end + (j - begin);
  }
};

template <typename T>
__device__ __forceinline__ Scalars scalars_of(int64_t n, const Split& s) {
  const int64_t end = s.begin + s.packs * kPack<T>;
  return {s.begin, end, s.begin + (n - end)};
}

template <typename T, bool kKappa>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, Split s,
                   Lam<Acc<T>> lam, Family<T, kKappa> f) {
  using A = Acc<T>;
  const A l = lam.get();
  auto value = [&](A v) { return l * f.value(v); };
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  const int64_t tid = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const Words* xv = chunks_of(x, s.begin, s.shift[0]);
  auto* yv = reinterpret_cast<Words*>(y + s.begin);
  // Two packs per thread and trip, both loaded before either is computed: twice the bytes in
  // flight per thread, which a memory-bound loop needs more than occupancy.
  for (int64_t i = tid; i < s.packs; i += 2 * stride) {
    const int64_t j = i + stride;
    const bool second = j < s.packs;
    const Words p = load(xv, i, s.shift[0]);
    Words q;
    if (second) q = load(xv, j, s.shift[0]);
    yv[i] = map<T>(p, value);
    if (second) yv[j] = map<T>(q, value);
  }
  const Scalars r = scalars_of<T>(n, s);
  for (int64_t j = tid; j < r.count; j += stride) {
    const int64_t i = r[j];
    y[i] = T(value(A(x[i])));
  }
}

// kGradX: write grad_x = grad * f'(x); kLam: reduce dL/dlam (at least one of them).
template <typename T, bool kKappa, bool kLam, bool kGradX>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ gx,
                    int64_t n, Split s, Lam<Acc<T>> lam, Family<T, kKappa> f,
                    Acc<T>* __restrict__ partial) {
  using A = Acc<T>;
  const A l = lam.get();
  A sum = 0, comp = 0;
  auto one = [&](A g, A xa) -> A {
    A fx;
    const A d = f.slope(xa, fx);
    if constexpr (kLam) kahan_add(sum, comp, g * fx);
    return g * l * d;
  };
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  const int64_t tid = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const Words* gv = chunks_of(grad, s.begin, s.shift[0]);
  const Words* xv = chunks_of(x, s.begin, s.shift[1]);
  for (int64_t i = tid; i < s.packs; i += stride) {
    const Words o = map2<T>(load(gv, i, s.shift[0]), load(xv, i, s.shift[1]), one);
    if constexpr (kGradX) reinterpret_cast<Words*>(gx + s.begin)[i] = o;
  }
  const Scalars r = scalars_of<T>(n, s);
  for (int64_t j = tid; j < r.count; j += stride) {
    const int64_t i = r[j];
    const T o = T(one(A(grad[i]), A(x[i])));
    if constexpr (kGradX) gx[i] = o;
  }
  if constexpr (kLam) {
    using Reduce = cub::BlockReduce<A, kThreads>;
    __shared__ typename Reduce::TempStorage tmp;
    const A block = Reduce(tmp).Sum(sum - comp);
    if (threadIdx.x == 0) partial[blockIdx.x] = block;
  }
}

// The second stage: one block adds the per-block partials in a fixed order, in float64, and
// writes the total in lam's dtype (rounded through A, as a cast of an A result would be).
template <typename A>
__global__ void __launch_bounds__(kThreads)
    sum_partials(const A* __restrict__ partial, int64_t count, void* __restrict__ out,
                 LamType type) {
  double sum = 0, comp = 0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) kahan_add(sum, comp, double(partial[i]));
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const double total = Reduce(tmp).Sum(sum - comp);
  if (threadIdx.x == 0) store_lam(out, type, A(total));
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

// Enough blocks for one trip of `packs_per_thread` packs per thread (of one element each in
// the scalar loop when there are no packs), at most one wave.
int64_t grid_for(int64_t n, const Split& s, int64_t packs_per_thread, int64_t wave) {
  const int64_t threads = s.packs > 0 ? (s.packs + packs_per_thread - 1) / packs_per_thread : n;
  return std::max<int64_t>(1, std::min(wave, (threads + kThreads - 1) / kThreads));
}

// `keep` holds lam's device copy in float32 for the rare dtypes the kernels do not read directly.
template <typename A>
Lam<A> lam_arg(const at::Tensor& lam, at::Tensor& keep) {
  if (lam.is_cpu()) return {nullptr, LamType::kFloat, A(lam.item<double>())};
  keep = lam_type(lam.scalar_type()) ? lam : lam.to(at::kFloat);
  return {keep.const_data_ptr(), *lam_type(keep.scalar_type()), A(0)};
}

template <typename T, bool kKappa>
void launch_forward(const T* x, T* y, int64_t n, Lam<Acc<T>> lam, double alpha, double beta,
                    double kappa, int device, cudaStream_t stream) {
  using A = Acc<T>;
  static WaveCache wave{};
  const auto kernel = forward_kernel<T, kKappa>;
  const Split s = split_for<T>(n, y, {x});
  const int64_t blocks = grid_for(n, s, 2, wave_blocks(kernel, wave, device));
  const Family<T, kKappa> f{A(alpha), A(beta), A(kappa)};
  kernel<<<blocks, kThreads, 0, stream>>>(x, y, n, s, lam, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Writes grad_x when kGradX and dL/dlam into `grad_lam` (lam's dtype) when kLam.
template <typename T, bool kKappa, bool kLam, bool kGradX>
void launch_backward(const T* g, const T* x, T* gx, int64_t n, Lam<Acc<T>> lam, double alpha,
                     double beta, double kappa, void* grad_lam, LamType grad_lam_type,
                     const at::TensorOptions& options, int device, cudaStream_t stream) {
  using A = Acc<T>;
  static WaveCache wave{};
  const auto kernel = backward_kernel<T, kKappa, kLam, kGradX>;
  // The stored tensor sets the alignment; without grad_x, x does (and is read like it).
  const Split s = kGradX ? split_for<T>(n, gx, {g, x}) : split_for<T>(n, x, {g, x});
  const int64_t blocks = grid_for(n, s, 1, wave_blocks(kernel, wave, device));
  const Family<T, kKappa> f{A(alpha), A(beta), A(kappa)};
  at::Tensor partial;
  if constexpr (kLam) {
    partial = at::empty({blocks}, options.dtype(c10::CppTypeToScalarType<A>::value));
  }
  kernel<<<blocks, kThreads, 0, stream>>>(g, x, gx, n, s, lam, f,
                                          kLam ? partial.mutable_data_ptr<A>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (kLam) {
    sum_partials<A><<<1, kThreads, 0, stream>>>(partial.const_data_ptr<A>(), blocks, grad_lam,
                                                grad_lam_type);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
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
    const auto l = lam_arg<Acc<scalar_t>>(lam, keep);
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

template <typename T, bool kKappa>
void backward_as(const T* g, const T* x, T* gx, int64_t n, Lam<Acc<T>> lam, double alpha,
                 double beta, double kappa, void* grad_lam, LamType grad_lam_type,
                 const at::TensorOptions& options, int device, cudaStream_t stream) {
  if (gx != nullptr && grad_lam != nullptr) {
    launch_backward<T, kKappa, true, true>(g, x, gx, n, lam, alpha, beta, kappa, grad_lam,
                                           grad_lam_type, options, device, stream);
  } else if (gx != nullptr) {
    launch_backward<T, kKappa, false, true>(g, x, gx, n, lam, alpha, beta, kappa, nullptr,
                                            grad_lam_type, options, device, stream);
  } else {
    launch_backward<T, kKappa, true, false>(g, x, nullptr, n, lam, alpha, beta, kappa, grad_lam,
                                            grad_lam_type, options, device, stream);
  }
}

// need_x: compute grad_x; need_lam: compute dL/dlam (one of them at least).
std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad, const at::Tensor& x,
                                                 const at::Tensor& lam, double alpha,
                                                 double beta, double kappa, bool need_x,
                                                 bool need_lam) {
  const char* op = backward_name(need_x, need_lam);
  check_inputs(x, lam, op);
  check_grad(grad, x, op);
  check_cuda(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = need_x ? at::empty_like(x) : at::Tensor();
  // dL/dlam is written on x's device in lam's dtype (float32 for dtypes the kernel does not
  // write), and a CPU lam gets it back on the CPU.
  const auto out_type = lam_type(lam.scalar_type()) ? lam.scalar_type() : at::kFloat;
  at::Tensor grad_lam =
      need_lam ? at::empty_like(lam, lam.options().dtype(out_type).device(x.device()))
               : at::Tensor();
  const int64_t n = x.numel();
  if (n == 0) {
    if (need_lam) grad_lam.zero_();
  } else {
    // Walked as one flat array: in grad_x's memory order, or x's when there is no grad_x.
    const at::Tensor xd = need_x ? same_layout(x, grad_x) : dense(x);
    const at::Tensor gd = same_layout(grad, need_x ? grad_x : xd);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "selu_family_backward", [&] {
      at::Tensor keep;
      const auto l = lam_arg<Acc<scalar_t>>(lam, keep);
      const scalar_t* gp = gd.const_data_ptr<scalar_t>();
      const scalar_t* xp = xd.const_data_ptr<scalar_t>();
      scalar_t* gxp = need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
      void* glp = need_lam ? grad_lam.mutable_data_ptr() : nullptr;
      const LamType glt = *lam_type(out_type);
      const int device = x.get_device();
      if (kappa != 0) {
        backward_as<scalar_t, true>(gp, xp, gxp, n, l, alpha, beta, kappa, glp, glt, x.options(),
                                    device, stream);
      } else {
        backward_as<scalar_t, false>(gp, xp, gxp, n, l, alpha, beta, kappa, glp, glt,
                                     x.options(), device, stream);
      }
    });
  }
  if (need_lam && grad_lam.scalar_type() != lam.scalar_type()) {
    grad_lam = grad_lam.to(lam.scalar_type());
  }
  if (need_lam && lam.is_cpu()) grad_lam = grad_lam.to(lam.device());
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

}  // namespace selfnorm::cuda

TORCH_LIBRARY_IMPL(selfnorm, CUDA, m) {
  m.impl("selu_family", &selfnorm::cuda::forward);
  m.impl("selu_family_backward", &selfnorm::cuda::backward);
  m.impl("selu_family_backward_lam", &selfnorm::cuda::backward_lam);
  m.impl("selu_family_backward_lam_only", &selfnorm::cuda::backward_lam_only);
}
