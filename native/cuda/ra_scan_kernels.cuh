// Kernels of the device code scan (ra_scan.h says what a search computes
// and why), included once, by ra_scan.cu. Both cuts (the candidates among
// every key, the answer among the keys scored) are wave_select.cuh's radix
// select over a policy of their own; what is taken is then placed in index
// order (a per-tile count, a scan of the tiles, a placement), so the lists
// and the sums over them do not depend on the order atomics ran in.
#pragma once

#include "cuda/wave_select.cuh"

#include <cub/block/block_scan.cuh>

#include <cmath>
#include <cstdint>

namespace kvr {
namespace cuda {
namespace {

constexpr int kScanMaxG = 16;
constexpr int kScanWarps = kThreads / 32;  // rows scored at once by a CTA of the exact kernels
constexpr int kScanPerThread = 4;          // keys a thread in ScanCodes
constexpr int kReduceThreads = 1024;       // SampleReduce and Refine: one CTA a head
constexpr int kSeedMax = 16;               // the sample's seeds at most (kSampleSeeds on the host)

struct ScanParams {
  int H = 0, G = 0, G4 = 0, d = 0, half = 0;
  int64_t n = 0, words = 0;  // keys a head; 32-bit words of a head's bitmaps
  float scale = 0.f;
  int64_t m = 0, stride = 1, off = 0;  // the strided sample: keys off + j·stride, j < m
  int sampleSeeds = 0;                 // min(16, m / 64)
  int64_t want = 0;                    // candidates a head: max(0, cap − m)
  int64_t cap = 0;                     // capacity of a head's lists: want + m
  int64_t k = 0;
  // The store's data.
  const uint8_t* codes = nullptr;      // [H, n, half]
  const uint16_t* keys = nullptr;      // [H, n, d]
  const uint32_t* entryBits = nullptr; // [H, words]
  uint32_t* seedBits = nullptr;        // [H, words]: the step's seeds (set, then cleared by the step)
  uint32_t* freeBits = nullptr;        // [H, words]: the step's free keys (likewise)
  // The step's inputs.
  const float* q = nullptr;            // [H * G, d]
  const int8_t* w8 = nullptr;          // [H, G4, d]
  const float* qscale = nullptr;       // [H, G4]
  const float* qbias = nullptr;        // [H, G4]
  const int32_t* seeds = nullptr;
  const int64_t* seedStart = nullptr;  // [H + 1]
  const int32_t* freeIds = nullptr;
  const int64_t* freeStart = nullptr;  // [H + 1]
  // Work.
  float* freeX = nullptr;              // [free total, G]
  float* sampleX = nullptr;            // [H, m, G]
  uint8_t* reached = nullptr;          // [H, m]: sample keys among the candidates
  float* c0 = nullptr;                 // [H, kScanMaxG]: log-partitions before the scan
  int32_t* sampleSeedIds = nullptr;    // [H, kSeedMax]
  uint32_t* ord = nullptr;             // [H, n]: the candidates' cut
  int32_t* cand = nullptr;             // [H, cap]: candidates, then the unreached sample
  float* candX = nullptr;              // [H, cap, G]
  float* candScore = nullptr;          // [H, cap]
  uint32_t* ord2 = nullptr;            // [H, cap]: the answer's cut
  int64_t* finalCount = nullptr;       // [H]
  // Out (one device block, copied back at once).
  int32_t* outIds = nullptr;           // [H, k]
  float* outScores = nullptr;          // [H, k]
  int64_t* outCounts = nullptr;        // [H]
  int64_t* outScanned = nullptr;       // [H]
};

__device__ __forceinline__ bool TestBit(const uint32_t* bits, int64_t id) { return (bits[id >> 5] >> (id & 31)) & 1u; }
__device__ __forceinline__ int IdBits(int64_t n) { return n > 1 ? 32 - __clz(uint32_t(n - 1)) : 0; }

// The candidates' cut: every key of a head, the best `want`.
struct ScanCodeCut {
  static constexpr bool kUnit = true;
  const uint32_t* ord;
  int64_t n, want;
  __device__ int64_t Begin(int h) const { return int64_t(h) * n; }
  __device__ int64_t Len(int) const { return n; }
  __device__ uint32_t Index(int h, int64_t i) const { return uint32_t(i - int64_t(h) * n); }
  __device__ int64_t Weight(int64_t) const { return 1; }
  __device__ int64_t Target(int) const { return want; }
  __device__ int64_t Cap(int) const { return want; }
  __device__ int IndexBits(int) const { return IdBits(n); }
};
// The answer's cut: the keys scored and the unreached sample, the best k.
struct ScanFinalCut {
  static constexpr bool kUnit = true;
  const uint32_t* ord;
  const int32_t* ids;
  const int64_t* count;
  int64_t cap, k, n;
  __device__ int64_t Begin(int h) const { return int64_t(h) * cap; }
  __device__ int64_t Len(int h) const { return count[h]; }
  __device__ uint32_t Index(int, int64_t i) const { return uint32_t(ids[i]); }
  __device__ int64_t Weight(int64_t) const { return 1; }
  __device__ int64_t Target(int) const { return k; }
  __device__ int64_t Cap(int) const { return k; }
  __device__ int IndexBits(int) const { return IdBits(n); }
};

// Sets (or clears) the bits of head h's list ids[start[h] .. start[h + 1]).
template <bool kSet>
__global__ void MarkList(uint32_t* bits, int64_t words, const int32_t* ids, const int64_t* start) {
  AfterPrior();
  const int h = blockIdx.y;
  const int64_t b = start[h], e = start[h + 1];
  for (int64_t i = b + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < e; i += int64_t(gridDim.x) * blockDim.x) {
    const int32_t id = ids[i];
    uint32_t* w = bits + size_t(h) * words + (id >> 5);
    if (kSet) atomicOr(w, 1u << (id & 31));
    else atomicAnd(w, ~(1u << (id & 31)));
  }
}

// The G logits scale·q_g·k of one row, by one warp: lane l reads channels
// 4l + 128i .. + 3, the q rows from shared memory ([G, d] floats); every lane
// ends with all G sums (butterfly).
template <bool kBf16>
__device__ __forceinline__ void WarpLogits(const uint16_t* row, const float* sq, int G, int d, float scale, float (&x)[kScanMaxG]) {
  const int lane = threadIdx.x & 31;
  float acc[kScanMaxG];
#pragma unroll
  for (int g = 0; g < kScanMaxG; ++g) acc[g] = 0.f;
  for (int c = lane * 4; c < d; c += 128) {
    const uint2 w = __ldg(reinterpret_cast<const uint2*>(row + c));
    const float k0 = WidenWord<kBf16>(uint16_t(w.x & 0xffffu)), k1 = WidenWord<kBf16>(uint16_t(w.x >> 16));
    const float k2 = WidenWord<kBf16>(uint16_t(w.y & 0xffffu)), k3 = WidenWord<kBf16>(uint16_t(w.y >> 16));
#pragma unroll
    for (int g = 0; g < kScanMaxG; ++g) {
      if (g >= G) break;
      const float4 qv = *reinterpret_cast<const float4*>(sq + g * d + c);
      acc[g] = fmaf(qv.x, k0, fmaf(qv.y, k1, fmaf(qv.z, k2, fmaf(qv.w, k3, acc[g]))));
    }
  }
#pragma unroll
  for (int g = 0; g < kScanMaxG; ++g) {
    if (g >= G) break;
    float v = acc[g];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    x[g] = scale * v;
  }
}

// Head h's q rows into shared memory (G·d floats).
__device__ __forceinline__ void LoadQ(const ScanParams& p, int h, float* sq) {
  for (int i = threadIdx.x; i < p.G * p.d; i += blockDim.x) sq[i] = p.q[size_t(h) * p.G * p.d + i];
  __syncthreads();
}

// Steps 0-1's logits: the free keys', then the sample's, a warp a key.
template <bool kBf16>
__global__ void SampleLogits(ScanParams p) {
  AfterPrior();
  extern __shared__ __align__(16) float scanQ[];
  float* const sq = scanQ;
  const int h = blockIdx.y;
  LoadQ(p, h, sq);
  const int64_t fb = p.freeStart[h], nf = p.freeStart[h + 1] - fb;
  const int64_t warp = int64_t(blockIdx.x) * kScanWarps + (threadIdx.x >> 5), warps = int64_t(gridDim.x) * kScanWarps;
  const uint16_t* keys = p.keys + size_t(h) * p.n * p.d;
  for (int64_t i = warp; i < nf + p.m; i += warps) {
    const int64_t id = i < nf ? int64_t(p.freeIds[fb + i]) : p.off + (i - nf) * p.stride;
    float x[kScanMaxG];
    WarpLogits<kBf16>(keys + size_t(id) * p.d, sq, p.G, p.d, p.scale, x);
    float* dst = i < nf ? p.freeX + size_t(fb + i) * p.G : p.sampleX + (size_t(h) * p.m + size_t(i - nf)) * p.G;
    if ((threadIdx.x & 31) < p.G) {
#pragma unroll
      for (int g = 0; g < kScanMaxG; ++g)
        if (g == (threadIdx.x & 31)) dst[g] = x[g];
    }
  }
}

// Max, then the exp-sum shifted by it, in double, over the block: what the
// host's LogSum gives (up to rounding).
__device__ __forceinline__ double BlockMaxD(double v, double* scratch) {
  struct MaxD { __device__ double operator()(double a, double b) const { return a > b ? a : b; } };
  return BlockReduce(v, MaxD(), scratch);
}

// Step 1's partitions and the sample's seeds, one CTA a head.
__global__ void __launch_bounds__(kReduceThreads) SampleReduce(ScanParams p) {
  AfterPrior();
  __shared__ double scratch[32];
  __shared__ double rank[4096];  // the sample's seed ranks (m <= 4096)
  const int h = blockIdx.x;
  const int64_t fb = p.freeStart[h], nf = p.freeStart[h + 1] - fb;
  const uint32_t* freeBits = p.freeBits + size_t(h) * p.words;
  const float* sx = p.sampleX + size_t(h) * p.m * p.G;
  int64_t others = 0;
  for (int64_t j = threadIdx.x; j < p.m; j += blockDim.x) others += TestBit(freeBits, p.off + j * p.stride) ? 0 : 1;
  others = BlockReduce(others, Add(), reinterpret_cast<int64_t*>(scratch));
  float* c0 = p.c0 + size_t(h) * kScanMaxG;
  for (int g = 0; g < p.G; ++g) {
    double mx = -INFINITY;
    for (int64_t i = threadIdx.x; i < nf; i += blockDim.x) mx = fmax(mx, double(p.freeX[size_t(fb + i) * p.G + g]));
    for (int64_t j = threadIdx.x; j < p.m; j += blockDim.x)
      if (!TestBit(freeBits, p.off + j * p.stride)) mx = fmax(mx, double(sx[size_t(j) * p.G + g]));
    mx = BlockMaxD(mx, scratch);
    double fs = 0, ss = 0;
    for (int64_t i = threadIdx.x; i < nf; i += blockDim.x) fs += exp(double(p.freeX[size_t(fb + i) * p.G + g]) - mx);
    for (int64_t j = threadIdx.x; j < p.m; j += blockDim.x)
      if (!TestBit(freeBits, p.off + j * p.stride)) ss += exp(double(sx[size_t(j) * p.G + g]) - mx);
    fs = BlockReduce(fs, Add(), scratch);
    ss = BlockReduce(ss, Add(), scratch);
    const double z = fs + (others > 0 ? ss * double(p.n - nf) / double(others) : 0.0);
    if (threadIdx.x == 0) c0[g] = float(mx + log(z));
    __syncthreads();
  }
  __syncthreads();
  // The seeds: the sample's best by Σ_g exp(x_g − c0_g) (the walk rank's order), ties towards the lower id.
  for (int64_t j = threadIdx.x; j < p.m; j += blockDim.x) {
    double s = 0;
    for (int g = 0; g < p.G; ++g) s += exp(double(sx[size_t(j) * p.G + g]) - double(c0[g]));
    rank[j] = s;
  }
  __syncthreads();
  struct Best {
    double v;
    int64_t j;
  };
  for (int t = 0; t < p.sampleSeeds; ++t) {
    double v = -1;
    int64_t at = p.m;
    for (int64_t j = threadIdx.x; j < p.m; j += blockDim.x)
      if (rank[j] > v) v = rank[j], at = j;  // strided from low j: the first of equals kept
    // (v, −j) largest over the block: the value, then the lower index.
    for (int o = 16; o > 0; o >>= 1) {
      const double ov = __shfl_down_sync(0xffffffffu, v, o);
      const int64_t oj = __shfl_down_sync(0xffffffffu, at, o);
      if (ov > v || (ov == v && oj < at)) v = ov, at = oj;
    }
    __shared__ Best warpBest[32];
    __syncthreads();
    if ((threadIdx.x & 31) == 0) warpBest[threadIdx.x >> 5] = Best{v, at};
    __syncthreads();
    if (threadIdx.x == 0) {
      Best b = warpBest[0];
      for (int w = 1; w < int(blockDim.x >> 5); ++w)
        if (warpBest[w].v > b.v || (warpBest[w].v == b.v && warpBest[w].j < b.j)) b = warpBest[w];
      const int32_t id = b.j < p.m ? int32_t(p.off + b.j * p.stride) : -1;
      p.sampleSeedIds[h * kSeedMax + t] = id;
      if (id >= 0) {
        rank[b.j] = -2;
        atomicOr(p.seedBits + size_t(h) * p.words + (id >> 5), 1u << (id & 31));
      }
    }
    __syncthreads();
  }
}

// Step 2: every key's code rank as a cut order. The int8 weights as words in
// shared memory: [G4][d / 4], a row's word w covering the low nibbles of
// bytes 4w..4w+3 (channels 4w..) and, at d/8 + w, their high nibbles
// (channels half + 4w..).
__global__ void ScanCodes(ScanParams p) {
  AfterPrior();
  __shared__ int32_t sw[kScanMaxG * (RaScanConfig::kMaxDim / 4)];
  __shared__ float sScale[kScanMaxG], sBias[kScanMaxG], sC0[kScanMaxG];
  const int h = blockIdx.y;
  const int wordsRow = p.d / 4, halfWords = p.half / 4;
  for (int i = threadIdx.x; i < p.G * wordsRow; i += blockDim.x)
    sw[i] = reinterpret_cast<const int32_t*>(p.w8 + size_t(h) * p.G4 * p.d)[i];
  if (threadIdx.x < p.G) {
    sScale[threadIdx.x] = p.qscale[h * p.G4 + threadIdx.x];
    sBias[threadIdx.x] = p.qbias[h * p.G4 + threadIdx.x];
    sC0[threadIdx.x] = p.c0[h * kScanMaxG + threadIdx.x];
  }
  __syncthreads();
  const uint32_t* entry = p.entryBits + size_t(h) * p.words;
  const uint32_t* seed = p.seedBits + size_t(h) * p.words;
  const uint32_t* fr = p.freeBits + size_t(h) * p.words;
  const uint8_t* codes = p.codes + size_t(h) * p.n * p.half;
  uint32_t* ord = p.ord + size_t(h) * p.n;
  const uint32_t top = RankOrder(INFINITY);
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < p.n; t += int64_t(gridDim.x) * blockDim.x) {
    if (TestBit(fr, t)) {
      ord[t] = kExcluded;
      continue;
    }
    if (TestBit(entry, t) || TestBit(seed, t)) {
      ord[t] = top;
      continue;
    }
    const uint32_t* row = reinterpret_cast<const uint32_t*>(codes + size_t(t) * p.half);
    int32_t acc[kScanMaxG];
#pragma unroll
    for (int g = 0; g < kScanMaxG; ++g) acc[g] = 0;
    for (int w0 = 0; w0 < halfWords; w0 += 4) {
      uint32_t v[4];
      if (w0 + 4 <= halfWords && (p.half & 15) == 0) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(row + w0));
        v[0] = u.x, v[1] = u.y, v[2] = u.z, v[3] = u.w;
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = w0 + i < halfWords ? __ldg(row + w0 + i) : 0u;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (w0 + i >= halfWords) break;
        const int lo = int(v[i] & 0x0f0f0f0fu), hi = int((v[i] >> 4) & 0x0f0f0f0fu);
#pragma unroll
        for (int g = 0; g < kScanMaxG; ++g) {
          if (g >= p.G) break;
          acc[g] = __dp4a(lo, sw[g * wordsRow + w0 + i], acc[g]);
          acc[g] = __dp4a(hi, sw[g * wordsRow + halfWords + w0 + i], acc[g]);
        }
      }
    }
    float rho = -INFINITY;
#pragma unroll
    for (int g = 0; g < kScanMaxG; ++g) {
      if (g >= p.G) break;
      rho = fmaxf(rho, __fmaf_rn(float(acc[g]), sScale[g], sBias[g]) - sC0[g]);
    }
    ord[t] = RankOrder(rho);
  }
}

