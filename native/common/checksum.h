// The one 64-bit checksum of the native code's stored artifacts (the IVF
// index envelope, the graph index blob). Each step is a bijection of the
// state for a fixed input word and of the word for a fixed state, so every
// change confined to one 8-byte word is detected; other corruptions pass with
// probability ~2^-64. Words are read in host order: artifacts are
// little-endian and so are the hosts this code supports.
//
// Persisted: changing it makes every stored artifact fail to load.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace kvr {

inline uint64_t Checksum64(const uint8_t* p, size_t n) {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ uint64_t(n);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * 0xff51afd7ed558ccdull;
    h ^= h >> 32;
  }
  for (; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 33;
  return h;
}

}  // namespace kvr
