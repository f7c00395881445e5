// Device block scoring and exact top-k per kv head (see block_scores.h).
//
// Per step, on one stream: the step's inputs in one copy (q, the extra ids'
// per-head offsets, the extra ids), ScoreBlocks (every block of every head,
// the whole device), SelectTop (one CTA per head: radix select of the k-th
// best key, compaction, bitonic sort, extra scores), the outputs in one copy
// back. The engine's steps replay these from a CUDA graph: the extra ids'
// count changes every step, so the copies move a count rounded up to
// kExtraBucket ids (the kernel reads the true count from the offsets), and a
// layer's steps keep one graph.
//
// Keys. A block's rank key is (order(score) << 32) | (0xffffffff - id): a
// larger key is a higher score, or the same score and a lower id, which is
// the host's order (common/ranked_hits.h). Keys are unique, so the k-th best
// key is a threshold that selects exactly k blocks, and ties never need a
// second pass. -0 and +0 rank equal, as they compare on the host.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/cuda_common.cuh"
#include "cuda/block_scores.h"
#include "cuda/step_graph.cuh"

namespace kvr {
namespace cuda {
namespace {


constexpr int kScoreThreads = 256;
constexpr int kRowsPerCta = kScoreThreads / 2;  // two threads per block mean
constexpr int kGroupChunk = 8;                  // query rows scored per pass over a mean
constexpr int kMaxQueryFloats = 8192;           // group * headDim, held in shared memory
constexpr int kSelectThreads = 1024;
constexpr int64_t kSharedSortKeys = 8192;  // 64 KiB of keys: larger sorts run in global memory
constexpr int64_t kExtraBucket = 2048;     // extra ids a graph's copies move, rounded up to (8 KiB)


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
  if (live && half == 0) scores[size_t(h) * blocks + size_t(row)] = best;
  // Groups of `reps` rows (a power of two <= 16, dividing blocks: a group's 2·reps threads lie in one warp and
  // one CTA): each group's best row by its rank key (score, then the lower row), its score written at the
  // group's index, so the group ranks where its best row ranks among the rows. Both threads of a pair hold
  // the row's score (the xor shuffle above sums alike), and every thread of the warp is here.
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

// ScoreBlocks with coalesced loads. ScoreBlocks' thread pair reads its row's 32 bytes a load, so one warp load
// touches 16 rows 272 bytes apart: 16 to 24 sectors of 16 cache lines for 512 bytes. It took 0.080 ms on the
// H100 for 142 MB at 1M (issue #13), ~1.8 TB/s, and no less with all 9 loads of a thread in flight at once
// (visit AD: 0.080 against 0.079 ms), so not the loads' latency but their count of lines in flight is the
// suspect. Here a warp reads its 16 rows (16 · d words, contiguous) as 16-byte chunks lane by lane, 512
// contiguous bytes (4 lines) a load, all in flight, into shared memory, and each thread pair then reads its
// row from there: the same words into the same sums in the same order as ScoreBlocks (stride u's words
// 16u + 8·half .., then the tail's 8 words for half 0), so the same bits. Groups of 4 query rows (the issue's
// 32 q / 8 kv heads) and d <= 144 (9 chunks a lane) only. KVRECALL_BLOCK_SCORES_LEGACY=1: ScoreBlocks for
// every shape (an A/B switch).
constexpr int kStagedChunks = 9;                 // 16-byte chunks a lane loads: 16 rows · d ≤ 144 words
constexpr int kStagedMaxD = kStagedChunks * 32 * 8 / 16;  // 144

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
  const int d4 = d / 4;
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
  if (live && half == 0) scores[size_t(h) * blocks + size_t(row)] = best;
  // Groups of reps rows: as ScoreBlocks.
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

// Whether ScoreBlocksStaged takes the shape, and its dynamic shared memory (query rows, then each warp's rows).
bool StagedFits(int d, int group) {
  static const bool legacy = [] {
    const char* v = std::getenv("KVRECALL_BLOCK_SCORES_LEGACY");
    return v && v[0] == '1';
  }();
  return !legacy && group == 4 && d <= kStagedMaxD;
}
size_t StagedShared(int d, int group) { return size_t(group) * d * 4 + size_t(kScoreThreads / 32) * 16 * d * 2; }

template <bool kBf16>
void LaunchScore(dim3 grid, size_t shared, cudaStream_t stream, const uint16_t* means, const float* q, float* scores, int64_t blocks, int d,
                 int group, float* groupScores, int reps) {
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

__device__ __forceinline__ int32_t IdOf(uint64_t key) { return int32_t(0xffffffffu - uint32_t(key)); }

// Blocks a select thread holds in registers (blocks <= kHeldKeys *
// kSelectThreads: 16,384, a 1M-token head); larger heads re-read scores.
constexpr int kHeldKeys = 16;

// Calls f(key, valid) for every block of the head, the whole warp together
// (f may use warp collectives): from registers when kItems > 0.
template <int kItems, typename F>
__device__ __forceinline__ void EachKey(const uint64_t* held, const float* sc, int64_t blocks, int tid, int bd, F&& f) {
  if constexpr (kItems > 0) {
#pragma unroll
    for (int j = 0; j < kItems; ++j) f(held[j], tid + int64_t(j) * bd < blocks);
  } else {
    for (int64_t base = 0; base < blocks; base += bd) {
      const int64_t i = base + tid;
      f(i < blocks ? KeyOf(sc[i], i) : uint64_t(0), i < blocks);
    }
  }
}

// One CTA per kv head: the head's best kk = min(k, blocks) blocks, best
// first, and its extra scores. The sort runs over p2 keys of shared memory
// when p2 <= kSharedSortKeys, else over the head's p2 keys of global scratch.
template <int kItems>
__global__ void __launch_bounds__(kSelectThreads) SelectTop(const float* __restrict__ scores, const float* __restrict__ extraFrom,
                                                            int64_t blocks, int idScale, int64_t kk, int64_t p2,
                                                            uint64_t* __restrict__ globalKeys, const int32_t* __restrict__ extraIds,
                                                            const int32_t* __restrict__ extraOffsets, float* __restrict__ extraScores,
                                                            int32_t* __restrict__ outIds, float* __restrict__ outScores) {
  extern __shared__ uint64_t sharedKeys[];
  __shared__ unsigned hist[256];
  __shared__ uint64_t sPrefix, sMask;
  __shared__ unsigned sNeed, sCount;
  __shared__ int sDone;
  const int h = blockIdx.x, tid = threadIdx.x, lane = tid & 31, bd = blockDim.x;
  const float* sc = scores + size_t(h) * blocks;

  // Extra ids are rows of extraFrom (the row scores; `scores` itself unless groups of rows are ranked).
  if (extraIds) {
    const float* ex = extraFrom + size_t(h) * blocks * idScale;
    for (int64_t e = extraOffsets[h] + tid; e < extraOffsets[h + 1]; e += bd) extraScores[e] = ex[extraIds[e]];
  }
  if (kk == 0) return;
  uint64_t held[kItems > 0 ? kItems : 1];
  if constexpr (kItems > 0) {
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = tid + int64_t(j) * bd;
      held[j] = i < blocks ? KeyOf(sc[i], i) : uint64_t(0);
    }
  }

  // The kk-th best key T, a digit of 8 bits at a time from the top: every
  // block whose key is >= T is selected, exactly kk of them.
  uint64_t prefix = 0;
  if (kk < blocks) {
    uint64_t mask = 0;
    unsigned need = unsigned(kk);
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += bd) hist[i] = 0;
      __syncthreads();
      EachKey<kItems>(held, sc, blocks, tid, bd, [&](uint64_t key, bool valid) {
        const unsigned digit = valid && (key & mask) == prefix ? unsigned(key >> shift) & 255u : 256u;
        const unsigned peers = __match_any_sync(0xffffffffu, digit);
        if (digit < 256 && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], unsigned(__popc(peers)));
      });
      __syncthreads();
      if (tid < 32) {
        // Lane l holds digits 255 - 8l .. 248 - 8l (best first).
        unsigned c[8], sum = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) sum += (c[j] = hist[255 - lane * 8 - j]);
        unsigned incl = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const unsigned v = __shfl_up_sync(0xffffffffu, incl, o);
          if (lane >= o) incl += v;
        }
        const unsigned excl = incl - sum;
        if (excl < need && need <= incl) {
          unsigned cum = excl;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if (cum + c[j] >= need) {
              const unsigned digit = 255u - unsigned(lane * 8 + j);
              sPrefix = prefix | (uint64_t(digit) << shift);
              sMask = mask | (uint64_t(255) << shift);
              sNeed = need - cum;
              sDone = c[j] == need - cum;
              break;
            }
            cum += c[j];
          }
        }
      }
      __syncthreads();
      prefix = sPrefix;
      mask = sMask;
      need = sNeed;
      const bool done = sDone;
      if (done) break;
    }
  }

  // Compaction of the keys >= T (warp-aggregated slots), padded with 0
  // (below every key) to p2.
  uint64_t* keys = p2 <= kSharedSortKeys ? sharedKeys : globalKeys + size_t(h) * p2;
  if (tid == 0) sCount = 0;
  for (int64_t i = tid; i < p2; i += bd) keys[i] = 0;
  __syncthreads();
  EachKey<kItems>(held, sc, blocks, tid, bd, [&](uint64_t key, bool valid) {
    const bool take = valid && key >= prefix;
    const unsigned ballot = __ballot_sync(0xffffffffu, take);
    unsigned first = 0;
    if (lane == 0 && ballot) first = atomicAdd(&sCount, unsigned(__popc(ballot)));
    first = __shfl_sync(0xffffffffu, first, 0);
    if (take) {
      const unsigned at = first + unsigned(__popc(ballot & ((1u << lane) - 1u)));
      if (at < p2) keys[at] = key;
    }
  });
  __syncthreads();

  // Bitonic sort, descending.
  for (int64_t size = 2; size <= p2; size <<= 1)
    for (int64_t stride = size >> 1; stride > 0; stride >>= 1) {
      for (int64_t i = tid; i < p2; i += bd) {
        const int64_t j = i ^ stride;
        if (j > i) {
          const uint64_t a = keys[i], b = keys[j];
          if (((i & size) == 0) ? (a < b) : (a > b)) {
            keys[i] = b;
            keys[j] = a;
          }
        }
      }
      __syncthreads();
    }

  for (int64_t j = tid; j < kk; j += bd) {
    const int32_t id = IdOf(keys[j]);
    outIds[size_t(h) * kk + j] = id * idScale;
    outScores[size_t(h) * kk + j] = sc[id];
  }
}

