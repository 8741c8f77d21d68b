// The portable build of the CPU kernels (at::vec's generic lanes; NEON on aarch64).
#include "prelude.h"

#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "kernel.h"
