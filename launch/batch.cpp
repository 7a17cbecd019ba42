#include "launch/batch.h"

#include <cmath>
#include <cstring>

namespace coil {

int64_t target_count(const data::Batch& b) {
  if (b.mask.empty()) return b.rows * (b.cols - 1);
  int64_t n = 0;
  for (int64_t i = 0; i < b.rows; ++i)
    for (int64_t j = 1; j < b.cols; ++j) n += b.mask[static_cast<size_t>(i * b.cols + j)] != 0;
  return n;
}

DeviceBatch to_device(const data::Batch& b, at::Device device) {
  const bool pin = device.is_cuda();
  const auto host = at::TensorOptions().dtype(at::kLong).pinned_memory(pin);
  const int64_t L = b.cols - 1;
  // inputs: tokens [.., :-1]; targets: tokens [.., 1:], -100 where the mask is off.
  at::Tensor inputs = at::empty({b.rows, L}, host), targets = at::empty({b.rows, L}, host);
  int64_t* in = inputs.data_ptr<int64_t>();
  int64_t* tg = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < b.rows; ++i) {
    const int32_t* row = b.tokens.data() + i * b.cols;
    const uint8_t* mask = b.mask.empty() ? nullptr : b.mask.data() + i * b.cols;
    for (int64_t j = 0; j < L; ++j) {
      in[i * L + j] = row[j];
      tg[i * L + j] = !mask || mask[j + 1] ? row[j + 1] : -100;
    }
  }
  at::Tensor seq_idx;
  if (!b.seq_idx.empty()) {
    seq_idx = at::empty({b.rows, L}, at::TensorOptions().dtype(at::kInt).pinned_memory(pin));
    int32_t* s = seq_idx.data_ptr<int32_t>();
    for (int64_t i = 0; i < b.rows; ++i) std::memcpy(s + i * L, b.seq_idx.data() + i * b.cols, static_cast<size_t>(L) * 4);
  }
  DeviceBatch out{inputs, targets, seq_idx, target_count(b)};
  if (pin) {
    out.inputs = inputs.to(device, /*non_blocking=*/true);
    out.targets = targets.to(device, /*non_blocking=*/true);
    if (seq_idx.defined()) out.seq_idx = seq_idx.to(device, /*non_blocking=*/true);
  }
  return out;
}

namespace {
uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
}  // namespace

void add_row_hashes(const data::Batch& b, int64_t first_global_row, double& low, double& high) {
  for (int64_t i = 0; i < b.rows; ++i) {
    uint64_t h = mix64(static_cast<uint64_t>(first_global_row + i) + 0x9e3779b97f4a7c15ULL);
    for (int64_t j = 0; j < b.cols; ++j) {
      const auto k = static_cast<size_t>(i * b.cols + j);
      const uint64_t m = b.mask.empty() ? 1 : b.mask[k];
      h = mix64(h ^ (static_cast<uint32_t>(b.tokens[k]) | m << 32));
    }
    low += static_cast<double>(h & 0xffffffffULL);
    high += static_cast<double>(h >> 32);
  }
}

uint64_t batch_hash(double low_sum, double high_sum) {
  return static_cast<uint64_t>(std::fmod(high_sum, 4294967296.0)) << 32 |
         static_cast<uint64_t>(std::fmod(low_sum, 4294967296.0));
}

at::Tensor loss_sum(const LossSum& model, const DeviceBatch& b) { return model(b.inputs, b.seq_idx, b.targets); }

}  // namespace coil
