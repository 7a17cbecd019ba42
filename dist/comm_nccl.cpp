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
//
// Failures (see comm.h): wait() and every new collective poll ncclCommGetAsyncError; a poller
// thread does the same every 100 ms, so that an error is caught while the host is blocked
// elsewhere (a .item() on a tensor the collective feeds). One mutex orders the poller's abort
// after any NCCL call of the caller's thread, so the communicator is never freed under a call.
// The poller names the oldest collective not yet finished (completion events, queried in order).
// A call that itself blocks inside NCCL (a lazy connection to a dead peer) holds the mutex: that
// hang is left to the training loop's watchdog.
#include <ATen/ATen.h>

#include <iterator>
#include <string>

#include "dist/comm.h"
#include "util/error.h"

namespace coil::dist::nccl_detail {

std::string unavailable_reason(bool cuda_built, bool nccl_disabled) {
  if (!cuda_built)
    return "the NCCL backend (GPU collectives, for train.device = \"cuda\" on several ranks) is not in this "
           "build: Coil was built without CUDA (a LibTorch without CUDA, or no nvcc at configure time)";
  if (nccl_disabled)
    return "the NCCL backend (GPU collectives, for train.device = \"cuda\" on several ranks) is not in this "
           "build: NCCL was disabled at build time (-DCOIL_NCCL=OFF); configure with -DCOIL_NCCL=ON";
  return "";
}

std::string unavailable_reason() {
#if defined(COIL_HAVE_NCCL)
  return unavailable_reason(true, false);
#elif defined(COIL_NCCL_DISABLED)
  return unavailable_reason(true, true);
#else
  return unavailable_reason(false, false);
#endif
}

std::string error_message(int rank, const char* op, int code, const std::string& detail) {
  // ncclResult_t's values (nccl.h; checked against it below where NCCL is built in).
  static const char* const kNames[] = {"ncclSuccess",        "ncclUnhandledCudaError", "ncclSystemError",
                                       "ncclInternalError",  "ncclInvalidArgument",    "ncclInvalidUsage",
                                       "ncclRemoteError",    "ncclInProgress"};
  static const char* const kCauses[] = {
      "no error",
      "a CUDA call inside NCCL failed",
      "a system call or the network failed (a peer rank may have died)",
      "an internal NCCL error",
      "an invalid argument (a bad pointer, dtype or count)",
      "invalid usage (the ranks called different collectives, sizes or roots)",
      "a peer rank died, or the network between the ranks broke",
      "the operation is still in progress",
  };
  const bool known = code >= 0 && code < static_cast<int>(std::size(kNames));
  std::string text = fmt::format("rank {}: NCCL {} failed: {} ({})", rank, op,
                                 known ? kNames[code] : fmt::format("result {}", code),
                                 known ? kCauses[code] : "an NCCL result this Coil does not know");
  if (!detail.empty()) text += ": " + detail;
  return text;
}

void check_tensors(int rank, int size, at::Device device, const char* op, const at::Tensor& in,
                   const at::Tensor* out, Sizes sizes) {
  const bool same = out == nullptr || out->is_same(in);
  for (int k = 0; k < (same ? 1 : 2); ++k) {
    const at::Tensor& t = k == 0 ? in : *out;
    const char* what = same ? "tensor" : k == 0 ? "input" : "output";
    COIL_CHECK(t.defined(), "rank {}: {}: the {} is undefined", rank, op, what);
    COIL_CHECK(t.device() == device, "rank {}: {}: the {} is on {}, the NCCL backend of this rank takes tensors on {}",
               rank, op, what, t.device().str(), device.str());
    COIL_CHECK(t.is_contiguous(), "rank {}: {}: the {} is not contiguous (the NCCL backend takes contiguous tensors)",
               rank, op, what);
  }
  if (same || sizes == Sizes::kSame) return;
  COIL_CHECK(out->scalar_type() == in.scalar_type(), "rank {}: {}: output dtype {} differs from input dtype {}", rank,
             op, out->dtype().name(), in.dtype().name());
  if (sizes == Sizes::kOutIsSizeTimesIn)
    COIL_CHECK(out->numel() == in.numel() * size, "rank {}: {}: output holds {} elements, needs {} ({} ranks x {})",
               rank, op, out->numel(), in.numel() * size, size, in.numel());
  else
    COIL_CHECK(in.numel() == out->numel() * size, "rank {}: {}: input holds {} elements, needs {} ({} ranks x {})",
               rank, op, in.numel(), out->numel() * size, size, out->numel());
}

}  // namespace coil::dist::nccl_detail

