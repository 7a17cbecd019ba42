// The safetensors format (Hugging Face): an 8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw data.
// Small enough to read and write here; every malformed input is a coil::Error naming the file and
// the tensor.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace coil {

// Every tensor of the file, in its own dtype (F64, F32, F16, BF16, I64, I32, U8, BOOL).
std::map<std::string, at::Tensor> read_safetensors(const std::string& path);

// Writes the tensors (contiguous copies, in the order given) and string metadata. The file is
// written under a temporary name and renamed, so a reader never sees half a file.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace coil