// What element i of a cut takes (Taken's unit case), as an int64.
template <typename S>
__device__ __forceinline__ int64_t TakenUnit(const S& s, uint32_t low, const CutState& c, int h, int64_t i) {
  return Taken(s, low, c, h, i);
}

// tiles[h, t]: elements of head h's tile t (kThreads of them) that its cut takes.
template <typename S>
__global__ void CountTaken(S s, const uint32_t* range, const CutState* cuts, int64_t* tiles, int64_t tilesPerHead) {
  AfterPrior();
  __shared__ int64_t scratch[32];
  const int h = blockIdx.y;
  const uint32_t low = SpanOf(range, h).low;
  const int64_t b = s.Begin(h), n = s.Len(h);
  for (int64_t t = blockIdx.x; t * blockDim.x < n; t += gridDim.x) {  // uniform over the CTA: its reduction
    const int64_t j = t * blockDim.x + threadIdx.x;
    int64_t w = j < n ? TakenUnit(s, low, cuts[h], h, b + j) : 0;
    w = BlockReduce(w, Add(), scratch);
    if (threadIdx.x == 0) tiles[size_t(h) * tilesPerHead + t] = w;
  }
}

// The tiles' exclusive scan within each head, in place (one CTA a head).
__global__ void __launch_bounds__(kReduceThreads) ScanTiles(int64_t* tiles, int64_t tilesPerHead, const int64_t* counts, int64_t fixedCount) {
  AfterPrior();
  using Scan = cub::BlockScan<int64_t, kReduceThreads>;
  __shared__ typename Scan::TempStorage temp;
  __shared__ int64_t carry;
  const int h = blockIdx.x;
  const int64_t n = counts ? counts[h] : fixedCount, used = (n + kThreads - 1) / kThreads;
  int64_t* row = tiles + size_t(h) * tilesPerHead;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < used; base += kReduceThreads) {
    const int64_t i = base + threadIdx.x;
    const int64_t v = i < used ? row[i] : 0;
    int64_t at, total;
    Scan(temp).ExclusiveSum(v, at, total);
    if (i < used) row[i] = carry + at;
    __syncthreads();
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
}

