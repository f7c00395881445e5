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
#include "cuda/block_score_kernels.cuh"
#include "cuda/step_graph.cuh"

namespace kvr {
namespace cuda {
namespace {

constexpr int kSelectThreads = 1024;
constexpr int64_t kSharedSortKeys = 8192;  // 64 KiB of keys: larger sorts run in global memory
constexpr int64_t kExtraBucket = 2048;     // extra ids a graph's copies move, rounded up to (8 KiB)

__device__ __forceinline__ int32_t IdOf(uint64_t key) { return int32_t(0xffffffffu - uint32_t(key)); }

// Blocks a select thread holds in registers (blocks <= kHeldKeys *
// kSelectThreads: 16,384, a 1M-token head); larger heads re-read scores.
constexpr int kHeldKeys = 16;
// The select in two launches (SelectMode): slices of kSliceKeys keys, 2 a thread; a head's candidates, 4 a thread.
constexpr int kSliceItems = 2, kCandItems = 4;
constexpr int64_t kSliceKeys = int64_t(kSliceItems) * kSelectThreads;

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

// The select in one launch (kWhole), or in two (by default; KVRECALL_BLOCK_SELECT_SLICED=0 keeps one: 0.034 ->
// 0.027 ms at 1M on an H100, session 28): kSlice, a CTA per slice of `span` keys of a head, writes the slice's best min(kk, its keys) keys to its kk
// candidate slots (zeros after); kCands, a CTA per head, selects from the head's `span` slots (zeros are not
// keys) as kWhole does from the scores. The head's best kk are among its slices' best kk each, so the answer is
// kWhole's. Why: the select's time grows with the keys a CTA holds (the rows' 65,536 a head took 0.149 ms, the
// groups' 16,384 0.034, visit AE), each pass a match and an atomic a key, and kWhole runs one CTA a head, 8 of
// the H100's 132 SMs; slices of 2,048 spread the passes over 8 CTAs a head and leave the second launch
// ~1,500 keys a head.
enum SelectMode { kWhole = 0, kSlice = 1, kCands = 2 };

// One CTA per kv head: the head's best kk = min(k, blocks) blocks, best
// first, and its extra scores. The sort runs over p2 keys of shared memory
// when p2 <= kSharedSortKeys, else over the head's p2 keys of global scratch.
// kSlice / kCands: SelectMode; blocks is the head's ranked keys (the scores' stride) in every mode.
template <int kItems, int kMode = kWhole>
__global__ void __launch_bounds__(kSelectThreads) SelectTop(const float* __restrict__ scores, const float* __restrict__ extraFrom,
                                                            int64_t blocks, int idScale, int64_t kk, int64_t p2,
                                                            uint64_t* __restrict__ globalKeys, const int32_t* __restrict__ extraIds,
                                                            const int32_t* __restrict__ extraOffsets, float* __restrict__ extraScores,
                                                            int32_t* __restrict__ outIds, float* __restrict__ outScores,
                                                            uint64_t* __restrict__ cands = nullptr, int64_t span = 0) {
  static_assert(kMode == kWhole || kItems > 0, "slices and candidates are held in registers");
  extern __shared__ uint64_t sharedKeys[];
  __shared__ unsigned hist[256];
  __shared__ uint64_t sPrefix, sMask;
  __shared__ unsigned sNeed, sCount;
  __shared__ int sDone;
  const int h = kMode == kSlice ? blockIdx.y : blockIdx.x, tid = threadIdx.x, lane = tid & 31, bd = blockDim.x;
  const float* sc = scores + size_t(h) * blocks;
  // The keys this CTA scans (n; a slice's start lo) and how many it keeps.
  const int64_t lo = kMode == kSlice ? int64_t(blockIdx.x) * span : 0;
  const int64_t n = kMode == kWhole ? blocks : kMode == kSlice ? (blocks - lo < span ? blocks - lo : span) : span;
  const int64_t keep = kMode == kSlice && n < kk ? n : kk;
  const uint64_t* headCands = kMode == kCands ? cands + size_t(h) * span : nullptr;

  // Extra ids are rows of extraFrom (the row scores; `scores` itself unless groups of rows are ranked).
  if (kMode != kSlice && extraIds) {
    const float* ex = extraFrom + size_t(h) * blocks * idScale;
    for (int64_t e = extraOffsets[h] + tid; e < extraOffsets[h + 1]; e += bd) extraScores[e] = ex[extraIds[e]];
  }
  if (kk == 0) return;
  uint64_t held[kItems > 0 ? kItems : 1];
  if constexpr (kItems > 0) {
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = tid + int64_t(j) * bd;
      if constexpr (kMode == kCands)
        held[j] = i < n ? headCands[i] : uint64_t(0);
      else
        held[j] = i < n ? KeyOf(sc[lo + i], lo + i) : uint64_t(0);
    }
  }

