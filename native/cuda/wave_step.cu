// The wave decode step on the GPU (see wave_step.h).
//
// Per step, on one stream: the inputs in one copy (query rows with their
// norm term, per-head budgets, sinks/window rows); ScoreClusters (every
// cluster of every head: the optimistic score as a rank order, and per q head
// the cluster's logit, kept for the estimate: second order with kSpread,
// s·q·centroid with kRadius); the cluster cut (where the best clusters'
// tokens reach the target, by a radix select on (score, index) keys,
// wave_select.cuh) and a scan of the tokens each gives; GatherCandidates
// (members, the cut cluster's first ones, in cluster order);
// RescoreCandidates (max over the group of q·k; rows in the skip ranges left
// out); the candidate cut (the best `keep`, ties towards the lower id, the
// host's order) and ScatterKept; then the
// estimate: the exact rows (selection + sinks/window) deduplicated through an
// owner array, counted per cluster; with kSpread, PartialLogits (a partly
// kept cluster's logit from the rows it has left, log of their own logits'
// mean exp with restRows, else from their moments, over the one
// ScoreClusters wrote); EstimatePart over cluster tiles (rows left:
// (n-r)·e to the normaliser, n·e·v̄ to the numerator) and over the exact
// rows of partly kept clusters (-e·v), tiles merged in float64; the outputs
// in one copy back. How scores are summed: wave_step_kernels.cuh.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/cuda_common.cuh"
#include "cuda/wave_step.h"
#include "cuda/wave_step_kernels.cuh"
#include "cuda/wave_score_mma.cuh"
#include "cuda/wave_rescore_mma.cuh"
#include "cuda/wave_rescore.cuh"
#include "cuda/wave_step_estimate.cuh"
#include "cuda/wave_partial.cuh"
#include "cuda/wave_step_attend.cuh"
#include "cuda/wave_select.cuh"
#include "cuda/step_graph.cuh"
#include "cuda/wave_buffers.cuh"
#include "cuda/wave_rest.cuh"
#include "cuda/wave_paths.cuh"
#include "cuda/wave_cache.cuh"
#include "cuda/wave_page_cap.cuh"
#include "cuda/wave_setup.cuh"
#include "cuda/wave_sizes.cuh"