// Places what head h's cut takes at its rank in index order: write(h, i, at).
template <typename S, typename W>
__global__ void PlaceTaken(S s, const uint32_t* range, const CutState* cuts, const int64_t* tiles, int64_t tilesPerHead, W write) {
  AfterPrior();
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  const int h = blockIdx.y;
  const uint32_t low = SpanOf(range, h).low;
  const int64_t b = s.Begin(h), n = s.Len(h);
  for (int64_t t = blockIdx.x; t * blockDim.x < n; t += gridDim.x) {  // uniform over the CTA
    const int64_t j = t * blockDim.x + threadIdx.x;
    const int64_t take = j < n ? TakenUnit(s, low, cuts[h], h, b + j) : 0;
    int64_t at;
    Scan(temp).ExclusiveSum(take, at);
    __syncthreads();
    if (take) write(h, b + j, tiles[size_t(h) * tilesPerHead + t] + at);
  }
}

struct WriteCandidate {
  ScanParams p;
  __device__ void operator()(int h, int64_t i, int64_t at) const { p.cand[size_t(h) * p.cap + at] = int32_t(i - int64_t(h) * p.n); }
};
struct WriteAnswer {
  ScanParams p;
  __device__ void operator()(int h, int64_t i, int64_t at) const {
    p.outIds[size_t(h) * p.k + at] = p.cand[i];
    p.outScores[size_t(h) * p.k + at] = p.candScore[i];
  }
};

