#include "kernels/block_reps.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/thread_pool.h"

namespace kvr {
namespace {

float Dist2(const float* a, const float* b, int d) {
  float s = 0.f;
  for (int j = 0; j < d; ++j) {
    const float x = a[j] - b[j];
    s += x * x;
  }
  return s;
}

// Nearest slot of each key (ties to the lower slot).
void Assign(const std::vector<float>& x, int n, const std::vector<float>& c, int slots, int d, std::vector<int>& own) {
  for (int i = 0; i < n; ++i) {
    int best = 0;
    float bd = Dist2(&x[size_t(i) * d], &c[0], d);
    for (int r = 1; r < slots; ++r) {
      const float dd = Dist2(&x[size_t(i) * d], &c[size_t(r) * d], d);
      if (dd < bd) bd = dd, best = r;
    }
    own[size_t(i)] = best;
  }
}

void OneBlock(const BlockRepsProblem& p, int64_t b) {
  const int d = p.headDim, R = p.reps;
  const int64_t t0 = b * p.blockSize;
  const int n = int(std::min<int64_t>(p.tokens, t0 + p.blockSize) - t0);
  std::vector<float> x(size_t(n) * d), c(size_t(R) * d, 0.f);
  std::vector<float> near(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) WidenRow(p.keys + size_t(t0 + i) * d, p.dtype, size_t(d), &x[size_t(i) * d]);
  // Farthest-first start: the mean, then the key farthest from every slot so far.
  std::vector<double> mean(size_t(d), 0.0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < d; ++j) mean[size_t(j)] += x[size_t(i) * d + j];
  for (int j = 0; j < d; ++j) c[size_t(j)] = float(mean[size_t(j)] / n);
  for (int i = 0; i < n; ++i) near[size_t(i)] = Dist2(&x[size_t(i) * d], &c[0], d);
  int slots = 1;
  for (; slots < R; ++slots) {
    int far = 0;
    for (int i = 1; i < n; ++i)
      if (near[size_t(i)] > near[size_t(far)]) far = i;
    if (!(near[size_t(far)] > 0.f)) break;  // every key already sits on a slot
    std::copy_n(&x[size_t(far) * d], d, &c[size_t(slots) * d]);
    for (int i = 0; i < n; ++i) near[size_t(i)] = std::min(near[size_t(i)], Dist2(&x[size_t(i) * d], &c[size_t(slots) * d], d));
  }
  std::vector<int> own(static_cast<size_t>(n));
  std::vector<double> sum(size_t(slots) * d);
  std::vector<int> cnt(static_cast<size_t>(slots));
  for (int it = 0; it < p.iterations; ++it) {
    Assign(x, n, c, slots, d, own);
    std::fill(sum.begin(), sum.end(), 0.0);
    std::fill(cnt.begin(), cnt.end(), 0);
    for (int i = 0; i < n; ++i) {
      cnt[size_t(own[size_t(i)])]++;
      for (int j = 0; j < d; ++j) sum[size_t(own[size_t(i)]) * d + j] += x[size_t(i) * d + j];
    }
    for (int r = 0; r < slots; ++r)
      if (cnt[size_t(r)] > 0)
        for (int j = 0; j < d; ++j) c[size_t(r) * d + j] = float(sum[size_t(r) * d + j] / cnt[size_t(r)]);
  }
  // Stored centroids, then the final assignment against them.
  uint16_t* out = p.centroids + size_t(b) * R * d;
  for (int r = 0; r < slots; ++r)
    for (int j = 0; j < d; ++j) {
      out[size_t(r) * d + j] = FromF32(c[size_t(r) * d + j], p.dtype);
      c[size_t(r) * d + j] = ToF32(out[size_t(r) * d + j], p.dtype);
    }
  Assign(x, n, c, slots, d, own);
  float* rad = p.radii + size_t(b) * R;
  int32_t* count = p.counts + size_t(b) * R;
  std::fill(rad, rad + R, 0.f);
  std::fill(count, count + R, 0);
  for (int i = 0; i < n; ++i) {
    const int r = own[size_t(i)];
    count[r]++;
    double ss = 0;  // in double: the radius is a bound
    for (int j = 0; j < d; ++j) ss += double(x[size_t(i) * d + j] - double(c[size_t(r) * d + j])) * (x[size_t(i) * d + j] - double(c[size_t(r) * d + j]));
    rad[r] = std::max(rad[r], float(std::sqrt(ss)));
  }
  int first = 0;
  while (count[first] == 0) ++first;  // n >= 1: some slot has members
  for (int r = 0; r < R; ++r)
    if (count[r] == 0) {
      std::copy_n(out + size_t(first) * d, d, out + size_t(r) * d);
      rad[r] = rad[first];  // count stays 0: it has no members of its own
    }
}

}  // namespace

void BlockReps(const BlockRepsProblem& p) {
  if (p.tokens <= 0) return;
  const int64_t blocks = (p.tokens + p.blockSize - 1) / p.blockSize;
  ThreadPool::Get().ParallelFor(size_t(blocks), [&](size_t b) { OneBlock(p, int64_t(b)); });
}

}  // namespace kvr
