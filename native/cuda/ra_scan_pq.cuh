// The device code scan's PQ first pass (ra_scan.h step 2 with `keep`; the
// host's ra_graph_code_scan.h SelectScanPq), included once, by ra_scan.cu
// after ra_scan_kernels.cuh. Why two passes: the one-pass scan reads every
// key's 4-bit code, a quarter of the f16 key's bytes (0.74-0.78 of what
// hnsw reads at its best ef at 1M keys, where issue #15 asks 1/3); a PQ
// code is a sixteenth, and read first it keeps the few percent of keys
// whose 4-bit codes are worth reading (ra_pq_codes.h says how well).
//
// The sets are the host's exactly: the PQ ranks are the host's integer sums
// and the same fmaf, the kept keys the exact best `need` by (ρ, id), and the
// 4-bit pass's candidates the exact best of those, the outliers and the +∞
// keys, through the same cuts as the one pass (ra_scan_select.cuh).
#pragma once

#include <algorithm>
#include <cstdint>

namespace kvr {
namespace cuda {
namespace {

constexpr int kPqCodes = 16;  // centroids a subspace (RaPqCodes::kCentroids)

struct PqParams {
  int quads = 0;      // ceil(G / 4): four heads' sums a 64-bit word
  int M = 0;          // subspaces (headDim / 4)
  int rowBytes = 0;   // a key's code bytes (M / 2)
  int64_t keep = 0;   // the first pass keeps at least this many keys a head
  const uint8_t* codes = nullptr;         // [H, n, rowBytes]
  const uint32_t* outlierBits = nullptr;  // [H, words]
  const uint64_t* lut = nullptr;          // [H, quads, M, 16]: head 4·quad + l's integer in bits 16l..
  const float* base = nullptr;            // [H, 4·quads]
  const float* delta = nullptr;           // [H, 4·quads]
  unsigned long long* inf = nullptr;      // [H]: the +∞ keys (entry points and seeds, not free)
  int64_t* need = nullptr;                // [H]: max(want − inf, keep), what the first pass keeps
  unsigned long long* listed = nullptr;   // [H]: the 4-bit pass's keys (kept, outliers, +∞)
  int32_t* list = nullptr;                // [H, listCap]: those in id order
  int64_t listCap = 0;
};

// Shared memory of a head's tables for G rows of headDim d.
__host__ __device__ constexpr size_t PqLutBytes(int G, int d) { return size_t((G + 3) / 4) * size_t(d / 4) * kPqCodes * 8; }

__device__ __forceinline__ size_t PqLutWords(const PqParams& q) { return size_t(q.quads) * q.M * kPqCodes; }

// Head h's tables, base, delta and c0 into shared memory (slut: PqLutWords words).
__device__ __forceinline__ void LoadPq(const ScanParams& p, const PqParams& q, int h, uint64_t* slut, float* sBase, float* sDelta, float* sC0) {
  const size_t words = PqLutWords(q);
  for (size_t i = threadIdx.x; i < words; i += blockDim.x) slut[i] = q.lut[size_t(h) * words + i];
  if (threadIdx.x < 4 * q.quads) {
    sBase[threadIdx.x] = q.base[h * 4 * q.quads + threadIdx.x];
    sDelta[threadIdx.x] = q.delta[h * 4 * q.quads + threadIdx.x];
  }
  if (threadIdx.x < p.G) sC0[threadIdx.x] = p.c0[h * kScanMaxG + threadIdx.x];
  __syncthreads();
}

// ρ = max_g (x̃_g − c0_g) of a PQ row, as RaPqCodes::MaxShifted computes it:
// each quad's four lanes summed as one 64-bit word (at most M·L <= 65535 a
// lane: no carry), then fmaf(delta, sum, base) − c0; where one quad holds
// every head the host adds +0 (its padded lanes' −∞ are added to all four),
// which only turns a −0 into +0, and is done here too. The lanes of a warp
// read the same subspace's 16 words at once (128 bytes): no bank conflicts.
// kWords: the row's 32-bit words where it is 8, 16 or 32 bytes (headDim 64,
// 128, 256), held in registers; 0 reads any row a byte at a time.
template <int kWords>
__device__ __forceinline__ float PqRho(const uint8_t* row, const PqParams& q, int G, const uint64_t* slut, const float* sBase, const float* sDelta,
                                       const float* sC0) {
  uint32_t w[kWords > 0 ? kWords : 1];
  if constexpr (kWords % 4 == 0 && kWords > 0) {
#pragma unroll
    for (int i = 0; i < kWords; i += 4) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(row) + i / 4);
      w[i] = u.x, w[i + 1] = u.y, w[i + 2] = u.z, w[i + 3] = u.w;
    }
  } else if constexpr (kWords == 2) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(row));
    w[0] = u.x, w[1] = u.y;
  }
  float rho = -INFINITY;
  for (int quad = 0; quad < q.quads; ++quad) {
    const uint64_t* l = slut + size_t(quad) * q.M * kPqCodes;
    uint64_t acc = 0;
    if constexpr (kWords > 0) {  // M = 8 · kWords
#pragma unroll
      for (int i = 0; i < kWords; ++i)
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const uint32_t v = (w[i] >> (8 * b)) & 255u;
          const int s = 2 * (4 * i + b);
          acc += l[s * kPqCodes + (v & 15u)] + l[(s + 1) * kPqCodes + (v >> 4)];
        }
    } else {
      for (int b = 0; b < q.rowBytes; ++b) {
        const uint32_t v = __ldg(row + b);
        acc += l[(2 * b) * kPqCodes + (v & 15u)];
        if (2 * b + 1 < q.M) acc += l[(2 * b + 1) * kPqCodes + (v >> 4)];
      }
    }
    for (int lane = 0; lane < 4; ++lane) {
      const int g = 4 * quad + lane;
      if (g >= G) break;
      float v = __fmaf_rn(sDelta[g], float(uint32_t(acc >> (16 * lane)) & 0xffffu), sBase[g]) - sC0[g];
      if (q.quads == 1) v = v + 0.f;
      rho = fmaxf(rho, v);
    }
  }
  return rho;
}

