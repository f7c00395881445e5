// Kernels of the device code scan (ra_scan.h says what a search computes
// and why), included once, by ra_scan.cu; the cuts and their placement are
// in ra_scan_select.cuh. The scan reads every key's code once and keeps only
// the keys at or above a threshold the strided sample's codes give (a few
// percent of them), so the candidates' exact cut runs over those, not over
// every key; where the threshold kept too few, the head is scanned again
// keeping every key, so the cut is always the exact best `want`.
#pragma once

#include "cuda/ra_scan_select.cuh"

#include <cub/block/block_scan.cuh>

#include <cmath>
#include <cstdint>

namespace kvr {
namespace cuda {
namespace {

constexpr int kScanMaxG = 16;
constexpr int kScanWarps = kThreads / 32;  // rows scored at once by a CTA of the exact kernels
constexpr int kScanPerThread = 4;          // keys a lane group in ScanCodes, at most
constexpr int kReduceThreads = 512;        // SampleReduce, SampleCut and Refine: one CTA a head
constexpr int kSeedMax = 16;               // the sample's seeds at most (kSampleSeeds on the host)
// The host's kSampleMax, plus the rounding: m = ceil((n − off) / stride),
// stride = floor(n / 4096), reaches 4104 (at n = 2,195,395).
constexpr int kSampleMaxKeys = 4096 + 8;

struct ScanParams {
  int H = 0, G = 0, G4 = 0, d = 0, half = 0;
  int64_t n = 0, words = 0;  // keys a head; 32-bit words of a head's bitmaps
  float scale = 0.f;
  int64_t m = 0, stride = 1, off = 0;  // the strided sample: keys off + j·stride, j < m
  int sampleSeeds = 0;                 // min(16, m / 64)
  int64_t want = 0;                    // candidates a head: the host's M = cap − m, at most n
  int64_t cap = 0;                     // capacity of a head's lists: want + m
  int64_t k = 0;
  // The store's data.
  const uint8_t* codes = nullptr;      // [H, n, half]
  const uint16_t* keys = nullptr;      // [H, n, d]
  const uint32_t* entryBits = nullptr; // [H, words]
  uint32_t* seedBits = nullptr;        // [H, words]: the step's seeds (set, then cleared by the step)
  uint32_t* freeBits = nullptr;        // [H, words]: the step's free keys (likewise)
  uint32_t* takeBits = nullptr;        // [H, words]: the candidates (set by MarkTaken, cleared by PlaceBits)
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
  float* c = nullptr;                  // [H, kScanMaxG]: refined
  int32_t* sampleSeedIds = nullptr;    // [H, kSeedMax]
  uint32_t* tau = nullptr;             // [H]: the scan keeps keys whose order is <= it
  uint32_t* keptOrd = nullptr;         // [H, n]: what the scan kept, in append order ...
  int32_t* keptIds = nullptr;          // [H, n]
  unsigned long long* keptCount = nullptr;  // [H]
  int32_t* redo = nullptr;             // [H]: the head kept too few: scanned again keeping every key
  double* partial = nullptr;           // [H, partials, kScanMaxG]: the candidates' exp sums per CTA
  int64_t partials = 0;
  int32_t* cand = nullptr;             // [H, cap]: candidates (id order), then the unreached sample
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
#pragma unroll
    for (int g = 0; g < kScanMaxG; ++g)
      if (g == (threadIdx.x & 31) && g < p.G) dst[g] = x[g];
  }
}

struct MaxD {
  __device__ double operator()(double a, double b) const { return a > b ? a : b; }
};

// Step 1's partitions (c0) and the sample's seeds, one CTA a head.
__global__ void __launch_bounds__(kReduceThreads) SampleReduce(ScanParams p) {
  AfterPrior();
  __shared__ double scratch[32];
  __shared__ double rank[kSampleMaxKeys];
  __shared__ double warpV[kReduceThreads / 32][kSeedMax];
  __shared__ int32_t warpJ[kReduceThreads / 32][kSeedMax];
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
    mx = BlockReduce(mx, MaxD(), scratch);
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
  // The seeds: the sample's best by Σ_g exp(x_g − c0_g) (the walk rank's order), ties towards the lower id:
  // each warp's best sampleSeeds (warp argmaxes, no barrier), then warp 0's over those.
  for (int64_t j = threadIdx.x; j < p.m; j += blockDim.x) {
    double s = 0;
    for (int g = 0; g < p.G; ++g) s += exp(double(sx[size_t(j) * p.G + g]) - double(c0[g]));
    rank[j] = s;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const auto better = [](double v, int64_t j, double ov, int64_t oj) { return ov > v || (ov == v && oj < j); };
  // Warp w ranks the sample keys w·32 + lane + i·blockDim.x.
  for (int t = 0; t < p.sampleSeeds; ++t) {
    double v = -1;
    int64_t at = p.m;
    for (int64_t j = threadIdx.x; j < p.m; j += blockDim.x)
      if (better(v, at, rank[j], j)) v = rank[j], at = j;
    for (int o = 16; o > 0; o >>= 1) {
      const double ov = __shfl_xor_sync(0xffffffffu, v, o);
      const int64_t oj = __shfl_xor_sync(0xffffffffu, at, o);
      if (better(v, at, ov, oj)) v = ov, at = oj;
    }
    if (lane == 0) warpV[warp][t] = v, warpJ[warp][t] = int32_t(at);
    if (at < p.m && (at & (blockDim.x - 1)) / 32 == warp && (at & 31) == lane) rank[at] = -2;  // its owner drops it
    __syncwarp();
  }
  __syncthreads();
  if (warp != 0) return;
  const int W = blockDim.x / 32;
  for (int t = 0; t < p.sampleSeeds; ++t) {
    double v = -1;
    int64_t at = p.m;
    int32_t slot = -1;
    for (int i = lane; i < W * p.sampleSeeds; i += 32) {
      const double ov = warpV[i / p.sampleSeeds][i % p.sampleSeeds];
      const int64_t oj = warpJ[i / p.sampleSeeds][i % p.sampleSeeds];
      if (oj < p.m && better(v, at, ov, oj)) v = ov, at = oj, slot = i;
    }
    for (int o = 16; o > 0; o >>= 1) {
      const double ov = __shfl_xor_sync(0xffffffffu, v, o);
      const int64_t oj = __shfl_xor_sync(0xffffffffu, at, o);
      const int32_t os = __shfl_xor_sync(0xffffffffu, slot, o);
      if (better(v, at, ov, oj)) v = ov, at = oj, slot = os;
    }
    __syncwarp();  // every lane's reads of warpJ before lane 0 marks one taken (the shuffles order no memory)
    if (lane == 0) {
      const int32_t id = at < p.m ? int32_t(p.off + at * p.stride) : -1;
      p.sampleSeedIds[h * kSeedMax + t] = id;
      if (id >= 0) {
        atomicOr(p.seedBits + size_t(h) * p.words + (id >> 5), 1u << (id & 31));
        warpJ[slot / p.sampleSeeds][slot % p.sampleSeeds] = int32_t(p.m);  // taken
      }
    }
    __syncwarp();
  }
}

// acc[g] += the int8 form's integer dots of a code row's words [w0, w1) for
// the G rows (sw: the weights as words, [G][d / 4]: word w of a row the low
// nibbles' weights of bytes 4w.., at d/8 + w their high nibbles'). vec: the
// words are read 16 bytes at a time (rows 16-byte aligned, w1 − w0 a
// multiple of 4).
__device__ __forceinline__ void CodeDots(const uint32_t* row, int w0, int w1, bool vec, const int32_t* sw, int wordsRow, int halfWords, int G,
                                         int32_t (&acc)[kScanMaxG]) {
  for (int w = w0; w < w1; w += 4) {
    uint32_t v[4];
    if (vec) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(row + w));
      v[0] = u.x, v[1] = u.y, v[2] = u.z, v[3] = u.w;
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = w + i < w1 ? __ldg(row + w + i) : 0u;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (w + i >= w1) break;
      const int lo = int(v[i] & 0x0f0f0f0fu), hi = int((v[i] >> 4) & 0x0f0f0f0fu);
#pragma unroll
      for (int g = 0; g < kScanMaxG; ++g) {
        if (g >= G) break;
        acc[g] = __dp4a(lo, sw[g * wordsRow + w + i], acc[g]);
        acc[g] = __dp4a(hi, sw[g * wordsRow + halfWords + w + i], acc[g]);
      }
    }
  }
}

// The scan's weights into shared memory, with each row's scale, bias and c0.
__device__ __forceinline__ void LoadWeights(const ScanParams& p, int h, int32_t* sw, float* sScale, float* sBias, float* sC0) {
  const int wordsRow = p.d / 4;
  for (int i = threadIdx.x; i < p.G * wordsRow; i += blockDim.x) sw[i] = reinterpret_cast<const int32_t*>(p.w8 + size_t(h) * p.G4 * p.d)[i];
  if (threadIdx.x < p.G) {
    sScale[threadIdx.x] = p.qscale[h * p.G4 + threadIdx.x];
    sBias[threadIdx.x] = p.qbias[h * p.G4 + threadIdx.x];
    sC0[threadIdx.x] = p.c0[h * kScanMaxG + threadIdx.x];
  }
  __syncthreads();
}

// ρ = max_g (x̃_g − c0_g) from a row's integer dots.
__device__ __forceinline__ float Rho(const int32_t (&acc)[kScanMaxG], int G, const float* sScale, const float* sBias, const float* sC0) {
  float rho = -INFINITY;
#pragma unroll
  for (int g = 0; g < kScanMaxG; ++g) {
    if (g >= G) break;
    rho = fmaxf(rho, __fmaf_rn(float(acc[g]), sScale[g], sBias[g]) - sC0[g]);
  }
  return rho;
}

// The r-th smallest (1-based) of ord[0 .. m), eight bits at a time from the
// top, by the whole CTA (every thread calls it after writing ord; thread 0's
// return is the answer).
__device__ uint32_t RthSmallest(const uint32_t* ord, int64_t m, int64_t r) {
  __shared__ uint32_t hist[256];
  __shared__ uint32_t prefix, rest;
  __syncthreads();
  if (threadIdx.x == 0) prefix = 0, rest = uint32_t(r);
  __syncthreads();
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    const uint32_t known = prefix;
    for (int64_t j = threadIdx.x; j < m; j += blockDim.x)
      if (shift == 24 || (ord[j] >> (shift + 8)) == (known >> (shift + 8))) atomicAdd(&hist[(ord[j] >> shift) & 255u], 1u);
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t left = rest;
      int digit = 0;
      for (; digit < 255 && hist[digit] < left; ++digit) left -= hist[digit];
      prefix = known | (uint32_t(digit) << shift);
      rest = left;
    }
    __syncthreads();
  }
  return prefix;
}

