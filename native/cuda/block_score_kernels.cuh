// The block scorer's score kernels (block_scores.cu): every block of every
// head scored against its query group in the host's Dot order. Included once,
// by block_scores.cu.
#pragma once

#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/cuda_common.cuh"

namespace kvr {
namespace cuda {
namespace {

constexpr int kScoreThreads = 256;
constexpr int kRowsPerCta = kScoreThreads / 2;  // two threads per block mean
constexpr int kGroupChunk = 8;                  // query rows scored per pass over a mean
constexpr int kMaxQueryFloats = 8192;           // group * headDim, held in shared memory

// scores[h, b] = max over g of q[h*group + g] · means[h, b], summed in the
// order of the host's AVX2 Dot: lane j of accumulator 0 takes words 16s + j,
// lane j of accumulator 1 words 16s + 8 + j (one FMA each, s ascending), a
// last 8 words (headDim % 16 == 8) go to accumulator 0; then acc = acc0 +
// acc1, h_j = acc_j + acc_{j+4}, s = (h0 + h2) + (h1 + h3). Thread pair
// (2r, 2r+1) holds accumulator 0 and 1 of block r; kGC query rows are summed
// per pass over the mean, and kUnroll 16-byte loads are in flight per
// thread. The max keeps the first of equal scores, as std::max does.
constexpr int kUnroll = 4;

__device__ __forceinline__ uint64_t KeyOf(float score, int64_t id) {
  uint32_t u = __float_as_uint(score == 0.f ? 0.f : score);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t(u) << 32) | uint64_t(0xffffffffu - uint32_t(id));
}

// The row's score written by the pair's first thread; with groupScores, groups
// of `reps` rows (a power of two <= 16, dividing blocks: a group's 2·reps
// threads lie in one warp and one CTA): each group's best row by its rank key
// (score, then the lower row), its score written at the group's index, so the
// group ranks where its best row ranks among the rows. Both threads of a pair
// hold the row's score (their xor shuffle sums alike), and every thread
// of the warp must call this.
__device__ __forceinline__ void WriteScores(float best, int64_t row, bool live, int half, int h, int64_t blocks,
                                            float* __restrict__ scores, float* __restrict__ groupScores, int reps) {
  if (live && half == 0) scores[size_t(h) * blocks + size_t(row)] = best;
  if (groupScores) {
    uint64_t key = live ? KeyOf(best, row) : uint64_t(0);
    float score = best;
    for (int o = 2; o < 2 * reps; o <<= 1) {
      const uint64_t k2 = __shfl_xor_sync(0xffffffffu, key, o);
      const float s2 = __shfl_xor_sync(0xffffffffu, score, o);
      if (k2 > key) key = k2, score = s2;
    }
    if (live && (threadIdx.x & (2 * reps - 1)) == 0) groupScores[size_t(h) * (blocks / reps) + size_t(row / reps)] = score;
  }
}

template <bool kBf16, int kGC>
__global__ void __launch_bounds__(kScoreThreads) ScoreBlocks(const uint16_t* __restrict__ means, const float* __restrict__ q,
                                                             float* __restrict__ scores, int64_t blocks, int d, int group,
                                                             float* __restrict__ groupScores, int reps) {
  extern __shared__ float qs[];  // [group, d]
  const int h = blockIdx.y;
  const float* qh = q + size_t(h) * group * d;
  for (int i = threadIdx.x; i < group * d; i += blockDim.x) qs[i] = qh[i];
  __syncthreads();
  const int half = threadIdx.x & 1;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerCta + (threadIdx.x >> 1);
  const bool live = row < blocks;
  const uint16_t* m = means + (size_t(h) * blocks + size_t(live ? row : 0)) * d + half * 8;
  const int strides = d / 16;
  const bool tail8 = (d % 16) == 8;
  float best = -INFINITY;
  for (int g0 = 0; g0 < group; g0 += kGC) {
    float acc[kGC][8];
#pragma unroll
    for (int g = 0; g < kGC; ++g)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[g][j] = 0.f;
    for (int s0 = 0; s0 < strides; s0 += kUnroll) {
      uint4 w[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        w[u] = live && s0 + u < strides ? __ldg(reinterpret_cast<const uint4*>(m + (s0 + u) * 16)) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (s0 + u >= strides) break;
        float kf[8];
        Widen8Words<kBf16>(w[u], kf);
        const float* qr = qs + (s0 + u) * 16 + half * 8;
#pragma unroll
        for (int g = 0; g < kGC; ++g) {
          if (g0 + g >= group) break;
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[g][j] = fmaf(qr[(g0 + g) * d + j], kf[j], acc[g][j]);
        }
      }
    }
    if (tail8 && half == 0 && live) {
      float kf[8];
      Widen8Words<kBf16>(__ldg(reinterpret_cast<const uint4*>(m + strides * 16)), kf);
      const float* qr = qs + strides * 16;
#pragma unroll
      for (int g = 0; g < kGC; ++g) {
        if (g0 + g >= group) break;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] = fmaf(qr[(g0 + g) * d + j], kf[j], acc[g][j]);
      }
    }
#pragma unroll
    for (int g = 0; g < kGC; ++g) {
      if (g0 + g >= group) break;
      float a[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) a[j] = __fadd_rn(acc[g][j], __shfl_xor_sync(0xffffffffu, acc[g][j], 1));
      const float h0 = __fadd_rn(a[0], a[4]), h1 = __fadd_rn(a[1], a[5]), h2 = __fadd_rn(a[2], a[6]), h3 = __fadd_rn(a[3], a[7]);
      const float s = __fadd_rn(__fadd_rn(h0, h2), __fadd_rn(h1, h3));
      if (best < s) best = s;
    }
  }
  WriteScores(best, row, live, half, h, blocks, scores, groupScores, reps);
}

// ScoreBlocks with coalesced loads. ScoreBlocks' thread pair reads its row's 32 bytes a load, so one warp load
// touches 16 rows 272 bytes apart: 16 to 24 sectors of 16 cache lines for 512 bytes. It took 0.080 ms on the
// H100 for 142 MB at 1M (issue #13), ~1.8 TB/s, and no less with all 9 loads of a thread in flight at once
// (visit AD: 0.080 against 0.079 ms), so not the loads' latency but their count of lines in flight is the
// suspect. Here a warp reads its 16 rows (16 · d words, contiguous) as 16-byte chunks lane by lane, 512
// contiguous bytes (4 lines) a load, all in flight, into shared memory, and each thread pair then reads its
// row from there: the same words into the same sums in the same order as ScoreBlocks (stride u's words
// 16u + 8·half .., then the tail's 8 words for half 0), so the same bits. Groups of 4 query rows (the issue's
// 32 q / 8 kv heads) and d <= 144 (9 chunks a lane) only; ScoreBlocks takes the other shapes. (It took the
// score 0.080 -> 0.063 ms on the H100, the same bits, against ScoreBlocks for every shape, the A/B switch
// KVRECALL_BLOCK_SCORES_LEGACY=1 of visit AE, since removed.)
constexpr int kStagedChunks = 9;                 // 16-byte chunks a lane loads: 16 rows · d ≤ 144 words
constexpr int kStagedMaxD = kStagedChunks * 32 * 8 / 16;  // 144

// A thread pair's row against every q row of the group, from shared memory:
// the best of the group's dots, each summed in the host's AVX2 order (lane j
// of the pair's accumulators, then the pair's halves, then h0..h3 as the host
// adds them). mine: the pair's row, its load u at mine[2u]; qs4: the group's
// q rows as float4s, d4 of them a row. Both staged kernels call it, so they
// give the same bits.
template <bool kBf16, int kGC>
__device__ __forceinline__ float RowBest(const uint4* mine, const float4* qs4, int loads, int group, int d4, int half) {
  float best = -INFINITY;
  for (int g0 = 0; g0 < group; g0 += kGC) {
    float acc[kGC][8];
#pragma unroll
    for (int g = 0; g < kGC; ++g)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[g][j] = 0.f;
    for (int u = 0; u < loads; ++u) {
      float kf[8];
      Widen8Words<kBf16>(mine[2 * u], kf);
      const float4* qr = qs4 + u * 4 + half * 2;
#pragma unroll
      for (int g = 0; g < kGC; ++g) {
        if (g0 + g >= group) break;
        const float4 a = qr[(g0 + g) * d4], b = qr[(g0 + g) * d4 + 1];
        acc[g][0] = fmaf(a.x, kf[0], acc[g][0]);
        acc[g][1] = fmaf(a.y, kf[1], acc[g][1]);
        acc[g][2] = fmaf(a.z, kf[2], acc[g][2]);
        acc[g][3] = fmaf(a.w, kf[3], acc[g][3]);
        acc[g][4] = fmaf(b.x, kf[4], acc[g][4]);
        acc[g][5] = fmaf(b.y, kf[5], acc[g][5]);
        acc[g][6] = fmaf(b.z, kf[6], acc[g][6]);
        acc[g][7] = fmaf(b.w, kf[7], acc[g][7]);
      }
    }
#pragma unroll
    for (int g = 0; g < kGC; ++g) {
      if (g0 + g >= group) break;
      float a[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) a[j] = __fadd_rn(acc[g][j], __shfl_xor_sync(0xffffffffu, acc[g][j], 1));
      const float h0 = __fadd_rn(a[0], a[4]), h1 = __fadd_rn(a[1], a[5]), h2 = __fadd_rn(a[2], a[6]), h3 = __fadd_rn(a[3], a[7]);
      const float s = __fadd_rn(__fadd_rn(h0, h2), __fadd_rn(h1, h3));
      if (best < s) best = s;
    }
  }
  return best;
}

template <bool kBf16, int kGC>
__global__ void __launch_bounds__(kScoreThreads) ScoreBlocksStaged(const uint16_t* __restrict__ means, const float* __restrict__ q,
                                                                   float* __restrict__ scores, int64_t blocks, int d, int group,
                                                                   float* __restrict__ groupScores, int reps) {
  extern __shared__ uint4 smem4[];  // [group · d / 4] float4 query rows, then per warp [16 · d / 8] chunks of rows
  const int h = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int half = threadIdx.x & 1;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerCta + (threadIdx.x >> 1);
  const bool live = row < blocks;
  // The warp's rows: 16 from warpRow, `liveRows` of them in the head.
  const int64_t warpRow = int64_t(blockIdx.x) * kRowsPerCta + warp * 16;
  const int64_t left = blocks - warpRow, liveRows = left < 0 ? 0 : left < 16 ? left : 16;
  const int chunks = 16 * d / 8, liveChunks = int(liveRows) * d / 8;
  const uint4* src = reinterpret_cast<const uint4*>(means + (size_t(h) * blocks + size_t(liveRows > 0 ? warpRow : 0)) * d);
  uint4 w[kStagedChunks];
#pragma unroll
  for (int i = 0; i < kStagedChunks; ++i) {
    const int c = lane + 32 * i;
    w[i] = c < liveChunks ? __ldg(src + c) : make_uint4(0, 0, 0, 0);
  }
  float4* qs4 = reinterpret_cast<float4*>(smem4);
  uint4* stage = smem4 + group * d / 4 + warp * chunks;
  const float4* qh = reinterpret_cast<const float4*>(q + size_t(h) * group * d);
  for (int i = threadIdx.x; i < group * d / 4; i += blockDim.x) qs4[i] = qh[i];
#pragma unroll
  for (int i = 0; i < kStagedChunks; ++i) {
    const int c = lane + 32 * i;
    if (c < chunks) stage[c] = w[i];
  }
  __syncthreads();
  const int strides = d / 16;
  const int loads = strides + ((d % 16) == 8 && half == 0 ? 1 : 0);
  const uint4* mine = stage + (lane >> 1) * (d / 8) + half;  // load u: chunk 2u of the row, + half
  const float best = RowBest<kBf16, kGC>(mine, qs4, loads, group, d / 4, half);
  WriteScores(best, row, live, half, h, blocks, scores, groupScores, reps);
}

// ScoreBlocksStaged with its loads overlapping its sums (by default where the shape fits;
// KVRECALL_BLOCK_SCORES_PIPED=0 turns it off: 0.077 -> 0.064 ms at 1M on an H100, session 28). A staged CTA loads its 128 rows, waits, sums, and exits; the ~4 CTAs an SM holds (64 registers a
// thread) start together and so load together and sum together, the memory idle while they sum (~1.2 us of
// every ~5.5 at 1M, 8 waves: 63 us for 142 MB, ~2.3 TB/s on the H100). Here grid.x CTAs a head, as many as the
// device holds at once, walk the head's 128-row tiles; a warp copies its 16 rows of the next tile into a second
// shared buffer (cp.async, no registers) while it sums this one, so the loads of the next tile are in flight
// during the sums. The same words into the same sums in the same order as ScoreBlocksStaged: the same bits.
// Each warp reads only its own rows, so a tile needs no CTA barrier, only the warp's.
template <bool kBf16, int kGC>
__global__ void __launch_bounds__(kScoreThreads) ScoreBlocksPiped(const uint16_t* __restrict__ means, const float* __restrict__ q,
                                                                  float* __restrict__ scores, int64_t blocks, int d, int group,
                                                                  float* __restrict__ groupScores, int reps) {
  extern __shared__ uint4 smem4[];  // [group · d / 4] float4 query rows, then per warp two buffers of [16 · d / 8] chunks
  const int h = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, half = threadIdx.x & 1;
  const int chunks = 16 * d / 8;
  const int64_t tiles = (blocks + kRowsPerCta - 1) / kRowsPerCta;
  float4* qs4 = reinterpret_cast<float4*>(smem4);
  uint4* const buffers = smem4 + group * d / 4 + warp * 2 * chunks;
  const uint16_t* headMeans = means + size_t(h) * blocks * d;
  // The copies of this warp's 16 rows of tile t into buffer b, as one group; chunks past the head's rows zeroed.
  const auto fetch = [&](int64_t t, int b) {
    uint4* dst = buffers + b * chunks;
    const int64_t warpRow = t * kRowsPerCta + warp * 16, left = blocks - warpRow;
    const int liveChunks = int(left <= 0 ? 0 : left < 16 ? left : 16) * d / 8;
    const uint4* src = reinterpret_cast<const uint4*>(headMeans + size_t(liveChunks > 0 ? warpRow : 0) * d);
    for (int c = lane; c < chunks; c += 32) {
      if (c < liveChunks)
        __pipeline_memcpy_async(dst + c, src + c, 16);
      else
        dst[c] = make_uint4(0, 0, 0, 0);
    }
    __pipeline_commit();
  };
  int64_t t = blockIdx.x;
  if (t < tiles) fetch(t, 0);
  const float4* qh = reinterpret_cast<const float4*>(q + size_t(h) * group * d);
  for (int i = threadIdx.x; i < group * d / 4; i += blockDim.x) qs4[i] = qh[i];
  __syncthreads();
  const int strides = d / 16;
  const int loads = strides + ((d % 16) == 8 && half == 0 ? 1 : 0);
  const int d4 = d / 4;
  for (int b = 0; t < tiles; t += gridDim.x, b ^= 1) {
    if (t + gridDim.x < tiles)
      fetch(t + gridDim.x, b ^ 1);
    else
      __pipeline_commit();  // an empty group, so that "all but the last group" below is this tile's
    __pipeline_wait_prior(1);
    __syncwarp();  // the warp's copies (and zeroed chunks) seen by every lane
    const int64_t row = t * kRowsPerCta + (threadIdx.x >> 1);
    const bool live = row < blocks;
    const uint4* mine = buffers + b * chunks + (lane >> 1) * (d / 8) + half;  // load u: chunk 2u of the row, + half
    const float best = RowBest<kBf16, kGC>(mine, qs4, loads, group, d4, half);
    WriteScores(best, row, live, half, h, blocks, scores, groupScores, reps);
    __syncwarp();  // every lane done with buffer b before the next tile's copies refill it
  }
}

// Whether ScoreBlocksStaged takes the shape, and its dynamic shared memory (query rows, then each warp's rows).
bool StagedFits(int d, int group) { return group == 4 && d <= kStagedMaxD; }
size_t StagedShared(int d, int group) { return size_t(group) * d * 4 + size_t(kScoreThreads / 32) * 16 * d * 2; }
// ScoreBlocksPiped's: the query rows, then each warp's two buffers.
size_t PipedShared(int d, int group) { return size_t(group) * d * 4 + size_t(kScoreThreads / 32) * 2 * 16 * d * 2; }

// pipedCtas > 0: the staged shapes run ScoreBlocksPiped with that many CTAs a head (grid.x), not a CTA a tile.
template <bool kBf16>
void LaunchScore(dim3 grid, size_t shared, cudaStream_t stream, const uint16_t* means, const float* q, float* scores, int64_t blocks, int d,
                 int group, float* groupScores, int reps, int pipedCtas = 0) {
  if (StagedFits(d, group) && pipedCtas > 0) {
    const dim3 piped(unsigned(std::min<int64_t>(pipedCtas, (blocks + kRowsPerCta - 1) / kRowsPerCta)), grid.y);
    ScoreBlocksPiped<kBf16, 4><<<piped, kScoreThreads, PipedShared(d, group), stream>>>(means, q, scores, blocks, d, group, groupScores, reps);
    return;
  }
  if (StagedFits(d, group)) {
    ScoreBlocksStaged<kBf16, 4><<<grid, kScoreThreads, StagedShared(d, group), stream>>>(means, q, scores, blocks, d, group, groupScores, reps);
    return;
  }
  switch (group) {
    case 1: ScoreBlocks<kBf16, 1><<<grid, kScoreThreads, shared, stream>>>(means, q, scores, blocks, d, group, groupScores, reps); break;
    case 2: ScoreBlocks<kBf16, 2><<<grid, kScoreThreads, shared, stream>>>(means, q, scores, blocks, d, group, groupScores, reps); break;
    case 4: ScoreBlocks<kBf16, 4><<<grid, kScoreThreads, shared, stream>>>(means, q, scores, blocks, d, group, groupScores, reps); break;
    default: ScoreBlocks<kBf16, kGroupChunk><<<grid, kScoreThreads, shared, stream>>>(means, q, scores, blocks, d, group, groupScores, reps); break;
  }
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
