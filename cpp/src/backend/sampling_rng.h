// The counter-based uniform generator every backend's sampler uses: a draw is a pure function of
// (seed, draw index), so a request's tokens do not depend on the rest of the batch, on thread
// scheduling or on the backend. constexpr so device code can call it (the CUDA build passes
// --expt-relaxed-constexpr); a GPU sampler must use exactly this function to match the CPU one.
#pragma once

#include <cstdint>

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

}  // namespace octavo
