// Kernels of the wave decode step's selection and what the estimate shares
// with it, included once, by wave_step.cu (which describes the step's
// order); the estimate's kernels are in wave_step_estimate.cuh.
//
// Scores are summed in the host's AVX2 Dot order (common/simd_math.h): lane
// j of accumulator a takes words 8c + j of the chunks c with c % 2 == a, one
// FMA each, c ascending; then acc = acc0 + acc1, h_j = acc_j + acc_{j+4},
// s = (h0 + h2) + (h1 + h3). A thread pair holds accumulators 0 and 1 of a
// row. headDim % 8 == 0 makes the centroid's first headDim words the same
// chunks as the plain dot, so one pass gives both of kRadius's scores.
// kSpread's three dots (q·mu, q·a, q²·var) are each summed so, and combined
// as the host's cluster_rank.cc is compiled: GCC (C++, -O3 -mfma, where
// floating-point contraction is on by default) turns along·along + channels
// and dot + spread·sd into FMAs, so the kernel calls fmaf there and
// __fmul_rn/__fsqrt_rn elsewhere (nvcc would contract on its own terms). A
// host compiler that contracts differently would move a score by an ulp and,
// rarely, a cluster across the cut; making the host's FMAs explicit
// (std::fma) would pin it.
#pragma once

#include "cuda/cuda_common.cuh"
#include "cuda/wave_moments.cuh"

#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace kvr {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerCta = kThreads / 2;  // thread pairs
constexpr int kGC = 4;                     // q heads summed per pass over a row
constexpr int kMaxQueryFloats = 12288;     // group * (headDim + 8) in shared memory
constexpr int kTile = 512;                 // clusters (or exact rows) per estimate CTA
constexpr int32_t kNoOwner = 0x7f7f7f7f;   // owner[] when no exact row claims a token
// EstimatePart's shared memory: per tile row its source (8 bytes) and kGC
// weights, and the row groups' partial sums (at most kThreads / (d / 8)
// groups × kGC × d floats, 32 KiB for any d).
constexpr size_t kEstimateSmem = size_t(kTile) * 8 + size_t(kGC) * kTile * 4 + size_t(kThreads) * 8 * kGC * 4;
constexpr int kParams = 4;                 // per kv head: budget, target, cluster cap, ids kept after the skip
constexpr int kPartialWarps = 4;           // PartialLogits: warps per CTA, each with [2, d] floats of shared memory

// Asks L2 for the 128-byte lines of [row, row + bytes): the load that needs
// them comes after a tile's setup (list, logits, block reductions), which
// otherwise leaves the memory idle; a hint only (no value changes).
__device__ __forceinline__ void PrefetchRow(const void* row, int bytes) {
  for (int o = 0; o < bytes; o += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const char*>(row) + o));
}

// Each step kernel's first statement. The step may launch a kernel while
// the one before it on the stream is still ending (programmatic dependent
// launch: wave_paths.cuh's StepLauncher); this waits for that kernel's end
// and its writes (at once where the kernel was launched as usual), so every
// kernel sees what all before it wrote, as in plain stream order, and only
// then lets the kernel after it be launched early in turn.
__device__ __forceinline__ void AfterPrior() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// One 16-bit word as a float (exact).
template <bool kBf16>
__device__ __forceinline__ float WidenWord(uint16_t w) {
  if (kBf16) return __uint_as_float(uint32_t(w) << 16);
  return __half2float(__ushort_as_half(w));
}


// A score's rank order: ascending = score descending. -0 and +0 rank equal,
// as they compare on the host.
__device__ __forceinline__ uint32_t RankOrder(float s) {
  uint32_t u = __float_as_uint(s);
  if ((u << 1) == 0) u = 0;
  return ~((u & 0x80000000u) ? ~u : (u | 0x80000000u));
}