// The sample index of key id, or -1.
__device__ __forceinline__ int64_t SampleIndex(const ScanParams& p, int64_t id) {
  const int64_t r = id - p.off;
  if (r < 0 || r % p.stride != 0) return -1;
  const int64_t j = r / p.stride;
  return j < p.m ? j : -1;
}

// Step 2's exact scores: the candidates' logits, a warp a candidate; the
// sample keys among them marked reached.
template <bool kBf16>
__global__ void ExactCandidates(ScanParams p, const CutState* cuts) {
  AfterPrior();
  extern __shared__ __align__(16) float scanQ[];
  float* const sq = scanQ;
  const int h = blockIdx.y;
  LoadQ(p, h, sq);
  const int64_t count = cuts[h].total;
  const int64_t warp = int64_t(blockIdx.x) * kScanWarps + (threadIdx.x >> 5), warps = int64_t(gridDim.x) * kScanWarps;
  const uint16_t* keys = p.keys + size_t(h) * p.n * p.d;
  for (int64_t i = warp; i < count; i += warps) {
    const int32_t id = p.cand[size_t(h) * p.cap + i];
    float x[kScanMaxG];
    WarpLogits<kBf16>(keys + size_t(id) * p.d, sq, p.G, p.d, p.scale, x);
    float* dst = p.candX + (size_t(h) * p.cap + i) * p.G;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int g = 0; g < kScanMaxG; ++g)
      if (g == lane && g < p.G) dst[g] = x[g];
    if (lane == 0) {
      const int64_t j = SampleIndex(p, id);
      if (j >= 0) p.reached[size_t(h) * p.m + j] = 1;
    }
  }
}

