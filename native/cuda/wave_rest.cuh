// The estimation zone of another method's selection on the device
// (WaveStore::Rest, wave_step.h): a nosa or topk-blocks step over a document
// whose wave store the device holds estimates what its selection leaves out
// here instead of on the host (engine/estimate.ts's estimateRest). Included
// once, by wave_step.cu, after the step's kernels.
//
// The step's estimate kernels read the exact rows of kv head h as positions
// j < keptN[h] of keptIds[h] (the selection; there are no `exact` rows here):
// ExpandRows writes the caller's rows there, its ranges first, then its ids,
// so that ExactRows (owner per row: a row listed twice counts once),
// PartialLogits, EstimatePart and MergeEstimate run unchanged. Clusters are
// scored (ScoreClusters: the estimate's per-cluster logits; the rank key it
// also writes is not read) but not cut or rescored. Per step, host to device:
// the query rows, 48 bytes per head, 8 per range and 4 per id (padded to a
// power of two, so that a steady selection size keeps one graph).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/cuda_common.cuh"
#include "cuda/step_graph.cuh"
#include "cuda/wave_buffers.cuh"
#include "cuda/wave_step.h"
#include "cuda/wave_step_attend.cuh"

namespace kvr {
namespace cuda {
namespace {

// Per kv head in the inputs: its first range, ranges, rows they cover, first id, ids, padding.
constexpr int kRestInfo = 6;
// Positions per head at most: below kNoOwner (ExactRows' owner), with room.
constexpr int64_t kRestMaxRows = int64_t(1) << 30;

struct RestRows {
  const int64_t* info;  // [kvHeads, kRestInfo]
  const int32_t* lo;    // [ranges]: a range's first row (empty ranges dropped)
  const int32_t* at;    // [ranges]: its first position among its head's rows
  const int32_t* ids;
};

// Position j of kv head blockIdx.y into keptIds; keptN[h]: the head's rows.
// A position in the ranges finds its range by binary search over their
// first positions, which ascend strictly (no range is empty).
__global__ void ExpandRows(StepParams p, RestRows r) {
  const int h = blockIdx.y;
  const int64_t* in = r.info + size_t(h) * kRestInfo;
  const int64_t inRanges = in[2], total = in[2] + in[4];
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j == 0) p.keptN[h] = total;
  if (j >= total) return;
  int32_t t;
  if (j < inRanges) {
    int64_t a = in[0], b = in[0] + in[1] - 1;  // the last range whose first position is <= j: in [a, b]
    while (a < b) {
      const int64_t m = (a + b + 1) / 2;
      if (r.at[m] <= j) a = m;
      else b = m - 1;
    }
    t = r.lo[a] + int32_t(j - r.at[a]);
  } else {
    t = r.ids[in[3] + (j - inRanges)];
  }
  p.keptIds[size_t(h) * p.width + j] = t;
}

// The rows partly attended clusters have left, per kv head (the host's
// `scanned` with member lists): after ExactRows<1>, before ExactRows<2>
// clears `removed`.
__global__ void RestScanned(StepParams p, unsigned long long* scanned) {
  __shared__ long long scratch[32];
  const int h = blockIdx.y;
  const int32_t front = p.touchedN[h], listed = front + p.touchedN[gridDim.y + h];  // both ends of the list
  long long n = 0;
  for (int32_t k = int32_t(blockIdx.x * blockDim.x + threadIdx.x); k < listed; k += int32_t(gridDim.x * blockDim.x)) {
    const int64_t c = p.base[h] + p.touched[size_t(h) * p.rowsMax + (k < front ? k : p.rowsMax - 1 - (k - front))];
    const int32_t count = p.counts[c], removed = p.removed[c];
    if (removed > 0 && removed < count) n += count - removed;
  }
  n = BlockReduce(n, Add(), scratch);
  if (threadIdx.x == 0 && n > 0) atomicAdd(scanned + h, static_cast<unsigned long long>(n));
}

// What Rest keeps between calls (the store's Step has its own).
struct RestState {
  DevBuf work, in, out;
  HostBuf hin, hout;
  StepGraph graph{StepGraph::Capture::kAtOnce};  // a block method's steady steps share one key
};

int64_t PowerOfTwoAtLeast(int64_t x, int64_t floor) {
  int64_t v = floor;
  while (v < x) v *= 2;
  return v;
}

// One rest call on `stream`, the store's lock held. base: the store's
// pointers (its arrays, owner and removed clean); ev: 13 events.
WaveRestResult RunRest(RestState& R, const StepParams& base, const WaveStoreConfig& cfg, int64_t cmax, cudaStream_t stream, cudaEvent_t* ev,
                       const WaveRestArgs& a) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point h0 = Clock::now();
  const int H = cfg.kvHeads, d = cfg.headDim, stride = d + 8, Q = a.qHeads;
  const int64_t N = cfg.tokens;
  if (Q < H || Q % H != 0) throw std::runtime_error("wave rest: qHeads must be a multiple of kvHeads");
  const int G = Q / H;
  if (int64_t(G) * stride > kMaxQueryFloats) throw std::runtime_error("wave rest: GQA group too large for shared memory");
  if (!a.q || !a.normTerms) throw std::runtime_error("wave rest: q and normTerms are needed");
  if (a.rangeStart.size() != size_t(H) + 1 || a.idStart.size() != size_t(H) + 1)
    throw std::runtime_error("wave rest: rangeStart and idStart need kvHeads + 1 entries");
  if (a.rangeStart[0] != 0 || a.rangeStart[H] * 2 != int64_t(a.ranges.size()) || a.idStart[0] != 0 || a.idStart[H] != int64_t(a.ids.size()))
    throw std::runtime_error("wave rest: rangeStart and idStart must span ranges and ids");
  // Per head: its ranges' first rows and positions (empty ones dropped), rows, ids.
  std::vector<int64_t> info(size_t(H) * kRestInfo, 0);
  std::vector<int32_t> lo, at;
  std::vector<int64_t> rows(static_cast<size_t>(H), 0);
  int64_t width = 0;
  for (int h = 0; h < H; ++h) {
    if (a.rangeStart[h + 1] < a.rangeStart[h] || a.idStart[h + 1] < a.idStart[h]) throw std::runtime_error("wave rest: rangeStart and idStart must ascend");
    const int64_t first = int64_t(lo.size());
    int64_t inRanges = 0;
    for (int64_t i = a.rangeStart[h]; i < a.rangeStart[h + 1]; ++i) {
      const int64_t l = a.ranges[size_t(2 * i)], e = a.ranges[size_t(2 * i + 1)];
      if (l < 0 || l > e || e > N) throw std::runtime_error("wave rest: a range outside [0, tokens) or with lo > hi");
      if (l == e) continue;
      if (inRanges + (e - l) >= kRestMaxRows) throw std::runtime_error("wave rest: more than 2^30 rows for a head");
      lo.push_back(int32_t(l));
      at.push_back(int32_t(inRanges));
      inRanges += e - l;
    }
    const int64_t nIds = a.idStart[h + 1] - a.idStart[h];
    rows[size_t(h)] = inRanges + nIds;
    if (rows[size_t(h)] >= kRestMaxRows) throw std::runtime_error("wave rest: more than 2^30 rows for a head");
    int64_t* ih = info.data() + size_t(h) * kRestInfo;
    ih[0] = first;
    ih[1] = int64_t(lo.size()) - first;
    ih[2] = inRanges;
    ih[3] = a.idStart[h];
    ih[4] = nIds;
    width = std::max(width, rows[size_t(h)]);
  }
  // Sizes a launch or copy bakes in, rounded up to a power of two: a
  // selection whose size moves a little from step to step replays one graph.
  // Positions past a head's rows are skipped by every kernel.
  width = PowerOfTwoAtLeast(width, kTile);
  const int64_t rangeCap = PowerOfTwoAtLeast(int64_t(lo.size()), 64), idCap = PowerOfTwoAtLeast(int64_t(a.ids.size()), 1024);
  const int64_t rowsMax = width;
  const int nMain = int(Cdiv(cmax, kTile)), nSub = int(Cdiv(rowsMax, kTile)), parts = nMain + nSub;
  // MergeEstimate holds a double per part in shared memory, beside ~9 KiB of
  // its own, within the 48 KiB a launch has without opting in: 4096 parts
  // (2M clusters and rows a head; engine/rest-on-device.ts asks for at most
  // 1M of each).
  if (parts > 4096) throw std::runtime_error("wave rest: too many clusters and rows for one call");
  StepParams p;
  std::memcpy(&p, &base, sizeof p);
  p.group = G;
  p.scale = a.scale;
  p.spreadMode = a.order != WaveRestOrder::kFirst;
  p.spread = 2.f;  // the rank key ScoreClusters writes and nothing reads
  p.restRows = a.order == WaveRestOrder::kRows;
  p.exactCount = 0;
  p.tmax = 0;
  p.width = width;
  p.nMain = nMain;
  p.parts = parts;
  p.attendPart0 = parts;
  p.estimateOn = true;
  p.attendOn = false;
  // No rescored dots here: PartialLogits must not take a cluster's logit from
  // them (it would read the last Step's cut, cnt, as this call's).
  p.dotsOn = false;
  p.rowsMax = rowsMax;
  Layout W;
  const size_t oLogits = W.Add(size_t(Q) * cmax * 4), oPm = W.Add(size_t(Q) * parts * 4), oPden = W.Add(size_t(Q) * parts * 4),
               oPnum = W.Add(size_t(Q) * parts * d * 4), oPest = W.Add(size_t(H) * nMain * 8), oTouched = W.Add(size_t(H) * rowsMax * 4),
               oTouchedN = W.Add(size_t(H) * 8), oKeptIds = W.Add(size_t(H) * width * 4), oKeptN = W.Add(size_t(H) * 8);
  R.work.Need(W.at, "cudaMalloc (wave rest)");
  void* X = R.work.p;
  p.logits = Layout::At<float>(X, oLogits);
  p.pm = Layout::At<float>(X, oPm);
  p.pden = Layout::At<float>(X, oPden);
  p.pnum = Layout::At<float>(X, oPnum);
  p.pest = Layout::At<int64_t>(X, oPest);
  p.touched = Layout::At<int32_t>(X, oTouched);
  p.touchedN = Layout::At<int32_t>(X, oTouchedN);
  p.keptIds = Layout::At<int32_t>(X, oKeptIds);
  p.keptN = Layout::At<int64_t>(X, oKeptN);
  Layout In;
  const size_t oQ = In.Add(size_t(Q) * stride * 4), oInfo = In.Add(size_t(H) * kRestInfo * 8), oLo = In.Add(size_t(rangeCap) * 4),
               oAt = In.Add(size_t(rangeCap) * 4), oIds = In.Add(size_t(idCap) * 4);
  R.in.Need(In.at, "cudaMalloc (wave rest inputs)");
  R.hin.Need(In.at, "cudaHostAlloc (wave rest inputs)");
  float* qAug = Layout::At<float>(R.hin.p, oQ);
  for (int r = 0; r < Q; ++r) {
    float* row = qAug + size_t(r) * stride;
    std::memcpy(row, a.q + size_t(r) * d, size_t(d) * 4);
    row[d] = a.normTerms[r];
    std::fill(row + d + 1, row + stride, 0.f);
  }
  std::memcpy(Layout::At<int64_t>(R.hin.p, oInfo), info.data(), info.size() * 8);
  if (!lo.empty()) {
    std::memcpy(Layout::At<int32_t>(R.hin.p, oLo), lo.data(), lo.size() * 4);
    std::memcpy(Layout::At<int32_t>(R.hin.p, oAt), at.data(), at.size() * 4);
  }
  if (!a.ids.empty()) std::memcpy(Layout::At<int32_t>(R.hin.p, oIds), a.ids.data(), a.ids.size() * 4);
  p.qAug = Layout::At<float>(R.in.p, oQ);
  const RestRows rr{Layout::At<int64_t>(R.in.p, oInfo), Layout::At<int32_t>(R.in.p, oLo), Layout::At<int32_t>(R.in.p, oAt),
                    Layout::At<int32_t>(R.in.p, oIds)};
  Layout Out;
  const size_t oOut = Out.Add(size_t(Q) * d * 4), oLse = Out.Add(size_t(Q) * 4), oEst = Out.Add(size_t(H) * 8), oScanned = Out.Add(size_t(H) * 8);
  R.out.Need(Out.at, "cudaMalloc (wave rest outputs)");
  R.hout.Need(Out.at, "cudaHostAlloc (wave rest outputs)");
  p.out = Layout::At<float>(R.out.p, oOut);
  p.lse = Layout::At<float>(R.out.p, oLse);
  p.est = Layout::At<int64_t>(R.out.p, oEst);
  unsigned long long* scanned = Layout::At<unsigned long long>(R.out.p, oScanned);

