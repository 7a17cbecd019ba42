// model/scan_cuda.cu compiled for the CPU emulator (include/cuda_runtime.h), unchanged, in namespace
// coil::scan_cuda_emu so that it links beside the real kernels.
#define scan_cuda scan_cuda_emu
#include "model/scan_cuda.cu"