#ifdef COIL_HAVE_NCCL
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <thread>

#include "dist/world.h"

namespace coil::dist {
namespace {

static_assert(ncclUnhandledCudaError == 1 && ncclSystemError == 2 && ncclInternalError == 3 &&
                  ncclInvalidArgument == 4 && ncclInvalidUsage == 5 && ncclRemoteError == 6 && ncclInProgress == 7,
              "nccl_detail::error_message's table follows ncclResult_t");

using nccl_detail::Sizes;

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

// A CUDA event, destroyed with its last holder (the Work and the poller's list share it).
struct Event {
  cudaEvent_t e = nullptr;
  Event() = default;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event() {
    if (e) cudaEventDestroy(e);
  }
};

class NcclComm : public Comm {
 public:
  explicit NcclComm(int color) {
    const World& w = world();
    if (color < 0) MPI_Comm_dup(MPI_COMM_WORLD, &group_.comm);
    else MPI_Comm_split(MPI_COMM_WORLD, color, w.rank, &group_.comm);
    MPI_Comm_rank(group_.comm, &rank_);
    MPI_Comm_size(group_.comm, &size_);
    int devices = 0;
    const cudaError_t rc = cudaGetDeviceCount(&devices);
    COIL_CHECK(rc == cudaSuccess && devices > 0, "rank {}: the NCCL backend needs a GPU and none is visible ({})", rank_,
               rc == cudaSuccess ? "no CUDA device" : cudaGetErrorString(rc));
    device_ = w.local_rank % devices;
    cuda(cudaSetDevice(device_), "cudaSetDevice");
    ncclUniqueId id;
    if (rank_ == 0) nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, group_.comm);
    nccl(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank");
    // A high-priority stream from LibTorch's pool (non-blocking), so recordStream() knows it.
    nccl_stream_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, static_cast<c10::DeviceIndex>(device_));
    stream_ = nccl_stream_->stream();
    poller_ = std::thread([this] { poll(); });
  }
  ~NcclComm() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    poller_.join();
    std::lock_guard<std::mutex> lock(mu_);
    if (!comm_) return;  // aborted already
    // Run by an exception (this rank failed; its peers may be stuck in a collective or gone), or
    // after an NCCL error: abort. Only an orderly end destroys, which waits for the peers.
    if (failed_ || std::uncaught_exceptions() > 0)
      ncclCommAbort(comm_);
    else
      ncclCommDestroy(comm_);
  }

  bool asynchronous() const override { return true; }
  std::unique_ptr<Work> all_gather_async(const at::Tensor& in, at::Tensor& out) override {
    check("all_gather", in, &out, Sizes::kOutIsSizeTimesIn);
    return queue("all_gather", in, out, [&] {
      return ncclAllGather(in.data_ptr(), out.data_ptr(), in.numel(), nccl_type(in), comm_, stream_);
    });
  }
  std::unique_ptr<Work> reduce_scatter_async(const at::Tensor& in, at::Tensor& out) override {
    check("reduce_scatter", in, &out, Sizes::kInIsSizeTimesOut);
    return queue("reduce_scatter", in, out, [&] {
      return ncclReduceScatter(in.data_ptr(), out.data_ptr(), out.numel(), nccl_type(in), ncclSum, comm_, stream_);
    });
  }