// The scan's threshold, one CTA a head: the sample's code ranks, and the
// order of its r-th best for r a little above the share of them `want`
// would take (its expectation + 4 standard deviations + 2), found digit by
// digit; every key ranked at least as well is kept. A head whose threshold
// keeps fewer than `want` is scanned again keeping every key (Decide).
__global__ void __launch_bounds__(kReduceThreads) SampleCut(ScanParams p) {
  AfterPrior();
  __shared__ int32_t sw[kScanMaxG * (RaScanConfig::kMaxDim / 4)];
  __shared__ float sScale[kScanMaxG], sBias[kScanMaxG], sC0[kScanMaxG];
  __shared__ uint32_t ord[kSampleMaxKeys];
  const int h = blockIdx.x;
  LoadWeights(p, h, sw, sScale, sBias, sC0);
  const double expect = double(p.m) * double(p.want) / double(p.n);
  const int64_t r = int64_t(ceil(expect + 4.0 * sqrt(expect) + 2.0));
  if (r >= p.m) {
    if (threadIdx.x == 0) p.tau[h] = kExcluded - 1;  // every key
    return;
  }
  const int halfWords = p.half / 4;
  const uint8_t* codes = p.codes + size_t(h) * p.n * p.half;
  for (int64_t j = threadIdx.x; j < p.m; j += blockDim.x) {
    int32_t acc[kScanMaxG];
#pragma unroll
    for (int g = 0; g < kScanMaxG; ++g) acc[g] = 0;
    const int64_t t = p.off + j * p.stride;
    CodeDots(reinterpret_cast<const uint32_t*>(codes + size_t(t) * p.half), 0, halfWords, (p.half & 15) == 0, sw, p.d / 4, halfWords, p.G, acc);
    ord[j] = RankOrder(Rho(acc, p.G, sScale, sBias, sC0));
  }
  const uint32_t tau = RthSmallest(ord, p.m, r);  // by the whole CTA: it counts and syncs
  if (threadIdx.x == 0) p.tau[h] = tau;
}