int64_t NextPow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

}  // namespace

struct BlockScores::Impl {
  BlockScoresConfig cfg;
  std::mutex mu;
  cudaStream_t stream = nullptr;
  cudaEvent_t kStart = nullptr, kMid = nullptr, kStop = nullptr;
  uint16_t* means = nullptr;  // [heads, blocks, d]
  float* scores = nullptr;    // [heads, blocks]
  float* groupScores = nullptr;  // [heads, blocks / reps] for steps that rank groups of rows (made at the first)
  int64_t groupCap = 0;          // floats
  uint8_t* devIn = nullptr;   // q | extra offsets | extra ids
  uint8_t* devOut = nullptr;  // ids | scores | extraScores
  uint8_t* hostIn = nullptr;  // pinned mirrors
  uint8_t* hostOut = nullptr;
  size_t inCap = 0, outCap = 0;
  uint64_t* sortKeys = nullptr;  // [heads, p2] for sorts beyond shared memory
  size_t sortCap = 0;
  BlockTopKTimes last;
  StepGraph graph{StepGraph::Capture::kAtOnce};  // one key while the ids fit their buffers

  ~Impl() {
    if (stream) cudaStreamSynchronize(stream);
    for (void* p : {static_cast<void*>(means), static_cast<void*>(scores), static_cast<void*>(devIn), static_cast<void*>(devOut),
                    static_cast<void*>(sortKeys), static_cast<void*>(groupScores)})
      if (p) cudaFree(p);
    if (hostIn) cudaFreeHost(hostIn);
    if (hostOut) cudaFreeHost(hostOut);
    for (cudaEvent_t e : {kStart, kMid, kStop})
      if (e) cudaEventDestroy(e);
    if (stream) cudaStreamDestroy(stream);
    cudaGetLastError();
  }