// inf[h]: the +∞ keys (entry points and seeds, not free); a thread a word.
__global__ void PqSpecials(ScanParams p, PqParams q) {
  AfterPrior();
  __shared__ int64_t scratch[32];
  const int h = blockIdx.y;
  const int64_t w = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t at = size_t(h) * p.words + size_t(w);
  const int64_t c = BlockReduce(int64_t(w < p.words ? __popc((p.entryBits[at] | p.seedBits[at]) & ~p.freeBits[at]) : 0), Add(), scratch);
  if (threadIdx.x == 0 && c > 0) atomicAdd(q.inf + h, (unsigned long long)c);
}

// The first pass's threshold and need, one CTA a head: as SampleCut, over
// the sample's PQ ranks and for `need` keys (the host's SelectTop asks the
// best max(M − inf, keep) of the keys not +∞ or free).
template <int kWords>
__global__ void __launch_bounds__(kReduceThreads) PqSampleCut(ScanParams p, PqParams q) {
  AfterPrior();
  extern __shared__ __align__(16) uint64_t pqLut[];
  __shared__ float sBase[kScanMaxG], sDelta[kScanMaxG], sC0[kScanMaxG];
  __shared__ uint32_t ord[kSampleMaxKeys];
  const int h = blockIdx.x;
  const int64_t need = max(p.want - int64_t(q.inf[h]), q.keep);
  if (threadIdx.x == 0) q.need[h] = need;
  const double expect = double(p.m) * double(need) / double(p.n);
  const int64_t r = int64_t(ceil(expect + 4.0 * sqrt(expect) + 2.0));
  if (r >= p.m) {
    if (threadIdx.x == 0) p.tau[h] = kExcluded - 1;  // every key
    return;
  }
  LoadPq(p, q, h, pqLut, sBase, sDelta, sC0);
  const uint8_t* codes = q.codes + size_t(h) * p.n * q.rowBytes;
  for (int64_t j = threadIdx.x; j < p.m; j += blockDim.x)
    ord[j] = RankOrder(PqRho<kWords>(codes + size_t(p.off + j * p.stride) * q.rowBytes, q, p.G, pqLut, sBase, sDelta, sC0));
  const uint32_t tau = RthSmallest(ord, p.m, r);
  if (threadIdx.x == 0) p.tau[h] = tau;
}