// acc[g] += q rows g0.. · row over the chunks c in [c0, c1) with c % 2 == half.
// kLoads chunks are loaded before any is used: a d=128 row's half (8 chunks)
// is then one round trip to memory, not two; the dots are latency-bound.
constexpr int kLoads = 8;
// kShared: row is in shared memory (a plain load; __ldg is global only).
// kSwz (a swizzled shared tile, ScoreClusters): chunk c of the row is stored
// at chunk c ^ sw; only the address moves, the q chunk and the order do not.
template <bool kBf16, bool kShared = false, bool kSwz = false>
__device__ __forceinline__ void Accumulate(const uint16_t* row, const float* qs, int qStride, int g0, int gc, int c0,
                                           int c1, int half, bool live, float (&acc)[kGC][8], int sw = 0) {
  for (int c = c0 + ((c0 ^ half) & 1); c < c1; c += 2 * kLoads) {
    uint4 w[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const uint4* at = reinterpret_cast<const uint4*>(row + (kSwz ? (c + 2 * u) ^ sw : c + 2 * u) * 8);
      w[u] = live && c + 2 * u < c1 ? (kShared ? *at : __ldg(at)) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      if (c + 2 * u >= c1) break;
      float kf[8];
      Widen8Words<kBf16>(w[u], kf);
      FmaChunk(qs + (c + 2 * u) * 8, qStride, g0, gc, kf, acc);
    }
  }
}

// The host's horizontal sum of acc0 + acc1 (the pair's two threads); every
// thread of the warp must call it.
__device__ __forceinline__ float ReducePair(const float (&a)[8]) {
  float s[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) s[j] = a[j] + __shfl_xor_sync(0xffffffffu, a[j], 1);
  const float h0 = s[0] + s[4], h1 = s[1] + s[5], h2 = s[2] + s[6], h3 = s[3] + s[7];
  return (h0 + h2) + (h1 + h3);
}

template <typename T, typename Op>
__device__ T BlockReduce(T v, Op op, T* scratch /* [32] */) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = scratch[0];
  for (int w = 1; w < warps; ++w) r = op(r, scratch[w]);
  __syncthreads();
  return r;
}
// The same horizontal sum over 16 lanes of a warp (lane bit 3: the
// accumulator, bits 0-2: its lane j); lane 0 of each 16 gets the sum. Every
// thread of the warp must call it.
__device__ __forceinline__ float ReduceSixteen(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 8);  // acc0_j + acc1_j
  x += __shfl_xor_sync(0xffffffffu, x, 4);  // h_j = s_j + s_{j+4}
  x += __shfl_xor_sync(0xffffffffu, x, 2);  // h0 + h2, h1 + h3
  x += __shfl_xor_sync(0xffffffffu, x, 1);  // (h0 + h2) + (h1 + h3)
  return x;
}

__device__ __forceinline__ void Zero(float (&acc)[kGC][8]) {
#pragma unroll
  for (int g = 0; g < kGC; ++g)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[g][j] = 0.f;
}

// The second-order logit of a cluster's tokens, with the host's roundings
// (native/kernels/cluster_estimate.cc's Logit as GCC compiles it: C++ with
// -mfma contracts a*b + c into one FMA): w = s·dot, then
// fma(((share·0.5)·s)·s, channels, w), capped at s·fma(norm, radius,
// centroidDot). share = 1 rounds as the host's 0.5·s·s (1·0.5 is exact).
__device__ __forceinline__ float SecondOrderLogit(float scale, float share, float dot, float channels, float centroidDot, float norm,
                                                  float radius) {
  const float coef = __fmul_rn(__fmul_rn(__fmul_rn(share, 0.5f), scale), scale);
  const float w = fmaf(coef, channels, __fmul_rn(scale, dot));
  const float cap = __fmul_rn(scale, fmaf(norm, radius, centroidDot));
  return cap < w ? cap : w;  // std::min(w, cap)
}

// Each head's member lists (its tokens grouped by cluster) and token->cluster
// map, in 16 bits where they fit (issue #13's "GPU memory for the layer <=
// 20% of its K/V": at 4 bytes each they were 1.6 points of it). A member
// is stored as its token less its position in the head's list: a build
// numbers clusters segment by segment (index/wave/cluster-build.ts), so both
// lie in one segment of 8K tokens. A token's cluster is stored less the
// least cluster of its tile of 4096 tokens (tileBase). Where either does not fit
// (clusters made otherwise), both stay 32-bit (wide): one uniform branch.
constexpr int kMapTileShift = 12;
struct ClusterMaps {
  const int32_t* members32;  // wide: [kvHeads, N] tokens
  const int32_t* tokCl32;    // wide: [kvHeads, N] clusters within the head
  const int16_t* members16;  // [kvHeads, N]: token - position
  const uint16_t* tokCl16;   // [kvHeads, N]: cluster - tileBase
  const int32_t* tileBase;   // [kvHeads, tiles]: the least cluster of each tile
  int64_t tiles;
  bool wide;
};
// The token at position pos of head h's member list (pos = memberStart + i).
__device__ __forceinline__ int32_t MemberToken(const ClusterMaps& m, int64_t N, int h, int64_t pos) {
  const size_t at = size_t(h) * N + pos;
  return m.wide ? __ldg(m.members32 + at) : int32_t(pos) + int32_t(__ldg(m.members16 + at));
}
// Token t's cluster within head h.
__device__ __forceinline__ int32_t TokenCluster(const ClusterMaps& m, int64_t N, int h, int32_t t) {
  const size_t at = size_t(h) * N + t;
  return m.wide ? __ldg(m.tokCl32 + at) : __ldg(m.tileBase + size_t(h) * m.tiles + (t >> kMapTileShift)) + int32_t(__ldg(m.tokCl16 + at));
}