  void all_gather(const at::Tensor& in, at::Tensor& out) override { all_gather_async(in, out)->wait(); }
  void reduce_scatter(const at::Tensor& in, at::Tensor& out) override { reduce_scatter_async(in, out)->wait(); }
  void all_reduce(at::Tensor& t) override {
    check("all_reduce", t, nullptr, Sizes::kSame);
    queue("all_reduce", t, t, [&] {
      return ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t), ncclSum, comm_, stream_);
    })->wait();
  }
  void broadcast(at::Tensor& t, int root) override {
    check("broadcast", t, nullptr, Sizes::kSame);
    queue("broadcast", t, t, [&] {
      return ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t), root, comm_, stream_);
    })->wait();
  }
  void gather(const at::Tensor& in, at::Tensor& out, int root) override {
    // Point to point inside a group: every rank sends its `in` to root (out matters on root only).
    const bool is_root = rank_ == root;
    check("gather", in, is_root ? &out : nullptr, Sizes::kOutIsSizeTimesIn);
    queue("gather", in, is_root ? out : in, [&] {
      ncclGroupStart();
      if (is_root)
        for (int r = 0; r < size_; ++r)
          ncclRecv(static_cast<char*>(out.data_ptr()) + r * in.nbytes(), in.numel(), nccl_type(in), r, comm_, stream_);
      ncclSend(in.data_ptr(), in.numel(), nccl_type(in), root, comm_, stream_);
      return ncclGroupEnd();
    })->wait();
  }
  void scatter(const at::Tensor& in, at::Tensor& out, int root) override {
    const bool is_root = rank_ == root;
    if (is_root)
      check("scatter", in, &out, Sizes::kInIsSizeTimesOut);
    else
      check("scatter", out, nullptr, Sizes::kSame);
    queue("scatter", is_root ? in : out, out, [&] {
      ncclGroupStart();
      if (is_root)
        for (int r = 0; r < size_; ++r)
          ncclSend(static_cast<const char*>(in.data_ptr()) + r * out.nbytes(), out.numel(), nccl_type(out), r, comm_,
                   stream_);
      ncclRecv(out.data_ptr(), out.numel(), nccl_type(out), root, comm_, stream_);
      return ncclGroupEnd();
    })->wait();
  }
  void barrier() override { MPI_Barrier(group_.comm); }

 private:
  // The collective in flight: its completion event on the NCCL stream, and its tensors.
  struct NcclWork : Work {
    NcclComm* owner;
    const char* op;
    std::shared_ptr<Event> done;
    at::Tensor in, out;
    NcclWork(NcclComm* o, const char* name, at::Tensor a, at::Tensor b)
        : owner(o), op(name), in(std::move(a)), out(std::move(b)) {}
    void wait() override {
      if (!done) return;
      std::shared_ptr<Event> d = std::move(done);
      struct Release {  // the tensors go after the stream wait, or on a throw
        NcclWork* w;
        ~Release() { w->in.reset(), w->out.reset(); }
      } release{this};
      if (d->e) owner->finish(op, *d);
    }
    ~NcclWork() override {
      try {
        wait();
      } catch (...) {
      }
    }
  };

  void check(const char* op, const at::Tensor& in, const at::Tensor* out, Sizes sizes) const {
    nccl_detail::check_tensors(rank_, size_, at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_)), op, in,
                               out, sizes);
  }

  template <typename F>
  std::unique_ptr<Work> queue(const char* op, const at::Tensor& in, const at::Tensor& out, F&& f) {
    cudaStream_t torch_stream = c10::cuda::getCurrentCUDAStream(device_).stream();
    auto work = std::make_unique<NcclWork>(this, op, in, out);
    work->done = std::make_shared<Event>();
    std::lock_guard<std::mutex> lock(mu_);
    poll_locked(op);
    cudaEvent_t before = nullptr;
    cuda(cudaEventCreateWithFlags(&before, cudaEventDisableTiming), op);
    cuda(cudaEventRecord(before, torch_stream), op);
    cuda(cudaStreamWaitEvent(stream_, before, 0), op);
    cudaEventDestroy(before);  // released once the record completes; the wait above stays valid
    nccl(f(), op);
    c10::cuda::CUDACachingAllocator::recordStream(in.storage().data_ptr(), *nccl_stream_);
    c10::cuda::CUDACachingAllocator::recordStream(out.storage().data_ptr(), *nccl_stream_);
    cuda(cudaEventCreateWithFlags(&work->done->e, cudaEventDisableTiming), op);
    cuda(cudaEventRecord(work->done->e, stream_), op);
    pending_.push_back({op, work->done});
    return work;
  }
  // Work::wait(): an error seen meanwhile is thrown; else LibTorch's stream waits for the event.
  void finish(const char* op, const Event& done) {
    std::lock_guard<std::mutex> lock(mu_);
    poll_locked(op);
    cudaStream_t torch_stream = c10::cuda::getCurrentCUDAStream(device_).stream();
    cuda(cudaStreamWaitEvent(torch_stream, done.e, 0), op);
  }

  // With mu_ held: retires the finished collectives, asks NCCL for an asynchronous error, aborts
  // the communicator on one. Throws the error (the first one seen, also later) when `op` is given.
  void poll_locked(const char* op) {
    if (comm_) {
      while (!pending_.empty() && cudaEventQuery(pending_.front().done->e) == cudaSuccess) pending_.pop_front();
      ncclResult_t async = ncclSuccess;
      const ncclResult_t rc = ncclCommGetAsyncError(comm_, &async);
      if (rc != ncclSuccess) async = rc;
      if (async != ncclSuccess && async != ncclInProgress) {
        const char* failed_op = pending_.empty() ? (op ? op : "a collective") : pending_.front().op;
        error_ = nccl_detail::error_message(rank_, failed_op, async, last_error()) +
                 "; the communicator was aborted";
        failed_ = true;
        ncclCommAbort(comm_);
        comm_ = nullptr;
        pending_.clear();
      }
    }
    if (op && !error_.empty()) fail("{}{}", error_, fmt::format(" (seen in {})", op));
    if (op && !comm_) fail("rank {}: NCCL {}: the communicator was aborted", rank_, op);
  }
  void poll() {
    cudaSetDevice(device_);  // the events live on this rank's device
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      wake_.wait_for(lock, std::chrono::milliseconds(100));
      if (!stop_) poll_locked(nullptr);
    }
  }
  std::string last_error() const {
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 13, 0)
    const char* text = comm_ ? ncclGetLastError(comm_) : nullptr;
    return text ? text : "";