// The first pass: every key's PQ rank, the keys not +∞ or free at or above
// the threshold appended with their orders; with `again`, only the heads
// Decide marked, keeping every such key. A lane a key: a row is 16 bytes at
// d = 128, one load, coalesced across the warp.
template <int kWords>
__global__ void __launch_bounds__(kThreads) PqScan(ScanParams p, PqParams q, bool again) {
  AfterPrior();
  extern __shared__ __align__(16) uint64_t pqLut[];
  __shared__ float sBase[kScanMaxG], sDelta[kScanMaxG], sC0[kScanMaxG];
  const int h = blockIdx.y;
  if (again && !p.redo[h]) return;
  LoadPq(p, q, h, pqLut, sBase, sDelta, sC0);
  const uint32_t tau = again ? kExcluded - 1 : p.tau[h];
  const size_t bits = size_t(h) * p.words;
  const uint8_t* codes = q.codes + size_t(h) * p.n * q.rowBytes;
  uint32_t* keptOrd = p.keptOrd + size_t(h) * p.n;
  int32_t* keptIds = p.keptIds + size_t(h) * p.n;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < p.n; base += step) {  // uniform over the CTA
    const int64_t t = base + threadIdx.x;
    bool keep = false;
    uint32_t order = 0;
    if (t < p.n && !TestBit(p.entryBits + bits, t) && !TestBit(p.seedBits + bits, t) && !TestBit(p.freeBits + bits, t)) {
      order = RankOrder(PqRho<kWords>(codes + size_t(t) * q.rowBytes, q, p.G, pqLut, sBase, sDelta, sC0));
      keep = order <= tau;
    }
    AppendKept(keep, order, int32_t(t), p.keptCount + h, keptOrd, keptIds);
  }
}

// The first pass's cut: the best need[h] of what it kept.
struct PqKeptCut {
  static constexpr bool kUnit = true;
  const uint32_t* ord;
  const int32_t* ids;
  const unsigned long long* count;
  const int64_t* need;
  int64_t n;
  __device__ int64_t Begin(int h) const { return int64_t(h) * n; }
  __device__ int64_t Len(int h) const { return int64_t(count[h]); }
  __device__ uint32_t Index(int, int64_t i) const { return uint32_t(ids[i]); }
  __device__ int64_t Weight(int64_t) const { return 1; }
  __device__ int64_t Target(int h) const { return need[h]; }
  __device__ int64_t Cap(int h) const { return need[h]; }
  __device__ int IndexBits(int) const { return IdBits(n); }
};

// The 4-bit pass's keys as bits (the first pass's, set by MarkTaken): those
// and the outliers and +∞ keys that are not free; listed[h] counts them.
__global__ void PqMarkSecond(ScanParams p, PqParams q) {
  AfterPrior();
  __shared__ int64_t scratch[32];
  const int h = blockIdx.y;
  const int64_t w = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t at = size_t(h) * p.words + size_t(w);
  uint32_t v = 0;
  if (w < p.words) {
    v = p.takeBits[at] | ((q.outlierBits[at] | p.entryBits[at] | p.seedBits[at]) & ~p.freeBits[at]);
    p.takeBits[at] = v;
  }
  const int64_t c = BlockReduce(int64_t(__popc(v)), Add(), scratch);
  if (threadIdx.x == 0 && c > 0) atomicAdd(q.listed + h, (unsigned long long)c);
}

