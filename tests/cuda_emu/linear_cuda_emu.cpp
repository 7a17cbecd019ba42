// model/linear_cuda.cu compiled for the CPU emulator (include/cuda_runtime.h), unchanged, in
// namespace coil::linear_cuda_emu so that it links beside the real kernel.
#define linear_cuda linear_cuda_emu
#include "model/linear_cuda.cu"
