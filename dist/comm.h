// The collectives Coil uses, behind one small interface, on flat contiguous tensors of one dtype.
// Two backends: MPI on CPU tensors, NCCL on CUDA tensors (its unique id broadcast over MPI, its own
// stream). An error of either becomes a coil::Error naming the rank and the operation.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

namespace coil::dist {

class Comm {
 public:
  virtual ~Comm() = default;
  int rank() const { return rank_; }
  int size() const { return size_; }

  // out (size x in.numel()) = every rank's `in`, rank after rank.
  virtual void all_gather(const at::Tensor& in, at::Tensor& out) = 0;
  // in holds size equal chunks; out (one chunk) = the sum over ranks of this rank's chunk.
  virtual void reduce_scatter(const at::Tensor& in, at::Tensor& out) = 0;
  virtual void all_reduce(at::Tensor& t) = 0;  // sum, in place
  virtual void broadcast(at::Tensor& t, int root) = 0;
  // root's out (size x in.numel()) = every rank's `in`; out is ignored on other ranks.
  virtual void gather(const at::Tensor& in, at::Tensor& out, int root) = 0;
  // out = chunk `rank` of root's `in` (size equal chunks); in is ignored on other ranks.
  virtual void scatter(const at::Tensor& in, at::Tensor& out, int root) = 0;
  virtual void barrier() = 0;

 protected:
  int rank_ = 0, size_ = 1;
};

// Every rank's `text`, in rank order (collective over CPU tensors; {text} when comm is null).
std::vector<std::string> all_gather_strings(Comm* comm, const std::string& text);

// MPI over MPI_COMM_WORLD (a duplicate of it), for CPU tensors.
std::unique_ptr<Comm> make_mpi_comm();
// NCCL for CUDA tensors of this rank's device; throws coil::Error when Coil was built without CUDA.
std::unique_ptr<Comm> make_nccl_comm();
// The backend for tensors on `device_type` ("cpu" or "cuda").
std::unique_ptr<Comm> make_comm(bool cuda);

}  // namespace coil::dist
