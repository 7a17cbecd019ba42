// The fused CPU scan compiled with AVX2 and FMA (this file gets -mavx2 -mfma); used only when the
// processor has both (scan_cpu_generic.cpp decides).
#define COIL_SCAN_ISA avx2
#define COIL_SCAN_ISA_NAME "avx2"
#include "model/scan_cpu_kernel.inc"

namespace coil::scan_cpu {
Kernels avx2_kernels() { return avx2::kernels(); }
}  // namespace coil::scan_cpu
