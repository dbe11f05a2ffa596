// Paged sparse decode attention (GQA) over a CSR page table, with split-K over pages.
//
// Semantics: kernels/reference.py::paged_decode_attention_ref. Shapes:
//   q        [B, Hq, D]        T = float | f16 | bf16
//   kv_cache [S, 2, P, D]      T; [:, 0] keys, [:, 1] values
//   indptr   [rows + 1]        int32, rows = B * Hkv; row r serves query heads r*G .. r*G+G-1
//   indices  [nnz]             int32, page slots
//   page_lens[nnz]             int32, valid tokens at the start of each page (clamped to P)
//   out      [B, Hq, D]        T (written directly when num_splits == 1)
//   part_o   [rows, splits, G, D] float32, per-split normalised outputs (num_splits > 1)
//   part_lse [rows, splits, G]    float32, per-split log2-sum-exp of the scaled scores
//
// Decode kernel: grid (rows, num_splits), block = W warps. A block takes a balanced slice
// of its row's pages; its warps take pages round-robin and keep their own online softmax
// (running max m, sum l, accumulator o) in the log2 domain (q is pre-scaled by
// sm_scale * log2(e)). Per page a warp:
//   1. scores: lanes take (token, head) pairs, a full D-long dot product each, reading the
//      key row in 16-byte vectors and q from shared memory;
//   2. lane g updates the running max of head g and the rescale factor;
//   3. probabilities p = exp2(s - m) for the same pairs;
//   4. values: lanes split D into 16-byte vectors (and tokens when D is short), so the
//      value rows are read coalesced, and accumulate p * v for all G heads.
// At the end the warps' states are merged in shared memory, and either the output or the
// split's partial (normalised o, lse) is written. The merge kernel (grid rows) combines
// the splits of a row.
//
// Dynamic shared memory (floats), see kernels/decode_plan.py::decode_shared_floats:
//   main loop:  q_s [G][D+4] | s_s [W][G][P] | p_s [W][G][P]
//   after loop: red_o [W][G][D] | red_l [W][G]          (aliases the main-loop area)
//   always:     m_s [W][G] | c_s [W][G]                  (after the larger of the two)
#include "common.cuh"