  int64_t Bytes() const {
    return int64_t(size_t(cfg.heads) * cfg.blocks * cfg.headDim * 2 + size_t(cfg.heads) * cfg.blocks * 4 + inCap + outCap + sortCap + size_t(groupCap) * 4);
  }

  // Grows a device buffer and its pinned host mirror to `bytes`.
  static void Grow(uint8_t*& dev, uint8_t*& host, size_t& cap, size_t bytes) {
    if (bytes <= cap) return;
    bytes = Align(std::max(bytes, cap * 2));
    if (dev) cudaFree(dev);
    if (host) cudaFreeHost(host);
    dev = host = nullptr;
    cap = 0;
    Check(cudaMalloc(reinterpret_cast<void**>(&dev), bytes), "cudaMalloc (block scores staging)");
    Check(cudaHostAlloc(reinterpret_cast<void**>(&host), bytes, cudaHostAllocDefault), "cudaHostAlloc (block scores staging)");
    cap = bytes;
  }
};

bool BlockScores::SupportsReps(int64_t blocks, int reps) {
  return reps >= 1 && reps <= 16 && (reps & (reps - 1)) == 0 && blocks % reps == 0;
}

bool BlockScores::Supports(int headDim, int group) {
  return headDim >= 8 && headDim <= 1024 && headDim % 8 == 0 && group >= 1 && int64_t(group) * headDim <= kMaxQueryFloats;
}

