// RaPqCodes (ra_pq_codes.h): the k-means, the codes and their scores.
#include "indexes/ra_pq_codes.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <stdexcept>

#include "common/thread_pool.h"
#include "indexes/ra_graph_dot.h"

namespace kvr {
namespace {

constexpr int64_t kRowsPerTask = 8192;
constexpr int S = RaPqCodes::kSub, C = RaPqCodes::kCentroids;

inline float Dist(const float* x, const float* c) {
  float s = 0;
  for (int j = 0; j < S; ++j) s += (x[j] - c[j]) * (x[j] - c[j]);
  return s;
}

// The nearest of the C centroids c [C, S] to x (ties towards the lower index).
inline int Nearest(const float* x, const float* c) {
  int best = 0;
  float bd = Dist(x, c);
  for (int k = 1; k < C; ++k) {
    const float dk = Dist(x, c + k * S);
    if (dk < bd) bd = dk, best = k;
  }
  return best;
}

// k-means++ seeding then Lloyd's iterations over x [T, S] into c [C, S]; a
// cluster left empty keeps its centroid. The generator is seeded per
// subspace, so the answer does not depend on which thread ran it.
void Kmeans(const std::vector<float>& x, int64_t T, uint64_t seed, float* c) {
  std::mt19937_64 rng(seed);
  auto uniform = [&] { return double(rng() >> 11) * (1.0 / 9007199254740992.0); };
  std::vector<double> d2(size_t(T), std::numeric_limits<double>::infinity());
  std::copy_n(x.data() + size_t(rng() % uint64_t(T)) * S, S, c);
  for (int k = 1; k < C; ++k) {
    double total = 0;
    for (int64_t i = 0; i < T; ++i) {
      d2[size_t(i)] = std::min(d2[size_t(i)], double(Dist(x.data() + size_t(i) * S, c + (k - 1) * S)));
      total += d2[size_t(i)];
    }
    int64_t pick = 0;
    if (total > 0) {
      double r = uniform() * total;
      for (pick = 0; pick + 1 < T && (r -= d2[size_t(pick)]) > 0; ++pick) {
      }
    }
    std::copy_n(x.data() + size_t(pick) * S, S, c + k * S);
  }
  std::vector<double> sum(static_cast<size_t>(C * S));
  std::vector<int64_t> count(static_cast<size_t>(C));
  for (int it = 0; it < RaPqCodes::kIterations; ++it) {
    std::fill(sum.begin(), sum.end(), 0.0);
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < T; ++i) {
      const float* xi = x.data() + size_t(i) * S;
      const int k = Nearest(xi, c);
      ++count[size_t(k)];
      for (int j = 0; j < S; ++j) sum[size_t(k) * S + j] += xi[j];
    }
    for (int k = 0; k < C; ++k)
      if (count[size_t(k)] > 0)
        for (int j = 0; j < S; ++j) c[k * S + j] = float(sum[size_t(k) * S + j] / double(count[size_t(k)]));
  }
}

}  // namespace