namespace icecache {

constexpr int kMaxGroup = 8;    // query heads per KV head (GQA ratio) supported
constexpr int kValueBatch = 4;  // value rows a lane loads before accumulating them

template <typename T, int D>
struct DecodeLayout {
  static constexpr int kElems = Vec16<T>::kElems;                 // elements per vector
  static constexpr int kVecs = D / kElems;                         // vectors per row
  static constexpr int kDimLanes = kVecs < 32 ? kVecs : 32;        // lanes across a row
  static constexpr int kTokenLanes = 32 / kDimLanes;               // rows per warp step
  static constexpr int kVecsPerLane = kVecs / kDimLanes;           // vectors per lane
  static constexpr int kValsPerLane = kVecsPerLane * kElems;       // accumulators per head
  static constexpr int kQStride = D + 4;                           // padded q row (banks)
  static_assert(D % kElems == 0, "head_dim must be a multiple of the 16-byte vector");
  static_assert(32 % kDimLanes == 0 && kVecs % kDimLanes == 0, "unsupported head_dim");
};

// Dot product of a shared-memory float row with a key row of D elements (16-byte aligned).
template <typename T, int D>
__device__ __forceinline__ float dot_row(const float* q_row, const T* __restrict__ k_row) {
  using L = DecodeLayout<T, D>;
  float acc[2] = {0.f, 0.f};
#pragma unroll
  for (int v = 0; v < L::kVecs; ++v) {
    float k[L::kElems];
    load_vec16(k_row + v * L::kElems, k);
    const float4* q4 = reinterpret_cast<const float4*>(q_row + v * L::kElems);
#pragma unroll
    for (int j = 0; j < L::kElems / 4; ++j) {
      const float4 qq = q4[j];
      acc[j & 1] += qq.x * k[4 * j] + qq.y * k[4 * j + 1] + qq.z * k[4 * j + 2] +
                    qq.w * k[4 * j + 3];
    }
  }
  return acc[0] + acc[1];
}

template <typename T, int D>
__device__ __forceinline__ void paged_decode(
    const T* __restrict__ q, const T* __restrict__ kv, const int* __restrict__ indptr,
    const int* __restrict__ indices, const int* __restrict__ page_lens, T* __restrict__ out,
    float* __restrict__ part_o, float* __restrict__ part_lse, int group, int page_size,
    int num_splits, float scale_log2) {
  using L = DecodeLayout<T, D>;
  IC_DYNAMIC_SMEM(float, smem);
  const int warps = static_cast<int>(blockDim.x) / 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int row = static_cast<int>(blockIdx.x);
  const int split = static_cast<int>(blockIdx.y);

  const int gp = group * page_size;
  const int main_floats = group * L::kQStride + 2 * warps * gp;
  const int red_floats = warps * group * (D + 1);
  float* q_s = smem;
  float* s_w = q_s + group * L::kQStride + warp * gp;       // this warp's scores [G][P]
  float* p_w = q_s + group * L::kQStride + (warps + warp) * gp;  // probabilities [G][P]
  float* m_s = smem + max_int(main_floats, red_floats);    // running max [W][G]
  float* m_w = m_s + warp * group;
  float* c_w = m_s + warps * group + warp * group;         // per-page rescale [W][G]
  float* red_o = smem;                                     // [W][G][D] after the loop
  float* red_l = smem + warps * group * D;                 // [W][G]

  // Balanced slice [p0, p1) of the row's pages for this split.
  const int start = indptr[row];
  const int count = indptr[row + 1] - start;
  const int p0 = start + static_cast<int>(static_cast<long long>(count) * split / num_splits);
  const int p1 =
      start + static_cast<int>(static_cast<long long>(count) * (split + 1) / num_splits);

  const T* q_row = q + static_cast<long long>(row) * group * D;
  for (int i = static_cast<int>(threadIdx.x); i < group * D; i += static_cast<int>(blockDim.x)) {
    q_s[(i / D) * L::kQStride + i % D] = to_float(q_row[i]) * scale_log2;
  }
  for (int i = static_cast<int>(threadIdx.x); i < warps * group; i += static_cast<int>(blockDim.x)) {
    m_s[i] = neg_inf();
  }
  __syncthreads();

  float acc[kMaxGroup][L::kValsPerLane];
  float l[kMaxGroup];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < L::kValsPerLane; ++e) acc[g][e] = 0.f;
  }
  const int dim_lane = lane % L::kDimLanes;
  const int token_lane = lane / L::kDimLanes;

  for (int p = p0 + warp; p < p1; p += warps) {
    const int len = min_int(page_lens[p], page_size);  // warp-uniform
    if (len <= 0) continue;
    const T* k_page = kv + static_cast<long long>(indices[p]) * 2 * page_size * D;
    const T* v_page = k_page + static_cast<long long>(page_size) * D;
    const int pairs = group * len;

    // 1. scores (log2 domain) of (token t, head g) pairs, g fastest: lanes of a token share
    //    its key row.
    for (int i = lane; i < pairs; i += 32) {
      const int t = i / group;
      const int g = i - t * group;
      s_w[g * page_size + t] = dot_row<T, D>(q_s + g * L::kQStride, k_page + t * D);
    }
    __syncwarp();
    // 2. running max of head g and the factor that rescales its old state.
    if (lane < group) {
      const float* s_g = s_w + lane * page_size;
      float page_max = s_g[0];
      for (int t = 1; t < len; ++t) page_max = fmaxf(page_max, s_g[t]);
      const float m_old = m_w[lane];
      const float m_new = fmaxf(m_old, page_max);
      c_w[lane] = exp2f(m_old - m_new);  // 0 on the first page (m_old = -inf)
      m_w[lane] = m_new;
    }
    __syncwarp();
    // 3. probabilities of the page's pairs.
    for (int i = lane; i < pairs; i += 32) {
      const int t = i / group;
      const int g = i - t * group;
      p_w[g * page_size + t] = exp2f(s_w[g * page_size + t] - m_w[g]);
    }
    __syncwarp();
    // 4. rescale the state, accumulate p * v with lanes across the value rows.
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g < group) {
        const float c = c_w[g];
        l[g] *= c;
#pragma unroll
        for (int e = 0; e < L::kValsPerLane; ++e) acc[g][e] *= c;
      }
    }
    // kValueBatch rows per lane in flight: all loads are issued before the first FMA.
    for (int t0 = token_lane; t0 < len; t0 += kValueBatch * L::kTokenLanes) {
      uint4 raw[kValueBatch][L::kVecsPerLane];
#pragma unroll
      for (int u = 0; u < kValueBatch; ++u) {
        const int t = t0 + u * L::kTokenLanes;
#pragma unroll
        for (int k = 0; k < L::kVecsPerLane; ++k) {
          if (t < len) raw[u][k] = load_raw16(v_page + t * D + (dim_lane + k * L::kDimLanes) * L::kElems);
        }
      }
#pragma unroll
      for (int u = 0; u < kValueBatch; ++u) {
        const int t = t0 + u * L::kTokenLanes;
        if (t < len) {
          float v[L::kValsPerLane];
#pragma unroll
          for (int k = 0; k < L::kVecsPerLane; ++k) unpack_vec16<T>(raw[u][k], v + k * L::kElems);
#pragma unroll
          for (int g = 0; g < kMaxGroup; ++g) {
            if (g < group) {
              const float pr = p_w[g * page_size + t];
              l[g] += pr;
#pragma unroll
              for (int e = 0; e < L::kValsPerLane; ++e) acc[g][e] += pr * v[e];
            }
          }
        }
      }
    }
  }

  // Sum the token lanes of each warp into red_o / red_l (the main-loop area is free now).
  __syncthreads();
  for (int tl = 0; tl < L::kTokenLanes; ++tl) {
    if (token_lane == tl) {
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g < group) {
          float* dst = red_o + (warp * group + g) * D;
#pragma unroll
          for (int k = 0; k < L::kVecsPerLane; ++k) {
#pragma unroll
            for (int e = 0; e < L::kElems; ++e) {
              const int d = (dim_lane + k * L::kDimLanes) * L::kElems + e;
              const float prev = tl == 0 ? 0.f : dst[d];
              dst[d] = prev + acc[g][k * L::kElems + e];
            }
          }
          if (dim_lane == 0) {
            const float prev = tl == 0 ? 0.f : red_l[warp * group + g];
            red_l[warp * group + g] = prev + l[g];
          }
        }
      }
    }
    __syncwarp();
  }
  __syncthreads();

  // Merge the warps and write the output (one split) or this split's partial.
  const long long part = static_cast<long long>(row) * num_splits + split;
  for (int i = static_cast<int>(threadIdx.x); i < group * D; i += static_cast<int>(blockDim.x)) {
    const int g = i / D;
    const int d = i - g * D;
    float m_max = neg_inf();
    for (int w = 0; w < warps; ++w) m_max = fmaxf(m_max, m_s[w * group + g]);
    float o = 0.f;
    float l_sum = 0.f;
    for (int w = 0; w < warps; ++w) {
      const float m_w_g = m_s[w * group + g];
      if (m_w_g == neg_inf()) continue;  // the warp saw no page
      const float c = exp2f(m_w_g - m_max);
      o += c * red_o[(w * group + g) * D + d];
      l_sum += c * red_l[w * group + g];
    }
    const float value = l_sum > 0.f ? o / l_sum : 0.f;
    if (num_splits == 1) {
      out[static_cast<long long>(row) * group * D + i] = from_float<T>(value);
    } else {
      part_o[part * group * D + i] = value;
      if (d == 0) part_lse[part * group + g] = l_sum > 0.f ? m_max + log2f(l_sum) : neg_inf();
    }
  }
}