struct Add { template <typename T> __device__ T operator()(T a, T b) const { return a + b; } };
struct Max { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };

struct StepParams {
  // store
  const uint16_t *cent, *means, *keys, *values;
  const int8_t* axes;   // [ctot, d]: scaled principal axes, 8-bit codes (common/moment_code.h)
  const uint8_t* vars;  // [ctot, d]: per-channel key variances, 8-bit codes
  const float *axisScales, *varScales;  // [ctot]: their scales
  const int32_t *counts, *memberStart;
  ClusterMaps maps;
  const int64_t* base;  // [kvHeads + 1]: head h's clusters are base[h] .. base[h+1]
  const float* shares;  // [kvHeads]: the second-order term's share per head
  int64_t N, cmax;
  int d, stride, group;
  float scale;
  // kSpread: the spread ranking and the second-order estimate (else the
  // radius ranking and the first-order estimate)
  bool spreadMode;
  float spread;
  // kSpread: partly attended clusters by their remaining rows' own logits (else their moments)
  bool restRows;
  // step inputs (device)
  const float* qAug;       // [qHeads, stride]
  const int64_t* params;   // [kvHeads, kParams]: budget, target, cluster cap, keep
  const int64_t* skip;     // [4], device (an input: it moves with the window, the launches stay): two [lo, hi) ranges of rows dropped from the kept ids (empty: lo == hi)
  const int32_t* exact;
  // The step's sizes as launches bake them in: buckets (StepBucket) of the
  // exact rows' count, the candidates and the kept ids, for strides and grids
  // only, so that the graph's key holds while they move by a row a step. The
  // exact rows' own count is device data (exactN, an input; null: exactCount,
  // the Rest call's 0): every bound on work reads ExactCount.
  int64_t exactCount, tmax, width;
  const int64_t* exactN;
  // scratch
  float* logits;           // [qHeads, cmax]
  uint32_t *ord1, *ord2;  // rank orders (ascending = better): [ctot] clusters, [kvHeads, tmax] candidates
  int32_t *cand, *owner, *removed;
  int32_t *take2, *cum2;  // [kvHeads, tmax]: a candidate kept (0/1); [kvHeads, tmax / kThreads up]: its tiles' sums
  int32_t* touched;   // [kvHeads, rowsMax]: clusters with an exact row, each listed once: FromDots's from the front, the others from the back
  int32_t* touchedN;  // [2, kvHeads]: how many at the front, at the back (kernels over gridDim.y = kvHeads)
  int64_t rowsMax;    // exact rows per head at most: width + exactCount
  int64_t *cnt, *cum, *sel;  // [ctot]: tokens a cluster gives, their scan within the head; sel [kvHeads, 2]: -, candidates
  int32_t* keptIds;          // [kvHeads, width]: the ranked ids outside the skip ranges, at most keep
  int64_t* keptN;            // [kvHeads]
  // The rescored candidates' dots q·k per q head, [qHeads, dotStride] (head
  // h's group, then the candidate; with attend, the exact rows' from
  // ExactDots after them, at tmax + e), and each kept id's candidate
  // position, [kvHeads, width]: with dotsOn, PartialLogitsFromDots and
  // AttendTile read the dots there instead of reading the rows' keys again
  // (the same dot, summed by the same code: bit for bit). Off (the Rest
  // call, or the comparison's old path): every dot recomputed from the keys.
  float* dots;
  int32_t* keptPos;
  int64_t dotStride;
  bool dotsOn;
  bool prefetchRows;  // EstimatePart's cluster tiles ask L2 for their value means first (PrefetchRow)
  bool scoreSplit;    // ScoreClusters<kFuse> waits for its variances only before their pass
  float *pm, *pden, *pnum;
  int64_t* pest;
  int nMain, parts;
  int attendPart0;  // the first part of the exact rows' attention (after the estimate's)
  bool estimateOn, attendOn;
  // outputs (device)
  int32_t* outIds;
  int64_t* outCounts;  // [kvHeads, 2]: ids kept, candidates
  float *out, *lse;
  int64_t* est;
  // The paged store (wave_cache.cuh): keys and values are the row cache's
  // rows, row t of head h at rowSlot[h·N + t] (from 1; not positive: row 0,
  // the zeroed dump, read only by a step that fails); null: the dense store.
  const int32_t* rowSlot;
  // The paged store's cap on the rows a step pages (wave_page_cap.cuh), per
  // cluster: its members the cache lacked and how many of them this step
  // paged; null: no cap (every member paged). A cluster with capAdm < capMis
  // has rows unread: its candidates among them are not rescored (cand ~t)
  // and a partly attended one's rest takes its moments (PagedWhole).
  const int32_t *capMis, *capAdm;
  // With the step's detail (capped): [kvHeads, rowsMax] the partly attended
  // clusters whose rest took moments for want of rows, counted per head in
  // momentN; null: not reported.
  int32_t* momentList;
  unsigned long long* momentN;
  // Where the orders are written (ScoreClusters: the clusters', RescoreHeld:
  // the candidates'), each warp's minima are taken into the cuts' order
  // ranges ([2, kvHeads, 2], wave_select.cuh's OrderRange), which StepClear
  // set to all ones: OrderRange's launch and its pass over the orders saved.
  // Null: OrderRange runs (the Rest call, the old paths).
  uint32_t* range;
  // ScatterPack also takes each exact row position's owner (ExactRows<0>'s
  // atomicMin, one launch less): set where it runs and the owners are used.
  bool packOwners;
};

