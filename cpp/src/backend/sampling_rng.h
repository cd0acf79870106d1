// The counter-based generators every backend's sampler uses: a draw is a pure function of
// (seed, draw index, token id), so a request's tokens do not depend on the rest of the batch, on
// thread scheduling or on the backend. constexpr or host-device so that device code can call them
// (the CUDA build passes --expt-relaxed-constexpr); a GPU sampler must use exactly these functions
// to match the CPU one.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define OCTAVO_HOST_DEVICE __host__ __device__
#else
#define OCTAVO_HOST_DEVICE
#endif

namespace octavo {

/// SplitMix64's finaliser (Steele, Lea and Flood 2014): a bijective 64-bit mix.
constexpr uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/// Uniform double in [0, 1) with 53 random bits for draw `draw` of the stream `seed`.
constexpr double sampling_uniform(uint64_t seed, uint64_t draw) {
  return double(splitmix64(seed ^ splitmix64(draw)) >> 11) * 0x1p-53;
}

/// MurmurHash3's 32-bit finaliser: a bijective mix, cheap on a GPU (32-bit multiplies only).
constexpr uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  return h ^ (h >> 16);
}

/// The 64-bit key of draw `draw` of the stream `seed`; token_uniform derives every token's
/// uniform from it.
constexpr uint64_t draw_key(uint64_t seed, uint64_t draw) { return splitmix64(seed ^ splitmix64(draw)); }

/// The 32-bit hash of token `id` in the draw with key `key`, from which its uniform comes.
constexpr uint32_t token_hash(uint64_t key, int32_t id) {
  return fmix32(fmix32(uint32_t(id) ^ uint32_t(key)) + uint32_t(key >> 32));
}

/// Uniform float in (0, 1) from a token hash's top 23 bits: strictly inside the interval, so that
/// both logarithms of the Gumbel variate stay finite. Non-decreasing in the hash.
constexpr float hash_uniform(uint32_t hash) { return (float(hash >> 9) + 0.5f) * 0x1p-23f; }

/// Uniform float in (0, 1), 23 random bits, for token `id` of the draw with key `key`.
constexpr float token_uniform(uint64_t key, int32_t id) { return hash_uniform(token_hash(key, id)); }

/// The standard Gumbel variate of a token hash (non-decreasing in the hash, up to logf's last bit).
OCTAVO_HOST_DEVICE inline float hash_gumbel(uint32_t hash) {
  return -logf(-logf(hash_uniform(hash)));
}

/// A standard Gumbel variate for token `id` of the draw with key `key`. The draw is the kept token
/// with the largest scaled logit + noise (the Gumbel-max trick: exactly the softmax of the scaled
/// logits over the kept tokens), so a draw reads each logit once and needs no sorted order. fp32
/// logf on both sides: the CPU's and the GPU's logf may differ in the last bit, which moves a draw
/// only when the two best noisy values are within an ulp of each other.
OCTAVO_HOST_DEVICE inline float gumbel_noise(uint64_t key, int32_t id) {
  return hash_gumbel(token_hash(key, id));
}

}  // namespace octavo
