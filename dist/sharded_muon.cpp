// Muon's orthogonalization under FSDP-style sharding (declared in dist/fsdp.h): each matrix's
// momentum update is gathered whole on its owner rank, orthogonalized there once, and its rows are
// scattered back. Owners balance the Newton-Schulz work over the ranks; an owner runs its matrices
// of one shape as one batched iteration (optim::newton_schulz_many).
#include <ATen/ATen.h>

#include <algorithm>

#include "dist/fsdp.h"
#include "optim/muon.h"

namespace coil::dist {

// ---- Muon on whole matrices, each on one owner rank ---------------------------------------------

optim::Muon::Orthogonalize sharded_orthogonalize(std::shared_ptr<Comm> comm, std::vector<ShardLayout> layouts,
                                                 int ns_steps) {
  // Owners: the costliest matrices first, each to the least loaded rank (the same on every rank).
  const int ranks = comm->size();
  std::vector<int> owner(layouts.size());
  std::vector<size_t> order(layouts.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  auto cost = [&](size_t i) {
    const double r = static_cast<double>(layouts[i].shape[0]), c = static_cast<double>(layouts[i].row_numel);
    return r * c * std::min(r, c);  // Newton-Schulz: matmuls of min x max by max
  };
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return cost(a) > cost(b); });
  std::vector<double> load(static_cast<size_t>(ranks), 0.0);
  for (size_t i : order) {
    const int r = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    owner[i] = r;
    load[static_cast<size_t>(r)] += cost(i);
  }
  return [comm, layouts, owner, ns_steps](const std::vector<size_t>& slots, const std::vector<at::Tensor>& updates) {
    const int me = comm->rank(), ranks = comm->size();
    // 1. Every matrix's rows go to its owner.
    std::vector<at::Tensor> whole(slots.size());
    for (size_t k = 0; k < slots.size(); ++k) {
      const ShardLayout& l = layouts[slots[k]];
      const int o = owner[slots[k]];
      at::Tensor buf = o == me ? at::empty({ranks * l.local_numel()}, updates[k].options()) : at::Tensor();
      comm->gather(updates[k].contiguous().view({-1}), buf, o);
      whole[k] = buf;
    }
    // 2. Each owner orthogonalizes its matrices, once, whole: one batched iteration per shape.
    std::vector<size_t> mine;
    std::vector<at::Tensor> matrices;
    for (size_t k = 0; k < slots.size(); ++k) {
      if (owner[slots[k]] != me) continue;
      const ShardLayout& l = layouts[slots[k]];
      mine.push_back(k);
      matrices.push_back(l.assemble(whole[k].view({ranks, l.local_numel()})));
    }
    const std::vector<at::Tensor> orthogonalized = optim::newton_schulz_many(matrices, ns_steps);
    for (size_t j = 0; j < mine.size(); ++j) {
      const size_t k = mine[j];
      const ShardLayout& l = layouts[slots[k]];
      const at::Tensor& o = orthogonalized[j];
      at::Tensor padded = at::zeros({ranks * l.rows_per_rank, l.row_numel}, o.options());
      padded.narrow(0, 0, l.shape[0]).copy_(o);
      whole[k] = padded.view({-1});
    }
    // 3. Every rank gets its rows back.
    std::vector<at::Tensor> out;
    for (size_t k = 0; k < slots.size(); ++k) {
      at::Tensor mine = at::empty_like(updates[k]).contiguous();
      comm->scatter(whole[k], mine, owner[slots[k]]);
      out.push_back(mine);
    }
    return out;
  };
}

}  // namespace coil::dist
