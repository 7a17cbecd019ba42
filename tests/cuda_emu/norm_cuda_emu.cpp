// model/norm_cuda.cu compiled for the CPU emulator (include/cuda_runtime.h), unchanged, in
// namespace coil::norm_cuda_emu so that it links beside the real kernel.
#define norm_cuda norm_cuda_emu
#include "model/norm_cuda.cu"