// OrderRange's minima (lowest order, ~highest) of one CTA's orders o, with
// 0xffffffff (wave_select.cuh's kExcluded) for none, into range[h]: the
// same two minima over the same orders, whichever CTA takes them first.
// The warps' minima meet in shared memory and one lane takes them into
// global memory: a warp each contended on a head's two words (RescoreHeld:
// ~5,300 warps a head), which cost its launch 31 us on the H100 (visit AC).
// Every thread of the CTA calls it (it syncs the CTA).
__device__ __forceinline__ void TakeRange(uint32_t* range, int h, uint32_t o) {
  __shared__ uint32_t m[2];
  if (threadIdx.x == 0) m[0] = m[1] = 0xffffffffu;
  __syncthreads();
  const uint32_t lo = __reduce_min_sync(0xffffffffu, o);
  const uint32_t notHi = __reduce_min_sync(0xffffffffu, o == 0xffffffffu ? 0xffffffffu : ~o);
  if ((threadIdx.x & 31) == 0 && lo != 0xffffffffu) {
    atomicMin(&m[0], lo);
    atomicMin(&m[1], notHi);
  }
  __syncthreads();
  if (threadIdx.x == 0 && m[0] != 0xffffffffu) {
    atomicMin(range + h * 2, m[0]);
    atomicMin(range + h * 2 + 1, m[1]);
  }
}

// Where row t of kv head h starts in keys and in values: every kernel's K/V
// read goes through here, so the paged store runs the dense store's kernels.
// kPaged (the kernels' last template argument, false by default): the dense
// store's kernels carry neither the map nor its branch (as a runtime test it
// cost ExactDots 8 registers, PartialLogits 12 bytes of spill).
template <bool kPaged>
__device__ __forceinline__ int64_t KvRow(const StepParams& p, int h, int64_t t) {
  const int64_t i = int64_t(h) * p.N + t;
  return (kPaged ? int64_t(max(p.rowSlot[i], 0)) : i) * p.d;
}

// Whether every member of cluster c (an index into the store's clusters) is
// on the device this step: always, unless the paged store's cap left some unread.
__device__ __forceinline__ bool PagedWhole(const StepParams& p, int64_t c) { return !p.capAdm || p.capAdm[c] == p.capMis[c]; }

