#include "kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/simd_math.h"
#include "common/thread_pool.h"

namespace kvr {
namespace {

// Tokens per task: large enough to amortise the partial state, small enough
// to spread one head over all cores. Fixed, so results do not depend on the
// number of threads.
constexpr int64_t kTaskTokens = 2048;
constexpr int64_t kSub = 64;  // tokens scored before one softmax update
// Work (rows x group x headDim) run on the calling thread, not the pool: a
// session's own tokens (16-64 rows beside a GPU wave step) cost 9-18 us so
// against 15-24 us through ParallelFor's wake-ups on the 2-core VM, where
// 256 rows (2^19) still gained nothing from a second thread. The same tasks
// run in the same order either way: the same answer, bit for bit.
constexpr int64_t kInlineWork = int64_t(1) << 18;

struct Task {
  int head, segment;
  int64_t from, to;  // positions in the segment's range or id list
};

struct Partial {
  float* m;    // [G]
  float* l;    // [G]
  float* acc;  // [G, d]
};

int64_t Count(const AttnSegment& s, int head) {
  return s.ids.empty() ? std::max<int64_t>(0, s.end - s.begin) : s.idCount[head];
}

// scores[g][i] = q_g · K[token(i)] * scale for the n tokens of a sub-block.
// Four tokens at a time share each load of q, and their four dot products
// are reduced together.
template <typename TokenFn>
void ScoreSub(const float* q, int G, int d, const uint16_t* K, Dtype dtype, float scale, int64_t n, TokenFn token,
              float* rows, float* scores) {
  for (int64_t i = 0; i < n; ++i) WidenRow(K + size_t(token(i)) * d, dtype, d, rows + size_t(i) * d);
  int64_t i = 0;
#ifdef KVR_X86_SIMD
  if (d % 8 == 0) {
    for (; i + 4 <= n; i += 4) {
      const float* r0 = rows + size_t(i) * d;
      const float *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
      for (int g = 0; g < G; ++g) {
        const float* qg = q + size_t(g) * d;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int j = 0; j < d; j += 8) {
          __m256 qv = _mm256_loadu_ps(qg + j);
          a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r0 + j), a0);
          a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r1 + j), a1);
          a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r2 + j), a2);
          a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r3 + j), a3);
        }
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        __m128 sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(scores + size_t(g) * kSub + i, _mm_mul_ps(sum, _mm_set1_ps(scale)));
      }
    }
  }
#endif
  for (; i < n; ++i)
    for (int g = 0; g < G; ++g) scores[size_t(g) * kSub + i] = Dot(q + size_t(g) * d, rows + size_t(i) * d, d) * scale;
}

// acc[g] += Σ_i p[g][i] · V[token(i)]. With G known at compile time the
// accumulators of a 16-wide slice of every head stay in registers over the
// whole sub-block.
template <int G>
void AccumulateTiled(int d, const float* rows, int64_t n, const float* probs, float* acc) {
#ifdef KVR_X86_SIMD
  for (int j = 0; j < d; j += 16) {
    __m256 a[G][2];
    for (int g = 0; g < G; ++g) {
      a[g][0] = _mm256_loadu_ps(acc + size_t(g) * d + j);
      a[g][1] = _mm256_loadu_ps(acc + size_t(g) * d + j + 8);
    }
    for (int64_t i = 0; i < n; ++i) {
      __m256 v0 = _mm256_loadu_ps(rows + size_t(i) * d + j), v1 = _mm256_loadu_ps(rows + size_t(i) * d + j + 8);
      for (int g = 0; g < G; ++g) {
        __m256 pv = _mm256_broadcast_ss(probs + size_t(g) * kSub + i);
        a[g][0] = _mm256_fmadd_ps(pv, v0, a[g][0]);
        a[g][1] = _mm256_fmadd_ps(pv, v1, a[g][1]);
      }
    }
    for (int g = 0; g < G; ++g) {
      _mm256_storeu_ps(acc + size_t(g) * d + j, a[g][0]);
      _mm256_storeu_ps(acc + size_t(g) * d + j + 8, a[g][1]);
    }
  }
#endif
}

template <typename TokenFn>
void AccumulateSub(int G, int d, const uint16_t* V, Dtype dtype, int64_t n, TokenFn token, float* rows, const float* probs,
                   float* acc) {
  for (int64_t i = 0; i < n; ++i) WidenRow(V + size_t(token(i)) * d, dtype, d, rows + size_t(i) * d);
#ifdef KVR_X86_SIMD
  if (d % 16 == 0) {
    switch (G) {
      case 1: return AccumulateTiled<1>(d, rows, n, probs, acc);
      case 2: return AccumulateTiled<2>(d, rows, n, probs, acc);
      case 4: return AccumulateTiled<4>(d, rows, n, probs, acc);
      case 8: return AccumulateTiled<8>(d, rows, n, probs, acc);
      default: break;
    }
  }
#endif
  for (int64_t i = 0; i < n; ++i)
    for (int g = 0; g < G; ++g) Axpy(probs[size_t(g) * kSub + i], rows + size_t(i) * d, acc + size_t(g) * d, d);
}

