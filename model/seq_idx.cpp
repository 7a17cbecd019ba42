#include "model/seq_idx.h"

#include <fmt/ranges.h>
#include <torch/types.h>

#include "util/error.h"

namespace coil {

void check_seq_idx(const at::Tensor& seq_idx, int64_t B, int64_t L, const char* who, bool order_on_device) {
  if (!seq_idx.defined()) return;
  COIL_CHECK(seq_idx.scalar_type() == torch::kInt, "{}: seq_idx must be int32, got {}", who,
             c10::toString(seq_idx.scalar_type()));
  COIL_CHECK(seq_idx.dim() == 2 && seq_idx.size(0) == B && seq_idx.size(1) == L,
             "{}: seq_idx has shape {}, expected {}x{}", who, fmt::to_string(fmt::join(seq_idx.sizes(), "x")), B, L);
  if (L < 2 || !(seq_idx.is_cpu() || order_on_device)) return;
  const at::Tensor down = seq_idx.narrow(1, 1, L - 1) < seq_idx.narrow(1, 0, L - 1);
  COIL_CHECK(!down.any().item<bool>(), "{}: seq_idx decreases within a row (document numbers must be non-decreasing)",
             who);
}

at::Tensor reset_flags(const at::Tensor& seq_idx) {
  if (!seq_idx.defined()) return at::Tensor();
  const int64_t L = seq_idx.size(1);
  at::Tensor r = torch::zeros(seq_idx.sizes(), seq_idx.options().dtype(torch::kByte));
  if (L > 1) r.narrow(1, 1, L - 1).copy_(seq_idx.narrow(1, 1, L - 1) != seq_idx.narrow(1, 0, L - 1));
  return r.contiguous();
}

}  // namespace coil