// The exact rows (sinks/window) the step attends: its own count, not the bucket.
__device__ __forceinline__ int64_t ExactCount(const StepParams& p) { return p.exactN ? *p.exactN : p.exactCount; }
// The ids kept (ScatterKept).
__device__ __forceinline__ int64_t Kept(const StepParams& p, int h) { return p.keptN[h]; }
// Exact row j of head h: the selection, then the sinks/window rows.
__device__ __forceinline__ int32_t ExactRow(const StepParams& p, int h, int64_t j, int64_t kept) {
  return j < kept ? p.keptIds[h * p.width + j] : p.exact[j - kept];
}

// One thread pair per cluster (blockIdx.y: the kv head): its rank key, and
// per q head the estimate's logit. kSpread: max over the group of
// fma(spread, sqrt(max(0, fma(along, along, channels))), dot) with dot = q·mu,
// along = q·a, channels = q²·var, the host's cluster_rank.cc as GCC compiles
// it; the logit is second order. kRadius: the optimistic row [q, share·‖q‖]
// against [centroid, radius], the logit s·q·mu.
//
// kStaged (kSpread only): the CTA's centroids, axes and variances are first
// copied into shared memory with cp.async, all at once, and the dots read
// them there: the three passes over a cluster otherwise wait on memory one
// after the other, with few warps per SM (the accumulators take registers)
// to hide it. Staged when the tile and q fit kStagedSmem (two CTAs per SM).
//
// kRows clusters a CTA (2·kRows threads). The step launches kScoreRows where
// it fits: four CTAs of 64 an SM (53 KiB of shared memory each at d=128 and
// 4 q heads a kv head, 116 registers) rather than two of 128 (104 KiB, 124):
// the same 16 warps, but a CTA computes only once its whole tile is in, and
// with four on an SM, copies and dots of different CTAs can overlap where
// two tended to wait together (ncu, H200: 53% of DRAM peak at 128).
//
// kSwz (kStaged, d % 64 == 0 and d / 8 dividing the CTA): the tile's rows
// are 256-byte multiples (the centroids' first d words apart from their
// radius chunk), and row r's 16-byte chunk c sits at c ^ 2(r % 4). A
// 16-byte shared load is served eight lanes at a time: four thread pairs,
// rows 4k..4k+3, each pair the 32 bytes of chunks 2u, 2u+1. Unswizzled,
// those four rows' chunks fall in the same 8 banks (rows 256 bytes apart:
// a 4-way conflict on the axes and variances; 272 apart for the
// centroids: 2-way); swizzled, at chunks 2(u ^ k), 2(u ^ k) + 1: all 32
// banks once. The same words reach the same accumulators in the same
// order: the same scores.
constexpr int kScoreRows = 64;
// The tile: centroid rows (16-bit words), then axis and variance code rows (bytes).
__host__ __device__ constexpr size_t ScoreTileBytes(int d, int stride, int rows = kRowsPerCta) { return size_t(rows) * (stride * 2 + 2 * d); }
constexpr size_t kStagedSmem = 113 * 1024;
// kFullG (kFuse; the launch checks): the group is a multiple of kGC (4 or 8
// q heads a kv head, the usual models), so every pass takes kGC q heads and
// the tests of g < gc per chunk and q head fold away (120 of the kernel's
// 3,470 SASS instructions at d = 64); the same operations in the same order.
template <bool kBf16, bool kStaged, int kRows = kRowsPerCta, bool kSwz = false, bool kFuse = false, bool kFullG = false>
__global__ void __launch_bounds__(2 * kRows, kRows == kScoreRows ? 4 : 1) ScoreClusters(StepParams p) {
  AfterPrior();
  static_assert(!kFuse || kSwz, "AccumulateCentroidAxis reads the swizzled tile");
  static_assert(!kFullG || kFuse, "only the fused launch has the full-group copy");
  // [group, stride]: q, then column d: the norm term; kSpread: then the
  // same again squared (each rounded to f32, as the host's q2), squared once
  // here rather than per cluster; kStaged: then the tile.
  extern __shared__ __align__(16) float qs[];
  const int h = blockIdx.y, qn = p.group * p.stride;
  float* q2 = qs + qn;
  const int64_t b = p.base[h], C = p.base[h + 1] - b, r0 = int64_t(blockIdx.x) * kRows;
  if (r0 >= C) return;  // the grid covers the head with the most clusters
  uint16_t* tile = reinterpret_cast<uint16_t*>(q2 + qn);  // [rows, stride] centroids, then [rows, d] axis codes, [rows, d] variance codes
  const int tileRows = int(min(int64_t(kRows), C - r0));
  const bool staged = kStaged && p.spreadMode;  // the launch stages only kSpread
  // kSwz: [rows, d] centroids, [rows, stride - d] their radius chunks; then (every staged tile) [rows, d] axis codes, [rows, d] variance codes
  const int nd = p.d / 8, ns = p.stride / 8, nt = ns - nd;
  uint16_t* const tileR = tile + size_t(kRows) * p.d;
  uint8_t* const tileA = reinterpret_cast<uint8_t*>(tile + size_t(kRows) * p.stride);
  uint8_t* const tileV = tileA + size_t(kRows) * p.d;
  const uint8_t* const srcA = reinterpret_cast<const uint8_t*>(p.axes + size_t(b + r0) * p.d);
  const uint8_t* const srcV = p.vars + size_t(b + r0) * p.d;
  if (kSwz && staged) {
    const uint4* srcC = reinterpret_cast<const uint4*>(p.cent + size_t(b + r0) * p.stride);
    uint4* dstC = reinterpret_cast<uint4*>(tile);
    uint4* dstR = reinterpret_cast<uint4*>(tileR);
    // nd: a power of two dividing blockDim (the launch checks d % 64 == 0 and
    // d / 8 | 2·kScoreRows): shifts and masks, not divisions' sequences.
    const int lnd = __ffs(nd) - 1, cc = int(threadIdx.x) & (nd - 1), step = int(blockDim.x) >> lnd;
    for (int rr = int(threadIdx.x) >> lnd; rr < tileRows; rr += step)
      __pipeline_memcpy_async(dstC + rr * nd + (cc ^ ((rr & 3) << 1)), srcC + size_t(rr) * ns + cc, 16);
    StageCodes<true>(tileA, srcA, tileRows, nd);
    for (int i = threadIdx.x; i < tileRows * nt; i += blockDim.x) {
      const int rr = nt == 1 ? i : i / nt;  // the step's stride is d + 8: one radius chunk, no division
      __pipeline_memcpy_async(dstR + i, srcC + size_t(rr) * ns + nd + (i - rr * nt), 16);
    }
    if (kFuse && p.scoreSplit) __pipeline_commit();  // the fused pass's part: centroids, radii, axes
    StageCodes<true>(tileV, srcV, tileRows, nd);
    __pipeline_commit();
  } else if (staged) {
    const int nc = tileRows * p.stride / 8;  // 16-byte pieces
    const uint4* srcC = reinterpret_cast<const uint4*>(p.cent + size_t(b + r0) * p.stride);
    uint4* dst = reinterpret_cast<uint4*>(tile);
    for (int i = threadIdx.x; i < nc; i += blockDim.x) __pipeline_memcpy_async(dst + i, srcC + i, 16);
    StageCodes<false>(tileA, srcA, tileRows, nd);
    StageCodes<false>(tileV, srcV, tileRows, nd);
    __pipeline_commit();
  }
  for (int i = threadIdx.x; i < qn; i += blockDim.x) {
    const float x = p.qAug[size_t(h) * qn + i];
    qs[i] = x;
    if (p.spreadMode) q2[i] = __fmul_rn(x, x);
  }
  if (kFuse && staged && p.scoreSplit) __pipeline_wait_prior(1);  // the variances may still be on their way
  else if (staged) __pipeline_wait_prior(0);
  __syncthreads();
  const int half = threadIdx.x & 1;
  const int64_t r = r0 + (threadIdx.x >> 1);
  const bool live = r < C;
  const size_t c = size_t(b + (live ? r : 0));  // a dead pair reads the head's cluster 0 (C >= 1) and writes nothing
  const int tr = live ? int(r - r0) : 0;
  const uint16_t* row = kSwz && staged ? tile + size_t(tr) * p.d : staged ? tile + size_t(tr) * p.stride : p.cent + c * p.stride;
  const int sw = (tr & 3) << 1, sx = tr & CodeSwizzleMask(nd);  // kSwz: the row's chunk swizzle, its code rows' piece swizzle
  float best = -INFINITY;
  float acc[kGC][8];
  if (p.spreadMode) {
    const uint8_t* axis = kStaged ? tileA + size_t(tr) * p.d : reinterpret_cast<const uint8_t*>(p.axes) + c * p.d;
    const uint8_t* var = kStaged ? tileV + size_t(tr) * p.d : p.vars + c * p.d;
    const float axisScale = p.axisScales[c], varScale = p.varScales[c];
    const float radius = WidenWord<kBf16>(kSwz ? tileR[size_t(tr) * (p.stride - p.d)] : row[p.d]), share = p.shares[h];
    for (int g0 = 0; g0 < p.group; g0 += kGC) {
      // uniform over the block: the shuffles below see every lane; kFullG: a constant, no test of g < gc per chunk and q head
      const int gc = kFullG ? kGC : min(kGC, p.group - g0);
      float dot[kGC], along[kGC];
      if (kFuse) {  // kSwz only: the centroid and axis passes in one (AccumulateCentroidAxis)
        float acc2[kGC][8];
        Zero(acc);
        Zero(acc2);
        AccumulateCentroidAxis<kBf16>(row, axis, axisScale, qs, p.stride, g0, gc, nd, half, live, acc, acc2, sw, sx);
#pragma unroll
        for (int g = 0; g < kGC; ++g)
          if (g < gc) {
            dot[g] = ReducePair(acc[g]);
            along[g] = ReducePair(acc2[g]);
          }
      } else {
        Zero(acc);
        Accumulate<kBf16, kStaged, kSwz>(row, qs, p.stride, g0, gc, 0, nd, half, live, acc, sw);
#pragma unroll
        for (int g = 0; g < kGC; ++g)
          if (g < gc) dot[g] = ReducePair(acc[g]);
        Zero(acc);
        AccumulateCodes<MomentCode::kAxis, kStaged, kSwz>(axis, axisScale, qs, p.stride, g0, gc, nd, half, live, acc, sx);
#pragma unroll
        for (int g = 0; g < kGC; ++g)
          if (g < gc) along[g] = ReducePair(acc[g]);
      }
      if (kFuse && p.scoreSplit && g0 == 0) {  // uniform over the block
        __pipeline_wait_prior(0);
        __syncthreads();
      }
      Zero(acc);
      AccumulateCodes<MomentCode::kVar, kStaged, kSwz>(var, varScale, q2, p.stride, g0, gc, nd, half, live, acc, sx);
#pragma unroll
      for (int g = 0; g < kGC; ++g) {
        if (g >= gc) break;
        const float channels = ReducePair(acc[g]);
        const float v = fmaf(along[g], along[g], channels);
        const float sd = __fsqrt_rn(0.f < v ? v : 0.f);  // std::max(0.f, v)
        const float s = fmaf(p.spread, sd, dot[g]);
        best = best < s ? s : best;  // std::max
        if (half == 0 && live)
          p.logits[size_t(h * p.group + g0 + g) * p.cmax + r] =
              SecondOrderLogit(p.scale, share, dot[g], channels, dot[g], qs[(g0 + g) * p.stride + p.d], radius);
      }
    }
  } else {
    for (int g0 = 0; g0 < p.group; g0 += kGC) {
      const int gc = min(kGC, p.group - g0);
      Zero(acc);
      Accumulate<kBf16>(row, qs, p.stride, g0, gc, 0, nd, half, live, acc);
#pragma unroll
      for (int g = 0; g < kGC; ++g) {
        if (g >= gc) break;
        const float dot = ReducePair(acc[g]);
        if (half == 0 && live) p.logits[size_t(h * p.group + g0 + g) * p.cmax + r] = __fmul_rn(p.scale, dot);
      }
      // The radius chunk continues the same accumulators: the host's Dot over stride words.
      Accumulate<kBf16>(row, qs, p.stride, g0, gc, nd, ns, half, live, acc);
#pragma unroll
      for (int g = 0; g < kGC; ++g) {
        if (g >= gc) break;
        const float s = ReducePair(acc[g]);
        best = best < s ? s : best;  // std::max
      }
    }
  }
  const uint32_t order = RankOrder(best);
  if (half == 0 && live) p.ord1[b + r] = order;
  if (p.range) TakeRange(p.range, h, half == 0 && live ? order : 0xffffffffu);  // uniform; every lane is here
}

