// The AVX2 build of the CPU kernels, picked at run time when ATen reports AVX2.
#include "prelude.h"

#if SELFNORM_X86_VARIANTS
#pragma GCC target("avx2,fma,f16c")
// The pragma does not define the ISA macros that sleef.h keys its AVX declarations on.
#define __AVX__ 1
#define __AVX2__ 1
#include <sleef.h>
#undef __AVX2__
#undef __AVX__

#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernel.h"
#endif
