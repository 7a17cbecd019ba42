// The fused CPU scan compiled for the baseline instruction set of the target (any x86-64 or ARM).
#define COIL_SCAN_ISA generic
#define COIL_SCAN_ISA_NAME "generic"
#include "model/scan_cpu_kernel.inc"

namespace coil::scan_cpu {

Kernels generic_kernels() { return generic::kernels(); }

const Kernels& best_kernels() {
#if defined(COIL_HAVE_AVX2_KERNEL)
  static const Kernels k = (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
                               ? avx2_kernels()
                               : generic_kernels();
#else
  static const Kernels k = generic_kernels();
#endif
  return k;
}

}  // namespace coil::scan_cpu