RaPqCodes RaPqCodes::Build(const uint16_t* keys, int64_t n, int d, Dtype dtype) {
  if (n < 0 || d <= 0) throw std::invalid_argument("RaPqCodes: bad shape");
  RaPqCodes pc;
  pc.n_ = n;
  pc.d_ = d;
  pc.M_ = (d + S - 1) / S;
  pc.rowBytes_ = size_t(pc.M_ + 1) / 2;
  const size_t D = size_t(d), M = size_t(pc.M_);
  pc.centroids_.assign(M * C * S, 0.f);
  pc.codes_.assign(size_t(n) * pc.rowBytes_, 0);
  if (n == 0) return pc;
  ThreadPool& pool = ThreadPool::Get();
  // The training keys, widened once, by subspace: sub[s] is [T, S].
  const int64_t T = std::min(n, kTrainMax), stride = n / T;
  std::vector<std::vector<float>> sub(M, std::vector<float>(size_t(T) * S, 0.f));
  {
    std::vector<float> row(D);
    for (int64_t i = 0; i < T; ++i) {
      WidenRow(keys + size_t(i * stride) * D, dtype, D, row.data());
      for (size_t j = 0; j < D; ++j) sub[j / S][size_t(i) * S + j % S] = row[j];
    }
  }
  pool.ParallelFor(M, [&](size_t s) { Kmeans(sub[s], T, 0x9E3779B97F4A7C15ull ^ uint64_t(s), pc.centroids_.data() + s * C * S); });
  const size_t tasks = size_t((n + kRowsPerTask - 1) / kRowsPerTask);
  // The channels' mean and spread for the outliers: per task in double,
  // added in task order (the same whatever ran where); the spread about the
  // mean, a second pass (RaKeyCodes::Build says why).
  std::vector<double> part(tasks * D);
  auto moments = [&](const double* mu) {
    std::fill(part.begin(), part.end(), 0.0);
    pool.ParallelFor(tasks, [&](size_t t) {
      std::vector<float> row(D);
      double* acc = part.data() + t * D;
      const int64_t end = std::min<int64_t>(n, int64_t(t + 1) * kRowsPerTask);
      for (int64_t i = int64_t(t) * kRowsPerTask; i < end; ++i) {
        WidenRow(keys + size_t(i) * D, dtype, D, row.data());
        for (size_t j = 0; j < D; ++j) acc[j] += mu ? (row[j] - mu[j]) * (row[j] - mu[j]) : double(row[j]);
      }
    });
    std::vector<double> total(D, 0.0);
    for (size_t t = 0; t < tasks; ++t)
      for (size_t j = 0; j < D; ++j) total[j] += part[t * D + j];
    for (double& v : total) v /= double(n);
    return total;
  };
  const std::vector<double> mu = moments(nullptr);
  std::vector<double> reach = moments(mu.data());
  for (double& v : reach) v = kOutlierSigmas * std::sqrt(v);
  std::vector<std::vector<int32_t>> outliers(tasks);
  pool.ParallelFor(tasks, [&](size_t t) {
    std::vector<float> row(M * S, 0.f);
    const int64_t end = std::min<int64_t>(n, int64_t(t + 1) * kRowsPerTask);
    for (int64_t i = int64_t(t) * kRowsPerTask; i < end; ++i) {
      WidenRow(keys + size_t(i) * D, dtype, D, row.data());
      bool out_ = false;
      for (size_t j = 0; j < D; ++j) out_ = out_ || !(std::fabs(double(row[j]) - mu[j]) <= reach[j]);
      if (out_) outliers[t].push_back(int32_t(i));
      uint8_t* out = pc.codes_.data() + size_t(i) * pc.rowBytes_;
      for (size_t s = 0; s < M; ++s) {
        const int k = Nearest(row.data() + s * S, pc.centroids_.data() + s * C * S);
        out[s >> 1] |= uint8_t((s & 1) ? k << 4 : k);
      }
    }
  });
  for (const std::vector<int32_t>& o : outliers) pc.outliers_.insert(pc.outliers_.end(), o.begin(), o.end());
  return pc;
}

void RaPqCodes::Prepare(const float* q, int G, float scale, RaPqQuery& out, bool pairs) const {
  const size_t M = size_t(M_), D = size_t(d_);
  out.G = G;
  out.M = M_;
  out.quads = (G + 3) / 4;
  out.table.assign(size_t(G) * M * C, 0.0);
  out.lut.assign(size_t(out.quads) * M * C, 0);
  out.base.assign(size_t(out.quads) * 4, 0.f);
  out.delta.assign(size_t(out.quads) * 4, 0.f);
  const int L = std::min(255, int(65535 / std::max<size_t>(M, 1)));
  for (int h = 0; h < G; ++h) {
    double* t = out.table.data() + size_t(h) * M * C;
    double widest = 0, base = 0;
    for (size_t s = 0; s < M; ++s) {
      double lo = std::numeric_limits<double>::infinity(), hi = -lo;
      // The subspace's channels read once, a channel past d as 0 (the last subspace's, when S does not divide d):
      // the same sums, in the same order, as testing each channel in the loop, which kept it from vectorising
      // (a call's tables were ~11 µs a head of a decode step's search at d = 128, G = 4, on the VM).
      double qs[S];
      for (int j = 0; j < S; ++j) qs[j] = s * S + size_t(j) < D ? double(q[size_t(h) * D + s * S + size_t(j)]) : 0.0;
      const float* cs = centroids_.data() + s * C * S;
      for (int k = 0; k < C; ++k) {
        double v = 0;
        for (int j = 0; j < S; ++j) v += qs[j] * cs[size_t(k) * S + size_t(j)];
        t[s * C + size_t(k)] = v *= double(scale);
        lo = std::min(lo, v), hi = std::max(hi, v);
      }
      widest = std::max(widest, hi - lo);
      base += lo;
    }
    const double delta = widest / L;
    const int quad = h / 4, lane = h % 4;
    out.base[size_t(h)] = float(base);
    out.delta[size_t(h)] = float(delta);
    if (!(delta > 0)) continue;  // every entry 0, as assigned
    for (size_t s = 0; s < M; ++s) {
      const double* ts = t + s * C;
      double lo = ts[0];
      for (int k = 1; k < C; ++k) lo = std::min(lo, ts[k]);
      // The same quotients and rounding as one entry at a time, in a loop the compiler vectorises (the
      // divisions were half of a call's tables); an entry is at most L <= 255, so an int32 holds it.
      int32_t u[C];
      for (int k = 0; k < C; ++k) u[k] = int32_t(std::max(0.0, std::min(double(L), std::nearbyint((ts[k] - lo) / delta))));
      uint64_t* l = out.lut.data() + (size_t(quad) * M + s) * C;
      for (int k = 0; k < C; ++k) l[k] |= uint64_t(u[k]) << (16 * lane);
    }
  }
  if (!pairs) {
    out.pairs.clear();
    return;
  }
  const size_t R = rowBytes_;
  out.pairs.assign(size_t(out.quads) * R * 256, 0);
  for (int quad = 0; quad < out.quads; ++quad)
    for (size_t i = 0; i < R; ++i)
      for (int b = 0; b < 256; ++b) {
        const uint64_t* l = out.lut.data() + size_t(quad) * M * C;
        out.pairs[(size_t(quad) * R + i) * 256 + size_t(b)] =
            l[2 * i * C + size_t(b & 15)] + (2 * i + 1 < M ? l[(2 * i + 1) * C + size_t(b >> 4)] : 0);
      }
}