// Steps 3-4's scores, one CTA a head: the unreached sample appended to the
// candidates, the partitions refined, every listed key's final score and
// cut order; the keys scored counted.
__global__ void __launch_bounds__(kReduceThreads) Refine(ScanParams p, const CutState* cuts) {
  AfterPrior();
  using Scan = cub::BlockScan<int64_t, kReduceThreads>;
  __shared__ typename Scan::TempStorage temp;
  __shared__ double scratch[32];
  __shared__ int64_t carry;
  __shared__ float c[kScanMaxG];
  const int h = blockIdx.x;
  const int64_t total = cuts[h].total;
  const int64_t fb = p.freeStart[h], nf = p.freeStart[h + 1] - fb;
  const uint32_t* freeBits = p.freeBits + size_t(h) * p.words;
  const uint8_t* reached = p.reached + size_t(h) * p.m;
  int32_t* cand = p.cand + size_t(h) * p.cap;
  float* candX = p.candX + size_t(h) * p.cap * p.G;
  const float* sx = p.sampleX + size_t(h) * p.m * p.G;
  // The sample keys no candidate is, nor a free key: appended in index order.
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  int64_t hit = 0;
  for (int64_t base = 0; base < p.m; base += kReduceThreads) {
    const int64_t j = base + threadIdx.x;
    const bool un = j < p.m && !reached[j] && !TestBit(freeBits, p.off + j * p.stride);
    hit += j < p.m && reached[j] ? 1 : 0;
    int64_t at, all;
    Scan(temp).ExclusiveSum(int64_t(un), at, all);
    if (un) {
      cand[total + carry + at] = int32_t(p.off + j * p.stride);
      for (int g = 0; g < p.G; ++g) candX[size_t(total + carry + at) * p.G + g] = sx[size_t(j) * p.G + g];
    }
    __syncthreads();
    if (threadIdx.x == 0) carry += all;
    __syncthreads();
  }
  const int64_t unreached = carry;
  hit = BlockReduce(hit, Add(), reinterpret_cast<int64_t*>(scratch));
  const int64_t listed = total + unreached;
  const int64_t rest = p.n - nf - total - unreached;
  for (int g = 0; g < p.G; ++g) {
    double mx = -INFINITY;
    for (int64_t i = threadIdx.x; i < nf; i += blockDim.x) mx = fmax(mx, double(p.freeX[size_t(fb + i) * p.G + g]));
    for (int64_t i = threadIdx.x; i < listed; i += blockDim.x) mx = fmax(mx, double(candX[size_t(i) * p.G + g]));
    mx = BlockMaxD(mx, scratch);
    double all = 0, miss = 0;
    for (int64_t i = threadIdx.x; i < nf; i += blockDim.x) all += exp(double(p.freeX[size_t(fb + i) * p.G + g]) - mx);
    for (int64_t i = threadIdx.x; i < listed; i += blockDim.x) {
      const double e = exp(double(candX[size_t(i) * p.G + g]) - mx);
      all += e;
      if (i >= total) miss += e;
    }
    all = BlockReduce(all, Add(), scratch);
    miss = BlockReduce(miss, Add(), scratch);
    if (unreached > 0 && rest > 0) all += miss * double(rest) / double(unreached);
    if (threadIdx.x == 0) c[g] = float(mx + log(all));
    __syncthreads();
  }
  const float logG = logf(float(p.G));
  for (int64_t i = threadIdx.x; i < listed; i += blockDim.x) {
    double s = 0;
    for (int g = 0; g < p.G; ++g) s += exp(double(candX[size_t(i) * p.G + g]) - double(c[g]));
    const float score = s > 0 ? float(log(s)) - logG : -INFINITY;
    p.candScore[size_t(h) * p.cap + i] = score;
    p.ord2[size_t(h) * p.cap + i] = RankOrder(score);
  }
  if (threadIdx.x == 0) {
    p.finalCount[h] = listed;
    p.outScanned[h] = p.m + total - hit;
  }
}

// The answer's count, and the step's marks cleared for the next.
__global__ void Finish(ScanParams p, const CutState* cuts) {
  AfterPrior();
  const int h = blockIdx.y;
  if (blockIdx.x == 0 && threadIdx.x == 0) p.outCounts[h] = cuts[h].total;
  if (blockIdx.x == 0 && threadIdx.x < p.sampleSeeds) {
    const int32_t id = p.sampleSeedIds[h * kSeedMax + threadIdx.x];
    if (id >= 0) atomicAnd(p.seedBits + size_t(h) * p.words + (id >> 5), ~(1u << (id & 31)));
  }
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
