// Bytes held through LibTorch's CPU allocator, counted: CpuMemory::install() puts a counting
// allocator in front of the default one (c10::SetCPUAllocator), for the rest of the process;
// memory allocated before it is not seen. For measurements (activation memory per mode) in tests
// and benchmarks; header-only, for targets that link LibTorch.
#pragma once

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace coil {

class CpuMemory final : public c10::Allocator {
 public:
  static CpuMemory& install() {
    static CpuMemory* counter = [] {
      auto* c = new CpuMemory(c10::GetCPUAllocator());  // never deleted: live allocations point at it
      c10::SetCPUAllocator(c, /*priority=*/100);
      return c;
    }();
    return *counter;
  }
  int64_t bytes() const { return bytes_.load(); }
  int64_t peak() const { return peak_.load(); }
  void reset_peak() { peak_ = bytes_.load(); }

  // A header in front of each block holds its size; the data pointer is its own context (as the
  // default allocator's), so raw_allocate / raw_deallocate work through this allocator too.
  c10::DataPtr allocate(size_t n) override {
    void* base = the()->inner_->raw_allocate(n + kHeader);
    *static_cast<size_t*>(base) = n;
    void* data = static_cast<char*>(base) + kHeader;
    const int64_t now = bytes_ += static_cast<int64_t>(n);
    int64_t p = peak_.load();
    while (now > p && !peak_.compare_exchange_weak(p, now)) {
    }
    return {data, data, &release, c10::Device(c10::kCPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

 private:
  static constexpr size_t kHeader = 64;  // keeps the default 64-byte alignment
  static CpuMemory*& the() {
    static CpuMemory* instance = nullptr;
    return instance;
  }
  static void release(void* data) {
    if (!data) return;
    void* base = static_cast<char*>(data) - kHeader;
    the()->bytes_ -= static_cast<int64_t>(*static_cast<size_t*>(base));
    the()->inner_->raw_deallocate(base);
  }
  explicit CpuMemory(c10::Allocator* inner) : inner_(inner) { the() = this; }
  c10::Allocator* inner_;
  std::atomic<int64_t> bytes_{0}, peak_{0};
};

}  // namespace coil