namespace {

// A row's four lane sums for one quad's byte tables (RaPqQuery::pairs).
inline uint64_t QuadSums(const uint64_t* pairs, const uint8_t* row, size_t bytes) {
  uint64_t a0 = 0, a1 = 0;
  size_t i = 0;
  for (; i + 2 <= bytes; i += 2) a0 += pairs[i * 256 + row[i]], a1 += pairs[(i + 1) * 256 + row[i + 1]];
  if (i < bytes) a0 += pairs[i * 256 + row[i]];
  return a0 + a1;
}

inline float Lane(const RaPqQuery& pq, uint64_t acc, int h) {
  return std::fma(pq.delta[size_t(h)], float((acc >> (16 * (h % 4))) & 0xFFFF), pq.base[size_t(h)]);
}

template <typename RowOf>
void MaxShifted(const RaPqQuery& pq, const float* c0, RowOf rowOf, size_t count, float* out) {
  const size_t bytes = size_t(pq.M + 1) / 2, stride = bytes * 256;
#ifdef KVR_X86_SIMD
  // G <= 4: a key's four x̃ − c0 in one register (the padded heads at −∞),
  // the same fma and subtraction as below: the same floats; a search at 1M
  // keys (scanKeep 0.08) took 20.9 ms of CPU against 25.0 with the scalar
  // lanes (2-core VM, one run each).
  if (pq.quads == 1) {
    alignas(16) float c[4], pad[4];
    for (int h = 0; h < 4; ++h)
      c[h] = h < pq.G ? c0[h] : 0.f, pad[h] = h < pq.G ? 0.f : -std::numeric_limits<float>::infinity();
    const __m128 dv = _mm_loadu_ps(pq.delta.data()), bv = _mm_loadu_ps(pq.base.data()), cv = _mm_load_ps(c),
                 pv = _mm_load_ps(pad);
    for (size_t i = 0; i < count; ++i) {
      const __m128i lanes = _mm_cvtepu16_epi32(_mm_cvtsi64_si128(int64_t(QuadSums(pq.pairs.data(), rowOf(i), bytes))));
      __m128 v = _mm_add_ps(_mm_sub_ps(_mm_fmadd_ps(dv, _mm_cvtepi32_ps(lanes), bv), cv), pv);
      v = _mm_max_ps(v, _mm_shuffle_ps(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
      v = _mm_max_ps(v, _mm_shuffle_ps(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
      out[i] = _mm_cvtss_f32(v);
    }
    return;
  }
#endif
  for (size_t i = 0; i < count; ++i) {
    const uint8_t* row = rowOf(i);
    float best = -std::numeric_limits<float>::infinity();
    for (int quad = 0; quad < pq.quads; ++quad) {
      const uint64_t acc = QuadSums(pq.pairs.data() + size_t(quad) * stride, row, bytes);
      for (int h = 4 * quad; h < std::min(pq.G, 4 * quad + 4); ++h) best = std::max(best, Lane(pq, acc, h) - c0[h]);
    }
    out[i] = best;
  }
}

}  // namespace

void RaPqCodes::Logits(const RaPqQuery& pq, const int32_t* ids, size_t count, float* x, size_t ld) const {
  const size_t stride = rowBytes_ * 256;
  for (size_t i = 0; i < count; ++i)
    for (int quad = 0; quad < pq.quads; ++quad) {
      const uint64_t acc = QuadSums(pq.pairs.data() + size_t(quad) * stride, Row(ids[i]), rowBytes_);
      for (int h = 4 * quad; h < std::min(pq.G, 4 * quad + 4); ++h) x[size_t(h) * ld + i] = Lane(pq, acc, h);
    }
}

void RaPqCodes::MaxShiftedIds(const RaPqQuery& pq, const float* c0, const int32_t* ids, size_t count,
                              float* out) const {
  MaxShifted(pq, c0, [&](size_t i) { return Row(ids[i]); }, count, out);
}

void RaPqCodes::MaxShiftedRows(const RaPqQuery& pq, const float* c0, int64_t first, size_t count, float* out) const {
  const uint8_t* rows = Row(first);
  MaxShifted(pq, c0, [&](size_t i) { return rows + i * rowBytes_; }, count, out);
}

}  // namespace kvr