// Appends the keys this CTA keeps (keep, with their orders) to a head's
// list: one atomic on its count a CTA (one a warp was ~40K a head at 1M, on
// one address): each warp's count, their scan by warp 0, one atomic, each
// warp's place after those before it. Every thread of the CTA calls it.
__device__ __forceinline__ void AppendKept(bool keep, uint32_t order, int32_t t, unsigned long long* count, uint32_t* keptOrd, int32_t* keptIds) {
  __shared__ int warpKept[kThreads / 32];
  __shared__ unsigned long long warpBase[kThreads / 32];
  const int lane = threadIdx.x & 31;
  const unsigned mask = __ballot_sync(0xffffffffu, keep);
  if (lane == 0) warpKept[threadIdx.x >> 5] = __popc(mask);
  __syncthreads();
  if (threadIdx.x < 32) {
    const int mine = threadIdx.x < int(blockDim.x >> 5) ? warpKept[threadIdx.x] : 0;
    int incl = mine;
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (threadIdx.x >= o) incl += y;
    }
    const int all = __shfl_sync(0xffffffffu, incl, 31);
    unsigned long long base = 0;
    if (threadIdx.x == 0 && all > 0) base = atomicAdd(count, (unsigned long long)all);
    base = __shfl_sync(0xffffffffu, base, 0);
    if (threadIdx.x < int(blockDim.x >> 5)) warpBase[threadIdx.x] = base + (incl - mine);
  }
  __syncthreads();
  if (keep) {
    const unsigned long long at = warpBase[threadIdx.x >> 5] + __popc(mask & ((1u << lane) - 1));
    keptOrd[at] = order;
    keptIds[at] = t;
  }
}

