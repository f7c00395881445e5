// RaWalkOrder (ra_walk_order.h).
#include "indexes/ra_walk_order.h"

#include <random>
#include <stdexcept>

namespace kvr {

RaWalkOrder RaWalkOrder::Bfs(const int64_t* off, const int32_t* nbr, int64_t n, const std::vector<int32_t>& entries,
                             int64_t sampleOff, int64_t stride, int64_t m) {
  RaWalkOrder o;
  o.key.reserve(size_t(n));
  o.walk.assign(size_t(n), -1);
  auto claim = [&](int32_t u) {
    if (u < 0 || u >= n || o.walk[size_t(u)] >= 0) return;
    o.walk[size_t(u)] = int32_t(o.key.size());
    o.key.push_back(u);
  };
  for (const int32_t e : entries) claim(e);
  // key[] is the queue: the keys in the order they were first met.
  size_t head = 0;
  for (int32_t next = 0;;) {
    for (; head < o.key.size(); ++head) {
      const int32_t u = o.key[head];
      for (int64_t i = off[u]; i < off[u + 1]; ++i) claim(nbr[i]);
    }
    while (next < n && o.walk[size_t(next)] >= 0) ++next;
    if (next >= n) break;
    claim(next);
  }
  o.Finish(off, nbr, n, entries, sampleOff, stride, m);
  return o;
}

RaWalkOrder RaWalkOrder::Identity(const int64_t* off, const int32_t* nbr, int64_t n,
                                  const std::vector<int32_t>& entries, int64_t sampleOff, int64_t stride, int64_t m) {
  RaWalkOrder o;
  o.key.resize(size_t(n));
  o.walk.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i) o.key[size_t(i)] = o.walk[size_t(i)] = int32_t(i);
  o.Finish(off, nbr, n, entries, sampleOff, stride, m);
  return o;
}

RaWalkOrder RaWalkOrder::Shuffled(const int64_t* off, const int32_t* nbr, int64_t n,
                                  const std::vector<int32_t>& entries, int64_t sampleOff, int64_t stride, int64_t m) {
  RaWalkOrder o;
  o.key.resize(size_t(n));
  o.walk.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i) o.key[size_t(i)] = int32_t(i);
  std::mt19937_64 rng(7);
  for (int64_t i = n - 1; i > 0; --i) std::swap(o.key[size_t(i)], o.key[size_t(rng() % uint64_t(i + 1))]);
  for (int64_t i = 0; i < n; ++i) o.walk[size_t(o.key[size_t(i)])] = int32_t(i);
  o.Finish(off, nbr, n, entries, sampleOff, stride, m);
  return o;
}

void RaWalkOrder::Finish(const int64_t* off, const int32_t* nbr, int64_t n, const std::vector<int32_t>& entries,
                         int64_t sampleOff, int64_t stride, int64_t m) {
  if (int64_t(key.size()) != n) throw std::logic_error("RaWalkOrder: not a permutation");
  this->off.resize(size_t(n) + 1);
  this->nbr.resize(size_t(off[n]));
  this->off[0] = 0;
  for (int64_t v = 0; v < n; ++v) {
    const int32_t u = key[size_t(v)];
    int64_t at = this->off[size_t(v)];
    for (int64_t i = off[u]; i < off[u + 1]; ++i) this->nbr[size_t(at++)] = walk[size_t(nbr[i])];
    this->off[size_t(v) + 1] = at;
  }
  this->entries.clear();
  for (const int32_t e : entries) this->entries.push_back(walk[size_t(e)]);
  sample.assign(size_t(n + 63) / 64, 0);
  for (int64_t j = 0; j < m; ++j) {
    const int32_t v = walk[size_t(sampleOff + j * stride)];
    sample[size_t(v) >> 6] |= uint64_t(1) << (v & 63);
  }
}

}  // namespace kvr
