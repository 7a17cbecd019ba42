// gtest's main for tests that run under mpirun: every rank runs every test; rank 0 prints, the
// other ranks print only failures. A failure on any rank makes mpirun exit non-zero.
#include <gtest/gtest.h>

#include "dist/world.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  const coil::dist::World& w = coil::dist::world();
  if (!w.root()) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  return RUN_ALL_TESTS();
}
