#include <ATen/ATen.h>
#include <mpi.h>

#include <cstring>

#include "dist/comm.h"
#include "dist/world.h"
#include "util/error.h"

namespace coil::dist {
namespace {

// bfloat16 travels as 16-bit words; its sum is a user-defined operation (bf16_sum below).
MPI_Datatype mpi_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return MPI_UINT16_T;
    case at::kFloat: return MPI_FLOAT;
    case at::kDouble: return MPI_DOUBLE;
    case at::kLong: return MPI_INT64_T;
    case at::kInt: return MPI_INT32_T;
    case at::kByte: return MPI_UINT8_T;
    default: fail("MPI collectives: unsupported dtype {}", t.dtype().name());
  }
}

// Sum of bfloat16 words: each pair added in float32, rounded to nearest even (as NCCL's bf16 sum
// and at::BFloat16's arithmetic do).
void bf16_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  const auto* a = static_cast<const c10::BFloat16*>(in);
  auto* b = static_cast<c10::BFloat16*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = c10::BFloat16(static_cast<float>(a[i]) + static_cast<float>(b[i]));
}

class MpiComm : public Comm {
 public:
  explicit MpiComm(int color) {
    world();  // MPI initialized
    if (color < 0) MPI_Comm_dup(MPI_COMM_WORLD, &comm_);
    else MPI_Comm_split(MPI_COMM_WORLD, color, world().rank, &comm_);
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    MPI_Op_create(&bf16_sum, /*commute=*/1, &bf16_sum_);
  }
  ~MpiComm() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Op_free(&bf16_sum_), MPI_Comm_free(&comm_);
  }

  void all_gather(const at::Tensor& in, at::Tensor& out) override {
    check_cpu(in, "all_gather"), check_cpu(out, "all_gather");
    COIL_CHECK(out.numel() == in.numel() * size_, "all_gather: output holds {} elements, needs {}", out.numel(),
               in.numel() * size_);
    COIL_CHECK(out.scalar_type() == in.scalar_type(), "all_gather: output dtype {} differs from input dtype {}",
               out.dtype().name(), in.dtype().name());
    // A copy: any dtype goes as its bytes.
    const int bytes = count(in.numel() * static_cast<int64_t>(in.element_size()));
    call(MPI_Allgather(in.data_ptr(), bytes, MPI_BYTE, out.data_ptr(), bytes, MPI_BYTE, comm_), "all_gather");
  }
  void reduce_scatter(const at::Tensor& in, at::Tensor& out) override {
    check_cpu(in, "reduce_scatter"), check_cpu(out, "reduce_scatter");
    COIL_CHECK(in.numel() == out.numel() * size_, "reduce_scatter: input holds {} elements, needs {}", in.numel(),
               out.numel() * size_);
    call(MPI_Reduce_scatter_block(in.data_ptr(), out.data_ptr(), count(out), mpi_type(in), sum(in), comm_),
         "reduce_scatter");
  }
  void all_reduce(at::Tensor& t) override {
    check_cpu(t, "all_reduce");
    call(MPI_Allreduce(MPI_IN_PLACE, t.data_ptr(), count(t), mpi_type(t), sum(t), comm_), "all_reduce");
  }
  void broadcast(at::Tensor& t, int root) override {
    check_cpu(t, "broadcast");
    call(MPI_Bcast(t.data_ptr(), count(t), mpi_type(t), root, comm_), "broadcast");
  }
  void gather(const at::Tensor& in, at::Tensor& out, int root) override {
    check_cpu(in, "gather");
    if (rank_ == root) {
      check_cpu(out, "gather");
      COIL_CHECK(out.numel() == in.numel() * size_, "gather: output holds {} elements, needs {}", out.numel(),
                 in.numel() * size_);
    }
    call(MPI_Gather(in.data_ptr(), count(in), mpi_type(in), rank_ == root ? out.data_ptr() : nullptr, count(in),
                    mpi_type(in), root, comm_),
         "gather");
  }
  void scatter(const at::Tensor& in, at::Tensor& out, int root) override {
    check_cpu(out, "scatter");
    if (rank_ == root) {
      check_cpu(in, "scatter");
      COIL_CHECK(in.numel() == out.numel() * size_, "scatter: input holds {} elements, needs {}", in.numel(),
                 out.numel() * size_);
    }
    call(MPI_Scatter(rank_ == root ? in.data_ptr() : nullptr, count(out), mpi_type(out), out.data_ptr(), count(out),
                     mpi_type(out), root, comm_),
         "scatter");
  }
  void barrier() override { call(MPI_Barrier(comm_), "barrier"); }

 private:
  static int count(const at::Tensor& t) { return count(t.numel()); }
  static int count(int64_t n) {
    COIL_CHECK(n <= INT32_MAX, "MPI collectives: {} elements is more than one call takes", n);
    return static_cast<int>(n);
  }
  MPI_Op sum(const at::Tensor& t) const { return t.scalar_type() == at::kBFloat16 ? bf16_sum_ : MPI_SUM; }
  void check_cpu(const at::Tensor& t, const char* op) const {
    COIL_CHECK(t.device().is_cpu() && t.is_contiguous(), "rank {}: {}: the MPI backend takes contiguous CPU tensors",
               rank_, op);
  }
  void call(int rc, const char* op) const {
    if (rc == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    fail("rank {}: MPI {} failed: {}", rank_, op, std::string(msg, static_cast<size_t>(len)));
  }
  MPI_Comm comm_;
  MPI_Op bf16_sum_;
};

}  // namespace

std::unique_ptr<Comm> make_mpi_comm(int color) { return std::make_unique<MpiComm>(color); }

std::unique_ptr<Comm> make_comm(bool cuda) { return cuda ? make_nccl_comm() : make_mpi_comm(); }

namespace {
struct Done : Work {
  void wait() override {}
};
}  // namespace

std::unique_ptr<Work> Comm::all_gather_async(const at::Tensor& in, at::Tensor& out) {
  all_gather(in, out);
  return std::make_unique<Done>();
}
std::unique_ptr<Work> Comm::reduce_scatter_async(const at::Tensor& in, at::Tensor& out) {
  reduce_scatter(in, out);
  return std::make_unique<Done>();
}

}  // namespace coil::dist

namespace coil::dist {

std::vector<std::string> all_gather_strings(Comm* comm, const std::string& text) {
  if (!comm || comm->size() == 1) return {text};
  const int world = comm->size();
  at::Tensor len = at::tensor({static_cast<int64_t>(text.size())}, at::kLong), lens = at::empty({world}, at::kLong);
  comm->all_gather(len, lens);
  const int64_t longest = std::max<int64_t>(1, lens.max().item<int64_t>());
  at::Tensor mine = at::zeros({longest}, at::kByte), all = at::empty({world * longest}, at::kByte);
  std::memcpy(mine.data_ptr(), text.data(), text.size());
  comm->all_gather(mine, all);
  std::vector<std::string> out;
  for (int r = 0; r < world; ++r)
    out.emplace_back(static_cast<const char*>(all.data_ptr()) + r * longest, static_cast<size_t>(lens[r].item<int64_t>()));
  return out;
}

}  // namespace coil::dist
