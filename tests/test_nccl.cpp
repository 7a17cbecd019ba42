// The NCCL backend. Without a GPU: its error texts (an NCCL result code, the rank, the operation),
// its tensor checks (as the MPI backend's: device, contiguity, dtype, sizes) and what a build
// without it says. On a GPU (NcclCuda, run by scripts/gpu-check): the backend is in the build
// (a failure, not a skip, when a GPU is visible and it is missing), exact values on 1 to N ranks,
// and bad tensors rejected before anything is queued.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "dist/comm.h"
#include "dist/world.h"
#include "util/error.h"

using namespace coil::dist;
using nccl_detail::Sizes;

namespace {
// The message of the coil::Error that f throws ("" when it throws none).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const coil::Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(NcclChecks, ErrorMessagesNameTheRankTheOperationAndTheCause) {
  EXPECT_EQ(nccl_detail::error_message(3, "reduce_scatter", 6, "socket closed by peer 1"),
            "rank 3: NCCL reduce_scatter failed: ncclRemoteError (a peer rank died, or the network between the ranks "
            "broke): socket closed by peer 1");
  EXPECT_EQ(nccl_detail::error_message(0, "all_gather", 2, ""),
            "rank 0: NCCL all_gather failed: ncclSystemError (a system call or the network failed (a peer rank may "
            "have died))");
  EXPECT_EQ(nccl_detail::error_message(1, "broadcast", 5, ""),
            "rank 1: NCCL broadcast failed: ncclInvalidUsage (invalid usage (the ranks called different collectives, "
            "sizes or roots))");
  EXPECT_EQ(nccl_detail::error_message(2, "gather", 42, ""),
            "rank 2: NCCL gather failed: result 42 (an NCCL result this Coil does not know)");
}

TEST(NcclChecks, TensorsAreCheckedAsInTheMpiBackend) {
  // The checks take the device as a parameter: CPU here stands for "this rank's GPU".
  const at::Device dev(at::kCPU);
  const auto f32 = torch::kFloat;
  torch::Tensor in = torch::ones({3}), out = torch::empty({6});
  auto check = [&](const char* op, const torch::Tensor& a, const torch::Tensor* b, Sizes s, int rank = 1) {
    return error_of([&] { nccl_detail::check_tensors(rank, 2, dev, op, a, b, s); });
  };
  EXPECT_EQ(check("all_gather", in, &out, Sizes::kOutIsSizeTimesIn), "");
  EXPECT_EQ(check("reduce_scatter", out, &in, Sizes::kInIsSizeTimesOut), "");
  EXPECT_EQ(check("all_reduce", in, nullptr, Sizes::kSame), "");
  torch::Tensor seven = torch::empty({7});
  EXPECT_EQ(check("all_gather", in, &seven, Sizes::kOutIsSizeTimesIn),
            "rank 1: all_gather: output holds 7 elements, needs 6 (2 ranks x 3)");
  EXPECT_EQ(check("reduce_scatter", seven, &in, Sizes::kInIsSizeTimesOut),
            "rank 1: reduce_scatter: input holds 7 elements, needs 6 (2 ranks x 3)");
  torch::Tensor bf = torch::empty({6}, torch::kBFloat16);
  EXPECT_EQ(check("all_gather", in, &bf, Sizes::kOutIsSizeTimesIn),
            "rank 1: all_gather: output dtype c10::BFloat16 differs from input dtype float");
  torch::Tensor strided = torch::ones({3, 2}, f32).t();
  EXPECT_EQ(check("all_gather", in, &strided, Sizes::kOutIsSizeTimesIn),
            "rank 1: all_gather: the output is not contiguous (the NCCL backend takes contiguous tensors)");
  EXPECT_EQ(check("all_reduce", strided, nullptr, Sizes::kSame, 0),
            "rank 0: all_reduce: the tensor is not contiguous (the NCCL backend takes contiguous tensors)");
  EXPECT_EQ(error_of([&] { nccl_detail::check_tensors(0, 2, at::Device(at::kCUDA, 1), "broadcast", in, nullptr,
                                                      Sizes::kSame); }),
            "rank 0: broadcast: the tensor is on cpu, the NCCL backend of this rank takes tensors on cuda:1");
  EXPECT_EQ(error_of([&] { nccl_detail::check_tensors(0, 2, at::Device(at::kCUDA, 0), "all_gather", in, &out,
                                                      Sizes::kOutIsSizeTimesIn); }),
            "rank 0: all_gather: the input is on cpu, the NCCL backend of this rank takes tensors on cuda:0");
  const torch::Tensor undefined;
  EXPECT_EQ(check("gather", in, &undefined, Sizes::kOutIsSizeTimesIn),
            "rank 1: gather: the output is undefined");
}

