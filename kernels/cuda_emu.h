// CPU emulation of the CUDA execution model, enough to run the IceCache kernels under g++.
//
// Include this header, then the .cu files, in one C++20 translation unit (kernels/emulator.py
// generates it). Model:
//   * a launch creates blockDim OS threads (std::thread); they run the grid's blocks one
//     after another, so `__shared__` (a function-level `static`) and the dynamic shared
//     buffer belong to the running block;
//   * threadIdx / blockIdx / blockDim / gridDim are thread_local;
//   * __syncthreads is a futex barrier over the block, __syncwarp a barrier over the 32
//     threads of a warp, and the __shfl_*_sync functions exchange values through a per-warp
//     double buffer and that barrier (full masks only);
//   * dynamic shared memory is filled with 0xff (a float NaN) before every block, so a read
//     of shared memory that the block did not write shows up in the results;
//   * a barrier that waits longer than ICECACHE_EMU_BARRIER_TIMEOUT_S (a deadlock: some
//     thread skipped a __syncthreads) prints a message and aborts instead of hanging.
// Device code must not use inline PTX outside `#if defined(__CUDA_ARCH__)`.
#pragma once

#define ICECACHE_CUDA_EMU 1

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#define IC_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::cuda_emu::dynamic_smem())

#ifndef ICECACHE_EMU_BARRIER_TIMEOUT_S
#define ICECACHE_EMU_BARRIER_TIMEOUT_S 120
#endif

// ---- built-in types and intrinsics ---------------------------------------------------------

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
// exp2f, log2f, fmaxf, ... come from <cmath> (the global C functions).

namespace cuda_emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// Reusable barrier for `count` threads: sleeps on a futex, aborts on a deadlock.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}

  void wait() {
    const int gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_acq_rel);
      syscall(SYS_futex, reinterpret_cast<int*>(&generation_), FUTEX_WAKE_PRIVATE, INT32_MAX,
              nullptr, nullptr, 0);
      return;
    }
    const std::time_t deadline = std::time(nullptr) + ICECACHE_EMU_BARRIER_TIMEOUT_S;
    while (generation_.load(std::memory_order_acquire) == gen) {
      struct timespec timeout = {1, 0};
      syscall(SYS_futex, reinterpret_cast<int*>(&generation_), FUTEX_WAIT_PRIVATE, gen,
              &timeout, nullptr, 0);
      if (std::time(nullptr) > deadline && generation_.load() == gen) {
        fail("barrier timeout: not every thread reached __syncthreads/__syncwarp (deadlock)");
      }
    }
  }

 private:
  static_assert(sizeof(std::atomic<int>) == sizeof(int), "futex needs a plain int");
  const int count_;
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
};

// What the threads of the running block share.
struct BlockContext {
  BlockContext(int threads, std::size_t smem_bytes)
      : block(threads), smem((smem_bytes + 15) / 16 + 1) {
    const int warps = (threads + warpSize - 1) / warpSize;
    for (int w = 0; w < warps; ++w) {
      const int lanes = threads - w * warpSize < warpSize ? threads - w * warpSize : warpSize;
      warp_barriers.emplace_back(new Barrier(lanes));
    }
    exchange.resize(static_cast<std::size_t>(warps) * 2 * warpSize);
  }
  void poison_smem() { std::memset(smem.data(), 0xff, smem.size() * sizeof(uint4)); }

  Barrier block;
  std::vector<std::unique_ptr<Barrier>> warp_barriers;
  std::vector<std::uint64_t> exchange;  // [warps][2][32] shuffle double buffer
  std::vector<uint4> smem;              // dynamic shared memory, 16-byte aligned
};

inline thread_local BlockContext* tl_block = nullptr;
inline thread_local int tl_linear_tid = 0;
inline thread_local int tl_shuffle_parity = 0;

inline void* dynamic_smem() { return tl_block->smem.data(); }
inline int lane_id() { return tl_linear_tid % warpSize; }
inline int warp_id() { return tl_linear_tid / warpSize; }

inline void check_full_mask(unsigned int mask) {
  if (mask != 0xffffffffu) fail("only full-warp masks (0xffffffff) are emulated");
}

// Every lane publishes `value`; returns the value of lane `src` of the same warp.
template <typename T>
inline T exchange(T value, int src) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t) && std::is_trivially_copyable_v<T>);
  const int warp = warp_id();
  std::uint64_t* slots =
      tl_block->exchange.data() + (static_cast<std::size_t>(warp) * 2 + tl_shuffle_parity) * warpSize;
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  slots[lane_id()] = bits;
  tl_block->warp_barriers[warp]->wait();
  T result;
  std::memcpy(&result, &slots[src], sizeof(T));
  tl_shuffle_parity ^= 1;  // the next exchange writes the other buffer: no second barrier
  return result;
}

}  // namespace cuda_emu

