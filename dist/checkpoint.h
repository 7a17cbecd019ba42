// Checkpoints in HDF5, readable by anyone with h5py:
//   <dir>/checkpoint.h5
//     /model/<Hugging Face name>      float32 datasets with the parameters' global shapes
//     /optimizer/<state name>         Muon momenta, AdamW moments ("muon.<param>.momentum", ...)
//     /rng/cpu                        LibTorch's CPU generator state (uint8)
//     attributes on /                 format = "coil.checkpoint", version = 1, step, and strings:
//                                     config (the resolved TOML), loader_state (JSON), ...
// A checkpoint directory is written under <dir>.tmp and renamed into place once whole, so a
// directory that exists is complete; a crash leaves at most a .tmp behind.
// (One process writes the whole state for now; the sharding issue adds one file per rank.)
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "model/mamba.h"

namespace coil {

struct CheckpointData {
  int64_t step = 0;
  std::vector<NamedTensor> model, optimizer;
  std::map<std::string, std::string> strings;  // config, loader_state, ...
  bool save_rng = true;
};

void save_checkpoint(const std::string& dir, const CheckpointData& data);

// Reads a checkpoint into the given tensors, whose names and shapes must match (an error names
// the first tensor that is missing or of another shape). optimizer may be null (SFT starts a
// fresh optimizer). Restores the CPU RNG when restore_rng. Returns the step and strings.
CheckpointData load_checkpoint(const std::string& dir, const std::vector<NamedTensor>& model,
                               const std::vector<NamedTensor>* optimizer, bool restore_rng = true);

// Points <parent>/<link> at <target> (a sibling directory name), atomically (a relative symlink).
void point_link(const std::string& parent, const std::string& link, const std::string& target);

}  // namespace coil
