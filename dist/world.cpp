#include "dist/world.h"

#include <fmt/core.h>
#include <mpi.h>
#include <unistd.h>

#include <cstdlib>
#include <thread>

namespace coil::dist {

namespace {

World init() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided);
    std::atexit([] {
      int finalized = 0;
      MPI_Finalized(&finalized);
      if (!finalized) MPI_Finalize();
    });
  }
  World w;
  MPI_Comm_rank(MPI_COMM_WORLD, &w.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &w.size);
  MPI_Comm local;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, w.rank, MPI_INFO_NULL, &local);
  MPI_Comm_rank(local, &w.local_rank);
  MPI_Comm_size(local, &w.local_size);
  MPI_Comm_free(&local);
  // Nodes: the ranks that are local rank 0.
  int leader = w.local_rank == 0 ? 1 : 0;
  MPI_Allreduce(&leader, &w.nodes, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  return w;
}

}  // namespace

bool launched_by_mpi() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"})
    if (const char* v = std::getenv(var); v && *v) return true;
  return false;
}

const World& world() {
  static const World w = init();
  return w;
}

void abort_all(const std::string& message, int code) {
  fmt::print(stderr, "coil: error: rank {}: {}\n", world().rank, message);
  std::fflush(stderr);
  if (world().size > 1) MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);
}

int cores_per_rank() {
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return std::max(1, cores / std::max(1, world().local_size));
}

}  // namespace coil::dist
