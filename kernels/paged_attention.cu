// Paged sparse decode attention (GQA) over a CSR page table, with split-K over pages.
//
// Semantics: kernels/reference.py::paged_decode_attention_ref. Shapes:
//   q        [B, Hq, D]        T = float | f16 | bf16
//   kv_cache [S, 2, P, D]      T; [:, 0] keys, [:, 1] values
//   indptr   [rows + 1]        int32, rows = B * Hkv; row r serves query heads r*G .. r*G+G-1
//   indices  [nnz]             int32, page slots
//   page_lens[nnz]             int32, valid tokens at the start of each page (clamped to P)
//   out      [B, Hq, D]        T (written directly by a row of one split)
//   part_o   [rows, max_splits, G, D] float32, per-split normalised outputs (rows of splits)
//   part_lse [rows, max_splits, G]    float32, per-split log2-sum-exp of the scaled scores
//
// Decode kernel: grid (rows, max_splits), block = W warps; one instance per dtype, head dim
// and group bucket NG (the smallest of 1, 2, 4, 8 that holds the row's G query heads; heads
// G..NG-1 have a zero query and are not written). A row's pages are cut into splits of
// split_pages pages, as many as the row needs (blocks past them return at once), so how a
// row is summed depends on the row alone, not on the other rows of the call: a sequence's
// attention is the same bits in any batch. A block's pages are cut into chunks of
// kChunk tokens (a page holds ceil(P / kChunk) of them), and its warps take the chunks
// round-robin, each keeping its own online softmax (running max m, sum l, accumulator o) in
// the log2 domain (q is pre-scaled by sm_scale * log2(e)).
//
// A warp holds a chunk in registers: lane (token_lane, dim_lane) owns kRows rows (tokens
// token_lane, token_lane + kTokenLanes, ...) and, of each, the 16-byte vectors dim_lane,
// dim_lane + kDimLanes, ... of both the key and the value row. All of a chunk's loads are
// issued before any of them is used, and a warp-wide load covers whole rows (coalesced).
// Per chunk:
//   1. scores: each lane's partial dot products over its dims (q from shared memory),
//      summed across the kDimLanes lanes of a token by xor shuffles;
//   2. the chunk's max per head (across token lanes), the rescale factor, p = exp2(s - m);
//   3. o = o * c + sum over the lane's rows of p * v, l = l * c + sum p (lane-local).
// At the end the token lanes are summed (xor shuffles), the warps' states are merged in
// shared memory, and either the output (a row of one split) or the split's partial
// (normalised o, lse) is written. The merge kernel (grid rows) combines the splits of each
// row that has several, in split order.
//
// Dynamic shared memory (floats), see kernels/decode_plan.py::decode_shared_floats:
//   main loop:  q_s [NG][D+4]
//   after loop: red_o [W][NG][D]                        (aliases q_s)
//   always:     m_s [W][NG] | l_s [W][NG]              (after the larger of the two)
#include "common.cuh"

