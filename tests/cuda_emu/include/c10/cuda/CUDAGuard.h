// The CUDA emulator's stand-in (see cuda_runtime.h): one device, nothing to switch.
#pragma once

#include <cstdint>

namespace c10 {
using DeviceIndex = int8_t;
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(DeviceIndex) {}
};
}  // namespace cuda
}  // namespace c10