void RunTask(const AttnProblem& p, const Task& t, Partial out) {
  const int G = p.qHeads / p.kvHeads, d = p.headDim;
  const AttnSegment& seg = p.segments[t.segment];
  const uint16_t* K = seg.k[t.head];
  const uint16_t* V = seg.v[t.head];
  const int32_t* ids = seg.ids.empty() ? nullptr : seg.ids[t.head];
  const float* q = p.q + size_t(t.head) * G * d;

  thread_local std::vector<float> rows, scores;
  rows.resize(size_t(kSub) * d);
  scores.resize(size_t(G) * kSub);

  std::fill(out.m, out.m + G, -std::numeric_limits<float>::infinity());
  std::fill(out.l, out.l + G, 0.f);
  std::fill(out.acc, out.acc + size_t(G) * d, 0.f);

  for (int64_t s0 = t.from; s0 < t.to; s0 += kSub) {
    const int64_t n = std::min(kSub, t.to - s0);
    auto token = [&](int64_t i) -> int64_t { return ids ? ids[s0 + i] : seg.begin + s0 + i; };
    ScoreSub(q, G, d, K, p.dtype, p.scale, n, token, rows.data(), scores.data());
    for (int g = 0; g < G; ++g) {
      float* sg = scores.data() + size_t(g) * kSub;
      float mx = *std::max_element(sg, sg + n);
      float mNew = std::max(out.m[g], mx);
      if (out.m[g] != mNew && out.l[g] > 0.f) {
        float corr = std::exp(out.m[g] - mNew);
        out.l[g] *= corr;
        Scale(corr, out.acc + size_t(g) * d, d);
      }
      out.m[g] = mNew;
      out.l[g] += ExpShiftSum(sg, mNew, sg, n);  // scores become probabilities
    }
    AccumulateSub(G, d, V, p.dtype, n, token, rows.data(), scores.data(), out.acc);
  }
}

}  // namespace

void Attend(const AttnProblem& p) {
  const int G = p.qHeads / p.kvHeads, d = p.headDim;
  std::vector<Task> tasks;
  for (int h = 0; h < p.kvHeads; ++h)
    for (int s = 0; s < int(p.segments.size()); ++s) {
      int64_t n = Count(p.segments[s], h);
      for (int64_t from = 0; from < n; from += kTaskTokens) tasks.push_back({h, s, from, std::min(n, from + kTaskTokens)});
    }

  const size_t stride = size_t(G) * (d + 2);
  std::vector<float> state(tasks.size() * stride);
  auto partial = [&](size_t i) {
    float* base = state.data() + i * stride;
    return Partial{base, base + G, base + 2 * G};
  };
  int64_t rows = 0;
  for (const Task& t : tasks) rows += t.to - t.from;
  if (rows * G * d <= kInlineWork)
    for (size_t i = 0; i < tasks.size(); ++i) RunTask(p, tasks[i], partial(i));
  else
    ThreadPool::Get().ParallelFor(tasks.size(), [&](size_t i) { RunTask(p, tasks[i], partial(i)); });

  // Merge per kv head in task order (deterministic), in double.
  std::vector<double> acc(d);
  for (int h = 0; h < p.kvHeads; ++h) {
    for (int g = 0; g < G; ++g) {
      const int qh = h * G + g;
      double M = -std::numeric_limits<double>::infinity();
      for (size_t i = 0; i < tasks.size(); ++i)
        if (tasks[i].head == h && partial(i).l[g] > 0.f) M = std::max(M, double(partial(i).m[g]));
      double L = 0;
      std::fill(acc.begin(), acc.end(), 0.0);
      if (std::isfinite(M)) {
        for (size_t i = 0; i < tasks.size(); ++i) {
          if (tasks[i].head != h) continue;
          Partial pt = partial(i);
          if (pt.l[g] <= 0.f) continue;
          double w = std::exp(double(pt.m[g]) - M);
          L += w * pt.l[g];
          for (int j = 0; j < d; ++j) acc[j] += w * pt.acc[size_t(g) * d + j];
        }
      }
      float* o = p.out + size_t(qh) * d;
      if (L > 0) {
        for (int j = 0; j < d; ++j) o[j] = float(acc[j] / L);
        p.lse[qh] = float(M + std::log(L));
      } else {
        std::fill(o, o + d, 0.f);
        p.lse[qh] = -std::numeric_limits<float>::infinity();
      }
    }
  }
}

}  // namespace kvr