// Step 2: every key's code rank; the keys kept (ρ's order at most tau, entry
// points and seeds always, free keys never) appended with their orders. L
// lanes read a row (16 bytes each where its words allow, coalesced across
// the warp) and sum their dots by shuffles. With `again`, only the heads
// Decide marked, keeping every key.
template <int L>
__global__ void __launch_bounds__(kThreads) ScanCodes(ScanParams p, bool again) {
  AfterPrior();
  __shared__ int32_t sw[kScanMaxG * (RaScanConfig::kMaxDim / 4)];
  __shared__ float sScale[kScanMaxG], sBias[kScanMaxG], sC0[kScanMaxG];
  const int h = blockIdx.y;
  if (again && !p.redo[h]) return;
  LoadWeights(p, h, sw, sScale, sBias, sC0);
  const uint32_t tau = again ? kExcluded - 1 : p.tau[h];
  const uint32_t* entry = p.entryBits + size_t(h) * p.words;
  const uint32_t* seed = p.seedBits + size_t(h) * p.words;
  const uint32_t* fr = p.freeBits + size_t(h) * p.words;
  const uint8_t* codes = p.codes + size_t(h) * p.n * p.half;
  uint32_t* keptOrd = p.keptOrd + size_t(h) * p.n;
  int32_t* keptIds = p.keptIds + size_t(h) * p.n;
  const int halfWords = p.half / 4, per = halfWords / L, lane = threadIdx.x & 31, sub = lane & (L - 1);
  const bool vec = (p.half & 15) == 0 && per % 4 == 0;
  const uint32_t top = RankOrder(INFINITY);
  const int64_t perCta = blockDim.x / L, step = int64_t(gridDim.x) * perCta;
  for (int64_t base = int64_t(blockIdx.x) * perCta; base < p.n; base += step) {  // uniform over the CTA
    const int64_t t = base + threadIdx.x / L;
    const bool valid = t < p.n;
    int32_t acc[kScanMaxG];
#pragma unroll
    for (int g = 0; g < kScanMaxG; ++g) acc[g] = 0;
    if (valid) CodeDots(reinterpret_cast<const uint32_t*>(codes + size_t(t) * p.half), sub * per, (sub + 1) * per, vec, sw, p.d / 4, halfWords, p.G, acc);
#pragma unroll
    for (int g = 0; g < kScanMaxG; ++g) {
      if (g >= p.G) break;
      for (int o = 1; o < L; o <<= 1) acc[g] += __shfl_xor_sync(0xffffffffu, acc[g], o);
    }
    bool keep = false;
    uint32_t order = 0;
    if (valid && sub == 0 && !TestBit(fr, t)) {
      order = TestBit(entry, t) || TestBit(seed, t) ? top : RankOrder(Rho(acc, p.G, sScale, sBias, sC0));
      keep = order <= tau;
    }
    AppendKept(keep, order, int32_t(t), p.keptCount + h, keptOrd, keptIds);
  }
}

