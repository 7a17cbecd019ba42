// The CUDA emulator's controls, for tests (plain C++; the design is in cuda_runtime.h here).
#pragma once

#include <cstdint>

namespace coil_emu {

enum class Order { kAscending, kDescending, kShuffled };
// The order threads (and blocks: reversed for kDescending) run in; kShuffled draws from seed.
void set_schedule(Order order, uint64_t seed = 0);
// What the launches since the last call did: kernels launched and blocks run.
struct Counts {
  int64_t launches = 0, blocks = 0;
};
Counts take_counts();

}  // namespace coil_emu
