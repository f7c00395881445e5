// The partly kept clusters' logits from the rescored candidates' dots (the
// clusters the cut took whole: FromDots), included once, by wave_step.cu
// after wave_step_estimate.cuh (Absorb, the touched list ExactRows<1> makes).
#pragma once

#include "cuda/wave_step_estimate.cuh"

namespace kvr {
namespace cuda {
namespace {

// Listed clusters a half-warp carries at once (PartialLogitsFromDots).
constexpr int kSlots = 2;

// Absorb with a half-warp per cluster: lane j of the half holds member i0 + j
// where Absorb's pair j (lanes 2j, 2j + 1) holds it. The same maximum, and
// the same sum: Absorb's butterfly over lanes by xor 16, 8, 4, 2 is this one
// over members by xor 8, 4, 2, 1 (each step the same two operands), and its
// last step, xor 1, adds the odd lanes' zeros (exact). So the same m and sum
// bit for bit. Every lane of the warp calls it (the shuffles stay within each
// half); a half whose cluster takes no members here (on false) keeps its own.
__device__ __forceinline__ void AbsorbHalf(float w, bool live, bool on, float& m, float& sum) {
  float top = w;
  for (int o = 8; o > 0; o >>= 1) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, o));
  const float next = fmaxf(m, top);
  float e = live ? expf(w - next) : 0.f;
  for (int o = 8; o > 0; o >>= 1) e += __shfl_xor_sync(0xffffffffu, e, o);
  if (!on) return;
  if (next != -INFINITY) sum = __fadd_rn(m == -INFINITY ? 0.f : __fmul_rn(sum, expf(m - next)), e);
  m = next;
}

// PartialLogit's restRows logit of the clusters FromDots names, with each
// member's dot read from RescoreCandidates' instead of summed again from its
// key row: a 4-byte read per q head instead of its 256-byte key. The members
// of a cluster the cut took whole sit together among the candidates, at
// GatherCandidates' place for it. What is left is a chain of dependent loads
// per cluster (list entry; its count, removed, cut share, place and member
// list; members and dots; owners): a half-warp takes kSlots listed clusters
// at once (four a warp) and issues each step's loads for all of them before
// waiting, each slot summed as one cluster alone would be, each member's
// loads made by one lane (the dots need no lane pair: there are no
// accumulators to split). At 62 registers (eight CTAs an SM, bounded here: at
// 72 unbounded it spilled) it keeps ~2.7 times as many clusters' chains in
// flight an SM as the kernel it replaced (a warp per two clusters, a lane
// pair a member as PartialLogit's: ncu, H100, 51 us at 32% of DRAM, 80
// registers, six CTAs an SM). Each cluster's logit is PartialLogit's sum of
// the same exps in the same order (AbsorbHalf): the same bits. The two were
// compared bit for bit on an H100 (session 18 visits AC and AD, this one as
// PartialLogitsFromDotsHalf against KVRECALL_WAVE_ROUND4=0) before the older
// one was removed.
__global__ void __launch_bounds__(kPartialWarps * 32, 8) PartialLogitsFromDots(StepParams p) {
  AfterPrior();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, h = blockIdx.y, sub = lane >> 4, j = lane & 15;
  // Half-warps in the grid; the warp's first cluster, its two halves' at kw and kw + 1 (slot 0).
  const int32_t listed = p.touchedN[h], halves = int32_t(gridDim.x) * kPartialWarps * 2;
  const int64_t b = p.base[h];
  const int32_t* own = p.owner + size_t(h) * p.N;
  for (int32_t kw = (int32_t(blockIdx.x) * kPartialWarps + warp) * 2; kw < listed; kw += kSlots * halves) {  // uniform over the warp
    int32_t cl[kSlots], n[kSlots], removed[kSlots], first[kSlots];
    int64_t c[kSlots], cnt[kSlots], cum[kSlots];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int32_t k = kw + sub + s * halves;
      cl[s] = k < listed ? p.touched[size_t(h) * p.rowsMax + k] : -1;
    }
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {  // all in bounds (a slot past the list reads cluster 0): no load waits on another
      c[s] = b + max(cl[s], 0);
      n[s] = p.counts[c[s]];
      removed[s] = p.removed[c[s]];
      cnt[s] = p.cnt[c[s]];
      cum[s] = p.cum[c[s]];
      first[s] = p.memberStart[c[s]];
    }
    bool on[kSlots];
    int32_t nMax = 0;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      on[s] = cl[s] >= 0 && removed[s] > 0 && removed[s] < n[s] && p.dotsOn && p.restRows && cnt[s] == n[s] && PagedWhole(p, c[s]);  // FromDots
      if (on[s]) nMax = max(nMax, n[s]);
    }
    nMax = __reduce_max_sync(0xffffffffu, nMax);
    if (nMax == 0) continue;  // uniform over the warp
    for (int g0 = 0; g0 < p.group; g0 += kGC) {
      const int gc = min(kGC, p.group - g0);
      float m[kSlots][kGC], sum[kSlots][kGC];
#pragma unroll
      for (int s = 0; s < kSlots; ++s)
#pragma unroll
        for (int g = 0; g < kGC; ++g) m[s][g] = -INFINITY, sum[s][g] = 0.f;
      for (int32_t i0 = 0; i0 < nMax; i0 += 16) {
        const int32_t i = i0 + j;
        int32_t u[kSlots];
        float dot[kSlots][kGC];
#pragma unroll
        for (int s = 0; s < kSlots; ++s) {
          const bool in = on[s] && i < n[s];
          u[s] = in ? MemberToken(p.maps, p.N, h, first[s] + i) : 0;
          // The cluster's first member among the head's candidates: cum - n.
          const float* dg = p.dots + (size_t(h) * p.group + g0) * p.dotStride + (cum[s] - n[s]) + i;
#pragma unroll
          for (int g = 0; g < kGC; ++g) dot[s][g] = in && g < gc ? dg[size_t(g) * p.dotStride] : 0.f;
        }
        bool live[kSlots];
#pragma unroll
        for (int s = 0; s < kSlots; ++s) live[s] = on[s] && i < n[s] && own[u[s]] == kNoOwner;
#pragma unroll
        for (int s = 0; s < kSlots; ++s)
#pragma unroll
          for (int g = 0; g < kGC; ++g) {
            if (g >= gc) break;  // uniform
            const float w = live[s] ? __fmul_rn(p.scale, dot[s][g]) : -INFINITY;
            AbsorbHalf(w, live[s], on[s] && i0 < n[s], m[s][g], sum[s][g]);
          }
      }
#pragma unroll
      for (int s = 0; s < kSlots; ++s)
        if (on[s] && j < gc) {
          float mg = m[s][0], sg = sum[s][0];
#pragma unroll
          for (int g = 1; g < kGC; ++g)
            if (g == j) mg = m[s][g], sg = sum[s][g];
          p.logits[(size_t(h) * p.group + g0 + j) * p.cmax + cl[s]] = mg + logf(sg) - logf(float(double(n[s] - removed[s])));
        }
    }
  }
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
