// Muon (Keller Jordan; Moonlight's scaling): momentum SGD whose update matrix is orthogonalized by
// a Newton-Schulz iteration before it is applied. For a 2-D weight W with gradient G:
//   m = beta m + (1 - beta) G                       momentum (beta 0.95)
//   U = (1 - beta) G + beta m                       Nesterov (or U = m without it)
//   O = NewtonSchulz5(U)                            ~ U's polar factor: U = P S Q^T -> ~ P Q^T
//   W = W (1 - lr wd) - lr s O                      decoupled weight decay, scale s:
//     keller:    s = sqrt(max(1, rows / cols)), with Muon's own lr (about 0.02)
//     moonlight: s = 0.2 sqrt(max(rows, cols)), with AdamW's lr (the update's RMS matches AdamW's)
//
// Newton-Schulz, 5 quintic steps, (a, b, c) = (3.4445, -4.7750, 2.0315): X = U / (||U||_F + 1e-7),
// on the wide orientation (transposed when rows > cols), then X <- a X + (b A + c A A) X with
// A = X X^T. The coefficients trade exactness for speed: the singular values land in about
// [0.5, 1.5] rather than on 1, which trains as well. float32 on CPU, bfloat16 on GPU.
//
// One step in a handful of kernels: the momentum and the Nesterov update are _foreach_ ops over all
// the matrices (bit for bit the per-tensor ops on CPU), Newton-Schulz runs once per distinct shape
// on the stack [k, rows, cols] of that shape's matrices (newton_schulz_batched: bmm/baddbmm, the
// same iteration matrix by matrix, equal to it within float32 rounding: the BLAS's batched GEMM
// may round otherwise than its GEMM), and the decay and the update are _foreach_ ops, one per scale.
// Muon::set_reference(true) runs the plain per-matrix loop instead (the tests' and benchmark's
// reference).
//
// Momentum lives on whatever tensor the optimizer is given (a whole matrix, or a rank's rows of it
// under sharding); the orthogonalization needs the whole matrix, so it is a pluggable step: by
// default newton_schulz() on the tensor itself; the sharding layer plugs in "gather the matrix,
// orthogonalize it once on its owner rank, hand back the local rows".
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/mamba.h"  // NamedTensor

namespace coil::optim {

struct MuonConfig {
  double momentum = 0.95;
  bool nesterov = true;
  int ns_steps = 5;
  double weight_decay = 0.1;
  std::string scale = "keller";  // or "moonlight"
};

// The approximate orthogonalization of a 2-D matrix (any orientation).
at::Tensor newton_schulz(const at::Tensor& update, int steps = 5);

// The same iteration on a stack of matrices of one shape [k, rows, cols], each on its own (batched
// products); returns the stack orthogonalized, contiguous, in the input's dtype.
at::Tensor newton_schulz_batched(const at::Tensor& stack, int steps = 5);

// Orthogonalizes every matrix of `updates` (any shapes, each once): one batched iteration per
// (shape, dtype, device) and per max_batch_numel elements of stack (2^28, 1 GiB of float32: 130m's
// 24 in_proj matrices are one batch, 1.4b's 48 are three), newton_schulz() for a shape met once.
// Results in the input order.
std::vector<at::Tensor> newton_schulz_many(const std::vector<at::Tensor>& updates, int steps = 5,
                                           int64_t max_batch_numel = int64_t{1} << 28);

// From now on calls fn(matrix) once per matrix orthogonalized, batched or not (tests check who
// orthogonalizes what); an empty fn stops it.
void observe_newton_schulz(std::function<void(const at::Tensor&)> fn);

// The scale of an update of a rows x cols matrix under the rule ("keller" or "moonlight").
double muon_scale(const std::string& rule, int64_t rows, int64_t cols);

class Muon {
 public:
  explicit Muon(const MuonConfig& config);
  // Registers a 2-D parameter (or a shard of rows of one) of the given whole-matrix shape.
  void add(const std::string& name, const at::Tensor& param, bool decay, int64_t rows = -1, int64_t cols = -1);
  // Replaces newton_schulz() on the local tensors; called once per step with the slots (indices in
  // add() order) that have a gradient and their local momentum updates (read only: without Nesterov
  // they are the momentum buffers themselves); returns the local parts of the orthogonalized whole
  // matrices, in the same order.
  using Orthogonalize =
      std::function<std::vector<at::Tensor>(const std::vector<size_t>& slots, const std::vector<at::Tensor>& updates)>;
  void set_orthogonalize(Orthogonalize fn) { orthogonalize_ = std::move(fn); }
  // One step; lr is Muon's own (keller) or AdamW's (moonlight), as the caller's schedule says.
  void step(double lr);
  int64_t steps() const { return step_; }
  // true: the per-matrix loop (today's reference) instead of foreach ops and batched Newton-Schulz.
  void set_reference(bool on) { reference_ = on; }

  std::vector<NamedTensor> state() const;  // "<name>.momentum"
  void load_state(const std::vector<NamedTensor>& tensors, int64_t steps);

 private:
  struct Slot {
    std::string name;
    at::Tensor param, momentum;
    bool decay;
    int64_t rows, cols;
  };
  MuonConfig config_;
  std::vector<Slot> slots_;
  Orthogonalize orthogonalize_;
  int64_t step_ = 0;
  bool reference_ = false;
  void step_reference(double lr);
  // The orthogonalized updates: the plugged-in step, or Newton-Schulz here (batched by shape, or
  // matrix by matrix for the reference).
  std::vector<at::Tensor> orthogonalized(const std::vector<size_t>& slots, const std::vector<at::Tensor>& updates,
                                         bool batched) const;
};

}  // namespace coil::optim