namespace icecache {

template <typename T, int D, int NG>
struct DecodeLayout {
  static constexpr int kElems = Vec16<T>::kElems;                 // elements per vector
  static constexpr int kVecs = D / kElems;                         // vectors per row
  static constexpr int kDimLanes = kVecs < 32 ? kVecs : 32;        // lanes across a row
  static constexpr int kTokenLanes = 32 / kDimLanes;               // rows per warp load
  static constexpr int kVecsPerLane = kVecs / kDimLanes;           // vectors per lane per row
  static constexpr int kValsPerLane = kVecsPerLane * kElems;       // dims a lane owns
  // Key vectors a lane holds per chunk (as many value vectors again). Measured on an H200
  // (bench/results/gpu.md, section 3b): 8 at NG = 4 takes ~190 registers, one 8-warp block an
  // SM, and runs a batch of 64 ~20% slower than 4 (128 registers, two blocks an SM); the
  // small groups fit two blocks with 8, the largest fits one either way.
#ifdef IC_DECODE_VEC_BUDGET  // a tuning variant (bench/gpu_check.py, section 3b)
  static constexpr int kVecBudget = IC_DECODE_VEC_BUDGET;
#else
  static constexpr int kVecBudget = NG <= 2 ? 8 : 4;
#endif
  static constexpr int kRows = kVecBudget / kVecsPerLane > 0 ? kVecBudget / kVecsPerLane : 1;
  static constexpr int kChunk = kRows * kTokenLanes;               // tokens per chunk
  static constexpr int kQStride = D + 4;                           // padded q row (banks)
  static_assert(D % kElems == 0, "head_dim must be a multiple of the 16-byte vector");
  static_assert(32 % kDimLanes == 0 && kVecs % kDimLanes == 0, "unsupported head_dim");
};

// Splits of a row of `count` pages: one, or as many runs of split_pages as cover them.
__device__ __forceinline__ int row_split_count(int count, int split_pages) {
  return count > split_pages ? (count + split_pages - 1) / split_pages : 1;
}

template <typename T, int D, int NG>
__device__ __forceinline__ void paged_decode(
    const T* __restrict__ q, const T* __restrict__ kv, const int* __restrict__ indptr,
    const int* __restrict__ indices, const int* __restrict__ page_lens, T* __restrict__ out,
    float* __restrict__ part_o, float* __restrict__ part_lse, int group, int page_size,
    int split_pages, int max_splits, float scale_log2) {
  using L = DecodeLayout<T, D, NG>;
  IC_DYNAMIC_SMEM(float, smem);
  const int warps = static_cast<int>(blockDim.x) / 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int row = static_cast<int>(blockIdx.x);
  const int split = static_cast<int>(blockIdx.y);
  const int dim_lane = lane % L::kDimLanes;
  const int token_lane = lane / L::kDimLanes;

  float* q_s = smem;                                        // [NG][kQStride]
  float* red_o = smem;                                      // [W][NG][D] after the loop
  float* m_s = smem + max_int(NG * L::kQStride, warps * NG * D);  // [W][NG]
  float* l_s = m_s + warps * NG;                            // [W][NG]

  // This split's pages [p0, p1): split_pages of the row's, in order; none past its last.
  const int start = indptr[row];
  const int count = indptr[row + 1] - start;
  const int row_splits = row_split_count(count, split_pages);
  if (split >= row_splits) return;  // the whole block, before any barrier
  const int p0 = start + split * split_pages;
  const int p1 = start + min_int(count, (split + 1) * split_pages);

  const T* q_row = q + static_cast<long long>(row) * group * D;
  for (int i = static_cast<int>(threadIdx.x); i < NG * D; i += static_cast<int>(blockDim.x)) {
    const int g = i / D;
    q_s[g * L::kQStride + i % D] = g < group ? to_float(q_row[i]) * scale_log2 : 0.f;
  }
  __syncthreads();

  float m[NG], l[NG], acc[NG][L::kValsPerLane];
#pragma unroll
  for (int g = 0; g < NG; ++g) {
    m[g] = neg_inf();
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < L::kValsPerLane; ++e) acc[g][e] = 0.f;
  }