// The 4-bit pass: the listed keys' code ranks (+∞ for entry points and
// seeds), every one appended, as ScanCodes<1> reads a row.
__global__ void __launch_bounds__(kThreads) PqScanListed(ScanParams p, PqParams q) {
  AfterPrior();
  __shared__ int32_t sw[kScanMaxG * (RaScanConfig::kMaxDim / 4)];
  __shared__ float sScale[kScanMaxG], sBias[kScanMaxG], sC0[kScanMaxG];
  const int h = blockIdx.y;
  LoadWeights(p, h, sw, sScale, sBias, sC0);
  const int64_t listed = int64_t(q.listed[h]);
  const size_t bits = size_t(h) * p.words;
  const int32_t* list = q.list + size_t(h) * q.listCap;
  const uint8_t* codes = p.codes + size_t(h) * p.n * p.half;
  const int halfWords = p.half / 4;
  const bool vec = (p.half & 15) == 0 && halfWords % 4 == 0;
  const uint32_t top = RankOrder(INFINITY);
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < listed; base += step) {  // uniform over the CTA
    const int64_t i = base + threadIdx.x;
    const bool valid = i < listed;
    const int32_t t = valid ? list[i] : 0;
    uint32_t order = 0;
    if (valid) {
      if (TestBit(p.entryBits + bits, t) || TestBit(p.seedBits + bits, t)) {
        order = top;
      } else {
        int32_t acc[kScanMaxG];
#pragma unroll
        for (int g = 0; g < kScanMaxG; ++g) acc[g] = 0;
        CodeDots(reinterpret_cast<const uint32_t*>(codes + size_t(t) * p.half), 0, halfWords, vec, sw, p.d / 4, halfWords, p.G, acc);
        order = RankOrder(Rho(acc, p.G, sScale, sBias, sC0));
      }
    }
    AppendKept(valid, order, t, p.keptCount + h, p.keptOrd + size_t(h) * p.n, p.keptIds + size_t(h) * p.n);
  }
}

// outKept[h]: the keys whose 4-bit code was read, the +∞ keys not counted
// (the host's counts.kept; 0 where the +∞ keys fill the candidates: the
// host then makes no pass, and the device's passes change nothing).
__global__ void PqFinish(ScanParams p, PqParams q, int64_t* outKept) {
  AfterPrior();
  const int h = threadIdx.x;
  if (h < p.H) outKept[h] = int64_t(q.inf[h]) >= p.want ? 0 : int64_t(q.listed[h]) - int64_t(q.inf[h]);
}

// The store's buffers the passes share with the one pass's steps
// (ra_scan.cu's Impl): what a pass keeps, the first pass's cut (its own
// range and state), the bitmap and tiles that list the 4-bit pass's keys.
struct PqWork {
  uint32_t* keptOrd;
  int32_t* keptIds;
  unsigned long long* keptCount;
  uint32_t* range;
  CutState* cuts;
  uint64_t* buf;
  int64_t* bufW;
  uint32_t* hist;
  uint32_t* takeBits;
  int64_t* tiles;
  int64_t tilesPerHead;
};

__host__ inline unsigned PqBlocks(int64_t x, int64_t y) { return unsigned(std::max<int64_t>(1, (x + y - 1) / y)); }

// The kernels for a row of q.rowBytes (PqRho's kWords).
__host__ inline int PqRowWords(const PqParams& q) { return q.rowBytes == 8 || q.rowBytes == 16 || q.rowBytes == 32 ? q.rowBytes / 4 : 0; }

// Step 1's end with keep, in place of SampleCut: the +∞ keys counted, the
// first pass's need and threshold.
__host__ inline void EnqueuePqThreshold(cudaStream_t s, const ScanParams& p, const PqParams& q, int H) {
  Check(cudaMemsetAsync(q.inf, 0, size_t(H) * 8, s), "memset");
  Check(cudaMemsetAsync(q.listed, 0, size_t(H) * 8, s), "memset");
  PqSpecials<<<dim3(unsigned(Tiles(p.words)), unsigned(H)), kThreads, 0, s>>>(p, q);
  const size_t smem = PqLutBytes(p.G, p.d);
  switch (PqRowWords(q)) {
    case 2: PqSampleCut<2><<<H, kReduceThreads, smem, s>>>(p, q); break;
    case 4: PqSampleCut<4><<<H, kReduceThreads, smem, s>>>(p, q); break;
    case 8: PqSampleCut<8><<<H, kReduceThreads, smem, s>>>(p, q); break;
    default: PqSampleCut<0><<<H, kReduceThreads, smem, s>>>(p, q); break;
  }
}

