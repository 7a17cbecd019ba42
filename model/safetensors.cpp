#include "model/safetensors.h"

#include <fmt/ranges.h>
#include <torch/types.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "util/error.h"

namespace coil {

using torch::Tensor;

namespace {

struct DtypeInfo {
  const char* name;
  torch::Dtype dtype;
  int64_t bytes;
};
const DtypeInfo kDtypes[] = {{"F64", torch::kDouble, 8}, {"F32", torch::kFloat, 4}, {"F16", torch::kHalf, 2},
                             {"BF16", torch::kBFloat16, 2}, {"I64", torch::kLong, 8}, {"I32", torch::kInt, 4},
                             {"U8", torch::kByte, 1},       {"BOOL", torch::kBool, 1}};

const DtypeInfo* find_dtype(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return &d;
  return nullptr;
}
const DtypeInfo* find_dtype(torch::Dtype t) {
  for (const auto& d : kDtypes)
    if (t == d.dtype) return &d;
  return nullptr;
}

}  // namespace

std::map<std::string, Tensor> read_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  COIL_CHECK(in, "{}: cannot open safetensors file", path);
  const int64_t size = in.tellg();
  in.seekg(0);
  uint64_t header_len = 0;
  COIL_CHECK(size >= 8 && in.read(reinterpret_cast<char*>(&header_len), 8),
             "{}: truncated safetensors file ({} bytes, no header)", path, size);
  COIL_CHECK(header_len <= static_cast<uint64_t>(size - 8),
             "{}: truncated safetensors file (header of {} bytes, file of {})", path, header_len, size);
  std::string header(header_len, '\0');
  in.read(header.data(), header_len);
  nlohmann::json j = nlohmann::json::parse(header, nullptr, /*allow_exceptions=*/false);
  COIL_CHECK(j.is_object(), "{}: the safetensors header is not a JSON object", path);
  const int64_t data_start = 8 + header_len, data_len = size - data_start;

  std::map<std::string, Tensor> out;
  for (auto& item : j.items()) {
    // Not a structured binding: a lambda may not capture one before C++20 (clang refuses).
    const std::string& name = item.key();
    nlohmann::json& entry = item.value();
    if (name == "__metadata__") continue;
    auto bad = [&](const std::string& why) { fail("{}: tensor '{}': {}", path, name, why); };
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") || !entry.contains("data_offsets"))
      bad("entry needs dtype, shape and data_offsets");
    if (!entry["dtype"].is_string()) bad("dtype is not a string");
    const DtypeInfo* dt = find_dtype(entry["dtype"].get<std::string>());
    if (!dt) bad(fmt::format("unsupported dtype {}", entry["dtype"].dump()));
    std::vector<int64_t> shape;
    int64_t numel = 1;
    if (!entry["shape"].is_array()) bad("shape is not a list");
    for (auto& d : entry["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) bad("shape holds a non-integer or negative size");
      shape.push_back(d.get<int64_t>());
      if (__builtin_mul_overflow(numel, shape.back(), &numel))
        bad(fmt::format("shape [{}, ...] has more elements than an int64 counts", fmt::join(shape, ", ")));
    }
    int64_t nbytes = 0;
    if (__builtin_mul_overflow(numel, dt->bytes, &nbytes))
      bad(fmt::format("shape [{}] of {} has more bytes than an int64 counts", fmt::join(shape, ", "), dt->name));
    auto& off = entry["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_integer() || !off[1].is_number_integer())
      bad("data_offsets is not [begin, end]");
    const int64_t begin = off[0].get<int64_t>(), end = off[1].get<int64_t>();
    if (begin < 0 || end < begin || end > data_len)
      bad(fmt::format("data [{}, {}) lies outside the file's {} data bytes (truncated file?)", begin, end, data_len));
    if (end - begin != nbytes)
      bad(fmt::format("{} bytes of data for shape [{}] of {}", end - begin, fmt::join(shape, ", "), dt->name));
    Tensor t = torch::empty(shape, torch::TensorOptions().dtype(dt->dtype));
    in.seekg(data_start + begin);
    if (!in.read(static_cast<char*>(t.data_ptr()), end - begin)) bad("read failed");
    out.emplace(name, std::move(t));
  }
  return out;
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<Tensor> data;
  int64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    const DtypeInfo* dt = find_dtype(tensor.scalar_type());
    COIL_CHECK(dt, "{}: tensor '{}' has a dtype safetensors cannot hold", path, name);
    Tensor t = tensor.detach().cpu().contiguous();
    const int64_t bytes = t.numel() * dt->bytes;
    header[name] = {{"dtype", dt->name}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(t);
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // keep the data 8-byte aligned, as the reference writer does
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    COIL_CHECK(out, "{}: cannot write", tmp);
    const uint64_t len = h.size();
    out.write(reinterpret_cast<const char*>(&len), 8);
    out.write(h.data(), h.size());
    for (const Tensor& t : data) out.write(static_cast<const char*>(t.data_ptr()), t.nbytes());
    COIL_CHECK(out.flush(), "{}: write failed (disk full?)", tmp);
  }
  COIL_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "{}: cannot rename into place", path);
}

}  // namespace coil