  const int chunks_per_page = (page_size + L::kChunk - 1) / L::kChunk;
  const int items = (p1 - p0) * chunks_per_page;
  for (int item = warp; item < items; item += warps) {
    const int p = p0 + item / chunks_per_page;
    const int c0 = (item % chunks_per_page) * L::kChunk;
    const int len = min_int(page_lens[p], page_size);  // warp-uniform
    if (c0 >= len) continue;
    const T* k_page = kv + static_cast<long long>(indices[p]) * 2 * page_size * D;
    const T* v_page = k_page + static_cast<long long>(page_size) * D;

    // Every load of the chunk first: keys and values of the lane's rows and dims.
    const uint4 zero = {0u, 0u, 0u, 0u};
    uint4 k_raw[L::kRows][L::kVecsPerLane];
    uint4 v_raw[L::kRows][L::kVecsPerLane];
#pragma unroll
    for (int r = 0; r < L::kRows; ++r) {
      const int t = c0 + r * L::kTokenLanes + token_lane;
#pragma unroll
      for (int k = 0; k < L::kVecsPerLane; ++k) {
        const int offset = t * D + (dim_lane + k * L::kDimLanes) * L::kElems;
        if (t < len) {
          k_raw[r][k] = load_raw16(k_page + offset);
          v_raw[r][k] = load_raw16(v_page + offset);
        } else {  // past the page's valid tokens: never read (the tail may be garbage)
          k_raw[r][k] = zero;
          v_raw[r][k] = zero;
        }
      }
    }

    // 1. scores of the lane's rows for every head, summed across the token's lanes.
    float s[L::kRows][NG];
#pragma unroll
    for (int r = 0; r < L::kRows; ++r) {
#pragma unroll
      for (int g = 0; g < NG; ++g) s[r][g] = 0.f;
    }
#pragma unroll
    for (int k = 0; k < L::kVecsPerLane; ++k) {
      const int d0 = (dim_lane + k * L::kDimLanes) * L::kElems;
#pragma unroll
      for (int g = 0; g < NG; ++g) {
        float qv[L::kElems];
        const float4* q4 = reinterpret_cast<const float4*>(q_s + g * L::kQStride + d0);
#pragma unroll
        for (int j = 0; j < L::kElems / 4; ++j) {
          const float4 x = q4[j];
          qv[4 * j] = x.x;
          qv[4 * j + 1] = x.y;
          qv[4 * j + 2] = x.z;
          qv[4 * j + 3] = x.w;
        }
#pragma unroll
        for (int r = 0; r < L::kRows; ++r) {
          float kf[L::kElems];
          unpack_vec16<T>(k_raw[r][k], kf);
#pragma unroll
          for (int e = 0; e < L::kElems; ++e) s[r][g] += qv[e] * kf[e];
        }
      }
    }
#pragma unroll
    for (int r = 0; r < L::kRows; ++r) {
      const bool valid = c0 + r * L::kTokenLanes + token_lane < len;
#pragma unroll
      for (int g = 0; g < NG; ++g) {
#pragma unroll
        for (int offset = L::kDimLanes / 2; offset > 0; offset /= 2) {
          s[r][g] += __shfl_xor_sync(0xffffffffu, s[r][g], offset);
        }
        if (!valid) s[r][g] = neg_inf();
      }
    }

    // 2. the chunk's max per head over every token lane, the rescale factor, p.
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      float chunk_max = s[0][g];
#pragma unroll
      for (int r = 1; r < L::kRows; ++r) chunk_max = fmaxf(chunk_max, s[r][g]);
#pragma unroll
      for (int offset = L::kDimLanes; offset < 32; offset *= 2) {
        chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, offset));
      }
      const float m_new = fmaxf(m[g], chunk_max);  // finite: the chunk has a valid token
      const float c = exp2f(m[g] - m_new);         // 0 on the first chunk (m = -inf)
      m[g] = m_new;
      l[g] *= c;
#pragma unroll
      for (int e = 0; e < L::kValsPerLane; ++e) acc[g][e] *= c;
#pragma unroll
      for (int r = 0; r < L::kRows; ++r) {
        s[r][g] = exp2f(s[r][g] - m_new);  // 0 for the rows past the page's length
        l[g] += s[r][g];
      }
    }

    // 3. o += p * v over the lane's rows and dims.
#pragma unroll
    for (int r = 0; r < L::kRows; ++r) {
#pragma unroll
      for (int k = 0; k < L::kVecsPerLane; ++k) {
        float vf[L::kElems];
        unpack_vec16<T>(v_raw[r][k], vf);
#pragma unroll
        for (int g = 0; g < NG; ++g) {
#pragma unroll
          for (int e = 0; e < L::kElems; ++e) acc[g][k * L::kElems + e] += s[r][g] * vf[e];
        }
      }
    }
  }

  // Sum the token lanes: lanes dim_lane (token lane 0) then hold the warp's whole state.
#pragma unroll
  for (int offset = L::kDimLanes; offset < 32; offset *= 2) {
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      l[g] += __shfl_xor_sync(0xffffffffu, l[g], offset);
#pragma unroll
      for (int e = 0; e < L::kValsPerLane; ++e) {
        acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], offset);
      }
    }
  }
  __syncthreads();  // q_s is dead: red_o may overwrite it
  if (token_lane == 0) {
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      float* dst = red_o + (warp * NG + g) * D;
#pragma unroll
      for (int k = 0; k < L::kVecsPerLane; ++k) {
#pragma unroll
        for (int e = 0; e < L::kElems; ++e) {
          dst[(dim_lane + k * L::kDimLanes) * L::kElems + e] = acc[g][k * L::kElems + e];
        }
      }
    }
    if (lane == 0) {  // m is warp-uniform, and l is after the sum over token lanes
#pragma unroll
      for (int g = 0; g < NG; ++g) {
        m_s[warp * NG + g] = m[g];
        l_s[warp * NG + g] = l[g];
      }
    }
  }
  __syncthreads();

  // Merge the warps and write the output (one split) or this split's partial.
  const long long part = static_cast<long long>(row) * max_splits + split;
  for (int i = static_cast<int>(threadIdx.x); i < group * D; i += static_cast<int>(blockDim.x)) {
    const int g = i / D;
    const int d = i - g * D;
    float m_max = neg_inf();
    for (int w = 0; w < warps; ++w) m_max = fmaxf(m_max, m_s[w * NG + g]);
    float o = 0.f;
    float l_sum = 0.f;
    for (int w = 0; w < warps; ++w) {
      const float m_w = m_s[w * NG + g];
      if (m_w == neg_inf()) continue;  // the warp saw no token
      const float c = exp2f(m_w - m_max);
      o += c * red_o[(w * NG + g) * D + d];
      l_sum += c * l_s[w * NG + g];
    }
    const float value = l_sum > 0.f ? o / l_sum : 0.f;
    if (row_splits == 1) {
      out[static_cast<long long>(row) * group * D + i] = from_float<T>(value);
    } else {
      part_o[part * group * D + i] = value;
      if (d == 0) part_lse[part * group + g] = l_sum > 0.f ? m_max + log2f(l_sum) : neg_inf();
    }
  }
}

