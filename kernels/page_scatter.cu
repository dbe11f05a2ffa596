// Bulk-load scatter: kv_cache[slots[i]] = staging[i] for whole pages.
//
// Semantics: kernels/reference.py::page_scatter_ref (same dtype on both sides). Shapes:
//   staging  [n, 2, P, D]   the pages gathered contiguously, already on the device
//   kv_cache [S, 2, P, D]   page slots
//   slots    [n]            int32, distinct destination slots; a slot outside [0, S) is skipped
//
// A page is `units` copy units of type U (16, 8, 4 or 2 bytes: the widest that divides the
// page size and the alignment of both buffers; 16 bytes for every real layout). Grid
// (n, chunks): block (i, c) copies chunk c of page i, each thread 4 units per step with the
// loads issued before the stores.
#include "common.cuh"

namespace icecache {

template <typename U>
__device__ __forceinline__ void scatter_pages(const U* __restrict__ staging, U* __restrict__ kv,
                                              const int* __restrict__ slots, long long units,
                                              int num_slots) {
  constexpr int kUnroll = 4;
  const int slot = slots[blockIdx.x];
  if (slot < 0 || slot >= num_slots) return;
  const U* src = staging + static_cast<long long>(blockIdx.x) * units;
  U* dst = kv + static_cast<long long>(slot) * units;
  const long long chunk = (units + gridDim.y - 1) / gridDim.y;
  const long long begin = chunk * blockIdx.y;
  const long long end = begin + chunk < units ? begin + chunk : units;
  const long long step = static_cast<long long>(blockDim.x) * kUnroll;
  for (long long base = begin + threadIdx.x; base < end; base += step) {
    U buf[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const long long j = base + static_cast<long long>(k) * blockDim.x;
      if (j < end) buf[k] = src[j];
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const long long j = base + static_cast<long long>(k) * blockDim.x;
      if (j < end) dst[j] = buf[k];
    }
  }
}

}  // namespace icecache

// ---- entry points: icecache_page_scatter_u<bytes> -----------------------------------------

#define ICECACHE_SCATTER_KERNEL(NAME, U)                                                   \
  extern "C" __global__ void __launch_bounds__(1024)                                     \
      NAME(const U* staging, U* kv, const int* slots, long long units, int num_slots) {   \
    icecache::scatter_pages<U>(staging, kv, slots, units, num_slots);                     \
  }

ICECACHE_SCATTER_KERNEL(icecache_page_scatter_u16, uint4)
ICECACHE_SCATTER_KERNEL(icecache_page_scatter_u8, uint2)
ICECACHE_SCATTER_KERNEL(icecache_page_scatter_u4, unsigned int)
ICECACHE_SCATTER_KERNEL(icecache_page_scatter_u2, unsigned short)
