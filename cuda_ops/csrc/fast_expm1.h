// e^t - 1 for the 16-bit CUDA forward, where the result is rounded to bfloat16 or float16 and
// expm1f's accuracy (about 30 instructions behind a branch) buys nothing. Shared by the CUDA
// kernels and the CPU test hook selfnorm::_fast_expm1, so a CPU test measures this very formula.
//
// Branchless, both halves computed and one selected:
//   |t| < 0.25: the degree-5 Taylor polynomial in explicit fmaf steps (the same bits on the host
//               and the GPU); the remainder stays below 1.6e-6 relative.
//   otherwise:  e^t - 1 with e^t from ex2.approx(t * log2 e), which is what __expf compiles to
//               (at most 2 + 1.173|t| ulp), in its flush-to-zero form: results below 2^-126 only
//               occur where e^t - 1 rounds to -1 anyway. |e^t - 1| >= 0.22 there, so the
//               subtraction amplifies the error of e^t at most 3.6-fold.
// Together below 2e-6 relative, far inside the half-ulp of bfloat16 (2^-8) and float16 (2^-11).
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define SELFNORM_HOST_DEVICE __host__ __device__
#else
#define SELFNORM_HOST_DEVICE
#endif

namespace selfnorm {

// 2^u: the GPU's approximate exponential instruction; on the host the exact exp2f, which differs
// from it by less than the __expf error bound the test allows for.
SELFNORM_HOST_DEVICE inline float exp2_approx(float u) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(u));
  return r;
#else
  return exp2f(u);
#endif
}

SELFNORM_HOST_DEVICE inline float fast_expm1(float t) {
  constexpr float kLog2e = 1.44269504088896341f;  // rounds to __expf's constant, 0x3FB8AA3B
  float p = 1.f / 120;
  p = fmaf(p, t, 1.f / 24);
  p = fmaf(p, t, 1.f / 6);
  p = fmaf(p, t, 0.5f);
  p = fmaf(p, t, 1.f);
  p = p * t;
  const float e = exp2_approx(t * kLog2e) - 1.f;
  return fabsf(t) < 0.25f ? p : e;
}

}  // namespace selfnorm