namespace kvr {
namespace cuda {

struct WaveStore::Impl {
  WaveStoreConfig cfg;
  int stride = 0;
  std::vector<int64_t> clusters, base;
  int64_t ctot = 0, cmax = 0;
  cudaStream_t stream = nullptr;
  cudaEvent_t ev[13] = {};
  DevBuf store, fixed, work, in, out;
  HostBuf hin, hout;
  size_t summaryBytes = 0, momentBytes = 0, mapBytes = 0, kvBytes = 0;
  StepParams p{};  // the store's and the fixed scratch's pointers
  // the cuts' scratch (wave_select.cuh): the cluster cut's bin gathered, the histogram, per head the two cuts
  uint64_t* buf1 = nullptr;
  int64_t* bufW1 = nullptr;
  uint32_t* hist = nullptr;
  CutState* cuts = nullptr;
  uint32_t* range = nullptr;  // [2, kvHeads, 2]: each cut's order range per head
  StepGraph graph;  // the lean step's launches (WaveStepArgs::graph)
  RestState rest;   // Rest's buffers and graphs (wave_rest.cuh)
  RowCache cache;   // the paged store's (cfg.cacheRows > 0; wave_cache.cuh)
  PageCap cap;      // its cap on the rows a step pages (cfg.pageCapBytes > 0; wave_page_cap.cuh)
  std::mutex mu;
  ~Impl() {
    for (auto& e : ev)
      if (e) cudaEventDestroy(e);
    if (stream) cudaStreamDestroy(stream);
  }
};

bool WaveStore::Supports(int headDim) { return headDim >= 8 && headDim <= 1024 && headDim % 8 == 0; }

WaveStore::WaveStore(const WaveStoreConfig& cfg, const WaveHeadHost* heads) : impl_(std::make_unique<Impl>()) {
  Impl& I = *impl_;
  I.cfg = cfg;
  if (!Supports(cfg.headDim)) throw std::runtime_error("wave store: headDim must be a multiple of 8 in [8, 1024]");
  if (cfg.kvHeads < 1 || cfg.tokens < 1) throw std::runtime_error("wave store: no heads or no tokens");
  if (!IsWordDtype(cfg.dtype)) throw std::runtime_error("wave store: dtype must be f16 or bf16");
  if (cfg.cacheRows < 0) throw std::runtime_error("wave store: cacheRows must be >= 0");
  const bool paged = cfg.cacheRows > 0;
  if (cfg.pageCapBytes < 0 || cfg.pageCapFrom < 0) throw std::runtime_error("wave store: pageCapBytes and pageCapFrom must be >= 0");
  if (cfg.pageCapBytes > 0 && !paged) throw std::runtime_error("wave store: pageCapBytes needs the paged store (cacheRows > 0)");
  for (int h = 0; h < cfg.kvHeads; ++h)
    if (!heads[h].keyAxes || !heads[h].keyVars || !heads[h].axisScales || !heads[h].varScales)
      throw std::runtime_error("wave store: every head needs keyAxes, keyVars and their scales");
  const int H = cfg.kvHeads, d = cfg.headDim;
  const int64_t N = cfg.tokens;
  I.stride = d + 8;
  I.base.assign(size_t(H) + 1, 0);
  for (int h = 0; h < H; ++h) {
    if (heads[h].clusters < 1) throw std::runtime_error("wave store: a head without clusters");
    I.clusters.push_back(heads[h].clusters);
    I.base[h + 1] = I.base[h] + heads[h].clusters;
    I.cmax = std::max(I.cmax, heads[h].clusters);
  }
  I.ctot = I.base[H];
  if (I.ctot >= (int64_t(1) << 31) || int64_t(H) * N >= (int64_t(1) << 31))
    throw std::runtime_error("wave store: more than 2^31 clusters or rows");
  const HostMaps maps(heads, H, N, I.base);
  Check(cudaSetDevice(0), "cudaSetDevice");
  Check(cudaStreamCreateWithFlags(&I.stream, cudaStreamNonBlocking), "stream");
  for (auto& e : I.ev) Check(cudaEventCreate(&e), "event");
  Layout L;
  const size_t oCent = L.Add(size_t(I.ctot) * I.stride * 2), oMeans = L.Add(size_t(I.ctot) * d * 2),
               oAxes = L.Add(size_t(I.ctot) * d), oVars = L.Add(size_t(I.ctot) * d), oScales = L.Add(size_t(I.ctot) * 8),
               oCounts = L.Add(size_t(I.ctot) * 4), oStart = L.Add(size_t(I.ctot) * 4), oMembers = L.Add(size_t(H) * N * maps.Word()),
               oTok = L.Add(size_t(H) * N * maps.Word()), oTiles = L.Add(maps.TileBytes()), oBase = L.Add(size_t(H + 1) * 8), oShares = L.Add(size_t(H) * 4);
  I.summaryBytes = L.at;
  I.momentBytes = oCounts - oAxes;
  I.mapBytes = oBase - oMembers;
  const size_t oKeys = L.Add(paged ? 0 : size_t(H) * N * d * 2), oValues = L.Add(paged ? 0 : size_t(H) * N * d * 2);
  I.kvBytes = L.at - I.summaryBytes;
  I.store.Need(L.at, "cudaMalloc (wave store)");
  void* S = I.store.p;
  StepParams& p = I.p;
  p.cent = Layout::At<uint16_t>(S, oCent);
  p.means = Layout::At<uint16_t>(S, oMeans);
  p.axes = Layout::At<int8_t>(S, oAxes);
  p.vars = Layout::At<uint8_t>(S, oVars);
  p.axisScales = Layout::At<float>(S, oScales), p.varScales = p.axisScales + I.ctot;
  p.counts = Layout::At<int32_t>(S, oCounts);
  p.memberStart = Layout::At<int32_t>(S, oStart);
  p.maps = maps.Place(Layout::At<void>(S, oMembers), Layout::At<void>(S, oTok), Layout::At<int32_t>(S, oTiles));
  p.base = Layout::At<int64_t>(S, oBase);
  p.shares = Layout::At<float>(S, oShares);
  p.keys = Layout::At<uint16_t>(S, oKeys);
  p.values = Layout::At<uint16_t>(S, oValues);
  auto put = [](const void* dst, const void* src, size_t bytes) {
    Check(cudaMemcpy(const_cast<void*>(dst), src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy (wave store)");
  };
  for (int h = 0; h < H; ++h) {
    const size_t b = size_t(I.base[h]), C = size_t(heads[h].clusters);
    put(p.cent + b * I.stride, heads[h].centroids, C * I.stride * 2);
    put(p.means + b * d, heads[h].valueMeans, C * d * 2);
    put(p.axes + b * d, heads[h].keyAxes, C * d), put(p.axisScales + b, heads[h].axisScales, C * 4);
    put(p.vars + b * d, heads[h].keyVars, C * d), put(p.varScales + b, heads[h].varScales, C * 4);
    put(p.counts + b, heads[h].counts, C * 4);
    if (!paged) put(p.keys + size_t(h) * N * d, heads[h].keys, size_t(N) * d * 2);
    if (!paged) put(p.values + size_t(h) * N * d, heads[h].values, size_t(N) * d * 2);
  }
  p.rowSlot = nullptr;
  if (paged) I.cache.Setup(cfg, heads, p);  // keys, values and rowSlot: the cache's
  p.capMis = p.capAdm = nullptr;
  if (paged && cfg.pageCapBytes > 0) I.cap.Setup(cfg, I.ctot, I.cmax, p);
  put(p.memberStart, maps.memberStart.data(), maps.memberStart.size() * 4);
  maps.Copy(p.maps, heads, put);
  put(p.base, I.base.data(), I.base.size() * 8);
  std::vector<float> shares(static_cast<size_t>(H));
  for (int h = 0; h < H; ++h) shares[size_t(h)] = heads[h].varianceShare;
  put(p.shares, shares.data(), shares.size() * 4);
  // Scratch sized by the store: the cluster cut (orders, tokens taken and
  // their scan, the cut's bin gathered, the histogram), owner and removed.
  Layout F;
  const size_t oOrd1 = F.Add(size_t(I.ctot) * 4), oCnt = F.Add(size_t(I.ctot) * 8), oCum = F.Add(size_t(I.ctot) * 8),
               oBuf1 = F.Add(size_t(I.ctot) * 8), oBufW1 = F.Add(size_t(I.ctot) * 8), oHist = F.Add(size_t(H) * kBins * 16),
               oCuts = F.Add(size_t(H) * 2 * sizeof(CutState)), oRange = F.Add(size_t(H) * 6 * 4), oOwner = F.Add(size_t(H) * N * 4),
               oRemoved = F.Add(size_t(I.ctot) * 4);
  I.fixed.Need(F.at, "cudaMalloc (wave scratch)");
  void* X = I.fixed.p;
  p.ord1 = Layout::At<uint32_t>(X, oOrd1);
  p.cnt = Layout::At<int64_t>(X, oCnt);
  p.cum = Layout::At<int64_t>(X, oCum);
  I.buf1 = Layout::At<uint64_t>(X, oBuf1);
  I.bufW1 = Layout::At<int64_t>(X, oBufW1);
  I.hist = Layout::At<uint32_t>(X, oHist);
  I.cuts = Layout::At<CutState>(X, oCuts);
  I.range = Layout::At<uint32_t>(X, oRange);
  p.owner = Layout::At<int32_t>(X, oOwner);
  p.removed = Layout::At<int32_t>(X, oRemoved);
  Check(cudaMemset(p.owner, 0x7f, size_t(H) * N * 4), "cudaMemset");  // kNoOwner
  Check(cudaMemset(p.removed, 0, size_t(I.ctot) * 4), "cudaMemset");
  p.N = N;
  p.cmax = I.cmax;
  p.d = d;
  p.stride = I.stride;
  SetWaveKernelAttributes();
  Check(cudaDeviceSynchronize(), "wave store upload");
}

WaveStore::~WaveStore() = default;

const WaveStoreConfig& WaveStore::Config() const { return impl_->cfg; }
int64_t WaveStore::Clusters(int head) const { return impl_->clusters.at(size_t(head)); }

WaveStoreBytes WaveStore::Bytes() const {
  const Impl& I = *impl_;
  WaveStoreBytes b;
  b.summaries = int64_t(I.summaryBytes);
  b.moments = int64_t(I.momentBytes);
  b.maps = int64_t(I.mapBytes);
  b.kv = int64_t(I.kvBytes);
  b.cache = int64_t(I.cache.dev.bytes);
  b.cacheRows = I.cache.rows;
  b.scratch = int64_t(I.cap.dev.bytes + I.fixed.bytes + I.work.bytes + I.in.bytes + I.out.bytes + I.rest.work.bytes + I.rest.in.bytes + I.rest.out.bytes);
  return b;
}

WaveRestResult WaveStore::Rest(const WaveRestArgs& a) {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> lock(I.mu);
  if (I.cache.rows > 0) throw std::runtime_error("wave rest: not on a paged store (cacheRows > 0): the rows it reads may exceed the cache");
  return RunRest(I.rest, I.p, I.cfg, I.cmax, I.stream, I.ev, a);
}

WaveStepResult WaveStore::Step(const WaveStepArgs& a) {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> lock(I.mu);
  using Clock = std::chrono::steady_clock;
  const Clock::time_point h0 = Clock::now();
  const int H = I.cfg.kvHeads, d = I.cfg.headDim, stride = I.stride, Q = a.qHeads;
  const int64_t N = I.cfg.tokens;
  if (Q < H || Q % H != 0) throw std::runtime_error("wave step: qHeads must be a multiple of kvHeads");
  const int G = Q / H;
  if (int64_t(G) * stride > kMaxQueryFloats) throw std::runtime_error("wave step: GQA group too large for shared memory");
  if (a.budget.size() != size_t(H) || a.target.size() != size_t(H) || a.maxClusters.size() != size_t(H))
    throw std::runtime_error("wave step: budget, target and maxClusters need one entry per kv head");
  if (!a.q || !a.normTerms) throw std::runtime_error("wave step: q and normTerms are needed");
  if (!a.keep.empty() && a.keep.size() != size_t(H)) throw std::runtime_error("wave step: keep needs one entry per kv head");
  if (a.skip.size() > 2) throw std::runtime_error("wave step: at most two skip ranges");
  std::vector<int64_t> params(size_t(H) * kParams);
  const int64_t skipped = SkippedRows(a.skip, N);
  int64_t widthOwn = 0, tmaxOwn = 0;
  for (int h = 0; h < H; ++h) {
    int64_t* ph = params.data() + size_t(h) * kParams;
    ph[0] = std::clamp<int64_t>(a.budget[h], 0, N);
    ph[1] = std::clamp<int64_t>(a.target[h], 0, N);
    ph[2] = std::clamp<int64_t>(a.maxClusters[h], 0, I.clusters[h]);
    ph[3] = a.keep.empty() ? ph[0] : std::clamp<int64_t>(a.keep[h], 0, ph[0]);
    widthOwn = std::max(widthOwn, ph[0]);
    tmaxOwn = std::max(tmaxOwn, ph[1]);
    // The kept ids are the best `keep` outside the skip ranges, which is what
    // dropping those rows from the best `budget` leaves only with this room.
    if (skipped > 0 && ph[3] + skipped > ph[0] && ph[3] > 0)
      throw std::runtime_error("wave step: keep + the rows in the skip ranges must not exceed the budget");
  }
  // Strides, grids and layouts from buckets of the sizes (StepBucket), the
  // counts themselves device data (params, exactN): the graph's key holds
  // while a session's own tokens are fewer than its window (E and the budget
  // move by a row a step). ids come back at the bucket's stride.
  const int64_t E = StepBucket(a.exactCount), width = StepBucket(widthOwn), tmax = StepBucket(tmaxOwn), rowsMax = width + E;
  if (int64_t(H) * tmax >= (int64_t(1) << 31)) throw std::runtime_error("wave step: too many candidates");
  // Parts MergeEstimate combines: the estimate's cluster tiles and its exact-row
  // tiles (with a.estimate), then the exact rows attended (with a.attend).
  const int nMain = a.estimate ? int(Cdiv(I.cmax, kTile)) : 0, nSub = a.estimate ? int(Cdiv(rowsMax, kTile)) : 0,
            nAtt = a.attend ? int(Cdiv(rowsMax, kTile)) : 0, parts = nMain + nSub + nAtt;
  // Copied bytewise, padding included: the graph's key compares p's bytes.
  StepParams p;
  std::memcpy(&p, &I.p, sizeof p);
  p.group = G;
  p.scale = a.scale;
  p.spreadMode = a.ranking == WaveRanking::kSpread;
  p.spread = a.spread;
  p.restRows = a.restRows;
  p.exactCount = E;
  p.tmax = tmax;
  p.width = width;
  p.nMain = nMain;
  p.parts = parts;
  p.attendPart0 = nMain + nSub;
  int64_t skipRanges[4];
  for (size_t i = 0; i < 2; ++i) {
    skipRanges[2 * i] = i < a.skip.size() ? a.skip[i].first : 0;
    skipRanges[2 * i + 1] = i < a.skip.size() ? a.skip[i].second : 0;
  }
  p.estimateOn = a.estimate, p.attendOn = a.attend;
  // The kernel paths (wave_paths.cuh: KVRECALL_WAVE_LEGACY=1 and the switches of single changes).
  const StepPaths P = ReadStepPaths(d);
  const bool legacy = P.legacy;
  p.dotsOn = p.prefetchRows = !legacy;
  p.scoreSplit = P.split;
  p.range = P.range ? I.range : nullptr;  // StepClear sets the ranges before ScoreClusters (P.range needs P.clear)
  p.packOwners = P.owners && tmax > 0 && (a.estimate || a.attend) && rowsMax > 0;  // ScatterPack runs, ExactRows<0> would
  const size_t n2 = size_t(H) * tmax;
  Layout W;
  const size_t oLogits = W.Add(size_t(Q) * I.cmax * 4), oSel = W.Add(size_t(H) * 16), oOrd2 = W.Add(n2 * 4),
               oTake2 = W.Add(n2 * 4), oCum2 = W.Add(n2 * 4), oBuf2 = W.Add(n2 * 8), oBufW2 = W.Add(n2 * 8),
               oCand = W.Add(n2 * 4), oPm = W.Add(size_t(Q) * parts * 4),
               oPden = W.Add(size_t(Q) * parts * 4), oPnum = W.Add(size_t(Q) * parts * d * 4),
               oPest = W.Add(size_t(H) * std::max(nMain, 1) * 8), oTouched = W.Add(size_t(H) * std::max<int64_t>(rowsMax, 1) * 4),
               oTouchedN = W.Add(size_t(H) * 8),
               oKeptIds = W.Add(size_t(H) * std::max<int64_t>(width, 1) * 4), oKeptN = W.Add(size_t(H) * 8), oTiles1 = W.Add(size_t(H) * Tiles(I.cmax) * 8);
  // The rescored candidates' dots, then (attend) the exact rows'.
  const int64_t dotStride = tmax + (a.attend ? E : 0);
  const size_t oDots = W.Add(size_t(Q) * dotStride * 4), oKeptPos = W.Add(size_t(H) * std::max<int64_t>(width, 1) * 4);
  I.work.Need(W.at, "cudaMalloc (wave step)");
  void* X = I.work.p;
  p.logits = Layout::At<float>(X, oLogits);
  p.sel = Layout::At<int64_t>(X, oSel);
  p.ord2 = Layout::At<uint32_t>(X, oOrd2);
  p.take2 = Layout::At<int32_t>(X, oTake2);
  p.cum2 = Layout::At<int32_t>(X, oCum2);
  uint64_t* buf2 = Layout::At<uint64_t>(X, oBuf2);
  int64_t* bufW2 = Layout::At<int64_t>(X, oBufW2);
  p.cand = Layout::At<int32_t>(X, oCand);
  p.pm = Layout::At<float>(X, oPm);
  p.pden = Layout::At<float>(X, oPden);
  p.pnum = Layout::At<float>(X, oPnum);
  p.pest = Layout::At<int64_t>(X, oPest);
  p.touched = Layout::At<int32_t>(X, oTouched);
  p.touchedN = Layout::At<int32_t>(X, oTouchedN);
  p.keptIds = Layout::At<int32_t>(X, oKeptIds);
  p.keptN = Layout::At<int64_t>(X, oKeptN);
  p.dots = Layout::At<float>(X, oDots);
  p.dotStride = dotStride;
  p.keptPos = Layout::At<int32_t>(X, oKeptPos);
  p.rowsMax = rowsMax;
  int64_t* const tiles1 = Layout::At<int64_t>(X, oTiles1);  // the cluster cut's tile sums (cum2 holds the candidates')
  // Inputs: the query rows with their norm term in column d, the per-head numbers, the exact rows.
  Layout In;
  const size_t oQ = In.Add(size_t(Q) * stride * 4), oParams = In.Add(size_t(H) * kParams * 8), oSkip = In.Add(4 * 8),
               oExactN = In.Add(8), oExact = In.Add(size_t(E) * 4);
  I.in.Need(In.at, "cudaMalloc (wave inputs)");
  I.hin.Need(In.at, "cudaHostAlloc (wave inputs)");
  float* qAug = Layout::At<float>(I.hin.p, oQ);
  for (int r = 0; r < Q; ++r) {
    float* row = qAug + size_t(r) * stride;
    std::memcpy(row, a.q + size_t(r) * d, size_t(d) * 4);
    row[d] = a.normTerms[r];
    std::fill(row + d + 1, row + stride, 0.f);
  }
  std::memcpy(Layout::At<int64_t>(I.hin.p, oParams), params.data(), params.size() * 8);
  std::memcpy(Layout::At<int64_t>(I.hin.p, oSkip), skipRanges, sizeof skipRanges);
  *Layout::At<int64_t>(I.hin.p, oExactN) = a.exactCount;
  if (a.exactCount > 0) std::memcpy(Layout::At<int32_t>(I.hin.p, oExact), a.exact, size_t(a.exactCount) * 4);
  p.qAug = Layout::At<float>(I.in.p, oQ);
  p.params = Layout::At<int64_t>(I.in.p, oParams);
  p.skip = Layout::At<int64_t>(I.in.p, oSkip);
  p.exact = Layout::At<int32_t>(I.in.p, oExact);
  p.exactN = Layout::At<int64_t>(I.in.p, oExactN);
  Layout Out;
  // The ids last: without args.ids the copy back stops before them.
  // The cache's counters, the cap's after them; with detail, momentList after the ids (wave_page_cap.cuh).
  const bool capped = I.cap.share > 0, detail = capped && a.detail;
  const int nCounters = I.cache.rows > 0 ? kCacheCounters + (capped ? CapCounters(H) : 0) : 0;
  const size_t oCounts = Out.Add(size_t(H) * 16), oOut = Out.Add(size_t(Q) * d * 4), oLse = Out.Add(size_t(Q) * 4),
               oEst = Out.Add(size_t(H) * 8), oCache = Out.Add(size_t(nCounters) * 8),
               oIds = Out.Add(size_t(H) * width * 4), oMoments = Out.Add(detail ? size_t(H) * rowsMax * 4 : 0);
  const size_t outBytes = detail ? Out.at : a.ids ? oMoments : oIds;
  I.out.Need(Out.at, "cudaMalloc (wave outputs)");
  I.hout.Need(Out.at, "cudaHostAlloc (wave outputs)");
  p.outIds = Layout::At<int32_t>(I.out.p, oIds);
  p.outCounts = Layout::At<int64_t>(I.out.p, oCounts);
  p.out = Layout::At<float>(I.out.p, oOut);
  p.lse = Layout::At<float>(I.out.p, oLse);
  p.est = Layout::At<int64_t>(I.out.p, oEst);
  p.momentList = detail ? Layout::At<int32_t>(I.out.p, oMoments) : nullptr, p.momentN = nullptr;
  if (capped) p.momentN = Layout::At<unsigned long long>(I.out.p, oCache) + kCacheCounters + 2 * H;

  Check(cudaSetDevice(0), "cudaSetDevice");
  const bool bf16 = I.cfg.dtype == Dtype::kBf16;
  const size_t qSmem = size_t(G) * stride * 4;
  const bool merge = a.estimate || a.attend;
  const auto kinds = [&](auto f) { WithKinds(bf16, I.cache.rows > 0, f); };
  const Clock::time_point h1 = Clock::now();
  // A stage's end, with stage times only (a graph replays none).
  const auto mark = [&](int i, cudaStream_t s) {
    if (a.stageTimes) Check(cudaEventRecord(I.ev[i], s), "event");
  };
  const auto enqueue = [&](cudaStream_t s) {
    StepLauncher L(s, P.pdl && !a.stageTimes);  // no early launches with stage times: mark's events would time the overlap
    const auto clear = [&](void* at, int v, size_t bytes) {
      if (!P.clear) Check(cudaMemsetAsync(at, v, bytes, s), "memset"), L.Other();
    };
    if (P.clear) L(StepClear, unsigned(Cdiv(int64_t(H) * kBins, kThreads)), kThreads, 0, p, I.range, I.hist, H);
    Check(cudaMemcpyAsync(I.in.p, I.hin.p, In.at, cudaMemcpyHostToDevice, s), "copy in");
    L.Other();
    mark(1, s);
    if (!(P.mma && LaunchScoreClustersMma(p, bf16, I.cmax, H, s))) LaunchScoreClusters(p, bf16, legacy, P.swizzle, P.fuse, qSmem, I.cmax, H, s);
    L.Kernel();
    mark(2, s);
    // The clusters probed: the cut where their tokens reach the target (wave_select.cuh).
    clear(p.sel, 0, size_t(H) * 16);
    const ClusterCut cc{p.ord1, p.base, p.counts, p.params};
    CutState* const cuts1 = I.cuts;
    CutState* const cuts2 = I.cuts + H;
    uint32_t* const range1 = I.range;
    uint32_t* const range2 = I.range + 2 * H;
    // The cuts' streaming kernels over n elements a head, `per` a thread:
    // each is a short chain of loads per element, so a grid of a few CTAs a
    // head (the old 16 a head at 65536 clusters: 16 elements a thread, one
    // CTA an SM) waited on them in turn. No answer depends on the grid (min,
    // integer sums, per-element writes; CollectBin's order is resolved by key).
    const auto cutGrid = [&](int64_t n, int per) {
      const int64_t old = std::clamp<int64_t>(Cdiv(n, 4096), 1, 32);
      return dim3(unsigned(legacy ? old : std::clamp<int64_t>(Cdiv(n, int64_t(per) * kThreads), 1, 65535)), unsigned(H));
    };
    clear(I.range, 0xff, size_t(H) * 16);
    clear(I.hist, 0, size_t(H) * kBins * 8);
    if (!p.range) L(OrderRange<ClusterCut>, cutGrid(I.cmax, kRangePer), kThreads, 0, cc, range1);
    if (P.find) L(HistogramFind<ClusterCut>, cutGrid(I.cmax, kHistPer), kThreads, 0, cc, range1, I.hist, I.range + 4 * H, cuts1);
    else L(Histogram<ClusterCut>, cutGrid(I.cmax, kHistPer), kThreads, 0, cc, range1, I.hist), L(FindBin<ClusterCut>, H, kFindThreads, 0, cc, I.hist, cuts1);
    mark(3, s);
    L(CollectBin<ClusterCut>, cutGrid(I.cmax, kScanPer), kThreads, 0, cc, range1, cuts1, I.buf1, I.bufW1);
    L(ResolveCut<ClusterCut>, unsigned(H), kResolveThreads, legacy ? 0 : ResolveSmem<ClusterCut>(), cc, range1, cuts1, I.buf1, I.bufW1, !legacy);
    L(TakeWeights<ClusterCut, int64_t>, cutGrid(I.cmax, kScanPer), kThreads, 0, cc, range1, cuts1, p.cnt, int64_t(0), tiles1, I.cmax);
    if (tmax > 0) L(GatherCandidates, dim3(unsigned(Tiles(I.cmax)), unsigned(H)), kThreads, 0, p, cuts1, tiles1);
    if (I.cache.rows > 0) {  // the rows read from here on (capped: at most the cap's)
      unsigned long long* const counters = Layout::At<unsigned long long>(I.out.p, oCache);
      if (capped) I.cache.Enqueue(p, H, counters, nCounters, s, a.stageTimes, [&](const CacheParams& k) { I.cap.Need(k, p, H, I.cmax, I.hist, I.buf1, I.bufW1, s); });
      else I.cache.Enqueue(p, H, counters, s, a.stageTimes);
      L.Other();
    }
    mark(4, s);
    // The sinks/window rows' dots, for AttendTile<kDots>: in RescoreHeld's launch where it runs.
    const int64_t exactCtas = p.dotsOn && a.attend && E > 0 ? Cdiv(E, kRowsPerCta) : 0;
    const bool heldDots = tmax > 0 && P.held;
    if (tmax > 0) {
      const dim3 grid(unsigned(Cdiv(tmax, kRowsPerCta) + (heldDots ? exactCtas : 0)), unsigned(H));
      kinds([&](auto B, auto G) { LaunchRescore<B(), G()>(L, P, p, d, grid, qSmem); });
    }
    if (exactCtas > 0 && !heldDots)
      kinds([&](auto B, auto G) { L(ExactDots<B(), G()>, dim3(unsigned(exactCtas), unsigned(H)), kThreads, qSmem, p); });
    mark(5, s);
    // The candidates kept: the best `keep` outside the skip ranges.
    clear(p.keptN, 0, size_t(H) * 8);
    if (tmax > 0) {
      const CandidateCut kc{p.ord2, p.cand, p.sel, p.params, tmax, N};
      uint32_t* const hist2 = P.clear ? I.hist + size_t(H) * kBins * 2 : I.hist;
      clear(hist2, 0, size_t(H) * kBins * 8);
      if (!(p.range && P.held)) L(OrderRange<CandidateCut>, cutGrid(tmax, kRangePer), kThreads, 0, kc, range2);
      if (P.find) L(HistogramFind<CandidateCut>, cutGrid(tmax, kHistPer), kThreads, 0, kc, range2, hist2, I.range + 5 * H, cuts2);
      else L(Histogram<CandidateCut>, cutGrid(tmax, kHistPer), kThreads, 0, kc, range2, hist2), L(FindBin<CandidateCut>, H, kFindThreads, 0, kc, hist2, cuts2);
      mark(6, s);
      L(CollectBin<CandidateCut>, cutGrid(tmax, kScanPer), kThreads, 0, kc, range2, cuts2, buf2, bufW2);
      L(ResolveCut<CandidateCut>, unsigned(H), kResolveThreads, legacy ? 0 : ResolveSmem<CandidateCut>(), kc, range2, cuts2, buf2, bufW2, !legacy);
      L(TakeWeights<CandidateCut, int32_t>, cutGrid(tmax, kScanPer), kThreads, 0, kc, range2, cuts2, p.take2, tmax, p.cum2, tmax);
      if (P.pack) L(ScatterPack, dim3(unsigned(Cdiv(std::max({tmax, width, p.packOwners ? E : 0}), kThreads)), unsigned(H)), kThreads, 0, p, cuts2);
      else L(ScatterKept, dim3(unsigned(Cdiv(tmax, kThreads)), unsigned(H)), kThreads, 0, p, cuts2);
    } else {
      mark(6, s);
    }
    if (!P.pack || tmax == 0) L(PackIds, dim3(unsigned(std::max<int64_t>(1, Cdiv(width, kThreads))), unsigned(H)), kThreads, 0, p);
    mark(7, s);
    const dim3 rowsGrid(unsigned(Cdiv(rowsMax, kThreads)), unsigned(H));
    if (merge && rowsMax > 0) {
      clear(p.touchedN, 0, size_t(H) * 8);
      if (!p.packOwners) L(ExactRows<0>, rowsGrid, kThreads, 0, p);
      if (a.estimate) L(ExactRows<1>, rowsGrid, kThreads, 0, p);
    }
    mark(8, s);
    if (a.estimate && rowsMax > 0 && p.spreadMode) {
      // Enough warps to hide their loads' latency, each striding over its part of the touched list.
      const dim3 grid(unsigned(std::min<int64_t>(Cdiv(rowsMax, kPartialWarps), 512)), unsigned(H));
      const size_t smem = size_t(kPartialWarps) * 2 * d * 4;  // at most 32 KiB (d <= 1024)
      // With dots, the clusters the cut took whole first, from their members'
      // dots; then the others: the cut's own and those of sinks/window rows
      // only, at most E + 1 a head (the grid is only speed: warps stride).
      // (Capped, a cluster taken whole with rows left unread is among the others: the full grid.)
      const bool fromDots = p.dotsOn && p.restRows;
      const dim3 partGrid(fromDots && !capped ? unsigned(std::min<int64_t>(Cdiv(E + 1, kPartialWarps), 512)) : grid.x, unsigned(H));
      if (fromDots) L(PartialLogitsFromDots, grid, kPartialWarps * 32, 0, p);
      kinds([&](auto B, auto G) { L(PartialLogits<B(), G()>, partGrid, kPartialWarps * 32, smem, p); });
    }
    mark(9, s);
    // The exact rows' estimate tiles with their attention tiles (the same
    // positions) where both run, and the cluster tiles, on a grid of one row:
    // the attention's tiles last, first with the tiles on the tensor cores (wave_step_attend.cuh).
    const bool together = !legacy && a.estimate && a.attend && nSub > 0 && nSub == nAtt;
    if (together)
      kinds([&](auto B, auto G) {
        const bool mma = P.mmaTiles && MmaTilesApply(d);
        L(mma ? AttendAndClusters<B(), G(), true> : AttendAndClusters<B(), G()>, unsigned((nAtt + nMain) * H), kThreads,
          mma ? MmaTileSmem(d) : kEstimateSmem, p, nAtt, nMain, H);
      });
    if (a.estimate && !together) {
      // The cluster tiles read no K/V row: one instantiation for both stores.
      L(bf16 ? EstimatePart<true, false> : EstimatePart<false, false>, dim3(unsigned(nMain), unsigned(H)), kThreads, kEstimateSmem, p);
      if (nSub > 0)
        kinds([&](auto B, auto G) { L(EstimatePart<B(), true, G()>, dim3(unsigned(nSub), unsigned(H)), kThreads, kEstimateSmem, p); });
    }
    if (a.attend && nAtt > 0 && !together) {
      const dim3 grid = dim3(unsigned(nAtt), unsigned(H));
      kinds([&](auto B, auto G) {
        if (p.dotsOn) L(AttendPart<B(), true, G()>, grid, kThreads, kEstimateSmem, p);
        else L(AttendPart<B(), false, G()>, grid, kThreads, kEstimateSmem, p);
      });
    }
    mark(10, s);
    if (merge) {
      const int colBlocks = int(Cdiv(d, 32)), mergeCtas = Q * colBlocks, rowCtas = int(rowsGrid.x);  // ExactRows<2>'s grid
      static_assert(kThreads == 256, "MergeAndClear: MergeEstimate's and ExactRows' CTAs alike");
      L(MergeAndClear, unsigned(mergeCtas + (rowsMax > 0 ? rowCtas * H : 0)), 256, size_t(std::max(parts, 1)) * 8, p, colBlocks, mergeCtas, rowCtas);
    }
    Check(cudaGetLastError(), "wave step launch");
    mark(11, s);
    Check(cudaMemcpyAsync(I.hout.p, I.out.p, outBytes, cudaMemcpyDeviceToHost, s), "copy out");
  };
  RowCache::StepGuard cacheGuard{I.cache, I.stream};
  Check(cudaEventRecord(I.ev[0], I.stream), "event");
  if (a.graph && !a.stageTimes) {
    // Everything the launches bake in beyond p (whose pointers cover the
    // work buffer): the copies' buffers and sizes, the cluster cut's tile
    // sums, the launches chosen.
    struct Key {
      StepParams p;
      const void *in, *hin, *out, *hout, *tiles1;
      size_t inBytes, outBytes;
      int nSub, nAtt;
      StepPaths paths;
      bool estimate, attend, ids;
    } k;
    std::memset(&k, 0, sizeof k);
    std::memcpy(&k.p, &p, sizeof p);
    k.in = I.in.p, k.hin = I.hin.p, k.out = I.out.p, k.hout = I.hout.p, k.tiles1 = tiles1;
    k.inBytes = In.at, k.outBytes = outBytes;
    k.nSub = nSub, k.nAtt = nAtt;
    k.estimate = a.estimate, k.attend = a.attend, k.ids = a.ids, k.paths = P;
    I.graph.Run(I.stream, &k, sizeof k, enqueue);
  } else {
    enqueue(I.stream);
  }
  Check(cudaEventRecord(I.ev[12], I.stream), "event");
  const Clock::time_point h2 = Clock::now();
  // The caller's host work beside the device's; the stream is waited for
  // before anything it threw goes up (a step's buffers stay in use until then).
  std::exception_ptr overlapError;
  if (a.overlap) {
    try {
      a.overlap();
    } catch (...) {
      overlapError = std::current_exception();
    }
  }
  const Clock::time_point h2o = Clock::now();
  Check(cudaStreamSynchronize(I.stream), "wave step");
  const Clock::time_point h3 = Clock::now();
  if (overlapError) std::rethrow_exception(overlapError);

  WaveStepResult r;
  cacheGuard.done = true;  // an overflow empties the cache below
  if (I.cache.rows > 0) {
    const unsigned long long* cc = Layout::At<unsigned long long>(I.hout.p, oCache);
    if (cc[1]) {
      I.cache.Reset(I.stream);
      throw std::runtime_error("wave step: the rows this step reads (" + std::to_string(cc[0]) + " missing) exceed the paged store's cache of " +
                               std::to_string(I.cache.rows) + " rows; the cache was emptied (size it by CacheRowsBound)");
    }
    r.misses = int64_t(cc[3]), r.bytesIn = int64_t(cc[2]);
    if (capped) PageCap::Read(cc, H, detail ? Layout::At<int32_t>(I.hout.p, oMoments) : nullptr, rowsMax, r);
  }
  r.width = widthOwn;
  if (a.ids) {
    const int32_t* ids = Layout::At<int32_t>(I.hout.p, oIds);
    r.ids.resize(size_t(H) * widthOwn);
    for (int h = 0; h < H; ++h) std::memcpy(r.ids.data() + size_t(h) * widthOwn, ids + size_t(h) * width, size_t(widthOwn) * 4);
  }
  const int64_t* counts = Layout::At<int64_t>(I.hout.p, oCounts);
  for (int h = 0; h < H; ++h) {
    r.idCounts.push_back(counts[h * 2]);
    r.candidates.push_back(counts[h * 2 + 1]);
  }
  if (merge) {
    const float* o = Layout::At<float>(I.hout.p, oOut);
    const float* l = Layout::At<float>(I.hout.p, oLse);
    r.out.assign(o, o + size_t(Q) * d);
    r.lse.assign(l, l + Q);
  } else {
    r.out.assign(size_t(Q) * d, 0.f);
    r.lse.assign(size_t(Q), -INFINITY);
  }
  const int64_t* e = Layout::At<int64_t>(I.hout.p, oEst);
  for (int h = 0; h < H; ++h) r.estimated.push_back(a.estimate ? double(e[h]) : 0.0);
  Check(cudaEventElapsedTime(&r.ms, I.ev[0], I.ev[12]), "event time");
  // The estimate's stages: the exact rows counted per cluster, the partly
  // attended clusters' logits, the cluster tiles, their merge.
  // clusters.bin / topk.bin: each cut's range, histogram and bin; clusters /
  // topk: the rest of the cut, the scan and the gather.
  static const char* const kStages[] = {"in", "score", "clusters.bin", "clusters", "rescore", "topk.bin", "topk", "exact", "partial", "tiles", "merge", "out"};
  for (int i = 0; i < 12 && a.stageTimes; ++i) {
    float ms = 0;
    Check(cudaEventElapsedTime(&ms, I.ev[i], I.ev[i + 1]), "event time");
    r.stages.emplace_back(kStages[i], ms);
  }
  if (a.stageTimes && I.cache.rows > 0) I.cache.Times(r.stages);
  const auto msBetween = [](Clock::time_point x, Clock::time_point y) { return std::chrono::duration<float, std::milli>(y - x).count(); };
  r.graphCaptures = I.graph.Captures();
  r.host = {{"prep", msBetween(h0, h1)}, {"launch", msBetween(h1, h2)}, {"overlap", msBetween(h2, h2o)}, {"wait", msBetween(h2o, h3)}, {"copy", msBetween(h3, Clock::now())}};
  return r;
}

}  // namespace cuda
}  // namespace kvr
