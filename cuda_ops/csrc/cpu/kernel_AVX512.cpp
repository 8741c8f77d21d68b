// The AVX-512 build of the CPU kernels, picked at run time when ATen reports AVX512 (the feature
// set ATen's own AVX512 kernels are compiled for).
#include "prelude.h"

#if SELFNORM_X86_VARIANTS
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// The pragma does not define the ISA macros that sleef.h keys its AVX declarations on.
#define __AVX__ 1
#define __AVX2__ 1
#define __AVX512F__ 1
#include <sleef.h>
#undef __AVX512F__
#undef __AVX2__
#undef __AVX__

#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernel.h"
#endif