// Combines the splits of row blockIdx.x: out = sum_s w_s * o_s with w = softmax(lse), over
// the row's own splits (a row of one split was written by the decode kernel).
// Dynamic shared memory: w_s [G][max_splits] floats.
template <typename T>
__device__ __forceinline__ void merge_splits(const float* __restrict__ part_o,
                                             const float* __restrict__ part_lse,
                                             T* __restrict__ out, const int* __restrict__ indptr,
                                             int group, int head_dim, int split_pages,
                                             int max_splits) {
  IC_DYNAMIC_SMEM(float, w_s);
  const long long row = blockIdx.x;
  const int num_splits = row_split_count(indptr[row + 1] - indptr[row], split_pages);
  if (num_splits == 1) return;
  const float* lse = part_lse + row * max_splits * group;  // [S][G]
  for (int g = static_cast<int>(threadIdx.x); g < group; g += static_cast<int>(blockDim.x)) {
    float m_max = neg_inf();
    for (int s = 0; s < num_splits; ++s) m_max = fmaxf(m_max, lse[s * group + g]);
    float total = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const float x = lse[s * group + g];
      const float w = x == neg_inf() ? 0.f : exp2f(x - m_max);
      w_s[g * num_splits + s] = w;
      total += w;
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    for (int s = 0; s < num_splits; ++s) w_s[g * num_splits + s] *= inv;
  }
  __syncthreads();
  const int width = group * head_dim;
  const float* o_row = part_o + row * max_splits * width;  // [S][G][D]
  for (int i = static_cast<int>(threadIdx.x); i < width; i += static_cast<int>(blockDim.x)) {
    const int g = i / head_dim;
    float o = 0.f;
    for (int s = 0; s < num_splits; ++s) o += w_s[g * num_splits + s] * o_row[s * width + i];
    out[row * width + i] = from_float<T>(o);
  }
}

}  // namespace icecache

// ---- entry points: icecache_decode_<dtype>_d<D>_g<NG>, icecache_decode_merge_<dtype> ---------

// Up to 16 warps a block where the kernel fits 128 registers a thread (NG <= 4), else 8.
#define ICECACHE_DECODE_KERNEL(NAME, T, D, NG)                                              \
  extern "C" __global__ void __launch_bounds__((NG) <= 4 ? 512 : 256)                     \
      NAME(const T* q, const T* kv, const int* indptr, const int* indices,                \
           const int* page_lens, T* out, float* part_o, float* part_lse, int group,        \
           int page_size, int split_pages, int max_splits, float scale_log2) {             \
    icecache::paged_decode<T, D, NG>(q, kv, indptr, indices, page_lens, out, part_o,       \
                                     part_lse, group, page_size, split_pages, max_splits,  \
                                     scale_log2);                                          \
  }

#define ICECACHE_MERGE_KERNEL(NAME, T)                                                     \
  extern "C" __global__ void __launch_bounds__(256)                                      \
      NAME(const float* part_o, const float* part_lse, T* out, const int* indptr,        \
           int group, int head_dim, int split_pages, int max_splits) {                    \
    icecache::merge_splits<T>(part_o, part_lse, out, indptr, group, head_dim, split_pages, \
                              max_splits);                                                \
  }

