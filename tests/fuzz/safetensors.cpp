// Fuzz target: a safetensors file (model/safetensors.h), as `coil import-hf` reads a Hugging Face
// model.safetensors. The bytes are the file. A file that reads is written back and read again:
// the same names, dtypes, shapes and bytes.
#include <torch/types.h>

#include "model/safetensors.h"
#include "tests/fuzz/fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = coil::fuzz::write_file("model.safetensors", {reinterpret_cast<const char*>(data), size});
  coil::fuzz::expect_coil_errors([&] {
    auto tensors = coil::read_safetensors(path);
    std::vector<std::pair<std::string, at::Tensor>> list(tensors.begin(), tensors.end());
    const std::string again = coil::fuzz::scratch_dir() + "/again.safetensors";
    coil::write_safetensors(again, list, {{"format", "pt"}});
    auto back = coil::read_safetensors(again);
    COIL_FUZZ_ASSERT(back.size() == tensors.size(), "a written file has the tensors read");
    for (const auto& [name, t] : tensors) {
      auto it = back.find(name);
      COIL_FUZZ_ASSERT(it != back.end(), "a written file has the tensors read");
      const at::Tensor& u = it->second;
      COIL_FUZZ_ASSERT(u.scalar_type() == t.scalar_type() && u.sizes() == t.sizes(), "same dtype and shape");
      COIL_FUZZ_ASSERT(t.nbytes() == 0 || std::memcmp(u.data_ptr(), t.data_ptr(), t.nbytes()) == 0, "same bytes");
    }
  });
  return 0;
}