  Check(cudaSetDevice(0), "cudaSetDevice");
  const bool bf16 = cfg.dtype == Dtype::kBf16;
  const size_t qSmem = size_t(G) * stride * 4;
  const bool countScanned = p.spreadMode && p.restRows;
  const Clock::time_point h1 = Clock::now();
  const auto mark = [&](int i, cudaStream_t s) {
    if (a.stageTimes) Check(cudaEventRecord(ev[i], s), "event");
  };
  const auto enqueue = [&](cudaStream_t s) {
    Check(cudaMemcpyAsync(R.in.p, R.hin.p, In.at, cudaMemcpyHostToDevice, s), "copy in");
    mark(1, s);
    // The clusters' logits, launched as Step launches ScoreClusters.
    const dim3 scoreGrid(unsigned(Cdiv(cmax, kRowsPerCta)), unsigned(H));
    const size_t scoreSmem = qSmem * (p.spreadMode ? 2 : 1);
    const size_t stagedSmem = 2 * qSmem + ScoreTileBytes(d, stride);
    if (p.spreadMode && stagedSmem <= kStagedSmem) {
      if (bf16) ScoreClusters<true, true><<<scoreGrid, kThreads, stagedSmem, s>>>(p);
      else ScoreClusters<false, true><<<scoreGrid, kThreads, stagedSmem, s>>>(p);
    } else {
      if (bf16) ScoreClusters<true, false><<<scoreGrid, kThreads, scoreSmem, s>>>(p);
      else ScoreClusters<false, false><<<scoreGrid, kThreads, scoreSmem, s>>>(p);
    }
    mark(2, s);
    const dim3 rowsGrid(unsigned(Cdiv(rowsMax, kThreads)), unsigned(H));
    ExpandRows<<<rowsGrid, kThreads, 0, s>>>(p, rr);
    Check(cudaMemsetAsync(p.touchedN, 0, size_t(H) * 8, s), "memset");
    Check(cudaMemsetAsync(scanned, 0, size_t(H) * 8, s), "memset");
    ExactRows<0><<<rowsGrid, kThreads, 0, s>>>(p);
    ExactRows<1><<<rowsGrid, kThreads, 0, s>>>(p);
    mark(3, s);
    if (p.spreadMode) {
      const dim3 grid(unsigned(std::min<int64_t>(Cdiv(rowsMax, kPartialWarps), 512)), unsigned(H));
      const size_t smem = size_t(kPartialWarps) * 2 * d * 4;
      if (bf16) PartialLogits<true><<<grid, kPartialWarps * 32, smem, s>>>(p);
      else PartialLogits<false><<<grid, kPartialWarps * 32, smem, s>>>(p);
    }
    if (countScanned)
      RestScanned<<<dim3(unsigned(std::min<int64_t>(Cdiv(rowsMax, kThreads), 64)), unsigned(H)), kThreads, 0, s>>>(p, scanned);
    mark(4, s);
    if (bf16) {
      EstimatePart<true, false><<<dim3(unsigned(nMain), unsigned(H)), kThreads, kEstimateSmem, s>>>(p);
      EstimatePart<true, true><<<dim3(unsigned(nSub), unsigned(H)), kThreads, kEstimateSmem, s>>>(p);
    } else {
      EstimatePart<false, false><<<dim3(unsigned(nMain), unsigned(H)), kThreads, kEstimateSmem, s>>>(p);
      EstimatePart<false, true><<<dim3(unsigned(nSub), unsigned(H)), kThreads, kEstimateSmem, s>>>(p);
    }
    mark(5, s);
    MergeEstimate<<<dim3(unsigned(Q), unsigned(Cdiv(d, 32))), 256, size_t(parts) * 8, s>>>(p);
    ExactRows<2><<<rowsGrid, kThreads, 0, s>>>(p);  // owner and removed clean for the next call
    Check(cudaGetLastError(), "wave rest launch");
    mark(6, s);
    Check(cudaMemcpyAsync(R.hout.p, R.out.p, Out.at, cudaMemcpyDeviceToHost, s), "copy out");
  };
  Check(cudaEventRecord(ev[0], stream), "event");
  if (a.graph && !a.stageTimes) {
    // Everything the launches bake in beyond p: the copies' buffers and sizes, the rows' inputs, the launches chosen.
    struct Key {
      StepParams p;
      RestRows rr;
      const void *in, *hin, *out, *hout;
      size_t inBytes, outBytes;
      int nSub;
      bool bf16;
    } k;
    std::memset(&k, 0, sizeof k);
    std::memcpy(&k.p, &p, sizeof p);
    k.rr = rr;
    k.in = R.in.p, k.hin = R.hin.p, k.out = R.out.p, k.hout = R.hout.p;
    k.inBytes = In.at, k.outBytes = Out.at, k.nSub = nSub, k.bf16 = bf16;
    R.graph.Run(stream, &k, sizeof k, enqueue);
  } else {
    enqueue(stream);
  }
  Check(cudaEventRecord(ev[12], stream), "event");
  const Clock::time_point h2 = Clock::now();
  Check(cudaStreamSynchronize(stream), "wave rest");
  const Clock::time_point h3 = Clock::now();

