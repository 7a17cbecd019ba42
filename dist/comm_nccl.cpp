// The NCCL backend: collectives on CUDA tensors. The NCCL unique id is made on rank 0 and
// broadcast over MPI; collectives run on a stream of their own, ordered after the work already
// queued on LibTorch's current stream (an event recorded there, waited for on the NCCL stream).
// The blocking calls make LibTorch's stream wait for the collective at once; the *_async ones
// return a Work whose wait() does that later, so that compute queued in between overlaps.
//
// Memory safety of the asynchronous calls: the tensors were allocated on LibTorch's stream, and
// the caching allocator may hand their blocks out again once they are freed there. Two guards:
// (1) the Work holds both tensors until wait(), after which LibTorch's stream is ordered after
// the collective, so a later free on that stream cannot overtake it; (2) recordStream() marks the
// blocks as used by the NCCL stream, so the allocator does not reuse them before the work queued
// there when they were freed has finished (this covers a Work dropped by an exception).
#include "dist/comm.h"
#include "util/error.h"

#ifdef COIL_HAVE_NCCL
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <optional>

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
    // A high-priority stream from LibTorch's pool (non-blocking), so recordStream() knows it.
    nccl_stream_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, static_cast<c10::DeviceIndex>(device_));
    stream_ = nccl_stream_->stream();
  }
  ~NcclComm() override { ncclCommDestroy(comm_); }

  bool asynchronous() const override { return true; }
  std::unique_ptr<Work> all_gather_async(const at::Tensor& in, at::Tensor& out) override {
    return queue("all_gather", in, out, [&] {
      return ncclAllGather(in.data_ptr(), out.data_ptr(), in.numel(), nccl_type(in), comm_, stream_);
    });
  }
  std::unique_ptr<Work> reduce_scatter_async(const at::Tensor& in, at::Tensor& out) override {
    return queue("reduce_scatter", in, out, [&] {
      return ncclReduceScatter(in.data_ptr(), out.data_ptr(), out.numel(), nccl_type(in), ncclSum, comm_, stream_);
    });
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
  // The collective in flight: its completion event on the NCCL stream, and its tensors.
  struct NcclWork : Work {
    const NcclComm* owner;
    const char* op;
    cudaEvent_t done = nullptr;
    at::Tensor in, out;
    NcclWork(const NcclComm* o, const char* name, at::Tensor a, at::Tensor b)
        : owner(o), op(name), in(std::move(a)), out(std::move(b)) {}
    void wait() override {
      if (!done) return;
      cudaStream_t torch_stream = c10::cuda::getCurrentCUDAStream(owner->device_).stream();
      owner->cuda(cudaStreamWaitEvent(torch_stream, done, 0), op);
      cudaEventDestroy(done);
      done = nullptr;
      in.reset();
      out.reset();
    }
    ~NcclWork() override {
      try {
        wait();
      } catch (...) {
      }
    }
  };

  template <typename F>
  std::unique_ptr<Work> queue(const char* op, const at::Tensor& in, const at::Tensor& out, F&& f) {
    for (const at::Tensor* t : {&in, &out})
      COIL_CHECK(t->is_cuda() && t->is_contiguous(), "rank {}: {}: the NCCL backend takes contiguous CUDA tensors",
                 rank_, op);
    cudaStream_t torch_stream = c10::cuda::getCurrentCUDAStream(device_).stream();
    cudaEvent_t before = nullptr;
    auto work = std::make_unique<NcclWork>(this, op, in, out);
    cuda(cudaEventCreateWithFlags(&before, cudaEventDisableTiming), op);
    cuda(cudaEventRecord(before, torch_stream), op);
    cuda(cudaStreamWaitEvent(stream_, before, 0), op);
    cudaEventDestroy(before);  // released once the record completes; the wait above stays valid
    nccl(f(), op);
    c10::cuda::CUDACachingAllocator::recordStream(in.storage().data_ptr(), *nccl_stream_);
    c10::cuda::CUDACachingAllocator::recordStream(out.storage().data_ptr(), *nccl_stream_);
    cuda(cudaEventCreateWithFlags(&work->done, cudaEventDisableTiming), op);
    cuda(cudaEventRecord(work->done, stream_), op);
    return work;
  }
  // The blocking form: queued, and LibTorch's stream waits for it at once.
  template <typename F>
  void run(const char* op, const at::Tensor& t, F&& f) {
    queue(op, t, t, std::forward<F>(f))->wait();
  }
  void nccl(ncclResult_t rc, const char* op) const {
    if (rc != ncclSuccess) fail("rank {}: NCCL {} failed: {}", rank_, op, ncclGetErrorString(rc));
  }
  void cuda(cudaError_t rc, const char* op) const {
    if (rc != cudaSuccess) fail("rank {}: CUDA error in {}: {}", rank_, op, cudaGetErrorString(rc));
  }
  ncclComm_t comm_ = nullptr;
  std::optional<c10::cuda::CUDAStream> nccl_stream_;
  cudaStream_t stream_ = nullptr;
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