BlockScores::BlockScores(const BlockScoresConfig& cfg, const uint16_t* const* means) : impl_(std::make_unique<Impl>()) {
  Impl& I = *impl_;
  I.cfg = cfg;
  if (cfg.heads < 1 || cfg.heads > 1024) throw std::runtime_error("BlockScores: heads must be in [1, 1024]");
  if (cfg.blocks < 1 || cfg.blocks > (int64_t(1) << 30)) throw std::runtime_error("BlockScores: blocks must be in [1, 2^30]");
  if (!Supports(cfg.headDim, 1)) throw std::runtime_error("BlockScores: headDim must be a multiple of 8 in [8, 1024]");
  if (!IsWordDtype(cfg.dtype)) throw std::runtime_error("BlockScores: dtype must be f16 or bf16");
  Check(cudaSetDevice(0), "cudaSetDevice");
  Check(cudaStreamCreateWithFlags(&I.stream, cudaStreamNonBlocking), "stream");
  Check(cudaEventCreate(&I.kStart), "event");
  Check(cudaEventCreate(&I.kMid), "event");
  Check(cudaEventCreate(&I.kStop), "event");
  const size_t headWords = size_t(cfg.blocks) * cfg.headDim;
  Check(cudaMalloc(reinterpret_cast<void**>(&I.means), size_t(cfg.heads) * headWords * 2), "cudaMalloc (block means)");
  Check(cudaMalloc(reinterpret_cast<void**>(&I.scores), size_t(cfg.heads) * cfg.blocks * 4), "cudaMalloc (block scores)");
  for (int h = 0; h < cfg.heads; ++h)
    Check(cudaMemcpyAsync(I.means + size_t(h) * headWords, means[h], headWords * 2, cudaMemcpyHostToDevice, I.stream), "H2D (block means)");
  Check(cudaStreamSynchronize(I.stream), "upload (block means)");
  static std::once_flag attr;
  std::call_once(attr, [] {
    cudaFuncSetAttribute(SelectTop<kHeldKeys>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSharedSortKeys * sizeof(uint64_t)));
    cudaFuncSetAttribute(SelectTop<0>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSharedSortKeys * sizeof(uint64_t)));
  });
  Check(cudaGetLastError(), "cudaFuncSetAttribute");
}

BlockScores::~BlockScores() = default;

const BlockScoresConfig& BlockScores::Config() const { return impl_->cfg; }

int64_t BlockScores::DeviceBytes() const { return impl_->Bytes(); }

BlockTopKTimes BlockScores::LastTimes() const { return impl_->last; }

int64_t BlockScores::GraphCaptures() const { return impl_->graph.Captures(); }