TEST(NcclChecks, ABuildWithoutNcclSaysWhy) {
  EXPECT_EQ(nccl_detail::unavailable_reason(true, false), "");
  const std::string off = nccl_detail::unavailable_reason(true, true);
  EXPECT_NE(off.find("NCCL was disabled at build time (-DCOIL_NCCL=OFF)"), std::string::npos) << off;
  const std::string cpu = nccl_detail::unavailable_reason(false, false);
  EXPECT_NE(cpu.find("built without CUDA"), std::string::npos) << cpu;
  for (const std::string& m : {off, cpu}) EXPECT_EQ(m.find('\n'), std::string::npos) << m;
  // This build: make_nccl_comm() throws that reason when the backend is not in it.
  const std::string mine = nccl_detail::unavailable_reason();
  if (!mine.empty()) {
    EXPECT_EQ(error_of([] { make_nccl_comm(); }), mine);
  } else if (!torch::cuda::is_available()) {  // in the build, but no GPU here: it says so at once
    EXPECT_NE(error_of([] { make_nccl_comm(); })
                  .find(fmt::format("rank {}: the NCCL backend needs a GPU and none is visible", world().rank)),
              std::string::npos);
  }
}

// ---- On GPUs (skipped without one). -------------------------------------------------------------

TEST(NcclCuda, InTheBuildAndExactOnEveryRank) {
  if (!at::hasCUDA() || at::getNumGPUs() == 0) GTEST_SKIP() << "no CUDA device";
  // A GPU is visible: a build without the backend is a failure here, not a skip.
  ASSERT_EQ(nccl_detail::unavailable_reason(), "");
  if (world().size > static_cast<int>(at::getNumGPUs())) GTEST_SKIP() << "more ranks than GPUs";
  auto comm = make_nccl_comm();
  const int r = comm->rank(), n = comm->size();
  const auto cuda = torch::TensorOptions().device(torch::kCUDA, world().local_rank);
  torch::Tensor mine = torch::arange(3, cuda.dtype(torch::kFloat)) + 10.0 * r, all = torch::empty({3 * n}, cuda);
  comm->all_gather(mine, all);
  for (int k = 0; k < n; ++k)
    for (int i = 0; i < 3; ++i) EXPECT_EQ(all[3 * k + i].item<float>(), 10.0f * k + i);
  torch::Tensor in = torch::arange(2 * n, cuda.dtype(torch::kDouble)) * (r + 1), out = torch::empty({2}, in.options());
  auto work = comm->reduce_scatter_async(in, out);
  work->wait();
  EXPECT_EQ(out[1].item<double>(), (2 * r + 1) * n * (n + 1) / 2.0);
  // Bad tensors: nothing queued, the communicator still works afterwards.
  torch::Tensor wrong = torch::empty({3 * n + 1}, cuda);
  EXPECT_EQ(error_of([&] { comm->all_gather(mine, wrong); }),
            fmt::format("rank {}: all_gather: output holds {} elements, needs {} ({} ranks x 3)", r, 3 * n + 1, 3 * n, n));
  torch::Tensor host = torch::empty({3 * n});
  EXPECT_NE(error_of([&] { comm->all_gather(mine, host); }).find("the output is on cpu"), std::string::npos);
  torch::Tensor t = torch::full({4}, static_cast<int64_t>(r + 1), cuda.dtype(torch::kLong));
  comm->all_reduce(t);
  EXPECT_EQ(t[3].item<int64_t>(), n * (n + 1) / 2);
}