  // The kk-th best key T, a digit of 8 bits at a time from the top: every
  // block whose key is >= T is selected, exactly kk of them.
  uint64_t prefix = 0;
  if (keep < n) {
    uint64_t mask = 0;
    unsigned need = unsigned(keep);
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += bd) hist[i] = 0;
      __syncthreads();
      EachKey<kItems>(held, sc, n, tid, bd, [&](uint64_t key, bool valid) {
        // A candidate slot past its slice's keys holds 0, below every key (KeyOf's low word is 0xffffffff - id).
        if constexpr (kMode == kCands) valid = valid && key != 0;
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
  // (below every key) to p2; a slice's into its kk candidate slots.
  uint64_t* keys = kMode == kSlice ? cands + (size_t(h) * gridDim.x + blockIdx.x) * kk : p2 <= kSharedSortKeys ? sharedKeys : globalKeys + size_t(h) * p2;
  const int64_t cap = kMode == kSlice ? kk : p2;
  if (tid == 0) sCount = 0;
  for (int64_t i = tid; i < cap; i += bd) keys[i] = 0;
  __syncthreads();
  EachKey<kItems>(held, sc, n, tid, bd, [&](uint64_t key, bool valid) {
    if constexpr (kMode == kCands) valid = valid && key != 0;
    const bool take = valid && key >= prefix;
    const unsigned ballot = __ballot_sync(0xffffffffu, take);
    unsigned first = 0;
    if (lane == 0 && ballot) first = atomicAdd(&sCount, unsigned(__popc(ballot)));
    first = __shfl_sync(0xffffffffu, first, 0);
    if (take) {
      const unsigned at = first + unsigned(__popc(ballot & ((1u << lane) - 1u)));
      if (at < cap) keys[at] = key;
    }
  });
  if constexpr (kMode == kSlice) return;  // unsorted: the second launch sorts the head's best
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
  cudaEvent_t callStart = nullptr, callStop = nullptr;  // around a step's copies and kernels (args.deviceTime)
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
  // KVRECALL_BLOCK_SCORES_PIPED=0 turns off (read at construction; on by default since session 28's H100 visit,
  // 0.077 -> 0.064 ms at 1M, bench/results/block-select-stages-gpu-h100.md): the staged shapes' score kernel walks tiles in
  // this many CTAs a head, its copies overlapping its sums (block_score_kernels.cuh ScoreBlocksPiped); 0: off.
  int pipedCtas = 0;
  // KVRECALL_BLOCK_SELECT_SLICED=0 turns off (read at construction; on by default, 0.034 -> 0.027 ms): the select in two launches where it fits
  // (SelectMode), its candidates in cands [heads, slices, kk].
  bool sliced = false;
  uint64_t* cands = nullptr;
  size_t candCap = 0;

  ~Impl() {
    if (stream) cudaStreamSynchronize(stream);
    for (void* p : {static_cast<void*>(means), static_cast<void*>(scores), static_cast<void*>(devIn), static_cast<void*>(devOut),
                    static_cast<void*>(sortKeys), static_cast<void*>(groupScores), static_cast<void*>(cands)})
      if (p) cudaFree(p);
    if (hostIn) cudaFreeHost(hostIn);
    if (hostOut) cudaFreeHost(hostOut);
    for (cudaEvent_t e : {kStart, kMid, kStop, callStart, callStop})
      if (e) cudaEventDestroy(e);
    if (stream) cudaStreamDestroy(stream);
    cudaGetLastError();
  }

  int64_t Bytes() const {
    return int64_t(size_t(cfg.heads) * cfg.blocks * cfg.headDim * 2 + size_t(cfg.heads) * cfg.blocks * 4 + inCap + outCap + sortCap + size_t(groupCap) * 4 + candCap);
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
  Check(cudaEventCreate(&I.callStart), "event");
  Check(cudaEventCreate(&I.callStop), "event");
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
    cudaFuncSetAttribute(SelectTop<kCandItems, kCands>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSharedSortKeys * sizeof(uint64_t)));
    cudaFuncSetAttribute(ScoreBlocksPiped<false, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(PipedShared(kStagedMaxD, 4)));
    cudaFuncSetAttribute(ScoreBlocksPiped<true, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(PipedShared(kStagedMaxD, 4)));
  });
  Check(cudaGetLastError(), "cudaFuncSetAttribute");
  const char* sliced = std::getenv("KVRECALL_BLOCK_SELECT_SLICED");
  I.sliced = !(sliced && std::strcmp(sliced, "0") == 0);
  const char* piped = std::getenv("KVRECALL_BLOCK_SCORES_PIPED");
  if (!(piped && std::strcmp(piped, "0") == 0) && cfg.headDim <= kStagedMaxD) {
    // As many CTAs as the device holds at once, shared by the heads (each walks its head's tiles). A query that
    // fails leaves the staged kernel in place.
    int sms = 0, perSm = 0;
    const auto fn = cfg.dtype == Dtype::kBf16 ? ScoreBlocksPiped<true, 4> : ScoreBlocksPiped<false, 4>;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0) == cudaSuccess &&
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&perSm, fn, kScoreThreads, PipedShared(cfg.headDim, 4)) == cudaSuccess && perSm > 0)
      I.pipedCtas = std::max(1, sms * perSm / cfg.heads);
    cudaGetLastError();
  }
}

