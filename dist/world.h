// The process world: who this process is among the ranks of a run. Comes from MPI, whether the
// ranks were started by `mpirun`, by `srun --mpi=pmix`, or the program runs alone (a singleton of
// size 1, no launcher needed).
#pragma once

#include <string>

namespace coil::dist {

struct World {
  int rank = 0, size = 1;              // among all ranks
  int local_rank = 0, local_size = 1;  // among the ranks of this node
  int nodes = 1;
  bool root() const { return rank == 0; }
};

// True when a launcher started this process as a rank of several (mpirun, srun --mpi=pmix): the
// environment says so before MPI is initialized. Single-process commands never touch MPI.
bool launched_by_mpi();

// Initializes MPI once (thread-multiple) and returns the world; MPI is finalized at exit.
const World& world();

// Ends every rank of the run (MPI_Abort) after printing `message` with this rank's number: what a
// rank does when it fails, so that no other rank waits forever for it.
[[noreturn]] void abort_all(const std::string& message, int code = 1);

// Cores this rank may use: the node's cores divided among its ranks (at least 1).
int cores_per_rank();

}  // namespace coil::dist
