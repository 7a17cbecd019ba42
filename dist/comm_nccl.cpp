// The NCCL backend: collectives on CUDA tensors. The NCCL unique id is made on rank 0 and
// broadcast over MPI; collectives run on a stream of their own, ordered after the work already
// queued on LibTorch's current stream, and LibTorch's stream waits for them in turn.
#include "dist/comm.h"
#include "util/error.h"

#ifdef COIL_HAVE_NCCL
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include "dist/world.h"

namespace coil::dist {
namespace {

ncclDataType_t nccl_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kBFloat16: return ncclBfloat16;
    case at::kHalf: return ncclFloat16;
    case at::kLong: return ncclInt64;
    case at::kInt: return ncclInt32;
    case at::kByte: return ncclUint8;
    default: fail("NCCL collectives: unsupported dtype {}", t.dtype().name());
  }
}

class NcclComm : public Comm {
 public:
  NcclComm() {
    const World& w = world();
    rank_ = w.rank;
    size_ = w.size;
    int devices = 0;
    cuda(cudaGetDeviceCount(&devices), "cudaGetDeviceCount");
    COIL_CHECK(devices > 0, "rank {}: the NCCL backend needs a GPU and none is visible", rank_);
    device_ = w.local_rank % devices;
    cuda(cudaSetDevice(device_), "cudaSetDevice");
    ncclUniqueId id;
    if (rank_ == 0) nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
    nccl(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank");
    cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    cuda(cudaEventCreateWithFlags(&before_, cudaEventDisableTiming), "cudaEventCreate");
    cuda(cudaEventCreateWithFlags(&after_, cudaEventDisableTiming), "cudaEventCreate");
  }
  ~NcclComm() override {
    ncclCommDestroy(comm_);
    cudaStreamDestroy(stream_);
    cudaEventDestroy(before_);
    cudaEventDestroy(after_);
  }

  void all_gather(const at::Tensor& in, at::Tensor& out) override {
    run("all_gather", in, [&] { return ncclAllGather(in.data_ptr(), out.data_ptr(), in.numel(), nccl_type(in), comm_, stream_); });
  }
  void reduce_scatter(const at::Tensor& in, at::Tensor& out) override {
    run("reduce_scatter", in, [&] {
      return ncclReduceScatter(in.data_ptr(), out.data_ptr(), out.numel(), nccl_type(in), ncclSum, comm_, stream_);
    });
  }
  void all_reduce(at::Tensor& t) override {
    run("all_reduce", t, [&] { return ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t), ncclSum, comm_, stream_); });
  }
  void broadcast(at::Tensor& t, int root) override {
    run("broadcast", t, [&] { return ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t), root, comm_, stream_); });
  }
  void gather(const at::Tensor& in, at::Tensor& out, int root) override {
    // Point to point inside a group: every rank sends its `in` to root.
    run("gather", in, [&] {
      ncclGroupStart();
      if (rank_ == root)
        for (int r = 0; r < size_; ++r)
          ncclRecv(static_cast<char*>(out.data_ptr()) + r * in.nbytes(), in.numel(), nccl_type(in), r, comm_, stream_);
      ncclSend(in.data_ptr(), in.numel(), nccl_type(in), root, comm_, stream_);
      return ncclGroupEnd();
    });
  }
  void scatter(const at::Tensor& in, at::Tensor& out, int root) override {
    run("scatter", out, [&] {
      ncclGroupStart();
      if (rank_ == root)
        for (int r = 0; r < size_; ++r)
          ncclSend(static_cast<const char*>(in.data_ptr()) + r * out.nbytes(), out.numel(), nccl_type(out), r, comm_, stream_);
      ncclRecv(out.data_ptr(), out.numel(), nccl_type(out), root, comm_, stream_);
      return ncclGroupEnd();
    });
  }
  void barrier() override { MPI_Barrier(MPI_COMM_WORLD); }

 private:
  template <typename F>
  void run(const char* op, const at::Tensor& t, F&& f) {
    COIL_CHECK(t.is_cuda() && t.is_contiguous(), "rank {}: {}: the NCCL backend takes contiguous CUDA tensors", rank_, op);
    cudaStream_t torch_stream = c10::cuda::getCurrentCUDAStream(device_).stream();
    cuda(cudaEventRecord(before_, torch_stream), op);
    cuda(cudaStreamWaitEvent(stream_, before_, 0), op);
    nccl(f(), op);
    cuda(cudaEventRecord(after_, stream_), op);
    cuda(cudaStreamWaitEvent(torch_stream, after_, 0), op);
  }
  void nccl(ncclResult_t rc, const char* op) const {
    if (rc != ncclSuccess) fail("rank {}: NCCL {} failed: {}", rank_, op, ncclGetErrorString(rc));
  }
  void cuda(cudaError_t rc, const char* op) const {
    if (rc != cudaSuccess) fail("rank {}: CUDA error in {}: {}", rank_, op, cudaGetErrorString(rc));
  }
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t before_ = nullptr, after_ = nullptr;
  int device_ = 0;
};

}  // namespace

std::unique_ptr<Comm> make_nccl_comm() { return std::make_unique<NcclComm>(); }

}  // namespace coil::dist

#else

namespace coil::dist {
std::unique_ptr<Comm> make_nccl_comm() {
  fail("this Coil was built without CUDA and NCCL: GPU collectives are not available");
}
}  // namespace coil::dist

#endif