// Combines the splits of row blockIdx.x: out = sum_s w_s * o_s with w = softmax(lse).
// Dynamic shared memory: w_s [G][num_splits] floats.
template <typename T>
__device__ __forceinline__ void merge_splits(const float* __restrict__ part_o,
                                             const float* __restrict__ part_lse,
                                             T* __restrict__ out, int group, int head_dim,
                                             int num_splits) {
  IC_DYNAMIC_SMEM(float, w_s);
  const long long row = blockIdx.x;
  const float* lse = part_lse + row * num_splits * group;  // [S][G]
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
  const float* o_row = part_o + row * num_splits * width;  // [S][G][D]
  for (int i = static_cast<int>(threadIdx.x); i < width; i += static_cast<int>(blockDim.x)) {
    const int g = i / head_dim;
    float o = 0.f;
    for (int s = 0; s < num_splits; ++s) o += w_s[g * num_splits + s] * o_row[s * width + i];
    out[row * width + i] = from_float<T>(o);
  }
}

}  // namespace icecache

// ---- entry points: icecache_decode_<dtype>_d<D>, icecache_decode_merge_<dtype> -------------

#define ICECACHE_DECODE_KERNEL(NAME, T, D)                                                  \
  extern "C" __global__ void __launch_bounds__(256)                                       \
      NAME(const T* q, const T* kv, const int* indptr, const int* indices,                \
           const int* page_lens, T* out, float* part_o, float* part_lse, int group,        \
           int page_size, int num_splits, float scale_log2) {                              \
    icecache::paged_decode<T, D>(q, kv, indptr, indices, page_lens, out, part_o, part_lse, \
                                 group, page_size, num_splits, scale_log2);                \
  }

#define ICECACHE_MERGE_KERNEL(NAME, T)                                                     \
  extern "C" __global__ void __launch_bounds__(256)                                      \
      NAME(const float* part_o, const float* part_lse, T* out, int group, int head_dim,   \
           int num_splits) {                                                              \
    icecache::merge_splits<T>(part_o, part_lse, out, group, head_dim, num_splits);        \
  }

ICECACHE_DECODE_KERNEL(icecache_decode_f32_d64, float, 64)
ICECACHE_DECODE_KERNEL(icecache_decode_f32_d128, float, 128)
ICECACHE_DECODE_KERNEL(icecache_decode_f32_d256, float, 256)
ICECACHE_DECODE_KERNEL(icecache_decode_f16_d64, icecache::f16, 64)
ICECACHE_DECODE_KERNEL(icecache_decode_f16_d128, icecache::f16, 128)
ICECACHE_DECODE_KERNEL(icecache_decode_f16_d256, icecache::f16, 256)
ICECACHE_DECODE_KERNEL(icecache_decode_bf16_d64, icecache::bf16, 64)
ICECACHE_DECODE_KERNEL(icecache_decode_bf16_d128, icecache::bf16, 128)
ICECACHE_DECODE_KERNEL(icecache_decode_bf16_d256, icecache::bf16, 256)

ICECACHE_MERGE_KERNEL(icecache_decode_merge_f32, float)
ICECACHE_MERGE_KERNEL(icecache_decode_merge_f16, icecache::f16)
ICECACHE_MERGE_KERNEL(icecache_decode_merge_bf16, icecache::bf16)
