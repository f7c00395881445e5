// The wave decode step's retrieval and steady zones attended exactly, from
// the K and V the store holds, as more tiles of the same (max, normaliser,
// numerator) parts the estimate writes: MergeEstimate combines them all, so
// one layer-step answers attention over the whole context (the session's
// own tokens aside, which the host holds). Included once, by wave_step.cu
// after wave_step_estimate.cuh (TileNumerators, the block reductions).
#pragma once

#include "cuda/wave_step_estimate.cuh"

namespace kvr {
namespace cuda {
namespace {

// The dots of the exact rows after the kept ones (positions kept ..
// kept + exactCount: the sinks/window rows), per q head, into dots after the
// rescored candidates' (column tmax + e), so that AttendTile<kDots> finds
// every attended row's dot there: a thread pair per row, the same
// Accumulate/ReducePair on the same q as AttendTile's pairs, bit for bit.
template <bool kBf16, bool kPaged = false>
__global__ void __launch_bounds__(kThreads) ExactDots(StepParams p) {
  AfterPrior();
  extern __shared__ __align__(16) float qs[];  // [group, stride]
  const int h = blockIdx.y;
  for (int i = threadIdx.x; i < p.group * p.stride; i += blockDim.x) qs[i] = p.qAug[size_t(h) * p.group * p.stride + i];
  __syncthreads();
  const int half = threadIdx.x & 1;
  const int64_t e = int64_t(blockIdx.x) * kRowsPerCta + (threadIdx.x >> 1);
  const bool live = e < ExactCount(p);
  const int32_t t = live ? p.exact[e] : 0;
  const uint16_t* row = p.keys + KvRow<kPaged>(p, h, t);
  for (int g0 = 0; g0 < p.group; g0 += kGC) {
    const int gc = min(kGC, p.group - g0);  // uniform over the block: the shuffles see every lane
    float acc[kGC][8];
    Zero(acc);
    Accumulate<kBf16>(row, qs, p.stride, g0, gc, 0, p.d / 8, half, live, acc);
#pragma unroll
    for (int g = 0; g < kGC; ++g) {
      if (g >= gc) break;
      const float dot = ReducePair(acc[g]);
      if (half == 0 && live) p.dots[(size_t(h) * p.group + g0 + g) * p.dotStride + p.tmax + e] = dot;
    }
  }
}

// Tile `tile` of exact-row positions of kv head h (the selection, then
// the sinks/window rows; a row listed twice is attended once, at the first
// position owner[] names): per q head the row's logit s·q·k, the tile's max,
// its normaliser and numerator; the logits wait in sE until the tile's max is
// known. kDots: every row's dot read from dots (the kept rows' from
// RescoreCandidates at their candidate position, keptPos; the others' from
// ExactDots), without this kernel's own accumulators (registers: see the
// launch); else the dots run here, a thread pair per row (the step's other
// dots' layout), the same sums.
template <bool kBf16, bool kDots, bool kPaged, bool kMma = false>
__device__ __forceinline__ void AttendTile(const StepParams& p, int tile, int h) {
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* sSrc = reinterpret_cast<int64_t*>(smem);    // [kTile] the row's first word in keys and values, compacted
  float* sE = reinterpret_cast<float*>(sSrc + kTile);  // [kGC, kTile] logits, then their exps
  float* sRed = sE + kGC * kTile;                     // TileNumerators' scratch
  __shared__ float fScratch[32 * kGC];
  __shared__ int nScratch[32];
  __shared__ int64_t sPos[kDots ? kTile : 1];  // kDots: the row's column in dots
  const int64_t kept = Kept(p, h);
  int64_t src[2] = {-1, -1}, pos[2] = {0, 0};
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int64_t at = int64_t(tile) * kTile + 2 * threadIdx.x + k;
    if (at < kept + ExactCount(p)) {
      const int32_t t = ExactRow(p, h, at, kept);
      if (p.owner[size_t(h) * p.N + t] == int32_t(at)) {
        src[k] = KvRow<kPaged>(p, h, t);
        if (kDots) PrefetchRow(p.values + src[k], p.d * 2);  // read by TileNumerators, after the logits' phase
        if (kDots) pos[k] = at < kept ? int64_t(p.keptPos[size_t(h) * p.width + at]) : p.tmax + (at - kept);
      }
    }
  }
  int at[2];
  const int live = CompactRows(src, sSrc, nScratch, at);
  if (kDots) {
#pragma unroll
    for (int k = 0; k < 2; ++k)
      if (src[k] >= 0) sPos[at[k]] = pos[k];
  }
  __syncthreads();
  const int part = p.attendPart0 + tile;
  const int half = threadIdx.x & 1, pair = threadIdx.x >> 1, nd = p.d / 8;
  const float* qg = p.qAug + size_t(h) * p.group * p.stride;
  for (int g0 = 0; g0 < p.group; g0 += kGC) {
    const int gc = min(kGC, p.group - g0);
    const size_t qh0 = size_t(h) * p.group + g0;
    if (kDots) {
      for (int i = threadIdx.x; i < live; i += blockDim.x) {
        const int64_t dp = sPos[i];
#pragma unroll
        for (int g = 0; g < kGC; ++g)
          if (g < gc) sE[g * kTile + i] = __fmul_rn(p.scale, p.dots[(qh0 + g) * p.dotStride + dp]);
      }
    } else {
      // Rows by pairs; the bound is uniform over the CTA, so every lane shuffles.
      for (int i0 = 0; i0 < live; i0 += kRowsPerCta) {
        const int i = i0 + pair;
        const bool on = i < live;
        float acc[kGC][8];
        Zero(acc);
        Accumulate<kBf16>(p.keys + (on ? sSrc[i] : 0), qg, p.stride, g0, gc, 0, nd, half, on, acc);
#pragma unroll
        for (int g = 0; g < kGC; ++g) {
          if (g >= gc) break;
          const float dot = ReducePair(acc[g]);
          if (on && half == 0) sE[g * kTile + i] = __fmul_rn(p.scale, dot);
        }
      }
    }
    __syncthreads();
    float mx[kGC], den[kGC];
#pragma unroll
    for (int g = 0; g < kGC; ++g) {
      mx[g] = -INFINITY;
      if (g < gc)
        for (int i = threadIdx.x; i < live; i += blockDim.x) mx[g] = fmaxf(mx[g], sE[g * kTile + i]);
    }
    BlockReduceGC(mx, Max(), fScratch);
#pragma unroll
    for (int g = 0; g < kGC; ++g) {
      den[g] = 0.f;
      if (g < gc)
        for (int i = threadIdx.x; i < live; i += blockDim.x) {
          const float e = expf(sE[g * kTile + i] - mx[g]);
          sE[g * kTile + i] = e;
          den[g] += e;
        }
    }
    BlockReduceGC(den, Add(), fScratch);  // its barriers publish sE too
    if (threadIdx.x < gc) {
      p.pm[(qh0 + threadIdx.x) * p.parts + part] = mx[threadIdx.x];
      p.pden[(qh0 + threadIdx.x) * p.parts + part] = den[threadIdx.x];
    }
    Numerators<kBf16, kMma>(p, p.values, sSrc, sE, sRed, live, gc, qh0, part, 1.f);
  }
}

template <bool kBf16, bool kDots, bool kPaged = false>
__global__ void __launch_bounds__(kThreads) AttendPart(StepParams p) {
  AfterPrior();
  AttendTile<kBf16, kDots, kPaged>(p, blockIdx.x, blockIdx.y);
}

// With the estimate and the attention both on, their exact-row tiles are the
// same positions: an attention tile, then the estimate's -e·v over the same
// rows' values (those of partly attended clusters), read again while the L2
// still holds them (128 KiB a tile) instead of from memory by a separate
// EstimatePart<kRows> launch (its 42 x 8 CTAs read 69 MB at 1M, up to 43 MB
// of them these value rows: ncu, H200, 32 us). Each part's sums as in the
// separate kernels: the same bits. And EstimatePart's cluster tiles in the
// same launch, on a grid of one row so that blocks start in index
// order: blocks [0, nMain·H) are the cluster tiles (kv head b / nMain, tile
// b % nMain), the rest the attention's (nAtt a head). Apart, the cluster
// tiles' last wave (2.6 waves at 1M) and the attention's one wave of 336
// CTAs (0.85 of one) each left part of the GPU idle (ncu, H100: 84 + 71 us,
// each at 65% of DRAM); together the attention tiles start in the cluster
// tiles' last wave. They start last, not first: an attention tile reads its
// value rows twice (the attention, then its -e·v) and the second time from
// L2, which the cluster tiles' stream of value means (134 MB at 1M) would
// flush if it ran beside them. Every tile is the same code on the same rows
// with the same part: the same bits. (Checked bit for bit and timed on an
// H100 against the two launches, EstimatePart's and AttendAndRows', under
// KVRECALL_WAVE_TILES=0, session 18 visit AC; that switch and AttendAndRows
// were removed after it.)
//
// kMma: every tile's numerators on the tensor cores (wave_tile_mma.cuh),
// and the attention tiles first (blocks [0, nAtt·H)). There the cluster
// tiles no longer spill nor prefetch, and the attention tiles, each a
// chain of gathers (owners, dots, clusters, counts, logits) twice over,
// were the launch's tail: started first, under the cluster tiles' stream,
// the stage took 0.120 ms against 0.135 at the issue's shape on an H100
// (0.068 against 0.084 at the llama3.2-1b shape), whatever the second read
// of their value rows lost of L2 (bench/results/wave-tiles-h100-s27.md).
template <bool kBf16, bool kPaged = false, bool kMma = false>
__global__ void __launch_bounds__(kThreads, 3) AttendAndClusters(StepParams p, int nAtt, int nMain, int H) {
  AfterPrior();
  const int b = kMma ? int((blockIdx.x + unsigned(nMain * H)) % unsigned((nAtt + nMain) * H)) : int(blockIdx.x);
  if (b < nMain * H) {  // uniform over the block, as every branch below
    EstimateTile<kBf16, false, kPaged, kMma>(p, b % nMain, b / nMain);  // reads no K/V row
  } else {
    const int a = b - nMain * H;
    AttendTile<kBf16, true, kPaged, kMma>(p, a % nAtt, a / nAtt);  // ends on a barrier: its shared memory is free
    EstimateTile<kBf16, true, kPaged, kMma>(p, a % nAtt, a / nAtt);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