// The step's ScoreClusters launch (Rest keeps its own): four CTAs of
// kScoreRows an SM where their tiles fit (d=128 with up to 4 q heads a kv
// head: 53 KiB each), swizzled where rows are 256-byte multiples and a row's
// chunks divide the CTA; else two staged CTAs of 128, else unstaged.
// qSmem: one [group, stride] copy of q in floats.
// fuse (with the swizzle): the centroid and axis passes share their q loads.
void LaunchScoreClusters(const StepParams& p, bool bf16, bool legacy, bool swizzle, bool fuse, size_t qSmem, int64_t cmax, int H,
                         cudaStream_t s) {
  const int d = p.d;
  const dim3 scoreGrid(unsigned((cmax + kRowsPerCta - 1) / kRowsPerCta), unsigned(H));
  const size_t scoreSmem = qSmem * (p.spreadMode ? 2 : 1);  // kSpread: q and its square
  const size_t stagedSmem = 2 * qSmem + ScoreTileBytes(d, p.stride);
  const size_t quarterSmem = 2 * qSmem + ScoreTileBytes(d, p.stride, kScoreRows);
  const bool swizzled = swizzle && d % 64 == 0 && (2 * kScoreRows) % (d / 8) == 0;
  if (!legacy && p.spreadMode && quarterSmem <= kStagedSmem / 2) {
    const dim3 grid(unsigned((cmax + kScoreRows - 1) / kScoreRows), unsigned(H));
    const bool full = p.group % kGC == 0;  // kFullG
    if (swizzled && fuse && bf16 && full) ScoreClusters<true, true, kScoreRows, true, true, true><<<grid, 2 * kScoreRows, quarterSmem, s>>>(p);
    else if (swizzled && fuse && full) ScoreClusters<false, true, kScoreRows, true, true, true><<<grid, 2 * kScoreRows, quarterSmem, s>>>(p);
    else if (swizzled && fuse && bf16) ScoreClusters<true, true, kScoreRows, true, true><<<grid, 2 * kScoreRows, quarterSmem, s>>>(p);
    else if (swizzled && fuse) ScoreClusters<false, true, kScoreRows, true, true><<<grid, 2 * kScoreRows, quarterSmem, s>>>(p);
    else if (swizzled && bf16) ScoreClusters<true, true, kScoreRows, true><<<grid, 2 * kScoreRows, quarterSmem, s>>>(p);
    else if (swizzled) ScoreClusters<false, true, kScoreRows, true><<<grid, 2 * kScoreRows, quarterSmem, s>>>(p);
    else if (bf16) ScoreClusters<true, true, kScoreRows><<<grid, 2 * kScoreRows, quarterSmem, s>>>(p);
    else ScoreClusters<false, true, kScoreRows><<<grid, 2 * kScoreRows, quarterSmem, s>>>(p);
  } else if (p.spreadMode && stagedSmem <= kStagedSmem) {
    if (bf16) ScoreClusters<true, true><<<scoreGrid, kThreads, stagedSmem, s>>>(p);
    else ScoreClusters<false, true><<<scoreGrid, kThreads, stagedSmem, s>>>(p);
  } else {
    if (bf16) ScoreClusters<true, false><<<scoreGrid, kThreads, scoreSmem, s>>>(p);
    else ScoreClusters<false, false><<<scoreGrid, kThreads, scoreSmem, s>>>(p);
  }
}