  WaveRestResult r;
  const float* o = Layout::At<float>(R.hout.p, oOut);
  const float* l = Layout::At<float>(R.hout.p, oLse);
  r.out.assign(o, o + size_t(Q) * d);
  r.lse.assign(l, l + Q);
  const int64_t* e = Layout::At<int64_t>(R.hout.p, oEst);
  const unsigned long long* sc = Layout::At<unsigned long long>(R.hout.p, oScanned);
  for (int h = 0; h < H; ++h) {
    r.estimated.push_back(double(e[h]));
    r.scanned.push_back(countScanned ? double(sc[h]) : 0.0);
  }
  r.rows = rows;
  Check(cudaEventElapsedTime(&r.ms, ev[0], ev[12]), "event time");
  static const char* const kStages[] = {"in", "score", "rows", "partial", "tiles", "merge"};
  for (int i = 0; i < 6 && a.stageTimes; ++i) {
    float ms = 0;
    Check(cudaEventElapsedTime(&ms, ev[i], ev[i + 1]), "event time");
    r.stages.emplace_back(kStages[i], ms);
  }
  if (a.stageTimes) {
    float ms = 0;
    Check(cudaEventElapsedTime(&ms, ev[6], ev[12]), "event time");
    r.stages.emplace_back("out", ms);
  }
  const auto msBetween = [](Clock::time_point x, Clock::time_point y) { return std::chrono::duration<float, std::milli>(y - x).count(); };
  r.graphCaptures = R.graph.Captures();
  r.host = {{"prep", msBetween(h0, h1)}, {"launch", msBetween(h1, h2)}, {"wait", msBetween(h2, h3)}, {"copy", msBetween(h3, Clock::now())}};
  return r;
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