// Heads whose threshold kept fewer keys than they need (their candidates, or
// need[h] where given) are scanned again, keeping every key.
__global__ void Decide(ScanParams p, const int64_t* need) {
  AfterPrior();
  const int h = threadIdx.x;
  if (h >= p.H) return;
  // Not where the threshold already kept every key (fewer keys than needed exist).
  const bool again = int64_t(p.keptCount[h]) < (need ? need[h] : p.want) && p.tau[h] != kExcluded - 1;
  p.redo[h] = again;
  if (again) p.keptCount[h] = 0;
}

// The sample index of key id, or -1.
__device__ __forceinline__ int64_t SampleIndex(const ScanParams& p, int64_t id) {
  const int64_t r = id - p.off;
  if (r < 0 || r % p.stride != 0) return -1;
  const int64_t j = r / p.stride;
  return j < p.m ? j : -1;
}

// Step 2's exact scores: the candidates' logits, a warp a candidate; the
// sample keys among them marked reached; each CTA's Σ exp(x_g − c0_g) over
// its candidates (in a fixed order: the answer does not depend on timing).
template <bool kBf16>
__global__ void ExactCandidates(ScanParams p, const CutState* cuts) {
  AfterPrior();
  extern __shared__ __align__(16) float scanQ[];
  float* const sq = scanQ;
  __shared__ double sums[kScanWarps][kScanMaxG];
  const int h = blockIdx.y;
  LoadQ(p, h, sq);
  const int64_t count = cuts[h].total;
  const int lane = threadIdx.x & 31, warpIn = threadIdx.x >> 5;
  const int64_t warp = int64_t(blockIdx.x) * kScanWarps + warpIn, warps = int64_t(gridDim.x) * kScanWarps;
  const uint16_t* keys = p.keys + size_t(h) * p.n * p.d;
  const double c0 = lane < p.G ? double(p.c0[h * kScanMaxG + lane]) : 0.0;
  double mine = 0;  // lane g's row's sum
  for (int64_t i = warp; i < count; i += warps) {
    const int32_t id = p.cand[size_t(h) * p.cap + i];
    float x[kScanMaxG];
    WarpLogits<kBf16>(keys + size_t(id) * p.d, sq, p.G, p.d, p.scale, x);
    float* dst = p.candX + (size_t(h) * p.cap + i) * p.G;
    // Lane g takes row g's logit (a select, not a branch a row: one exp a lane, all lanes at once).
    float own = 0.f;
#pragma unroll
    for (int g = 0; g < kScanMaxG; ++g) own = g == lane ? x[g] : own;
    if (lane < p.G) dst[lane] = own, mine += exp(double(own) - c0);
    if (lane == 0) {
      const int64_t j = SampleIndex(p, id);
      if (j >= 0) p.reached[size_t(h) * p.m + j] = 1;
    }
  }
  if (lane < p.G) sums[warpIn][lane] = mine;
  __syncthreads();
  if (threadIdx.x < p.G) {
    double s = 0;
    for (int w = 0; w < kScanWarps; ++w) s += sums[w][threadIdx.x];
    p.partial[(size_t(h) * p.partials + blockIdx.x) * kScanMaxG + threadIdx.x] = s;
  }
}

