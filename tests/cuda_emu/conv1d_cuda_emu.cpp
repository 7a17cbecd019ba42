// model/conv1d_cuda.cu compiled for the CPU emulator (include/cuda_runtime.h), unchanged, in
// namespace coil::conv_cuda_emu so that it links beside the real kernels.
#define conv_cuda conv_cuda_emu
#include "model/conv1d_cuda.cu"