// Exclusive prefix of x over the block, in thread order; total: the sum.
__device__ int BlockExclusiveScan(int x, int* scratch /* [32] */, int& total) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  int inc = x;
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += y;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = inc;
  __syncthreads();
  int before = 0;
  total = 0;
  for (int w = 0; w < warps; ++w) {
    if (w < warp) before += scratch[w];
    total += scratch[w];
  }
  __syncthreads();
  return before + inc - x;
}

// kGC values reduced over the block at once; every thread gets the results.
template <typename Op>
__device__ void BlockReduceGC(float (&v)[kGC], Op op, float* scratch /* [32 * kGC] */) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
#pragma unroll
  for (int g = 0; g < kGC; ++g)
    for (int o = 16; o > 0; o >>= 1) v[g] = op(v[g], __shfl_down_sync(0xffffffffu, v[g], o));
  __syncthreads();
  if (lane == 0)
#pragma unroll
    for (int g = 0; g < kGC; ++g) scratch[warp * kGC + g] = v[g];
  __syncthreads();
#pragma unroll
  for (int g = 0; g < kGC; ++g) {
    float r = scratch[g];
    for (int w = 1; w < warps; ++w) r = op(r, scratch[w * kGC + g]);
    v[g] = r;
  }
  __syncthreads();
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
