#include "kernels/convert.h"

#include <cmath>
#include <cstring>

#include "common/thread_pool.h"

namespace kvr {
namespace {

constexpr size_t kChunk = 1 << 16;

float Load(const uint8_t* src, Dtype d, size_t i) {
  if (d == Dtype::kF32) {
    float f;
    std::memcpy(&f, src + 4 * i, 4);
    return f;
  }
  uint16_t w;
  std::memcpy(&w, src + 2 * i, 2);
  return ToF32(w, d);
}

void Store(uint8_t* dst, Dtype d, size_t i, float f) {
  if (d == Dtype::kF32) {
    std::memcpy(dst + 4 * i, &f, 4);
    return;
  }
  uint16_t w = FromF32(f, d);
  std::memcpy(dst + 2 * i, &w, 2);
}

}  // namespace

void Convert(const uint8_t* src, Dtype from, uint8_t* dst, Dtype to, size_t n) {
  if (from == to) {
    std::memcpy(dst, src, n * DtypeBytes(from));
    return;
  }
  size_t chunks = (n + kChunk - 1) / kChunk;
  ThreadPool::Get().ParallelFor(chunks, [&](size_t c) {
    size_t end = std::min(n, (c + 1) * kChunk);
    for (size_t i = c * kChunk; i < end; ++i) Store(dst, to, i, Load(src, from, i));
  });
}

int64_t FirstNonFinite(const uint8_t* src, Dtype dtype, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (dtype == Dtype::kF32) {
      uint32_t x;
      std::memcpy(&x, src + 4 * i, 4);
      if ((x & 0x7f800000u) == 0x7f800000u) return int64_t(i);
    } else {
      uint16_t w;
      std::memcpy(&w, src + 2 * i, 2);
      uint16_t expMask = dtype == Dtype::kF16 ? 0x7c00u : 0x7f80u;
      if ((w & expMask) == expMask) return int64_t(i);
    }
  }
  return -1;
}

}  // namespace kvr
