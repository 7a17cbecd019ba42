// The host side of a training step, in one run (launch/batch.h, dist::CheckpointSaver::stage):
//   host: a micro batch made into inputs and targets by to_device (one loop over the loader's
//     int32 tokens and mask, the count from the mask on the host) vs the tensor-op version the
//     trainer had (int32 -> int64 cast, narrow, clone, masked_fill, mask.sum().item()); ratio.
//   CUDA only: the micro batch's host-to-device copy, pinned and non_blocking (to_device) vs a
//     pageable blocking .to(device), as the time the host is held per micro batch while the GPU
//     is busy with other work (a queued matmul), and the end-to-end time; and checkpoint staging:
//     device-to-host copies of the 130m model's parameters into pinned vs pageable buffers (GB/s).
//   bench_batch [--rows 8] [--cols 2049] [--device cpu|cuda]
#include <ATen/ATen.h>
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <random>

#include "dist/checkpoint.h"
#include "launch/batch.h"
#include "model/mamba.h"

using namespace coil;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Best of `reps` timings of f, in seconds.
template <typename F>
double best_of(int reps, F&& f) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t0 = now();
    f();
    best = std::min(best, now() - t0);
  }
  return best;
}

// The trainer's former to_tensors: tensor ops, and the count from the mask tensor.
int64_t to_tensors_ops(const data::Batch& b, at::Tensor& inputs, at::Tensor& targets) {
  at::Tensor tokens = at::from_blob(const_cast<int32_t*>(b.tokens.data()), {b.rows, b.cols}, at::kInt).to(at::kLong);
  inputs = tokens.narrow(1, 0, b.cols - 1);
  targets = tokens.narrow(1, 1, b.cols - 1).clone();
  if (b.mask.empty()) return b.rows * (b.cols - 1);
  at::Tensor mask = at::from_blob(const_cast<uint8_t*>(b.mask.data()), {b.rows, b.cols}, at::kByte).narrow(1, 1, b.cols - 1);
  targets.masked_fill_(mask.eq(0), -100);
  return mask.sum().item<int64_t>();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_batch: the host side of a training step"};
  int64_t rows = 8, cols = 2049;
  std::string device_name = at::hasCUDA() && at::getNumGPUs() > 0 ? "cuda" : "cpu";
  app.add_option("--rows", rows, "sequences per micro batch");
  app.add_option("--cols", cols, "tokens per sequence (seq_len + 1)");
  app.add_option("--device", device_name, "cpu or cuda");
  CLI11_PARSE(app, argc, argv);
  std::mt19937 rng(1);
  data::Batch b;
  b.rows = rows, b.cols = cols;
  for (int64_t i = 0; i < rows * cols; ++i) b.tokens.push_back(static_cast<int32_t>(rng() % 50000));
  data::Batch masked = b;
  for (int64_t i = 0; i < rows * cols; ++i) masked.mask.push_back(static_cast<uint8_t>(rng() % 4 != 0));

  fmt::print("micro batch {} x {} tokens\n", rows, cols);
  for (const data::Batch* x : {&b, &masked}) {
    at::Tensor in, tg;
    const double ops = best_of(50, [&] { (void)to_tensors_ops(*x, in, tg); });
    const double loop = best_of(50, [&] { (void)to_device(*x, at::kCPU); });
    fmt::print("host, {}: to_device {:.1f} us, tensor ops {:.1f} us, ratio {:.2f}\n",
               x->mask.empty() ? "no mask" : "masked", loop * 1e6, ops * 1e6, ops / loop);
  }
  if (device_name != "cuda") {
    fmt::print("no GPU: the CUDA copies are not measured (--device cuda on a GPU machine)\n");
    return 0;
  }
  const at::Device dev(at::kCUDA, 0);
  const at::Tensor a = at::randn({4096, 4096}, at::TensorOptions().device(dev));
  auto sync = [&] { (void)a.sum().item<float>(); };
  // The host's time per micro batch while the GPU still works on a queued matmul, and the total.
  const int micro = 8;
  auto copies = [&](bool pinned) {
    double host = 0, total = 0;
    for (int rep = 0; rep < 5; ++rep) {
      sync();
      const double t0 = now();
      at::Tensor busy = at::mm(a, a);  // keeps the stream busy for a few ms
      for (int m = 0; m < micro; ++m) {
        if (pinned) {
          (void)to_device(masked, dev);
        } else {
          at::Tensor in, tg;
          to_tensors_ops(masked, in, tg);
          (void)in.to(dev), (void)tg.to(dev);
        }
      }
      const double t1 = now();
      sync();
      host += (t1 - t0) / micro, total += now() - t0;
    }
    return std::pair<double, double>{host / 5, total / 5};
  };
  copies(true), copies(false);  // warm-up: the caching allocators
  const auto [ph, pt] = copies(true);
  const auto [qh, qt] = copies(false);
  fmt::print("host-to-device, {} micro batches behind a matmul: host per micro batch pinned {:.1f} us, pageable {:.1f} us "
             "(ratio {:.2f}); end to end {:.2f} ms vs {:.2f} ms (ratio {:.2f})\n",
             micro, ph * 1e6, qh * 1e6, qh / ph, pt * 1e3, qt * 1e3, qt / pt);
  // Checkpoint staging: the 130m model's parameters from the GPU into host buffers.
  MambaConfig mc = MambaConfig::preset("130m");
  MambaLM model(mc, 0);
  model.to(dev);
  int64_t bytes = 0;
  for (const auto& p : model.named_parameters()) bytes += p.tensor.numel() * 4;
  auto stage = [&](bool pinned) {
    std::vector<at::Tensor> bufs;
    for (const auto& p : model.named_parameters())
      bufs.push_back(at::empty(p.tensor.sizes(), p.tensor.options().device(at::kCPU).pinned_memory(pinned)));
    return best_of(5, [&] {
      const auto named = model.named_parameters();
      for (size_t i = 0; i < named.size(); ++i) bufs[i].copy_(named[i].tensor);
    });
  };
  const double pin = stage(true), page = stage(false);
  fmt::print("checkpoint staging of 130m ({:.0f} MB): pinned {:.1f} GB/s, pageable {:.1f} GB/s, ratio {:.2f}\n",
             static_cast<double>(bytes) / 1e6, static_cast<double>(bytes) / pin / 1e9,
             static_cast<double>(bytes) / page / 1e9, page / pin);
  return 0;
}