// Step 2 with keep, in place of the one pass's scans: the first pass (again
// for the heads that kept too few), its cut, the 4-bit pass's keys listed
// in id order and ranked, every one kept for the candidates' cut (which
// follows as for the one pass, over w.keptOrd / keptIds).
__host__ inline void EnqueuePqPasses(cudaStream_t s, const ScanParams& p, const PqParams& q, const PqWork& w, int H, int64_t want) {
  const unsigned T = kThreads;
  const size_t smem = PqLutBytes(p.G, p.d);
  const dim3 grid(PqBlocks(p.n, int64_t(T) * kScanPerThread), unsigned(H));
  const auto scan = [&](bool again) {
    switch (PqRowWords(q)) {
      case 2: PqScan<2><<<grid, T, smem, s>>>(p, q, again); break;
      case 4: PqScan<4><<<grid, T, smem, s>>>(p, q, again); break;
      case 8: PqScan<8><<<grid, T, smem, s>>>(p, q, again); break;
      default: PqScan<0><<<grid, T, smem, s>>>(p, q, again); break;
    }
  };
  scan(false);
  Decide<<<1, unsigned(std::max(32, H)), 0, s>>>(p, q.need);
  scan(true);
  const PqKeptCut pk{w.keptOrd, w.keptIds, w.keptCount, q.need, p.n};
  // What the first pass keeps is a few percent of n: grids for that, the kernels stride past it.
  const int64_t guess = std::min<int64_t>(p.n, 2 * std::max(want, q.keep) + 4096);
  OrderRange<PqKeptCut><<<dim3(PqBlocks(guess, int64_t(T) * kRangePer), H), T, 0, s>>>(pk, w.range);
  Histogram<PqKeptCut><<<dim3(PqBlocks(guess, int64_t(T) * kHistPer), H), T, 0, s>>>(pk, w.range, w.hist);
  FindBin<PqKeptCut><<<H, kFindThreads, 0, s>>>(pk, w.hist, w.cuts);
  CollectBin<PqKeptCut><<<dim3(PqBlocks(guess, int64_t(T) * kScanPer), H), T, 0, s>>>(pk, w.range, w.cuts, w.buf, w.bufW);
  ResolveCut<PqKeptCut><<<H, kResolveThreads, ResolveSmem<PqKeptCut>(), s>>>(pk, w.range, w.cuts, w.buf, w.bufW, true);
  MarkTaken<PqKeptCut><<<dim3(PqBlocks(guess, int64_t(T) * kScanPer), H), T, 0, s>>>(pk, w.range, w.cuts, w.takeBits, p.words);
  const dim3 words(unsigned(Tiles(p.words)), unsigned(H));
  PqMarkSecond<<<words, T, 0, s>>>(p, q);
  CountBits<<<words, T, 0, s>>>(w.takeBits, p.words, w.tiles, w.tilesPerHead);
  ScanTiles<<<H, kTileThreads, 0, s>>>(w.tiles, w.tilesPerHead, nullptr, p.words);
  PlaceBits<<<words, T, 0, s>>>(w.takeBits, p.words, w.tiles, w.tilesPerHead, q.list, q.listCap);
  // The list, in buf, is read before the candidates' cut collects its bin there; the counts and bins start anew.
  Check(cudaMemsetAsync(w.keptCount, 0, size_t(H) * 8, s), "memset");
  Check(cudaMemsetAsync(w.hist, 0, size_t(H) * kBins * 2 * 4, s), "memset");
  PqScanListed<<<dim3(PqBlocks(guess + want, T), H), T, 0, s>>>(p, q);
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
