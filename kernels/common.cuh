// Shared helpers of the IceCache kernels: 16-bit storage types, conversions, vector loads.
//
// The kernels include no CUDA header on purpose. NVRTC (the compiler behind
// cupy.RawModule) ships without cuda_fp16.h / cuda_bf16.h, and CuPy 13+ no longer bundles
// them, so the half types here are plain 16-bit storage structs. Only the half -> float
// conversion of the inner loops uses PTX on the device; every other line is portable C++
// and is what kernels/cuda_emu.h runs on the CPU in the tests.
#pragma once

#ifndef IC_DYNAMIC_SMEM
// Dynamic shared memory of the launch (`shared_mem` bytes), 16-byte aligned.
#define IC_DYNAMIC_SMEM(type, name)                              \
  extern __shared__ __align__(16) unsigned char ic_dyn_smem_[]; \
  type* name = reinterpret_cast<type*>(ic_dyn_smem_)
#endif

namespace icecache {

// IEEE binary16 and bfloat16 as raw bits (little-endian, same layout as torch).
struct f16 {
  unsigned short bits;
};
struct bf16 {
  unsigned short bits;
};

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }
__device__ __forceinline__ int min_int(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int max_int(int a, int b) { return a > b ? a : b; }

// ---- 16-bit -> float -------------------------------------------------------------------

__device__ __forceinline__ float half_bits_to_float(unsigned int h) {
#if defined(__CUDA_ARCH__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(static_cast<unsigned short>(h)));
  return f;
#else
  // Exact for every input: move exponent+mantissa into place, rebias by 2^112 (this also
  // normalises subnormals), then restore inf/NaN and the sign.
  const unsigned int sign = (h & 0x8000u) << 16;
  const unsigned int em = h & 0x7fffu;
  float f = __uint_as_float(em << 13) * 5.192296858534828e33f;  // 2^112
  if (em >= 0x7c00u) f = __uint_as_float(0x7f800000u | (em << 13));
  return __uint_as_float(__float_as_uint(f) | sign);
#endif
}

__device__ __forceinline__ float bf16_bits_to_float(unsigned int b) {
  return __uint_as_float((b & 0xffffu) << 16);
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(f16 x) { return half_bits_to_float(x.bits); }
__device__ __forceinline__ float to_float(bf16 x) { return bf16_bits_to_float(x.bits); }

// ---- float -> 16-bit, round to nearest even (outputs only, so portable everywhere) -------

__device__ __forceinline__ unsigned short float_to_half_bits(float value) {
  unsigned int u = __float_as_uint(value);
  const unsigned int sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  unsigned int out;
  if (u >= 0x47800000u) {                    // |x| >= 65536: inf, or NaN
    out = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < 0x38800000u) {              // result is subnormal or zero
    const float shifted = __uint_as_float(u) + 0.5f;  // FPU rounds the mantissa for us
    out = __float_as_uint(shifted) - 0x3f000000u;
  } else {                                   // normal: rebias exponent, round half to even
    const unsigned int odd = (u >> 13) & 1u;
    out = (u + 0xc8000fffu + odd) >> 13;
  }
  return static_cast<unsigned short>(out | sign);
}

__device__ __forceinline__ unsigned short float_to_bf16_bits(float value) {
  const unsigned int u = __float_as_uint(value);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((u >> 16) | 0x40u);
  return static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ f16 from_float<f16>(float x) {
  f16 h;
  h.bits = float_to_half_bits(x);
  return h;
}
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float x) {
  bf16 b;
  b.bits = float_to_bf16_bits(x);
  return b;
}

// ---- 16-byte vector loads --------------------------------------------------------------

// Elements of T in one 16-byte vector.
template <typename T>
struct Vec16 {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
};

__device__ __forceinline__ void unpack_word(float, unsigned int w, float* out) {
  out[0] = __uint_as_float(w);
}
__device__ __forceinline__ void unpack_word(f16, unsigned int w, float* out) {
  out[0] = half_bits_to_float(w & 0xffffu);
  out[1] = half_bits_to_float(w >> 16);
}
__device__ __forceinline__ void unpack_word(bf16, unsigned int w, float* out) {
  out[0] = __uint_as_float(w << 16);
  out[1] = __uint_as_float(w & 0xffff0000u);
}

// Converts one 16-byte vector of T to Vec16<T>::kElems floats.
template <typename T>
__device__ __forceinline__ void unpack_vec16(const uint4& raw, float* out) {
  constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
  unpack_word(T(), raw.x, out);
  unpack_word(T(), raw.y, out + kPerWord);
  unpack_word(T(), raw.z, out + 2 * kPerWord);
  unpack_word(T(), raw.w, out + 3 * kPerWord);
}

// One 16-byte vector at `src` (16-byte aligned), not yet converted.
template <typename T>
__device__ __forceinline__ uint4 load_raw16(const T* __restrict__ src) {
  return *reinterpret_cast<const uint4*>(src);
}

// Loads Vec16<T>::kElems elements at `src` (16-byte aligned) as floats into `out`.
template <typename T>
__device__ __forceinline__ void load_vec16(const T* __restrict__ src, float* out) {
  unpack_vec16<T>(load_raw16(src), out);
}

}  // namespace icecache