ICECACHE_DECODE_KERNEL(icecache_decode_f32_d64_g1, float, 64, 1)
ICECACHE_DECODE_KERNEL(icecache_decode_f32_d64_g2, float, 64, 2)
ICECACHE_DECODE_KERNEL(icecache_decode_f32_d64_g4, float, 64, 4)
ICECACHE_DECODE_KERNEL(icecache_decode_f32_d64_g8, float, 64, 8)
ICECACHE_DECODE_KERNEL(icecache_decode_f32_d128_g1, float, 128, 1)
ICECACHE_DECODE_KERNEL(icecache_decode_f32_d128_g2, float, 128, 2)
ICECACHE_DECODE_KERNEL(icecache_decode_f32_d128_g4, float, 128, 4)
ICECACHE_DECODE_KERNEL(icecache_decode_f32_d128_g8, float, 128, 8)
ICECACHE_DECODE_KERNEL(icecache_decode_f32_d256_g1, float, 256, 1)
ICECACHE_DECODE_KERNEL(icecache_decode_f32_d256_g2, float, 256, 2)
ICECACHE_DECODE_KERNEL(icecache_decode_f32_d256_g4, float, 256, 4)
ICECACHE_DECODE_KERNEL(icecache_decode_f32_d256_g8, float, 256, 8)
ICECACHE_DECODE_KERNEL(icecache_decode_f16_d64_g1, icecache::f16, 64, 1)
ICECACHE_DECODE_KERNEL(icecache_decode_f16_d64_g2, icecache::f16, 64, 2)
ICECACHE_DECODE_KERNEL(icecache_decode_f16_d64_g4, icecache::f16, 64, 4)
ICECACHE_DECODE_KERNEL(icecache_decode_f16_d64_g8, icecache::f16, 64, 8)
ICECACHE_DECODE_KERNEL(icecache_decode_f16_d128_g1, icecache::f16, 128, 1)
ICECACHE_DECODE_KERNEL(icecache_decode_f16_d128_g2, icecache::f16, 128, 2)
ICECACHE_DECODE_KERNEL(icecache_decode_f16_d128_g4, icecache::f16, 128, 4)
ICECACHE_DECODE_KERNEL(icecache_decode_f16_d128_g8, icecache::f16, 128, 8)
ICECACHE_DECODE_KERNEL(icecache_decode_f16_d256_g1, icecache::f16, 256, 1)
ICECACHE_DECODE_KERNEL(icecache_decode_f16_d256_g2, icecache::f16, 256, 2)
ICECACHE_DECODE_KERNEL(icecache_decode_f16_d256_g4, icecache::f16, 256, 4)
ICECACHE_DECODE_KERNEL(icecache_decode_f16_d256_g8, icecache::f16, 256, 8)
ICECACHE_DECODE_KERNEL(icecache_decode_bf16_d64_g1, icecache::bf16, 64, 1)
ICECACHE_DECODE_KERNEL(icecache_decode_bf16_d64_g2, icecache::bf16, 64, 2)
ICECACHE_DECODE_KERNEL(icecache_decode_bf16_d64_g4, icecache::bf16, 64, 4)
ICECACHE_DECODE_KERNEL(icecache_decode_bf16_d64_g8, icecache::bf16, 64, 8)
ICECACHE_DECODE_KERNEL(icecache_decode_bf16_d128_g1, icecache::bf16, 128, 1)
ICECACHE_DECODE_KERNEL(icecache_decode_bf16_d128_g2, icecache::bf16, 128, 2)
ICECACHE_DECODE_KERNEL(icecache_decode_bf16_d128_g4, icecache::bf16, 128, 4)
ICECACHE_DECODE_KERNEL(icecache_decode_bf16_d128_g8, icecache::bf16, 128, 8)
ICECACHE_DECODE_KERNEL(icecache_decode_bf16_d256_g1, icecache::bf16, 256, 1)
ICECACHE_DECODE_KERNEL(icecache_decode_bf16_d256_g2, icecache::bf16, 256, 2)
ICECACHE_DECODE_KERNEL(icecache_decode_bf16_d256_g4, icecache::bf16, 256, 4)
ICECACHE_DECODE_KERNEL(icecache_decode_bf16_d256_g8, icecache::bf16, 256, 8)

ICECACHE_MERGE_KERNEL(icecache_decode_merge_f32, float)
ICECACHE_MERGE_KERNEL(icecache_decode_merge_f16, icecache::f16)
ICECACHE_MERGE_KERNEL(icecache_decode_merge_bf16, icecache::bf16)