int64_t BlockScores::TopK(const BlockTopKArgs& a) {
  Impl& I = *impl_;
  const BlockScoresConfig& c = I.cfg;
  if (!Supports(c.headDim, a.group)) throw std::runtime_error("BlockScores: group * headDim is beyond the device scorer");
  if (!SupportsReps(c.blocks, a.reps)) throw std::runtime_error("BlockScores: reps must be a power of two in [1, 16] dividing blocks");
  // The ranked keys: the rows, or their groups of reps (a group ranks by its best row).
  const int64_t ranked = c.blocks / a.reps;
  const int64_t kk = std::max<int64_t>(0, std::min<int64_t>(a.k, ranked));
  const int64_t extra = a.extraIds ? a.extraTotal : 0;
  std::lock_guard<std::mutex> lock(I.mu);
  if (a.reps > 1 && I.groupCap < int64_t(c.heads) * ranked) {
    if (I.groupScores) cudaFree(I.groupScores);
    I.groupScores = nullptr;
    I.groupCap = 0;
    Check(cudaMalloc(reinterpret_cast<void**>(&I.groupScores), size_t(c.heads) * ranked * 4), "cudaMalloc (group scores)");
    I.groupCap = int64_t(c.heads) * ranked;
  }
  float* groupScores = a.reps > 1 ? I.groupScores : nullptr;
  const float* rankedScores = a.reps > 1 ? groupScores : I.scores;
  using Clock = std::chrono::steady_clock;
  const auto ms = [](Clock::time_point a, Clock::time_point b) { return std::chrono::duration<float, std::milli>(b - a).count(); };
  const Clock::time_point t0 = Clock::now();

  // Inputs: q | offsets [heads + 1] | extra ids; outputs: ids | scores | extra scores. Offsets and every output
  // lie where only the shape puts them, and the copies move the extra ids rounded up to kExtraBucket, so a graph
  // captured for one step serves the next (the true count is in the offsets).
  const bool haveExtra = extra > 0;
  const int64_t extraCopied = haveExtra ? (extra + kExtraBucket - 1) / kExtraBucket * kExtraBucket : 0;
  const size_t qBytes = size_t(c.heads) * a.group * c.headDim * 4;
  const size_t offAt = Align(qBytes), idsAt = Align(offAt + size_t(c.heads + 1) * 4);
  const size_t inBytes = haveExtra ? idsAt + size_t(extraCopied) * 4 : qBytes;
  const size_t outScoresAt = Align(size_t(c.heads) * kk * 4), extraAt = Align(outScoresAt + size_t(c.heads) * kk * 4);
  const size_t outBytes = (kk > 0 || haveExtra) ? extraAt + size_t(extraCopied) * 4 : 0;
  Impl::Grow(I.devIn, I.hostIn, I.inCap, inBytes);
  Impl::Grow(I.devOut, I.hostOut, I.outCap, outBytes + 4);
  const int64_t p2 = NextPow2(std::max<int64_t>(kk, 1));
  if (p2 > kSharedSortKeys && size_t(c.heads) * p2 * 8 > I.sortCap) {
    if (I.sortKeys) cudaFree(I.sortKeys);
    I.sortKeys = nullptr;
    I.sortCap = 0;
    Check(cudaMalloc(reinterpret_cast<void**>(&I.sortKeys), size_t(c.heads) * p2 * 8), "cudaMalloc (sort keys)");
    I.sortCap = size_t(c.heads) * p2 * 8;
  }

  std::memcpy(I.hostIn, a.q, qBytes);
  if (haveExtra) {
    int32_t* off = reinterpret_cast<int32_t*>(I.hostIn + offAt);
    off[0] = 0;
    for (int h = 0; h < c.heads; ++h) off[h + 1] = off[h] + a.extraCounts[h];
    std::memcpy(I.hostIn + idsAt, a.extraIds, size_t(extra) * 4);
  }
  const Clock::time_point t1 = Clock::now();
  const dim3 scoreGrid(unsigned((c.blocks + kRowsPerCta - 1) / kRowsPerCta), unsigned(c.heads));
  const size_t qShared = size_t(a.group) * c.headDim * 4;
  const size_t sortShared = p2 <= kSharedSortKeys ? size_t(p2) * 8 : 0;
  // Everything a launch bakes in, for the graph's key (cuda/step_graph.cuh).
  struct Key {
    const void* ptrs[6];
    int64_t kk, p2, group;
    size_t inBytes, outBytes;
    int64_t haveExtra;
    const void* groupScores;
    int64_t reps;
  } key{{I.devIn, I.devOut, I.hostIn, I.hostOut, I.sortKeys, I.scores}, kk, p2, a.group, inBytes, outBytes, haveExtra ? 1 : 0, groupScores, a.reps};
  const auto enqueue = [&](cudaStream_t s, bool events) {
    Check(cudaMemcpyAsync(I.devIn, I.hostIn, inBytes, cudaMemcpyHostToDevice, s), "H2D (step inputs)");
    if (events) Check(cudaEventRecord(I.kStart, s), "event");
    const float* dq = reinterpret_cast<const float*>(I.devIn);
    if (c.dtype == Dtype::kBf16)
      LaunchScore<true>(scoreGrid, qShared, s, I.means, dq, I.scores, c.blocks, c.headDim, a.group, groupScores, a.reps);
    else
      LaunchScore<false>(scoreGrid, qShared, s, I.means, dq, I.scores, c.blocks, c.headDim, a.group, groupScores, a.reps);
    Check(cudaGetLastError(), "ScoreBlocks launch");
    if (events) Check(cudaEventRecord(I.kMid, s), "event");
    if (kk > 0 || haveExtra) {
      int32_t* outIds = reinterpret_cast<int32_t*>(I.devOut);
      float* outScores = reinterpret_cast<float*>(I.devOut + outScoresAt);
      float* extraScores = reinterpret_cast<float*>(I.devOut + extraAt);
      const int32_t* ids = haveExtra ? reinterpret_cast<const int32_t*>(I.devIn + idsAt) : nullptr;
      const int32_t* offsets = reinterpret_cast<const int32_t*>(I.devIn + offAt);
      if (ranked <= int64_t(kHeldKeys) * kSelectThreads)
        SelectTop<kHeldKeys><<<unsigned(c.heads), kSelectThreads, sortShared, s>>>(rankedScores, I.scores, ranked, a.reps, kk, p2, I.sortKeys,
                                                                                  ids, offsets, extraScores, outIds, outScores);
      else
        SelectTop<0><<<unsigned(c.heads), kSelectThreads, sortShared, s>>>(rankedScores, I.scores, ranked, a.reps, kk, p2, I.sortKeys, ids,
                                                                          offsets, extraScores, outIds, outScores);
      Check(cudaGetLastError(), "SelectTop launch");
    }
    if (events) Check(cudaEventRecord(I.kStop, s), "event");
    if (outBytes > 0) Check(cudaMemcpyAsync(I.hostOut, I.devOut, outBytes, cudaMemcpyDeviceToHost, s), "D2H (top blocks)");
  };
  if (a.times)
    enqueue(I.stream, true);
  else
    I.graph.Run(I.stream, &key, sizeof key, [&](cudaStream_t s) { enqueue(s, false); });
  const Clock::time_point t2 = Clock::now();
  Check(cudaStreamSynchronize(I.stream), "block top-k");
  const Clock::time_point t3 = Clock::now();
  BlockTopKTimes& t = I.last;
  t.scoreMs = t.selectMs = 0;
  if (a.times && (cudaEventElapsedTime(&t.scoreMs, I.kStart, I.kMid) != cudaSuccess || cudaEventElapsedTime(&t.selectMs, I.kMid, I.kStop) != cudaSuccess))
    cudaGetLastError();
  const size_t n = size_t(c.heads) * kk;
  if (n > 0) {
    std::memcpy(a.outIds, I.hostOut, n * 4);
    std::memcpy(a.outScores, I.hostOut + outScoresAt, n * 4);
  }
  if (haveExtra) std::memcpy(a.extraScores, I.hostOut + extraAt, size_t(extra) * 4);
  const Clock::time_point t4 = Clock::now();
  t.prepMs = ms(t0, t1);
  t.issueMs = ms(t1, t2);
  t.waitMs = ms(t2, t3);
  t.copyOutMs = ms(t3, t4);
  return kk;
}

}  // namespace cuda
}  // namespace kvr
