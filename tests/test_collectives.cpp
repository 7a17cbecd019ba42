// The MPI collectives, with exact values, on whatever number of ranks mpirun starts (1 to 4).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "dist/comm.h"
#include "dist/world.h"
#include "util/error.h"

using namespace coil::dist;

TEST(Collectives, ExactValues) {
  auto comm = make_mpi_comm();
  const int r = comm->rank(), n = comm->size();
  EXPECT_EQ(n, world().size);
  // all_gather: rank r contributes [10r, 10r + 1, 10r + 2].
  torch::Tensor mine = torch::arange(3, torch::kFloat) + 10.0 * r, all = torch::empty({3 * n});
  comm->all_gather(mine, all);
  for (int k = 0; k < n; ++k)
    for (int i = 0; i < 3; ++i) EXPECT_EQ(all[3 * k + i].item<float>(), 10.0f * k + i);
  // reduce_scatter: every rank holds [0, 1, ..., 2n - 1] * (r + 1); chunk k summed over ranks.
  torch::Tensor in = torch::arange(2 * n, torch::kDouble) * (r + 1), out = torch::empty({2}, torch::kDouble);
  comm->reduce_scatter(in, out);
  const double ranks_sum = n * (n + 1) / 2.0;
  EXPECT_EQ(out[0].item<double>(), (2 * r) * ranks_sum);
  EXPECT_EQ(out[1].item<double>(), (2 * r + 1) * ranks_sum);
  // all_reduce and broadcast.
  torch::Tensor t = torch::full({5}, static_cast<int64_t>(r + 1), torch::kLong);
  comm->all_reduce(t);
  EXPECT_EQ(t[4].item<int64_t>(), n * (n + 1) / 2);
  torch::Tensor b = torch::full({2}, static_cast<float>(r));
  comm->broadcast(b, n - 1);
  EXPECT_EQ(b[1].item<float>(), static_cast<float>(n - 1));
  // gather to the last rank, scatter back from it.
  const int root = n - 1;
  torch::Tensor g = torch::empty({2 * n});
  comm->gather(torch::tensor({1.0f * r, -1.0f * r}), g, root);
  if (r == root) {
    for (int k = 0; k < n; ++k) EXPECT_EQ(g[2 * k + 1].item<float>(), -1.0f * k);
  }
  torch::Tensor s = torch::empty({2});
  comm->scatter(r == root ? g * 2 : torch::Tensor(), s, root);
  EXPECT_EQ(s[0].item<float>(), 2.0f * r);
  comm->barrier();
}

TEST(Collectives, BadSizesNameTheRankAndTheOperation) {
  auto comm = make_mpi_comm();
  torch::Tensor in = torch::ones({3}), out = torch::empty({3 * comm->size() + 1});
  try {
    comm->all_gather(in, out);
    FAIL();
  } catch (const coil::Error& e) {
    EXPECT_NE(std::string(e.what()).find("all_gather: output holds"), std::string::npos) << e.what();
  }
  torch::Tensor strided = torch::ones({4, 2}).t();
  try {
    comm->all_reduce(strided);
    FAIL();
  } catch (const coil::Error& e) {
    EXPECT_NE(std::string(e.what()).find(fmt::format("rank {}: all_reduce: the MPI backend takes contiguous CPU tensors",
                                                     comm->rank())),
              std::string::npos)
        << e.what();
  }
  // Without CUDA here, the NCCL backend says so instead of failing later.
  if (!torch::cuda::is_available()) {
    EXPECT_THROW(make_nccl_comm(), coil::Error);
  }
}