// Step 3, one CTA a head: the unreached sample appended to the candidates,
// the partitions refined (shifted by c0: the candidates' sums come so from
// ExactCandidates), the keys scored counted.
__global__ void __launch_bounds__(kReduceThreads) Refine(ScanParams p, const CutState* cuts) {
  AfterPrior();
  using Scan = cub::BlockScan<int64_t, kReduceThreads>;
  __shared__ typename Scan::TempStorage temp;
  __shared__ double scratch[32];
  __shared__ int64_t carry;
  const int h = blockIdx.x;
  const int64_t total = cuts[h].total;
  const int64_t fb = p.freeStart[h], nf = p.freeStart[h + 1] - fb;
  const uint32_t* freeBits = p.freeBits + size_t(h) * p.words;
  const uint8_t* reached = p.reached + size_t(h) * p.m;
  int32_t* cand = p.cand + size_t(h) * p.cap;
  float* candX = p.candX + size_t(h) * p.cap * p.G;
  const float* sx = p.sampleX + size_t(h) * p.m * p.G;
  const float* c0 = p.c0 + size_t(h) * kScanMaxG;
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
  const int64_t rest = p.n - nf - total - unreached;
  for (int g = 0; g < p.G; ++g) {
    const double shift = double(c0[g]);
    double all = 0, miss = 0;
    for (int64_t i = threadIdx.x; i < nf; i += blockDim.x) all += exp(double(p.freeX[size_t(fb + i) * p.G + g]) - shift);
    for (int64_t i = total + threadIdx.x; i < total + unreached; i += blockDim.x) miss += exp(double(candX[size_t(i) * p.G + g]) - shift);
    all = BlockReduce(all, Add(), scratch);
    miss = BlockReduce(miss, Add(), scratch);
    if (threadIdx.x == 0) {
      for (int64_t b = 0; b < p.partials; ++b) all += p.partial[(size_t(h) * p.partials + b) * kScanMaxG + g];
      all += miss;
      if (unreached > 0 && rest > 0) all += miss * double(rest) / double(unreached);
      p.c[h * kScanMaxG + g] = float(shift + log(all));
    }
  }
  if (threadIdx.x == 0) {
    p.finalCount[h] = total + unreached;
    p.outScanned[h] = p.m + total - hit;
  }
}

// Step 4's scores: every listed key's ln((1/G) Σ_g exp(x_g − c_g)) and its cut order.
__global__ void FinalScores(ScanParams p) {
  AfterPrior();
  const int h = blockIdx.y;
  const int64_t listed = p.finalCount[h];
  const float logG = logf(float(p.G));
  const float* c = p.c + size_t(h) * kScanMaxG;
  const float* candX = p.candX + size_t(h) * p.cap * p.G;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < listed; i += int64_t(gridDim.x) * blockDim.x) {
    double s = 0;
    for (int g = 0; g < p.G; ++g) s += exp(double(candX[size_t(i) * p.G + g]) - double(c[g]));
    const float score = s > 0 ? float(log(s)) - logG : -INFINITY;
    p.candScore[size_t(h) * p.cap + i] = score;
    p.ord2[size_t(h) * p.cap + i] = RankOrder(score);
  }
}

struct WriteAnswer {
  ScanParams p;
  __device__ void operator()(int h, int64_t i, int64_t at) const {
    p.outIds[size_t(h) * p.k + at] = p.cand[i];
    p.outScores[size_t(h) * p.k + at] = p.candScore[i];
  }
};

// The answer's count, and the sample's seeds' marks cleared for the next step.
__global__ void Finish(ScanParams p, const CutState* cuts) {
  AfterPrior();
  const int h = blockIdx.y;
  if (threadIdx.x == 0) p.outCounts[h] = cuts[h].total;
  if (threadIdx.x < p.sampleSeeds) {
    const int32_t id = p.sampleSeedIds[h * kSeedMax + threadIdx.x];
    if (id >= 0) atomicAnd(p.seedBits + size_t(h) * p.words + (id >> 5), ~(1u << (id & 31)));
  }
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