#else
    return "";
#endif
  }
  void nccl(ncclResult_t rc, const char* op) {
    if (rc == ncclSuccess) return;
    failed_ = true;  // the peers may be inside this collective: the destructor aborts
    fail("{}", nccl_detail::error_message(rank_, op, rc, last_error()));
  }
  void cuda(cudaError_t rc, const char* op) const {
    if (rc != cudaSuccess) fail("rank {}: CUDA error in {}: {}", rank_, op, cudaGetErrorString(rc));
  }

  struct Pending {
    const char* op;
    std::shared_ptr<Event> done;
  };
  std::mutex mu_;  // guards everything below against the poller
  std::condition_variable wake_;
  bool stop_ = false, failed_ = false;
  std::string error_;             // the first asynchronous error, thrown by every later call
  std::deque<Pending> pending_;   // queued and not yet seen finished, oldest first
  ncclComm_t comm_ = nullptr;     // null once aborted
  // The same ranks in MPI (the unique id's broadcast, barrier). A member of its own, so that it is
  // freed after the destructor's body has ended the NCCL communicator, and also when the
  // constructor throws (no GPU) after creating it.
  struct MpiGroup {
    MPI_Comm comm = MPI_COMM_NULL;
    ~MpiGroup() {
      int finalized = 0;
      MPI_Finalized(&finalized);
      if (!finalized && comm != MPI_COMM_NULL) MPI_Comm_free(&comm);
    }
  } group_;
  std::optional<c10::cuda::CUDAStream> nccl_stream_;
  cudaStream_t stream_ = nullptr;
  int device_ = 0;
  std::thread poller_;
};

}  // namespace

std::unique_ptr<Comm> make_nccl_comm(int color) { return std::make_unique<NcclComm>(color); }

}  // namespace coil::dist

#else

namespace coil::dist {
std::unique_ptr<Comm> make_nccl_comm(int) { fail("{}", nccl_detail::unavailable_reason()); }
}  // namespace coil::dist

#endif
