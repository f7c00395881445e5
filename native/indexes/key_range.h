// The largest |key| the clustering indexes take (faiss's f32 k-means and
// IVF, the device's k-means). With |x| <= 2^50 a squared norm (<= 1024 *
// 2^100), a cluster's sum of up to 2^31 keys and any dot product stay far
// inside f32. Beyond it, where only finite bf16 keys reach (f16's largest is
// 65504), faiss's sums overflow to Inf, its centroids turn NaN and an
// assertion in its k-means aborts the process; the device's k-means would
// cluster what the host refuses. Such keys are refused before any work.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <vector>

#include "common/half.h"
#include "common/thread_pool.h"

namespace kvr {

// 2^50 as a bf16's magnitude bits: exponent 127 + 50, no mantissa.
constexpr uint16_t kMaxClusteredBf16Bits = uint16_t((127 + 50) << 7);

// Throws std::invalid_argument (a RangeError in JS) where any of the count
// 16-bit keys lies beyond 2^50 in magnitude. The keys are finite (uploads
// refuse NaN and Inf); only bf16 is read.
inline void CheckClusterableKeys(const uint16_t* keys, Dtype dtype, int64_t count) {
  if (dtype != Dtype::kBf16 || count <= 0) return;
  constexpr int64_t kTask = int64_t(1) << 20;
  const int64_t tasks = (count + kTask - 1) / kTask;
  std::vector<uint16_t> peak(size_t(tasks), 0);
  ThreadPool::Get().ParallelFor(size_t(tasks), [&](size_t t) {
    const int64_t i1 = std::min(count, int64_t(t + 1) * kTask);
    uint16_t m = 0;
    for (int64_t i = int64_t(t) * kTask; i < i1; ++i) m = std::max<uint16_t>(m, keys[i] & 0x7fff);
    peak[t] = m;
  });
  const uint16_t m = *std::max_element(peak.begin(), peak.end());
  if (m <= kMaxClusteredBf16Bits) return;
  char text[160];
  std::snprintf(text, sizeof(text), "keys hold a value of magnitude %.4g, beyond the 2^50 (%.4g) that k-means and IVF in float32 cluster without overflow",
                double(Bf16ToF32(m)), double(Bf16ToF32(kMaxClusteredBf16Bits)));
  throw std::invalid_argument(text);
}

}  // namespace kvr