inline void __syncthreads() { cuda_emu::tl_block->block.wait(); }
inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  cuda_emu::check_full_mask(mask);
  cuda_emu::tl_block->warp_barriers[cuda_emu::warp_id()]->wait();
}

template <typename T>
inline T __shfl_sync(unsigned int mask, T var, int src_lane, int width = warpSize) {
  cuda_emu::check_full_mask(mask);
  const int lane = cuda_emu::lane_id();
  return cuda_emu::exchange(var, (lane / width) * width + (src_lane % width));
}
template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = warpSize) {
  cuda_emu::check_full_mask(mask);
  const int lane = cuda_emu::lane_id();
  int src = lane ^ lane_mask;
  if (src >= (lane / width + 1) * width) src = lane;
  return cuda_emu::exchange(var, src);
}
template <typename T>
inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
  cuda_emu::check_full_mask(mask);
  const int lane = cuda_emu::lane_id();
  const int src = (lane % width) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta)
                                                                   : lane;
  return cuda_emu::exchange(var, src);
}
template <typename T>
inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
  cuda_emu::check_full_mask(mask);
  const int lane = cuda_emu::lane_id();
  const int src = (lane % width) >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return cuda_emu::exchange(var, src);
}

namespace cuda_emu {

constexpr std::size_t kMaxSharedBytes = 48 * 1024;  // the default per-block limit on a GPU

// Runs `body` (the kernel call) over `grid` x `block`; returns 0, or an error message.
template <typename Body>
const char* launch(dim3 grid, dim3 block, std::size_t smem_bytes, Body body) {
  const long threads = static_cast<long>(block.x) * block.y * block.z;
  if (threads < 1 || threads > 1024) return "block must have 1..1024 threads";
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535) {
    return "invalid grid";
  }
  if (smem_bytes > kMaxSharedBytes) return "dynamic shared memory above 48 KiB";
  BlockContext ctx(static_cast<int>(threads), smem_bytes);
  auto worker = [&](int tid) {
    tl_block = &ctx;
    tl_linear_tid = tid;
    tl_shuffle_parity = 0;
    blockDim = block;
    gridDim = grid;
    threadIdx = dim3(tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y));
    for (unsigned int z = 0; z < grid.z; ++z) {
      for (unsigned int y = 0; y < grid.y; ++y) {
        for (unsigned int x = 0; x < grid.x; ++x) {
          if (tid == 0) ctx.poison_smem();
          ctx.block.wait();  // smem poisoned before any thread of this block starts
          blockIdx = dim3(x, y, z);
          body();
          ctx.block.wait();  // the block is done before the next one reuses shared memory
        }
      }
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<std::size_t>(threads));
  for (int tid = 0; tid < threads; ++tid) pool.emplace_back(worker, tid);
  for (auto& t : pool) t.join();
  return nullptr;
}

// ---- kernel table: name -> (signature, launcher over a void** argument array) ----------------

template <typename T>
struct ArgCode;
template <typename T>
struct ArgCode<T*> {
  static constexpr char value = 'p';
};
template <>
struct ArgCode<int> {
  static constexpr char value = 'i';
};
template <>
struct ArgCode<long long> {
  static constexpr char value = 'q';
};
template <>
struct ArgCode<float> {
  static constexpr char value = 'f';
};

using Launcher = const char* (*)(dim3, dim3, std::size_t, void**);

struct KernelEntry {
  const char* name;
  std::string signature;  // one ArgCode per parameter, e.g. "pppif"
  Launcher launcher;
};

template <auto Kernel, typename... A, std::size_t... I>
const char* launch_unpacked(dim3 grid, dim3 block, std::size_t smem, void** args,
                            std::index_sequence<I...>) {
  return launch(grid, block, smem, [args] { Kernel(*static_cast<A*>(args[I])...); });
}

template <auto Kernel, typename... A>
KernelEntry make_entry_impl(const char* name, void (*)(A...)) {
  Launcher launcher = [](dim3 grid, dim3 block, std::size_t smem, void** args) {
    return launch_unpacked<Kernel, A...>(grid, block, smem, args, std::index_sequence_for<A...>{});
  };
  return KernelEntry{name, std::string{ArgCode<A>::value...}, launcher};
}

template <auto Kernel>
KernelEntry make_entry(const char* name) {
  return make_entry_impl<Kernel>(name, Kernel);
}

}  // namespace cuda_emu
