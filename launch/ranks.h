// Who the ranks of a run are and what they share, checked before step 1: the host and device of
// every rank (gathered once, for the start-up line "2 node(s) x 2 rank(s) per node ..."), and a
// proof that every rank sees the same train.run_dir. A run_dir that one host cannot see (a local
// disk on a cluster, a mount missing on one node) would otherwise show only at the first checkpoint,
// and the run would go on saving nothing. The proof: rank 0 writes a token file holding a random
// value, a barrier, every rank reads it back; the ranks then agree on the outcome (a sum), so that
// every rank exits with the same error and none waits for the others.
#pragma once

#include <string>
#include <vector>

#include "dist/comm.h"

namespace coil {

struct RankInfo {
  std::string host;    // gethostname()
  std::string device;  // "cpu", "cuda:0", ...
};

struct Ranks {
  std::vector<RankInfo> ranks;  // by rank
  int nodes() const;
  // "2 node(s) x 2 rank(s) per node, 1 thread(s) per rank; node1: ranks 0-1 on cpu, cpu; node2: ..."
  std::string describe(int threads_per_rank) const;
};

// Gathers every rank's host and device (comm null: this process alone).
Ranks gather_ranks(dist::Comm* comm, int rank, int world, const std::string& device);

// Every rank sees the file rank 0 wrote in run_dir (created by rank 0 first). Throws on rank 0, on
// every rank alike, "train.run_dir X is not shared: rank R on host H does not see ..." (the first
void check_shared_run_dir(const std::string& run_dir, dist::Comm* comm, int rank, const Ranks& ranks);

}  // namespace coil
