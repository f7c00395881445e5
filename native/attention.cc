#include "attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "simd_math.h"
#include "thread_pool.h"

namespace kvr {
namespace {

// Tokens per task: large enough to amortise the partial state, small enough
// to spread one head over all cores. Fixed, so results do not depend on the
// number of threads.
constexpr int64_t kTaskTokens = 2048;
constexpr int64_t kSub = 64;  // tokens scored before one softmax update

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

void RunTask(const AttnProblem& p, const Task& t, Partial out) {
  const int G = p.qHeads / p.kvHeads, d = p.headDim;
  const AttnSegment& seg = p.segments[t.segment];
  const uint16_t* K = seg.k[t.head];
  const uint16_t* V = seg.v[t.head];
  const int32_t* ids = seg.ids.empty() ? nullptr : seg.ids[t.head];
  const float* q = p.q + size_t(t.head) * G * d;

  thread_local std::vector<float> row, scores;
  row.resize(d);
  scores.resize(size_t(G) * kSub);

  std::fill(out.m, out.m + G, -std::numeric_limits<float>::infinity());
  std::fill(out.l, out.l + G, 0.f);
  std::fill(out.acc, out.acc + size_t(G) * d, 0.f);

  for (int64_t s0 = t.from; s0 < t.to; s0 += kSub) {
    const int64_t n = std::min(kSub, t.to - s0);
    auto token = [&](int64_t i) -> int64_t { return ids ? ids[s0 + i] : seg.begin + s0 + i; };
    for (int64_t i = 0; i < n; ++i) {
      WidenRow(K + size_t(token(i)) * d, p.dtype, d, row.data());
      for (int g = 0; g < G; ++g) scores[size_t(g) * kSub + i] = Dot(q + size_t(g) * d, row.data(), d) * p.scale;
    }
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
    for (int64_t i = 0; i < n; ++i) {
      WidenRow(V + size_t(token(i)) * d, p.dtype, d, row.data());
      for (int g = 0; g < G; ++g) Axpy(scores[size_t(g) * kSub + i], row.data(), out.acc + size_t(g) * d, d);
    }
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
