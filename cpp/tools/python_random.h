// Python's random.Random, bit for bit, for the draws BENCH.md's workloads make: the Mersenne
// Twister MT19937 seeded as CPython seeds it from an integer (init_by_array over the integer's
// 32-bit words), getrandbits(k) for k <= 32, and randrange/randint by rejection (CPython's
// _randbelow_with_getrandbits). octavo_bench then draws the same prompt lengths and token ids as
// bench/throughput.py, so the two run the same workload.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace octavo::bench {

class PythonRandom {
 public:
  /// random.Random(seed) for a non-negative integer seed.
  explicit PythonRandom(uint64_t seed) {
    std::vector<uint32_t> key;
    for (uint64_t rest = seed; rest != 0; rest >>= 32) key.push_back(uint32_t(rest));
    if (key.empty()) key.push_back(0);  // CPython seeds 0 with the one-word key [0]
    init_by_array(key);
  }

  /// random.getrandbits(k), 0 <= k <= 32.
  uint32_t getrandbits(int k) {
    if (k < 0 || k > 32) throw std::invalid_argument("getrandbits: k must be in [0, 32]");
    if (k == 0) return 0;
    return next_uint32() >> (32 - k);
  }

  /// random.randrange(n): uniform in [0, n), n in [1, 2^32).
  uint32_t randbelow(uint64_t n) {
    if (n == 0 || n > UINT32_MAX) throw std::invalid_argument("randbelow: n must be in [1, 2^32)");
    int k = 0;
    while ((uint64_t{1} << k) <= n) ++k;  // n.bit_length()
    uint32_t r = getrandbits(k);
    while (r >= n) r = getrandbits(k);
    return r;
  }

  /// random.randint(a, b): uniform in [a, b].
  int64_t randint(int64_t a, int64_t b) {
    if (b < a) throw std::invalid_argument("randint: empty range");
    return a + int64_t(randbelow(uint64_t(b - a) + 1));
  }

 private:
  static constexpr int kN = 624, kM = 397;

  void init_genrand(uint32_t s) {
    mt_[0] = s;
    for (int i = 1; i < kN; ++i) mt_[i] = 1812433253u * (mt_[i - 1] ^ (mt_[i - 1] >> 30)) + uint32_t(i);
    index_ = kN;
  }

  void init_by_array(const std::vector<uint32_t>& key) {
    init_genrand(19650218u);
    int i = 1;
    size_t j = 0;
    for (size_t k = std::max<size_t>(kN, key.size()); k > 0; --k) {
      mt_[i] = (mt_[i] ^ ((mt_[i - 1] ^ (mt_[i - 1] >> 30)) * 1664525u)) + key[j] + uint32_t(j);
      ++i;
      ++j;
      if (i >= kN) {
        mt_[0] = mt_[kN - 1];
        i = 1;
      }
      if (j >= key.size()) j = 0;
    }
    for (int k = kN - 1; k > 0; --k) {
      mt_[i] = (mt_[i] ^ ((mt_[i - 1] ^ (mt_[i - 1] >> 30)) * 1566083941u)) - uint32_t(i);
      ++i;
      if (i >= kN) {
        mt_[0] = mt_[kN - 1];
        i = 1;
      }
    }
    mt_[0] = 0x80000000u;  // a non-zero state whatever the key
    index_ = kN;
  }

  uint32_t next_uint32() {
    if (index_ >= kN) {
      for (int i = 0; i < kN; ++i) {
        const uint32_t y = (mt_[i] & 0x80000000u) | (mt_[(i + 1) % kN] & 0x7fffffffu);
        mt_[i] = mt_[(i + kM) % kN] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
      }
      index_ = 0;
    }
    uint32_t y = mt_[index_++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
  }

  std::array<uint32_t, kN> mt_{};
  int index_ = kN;
};

}  // namespace octavo::bench