BlockScores::~BlockScores() = default;

const BlockScoresConfig& BlockScores::Config() const { return impl_->cfg; }

int64_t BlockScores::DeviceBytes() const { return impl_->Bytes(); }

BlockTopKTimes BlockScores::LastTimes() const { return impl_->last; }

int64_t BlockScores::GraphCaptures() const { return impl_->graph.Captures(); }

bool BlockScores::PipedScores() const { return impl_->pipedCtas > 0; }

bool BlockScores::SlicedSelect() const { return impl_->sliced; }

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
  // The select in two launches (SelectMode) where the heads' slices' candidates fit a CTA's registers.
  const int64_t slices = (ranked + kSliceKeys - 1) / kSliceKeys;
  const bool twoLaunches = I.sliced && kk > 0 && slices >= 2 && slices * kk <= int64_t(kCandItems) * kSelectThreads;
  if (twoLaunches && size_t(c.heads) * slices * kk * 8 > I.candCap) {
    if (I.cands) cudaFree(I.cands);
    I.cands = nullptr;
    I.candCap = 0;
    Check(cudaMalloc(reinterpret_cast<void**>(&I.cands), size_t(c.heads) * slices * kk * 8), "cudaMalloc (select candidates)");
    I.candCap = size_t(c.heads) * slices * kk * 8;
  }
  // Everything a launch bakes in, for the graph's key (cuda/step_graph.cuh).
  struct Key {
    const void* ptrs[6];
    int64_t kk, p2, group;
    size_t inBytes, outBytes;
    int64_t haveExtra;
    const void* groupScores;
    int64_t reps;
    int64_t deviceTime;
    int64_t slices;
    const void* cands;
  } key{{I.devIn, I.devOut, I.hostIn, I.hostOut, I.sortKeys, I.scores}, kk, p2, a.group, inBytes, outBytes, haveExtra ? 1 : 0, groupScores, a.reps,
        a.deviceTime ? 1 : 0, twoLaunches ? slices : 0, twoLaunches ? I.cands : nullptr};
  // The call's device time: events around its copies and kernels, recorded by the device when it reaches them,
  // so a host's late launch is not in it. In a capture they are the graph's own nodes (External: a record, not a
  // dependency); a graph of their own, so the engine's steps (deviceTime off) replay one without them.
  const auto record = [&](cudaEvent_t e, cudaStream_t s, bool capturing) {
    Check(capturing ? cudaEventRecordWithFlags(e, s, cudaEventRecordExternal) : cudaEventRecord(e, s), "event");
  };
  const auto enqueue = [&](cudaStream_t s, bool events) {
    if (a.deviceTime) record(I.callStart, s, !events);
    Check(cudaMemcpyAsync(I.devIn, I.hostIn, inBytes, cudaMemcpyHostToDevice, s), "H2D (step inputs)");
    if (events) Check(cudaEventRecord(I.kStart, s), "event");
    const float* dq = reinterpret_cast<const float*>(I.devIn);
    if (c.dtype == Dtype::kBf16)
      LaunchScore<true>(scoreGrid, qShared, s, I.means, dq, I.scores, c.blocks, c.headDim, a.group, groupScores, a.reps, I.pipedCtas);
    else
      LaunchScore<false>(scoreGrid, qShared, s, I.means, dq, I.scores, c.blocks, c.headDim, a.group, groupScores, a.reps, I.pipedCtas);
    Check(cudaGetLastError(), "ScoreBlocks launch");
    if (events) Check(cudaEventRecord(I.kMid, s), "event");
    if (kk > 0 || haveExtra) {
      int32_t* outIds = reinterpret_cast<int32_t*>(I.devOut);
      float* outScores = reinterpret_cast<float*>(I.devOut + outScoresAt);
      float* extraScores = reinterpret_cast<float*>(I.devOut + extraAt);
      const int32_t* ids = haveExtra ? reinterpret_cast<const int32_t*>(I.devIn + idsAt) : nullptr;
      const int32_t* offsets = reinterpret_cast<const int32_t*>(I.devIn + offAt);
      if (twoLaunches) {
        SelectTop<kSliceItems, kSlice><<<dim3(unsigned(slices), unsigned(c.heads)), kSelectThreads, 0, s>>>(
            rankedScores, I.scores, ranked, a.reps, kk, p2, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, I.cands, kSliceKeys);
        Check(cudaGetLastError(), "SelectTop (slices) launch");
        SelectTop<kCandItems, kCands><<<unsigned(c.heads), kSelectThreads, sortShared, s>>>(rankedScores, I.scores, ranked, a.reps, kk, p2, I.sortKeys,
                                                                                           ids, offsets, extraScores, outIds, outScores, I.cands,
                                                                                           slices * kk);
      } else if (ranked <= int64_t(kHeldKeys) * kSelectThreads)
        SelectTop<kHeldKeys><<<unsigned(c.heads), kSelectThreads, sortShared, s>>>(rankedScores, I.scores, ranked, a.reps, kk, p2, I.sortKeys,
                                                                                  ids, offsets, extraScores, outIds, outScores);
      else
        SelectTop<0><<<unsigned(c.heads), kSelectThreads, sortShared, s>>>(rankedScores, I.scores, ranked, a.reps, kk, p2, I.sortKeys, ids,
                                                                          offsets, extraScores, outIds, outScores);
      Check(cudaGetLastError(), "SelectTop launch");
    }
    if (events) Check(cudaEventRecord(I.kStop, s), "event");
    if (outBytes > 0) Check(cudaMemcpyAsync(I.hostOut, I.devOut, outBytes, cudaMemcpyDeviceToHost, s), "D2H (top blocks)");
    if (a.deviceTime) record(I.callStop, s, !events);
  };
  if (a.times)
    enqueue(I.stream, true);
  else
    I.graph.Run(I.stream, &key, sizeof key, [&](cudaStream_t s) { enqueue(s, false); });
  const Clock::time_point t2 = Clock::now();
  Check(cudaStreamSynchronize(I.stream), "block top-k");
  const Clock::time_point t3 = Clock::now();
  BlockTopKTimes& t = I.last;
  t.scoreMs = t.selectMs = t.deviceMs = 0;
  if (a.times && (cudaEventElapsedTime(&t.scoreMs, I.kStart, I.kMid) != cudaSuccess || cudaEventElapsedTime(&t.selectMs, I.kMid, I.kStop) != cudaSuccess))
    cudaGetLastError();
  if (a.deviceTime && cudaEventElapsedTime(&t.deviceMs, I.callStart, I.callStop) != cudaSuccess) cudaGetLastError();
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
