// The device code scan's store and its search (ra_scan.h): the data uploaded
// once, a layer-step's inputs in one copy, its kernels on one stream
// (ra_scan_kernels.cuh), its answer in one copy back.
#include "cuda/ra_scan.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/thread_pool.h"
#include "cuda/cuda_common.cuh"
#include "cuda/ra_attend_rows.cuh"
#include "cuda/ra_scan_kernels.cuh"
#include "cuda/ra_scan_pq.cuh"
#include "cuda/wave_buffers.cuh"
#include "cuda/step_graph.cuh"

namespace kvr {
namespace cuda {

namespace {

// The host's sample rule (native/indexes/ra_graph_attention.cc: kSampleShare,
// kSampleMin, kSampleMax, kSampleSeeds, kSampleSeedShare).
constexpr int64_t kSampleShare = 512, kSampleMin = 64, kSampleMax = 4096, kSampleSeedShare = 64;

uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Head lists back to back into dst: each head's `ranges` rows ([begin, end)
// pairs, every head's), then its own list, each id checked in [0, n) as it
// is copied (the caller's memory: an id past the store's rows would set bits
// or read rows outside it). A head a task on the native pool: a step's seeds
// or rows are ~86K ids at 1M, all on the awaited path. Throws before
// anything is queued.
void GatherLists(int32_t* dst, int H, const int32_t* const* lists, const int32_t* counts, const int32_t* ranges, int64_t rangePairs, int64_t n,
                 const char* what) {
  int64_t rangeRows = 0;
  for (int64_t r = 0; r < rangePairs; ++r) rangeRows += ranges[2 * r + 1] - ranges[2 * r];
  std::vector<int64_t> at(size_t(H) + 1, 0);
  for (int h = 0; h < H; ++h) at[size_t(h) + 1] = at[size_t(h)] + rangeRows + counts[h];
  std::vector<uint8_t> bad(size_t(H), 0);
  ThreadPool::Get().ParallelFor(size_t(H), [&](size_t h) {
    int32_t* out = dst + at[h];
    for (int64_t r = 0; r < rangePairs; ++r)
      for (int32_t t = ranges[2 * r]; t < ranges[2 * r + 1]; ++t) *out++ = t;
    const int32_t* src = lists[h];
    bool b = false;
    for (int32_t i = 0; i < counts[h]; ++i) {
      const int32_t v = src[i];
      b |= v < 0 || v >= n;
      out[i] = v;
    }
    bad[h] = b;
  });
  for (int h = 0; h < H; ++h)
    for (int32_t i = 0; bad[size_t(h)] && i < counts[h]; ++i)
      if (lists[h][i] < 0 || lists[h][i] >= n)
        throw std::invalid_argument(std::string("RaScanStore: ") + what + "[" + std::to_string(h) + "][" + std::to_string(i) + "] = " +
                                    std::to_string(lists[h][i]) + " is outside [0, tokens)");
}

template <typename T>
T* Carve(char*& at, size_t count) {
  T* p = reinterpret_cast<T*>(at);
  at += Align(count * sizeof(T));
  return p;
}

}  // namespace

struct RaScanStore::Impl {
  RaScanConfig cfg;
  int64_t words = 0;
  cudaStream_t stream = nullptr;
  cudaEvent_t ev[10] = {};  // 0-7 the search's, 8-9 Attend's
  DevBuf data;   // codes, keys, entry bits, seed, free and take bits, what the scan keeps
  DevBuf work;   // sized by the largest step
  DevBuf in, out;
  HostBuf hin, hout;
  // Attend's own: the search's graph bakes in the pointers of the buffers above.
  DevBuf vals, ain, aout, apartial;
  HostBuf ahin, ahout;
  uint16_t* values = nullptr;
  // The PQ codes and their outliers' bits (searches with keep), where the heads brought them.
  DevBuf pqData;
  uint8_t* pqCodes = nullptr;
  uint32_t* outlierBits = nullptr;
  int pqM = 0, pqRowBytes = 0;
  int64_t workCap = -1, workFree = -1, workK = -1;
  uint8_t* codes = nullptr;
  uint16_t* keys = nullptr;
  uint32_t* entryBits = nullptr;
  uint32_t* seedBits = nullptr;
  uint32_t* freeBits = nullptr;
  uint32_t* takeBits = nullptr;
  // What the scan keeps (every key at most) and the cut's bin, per head: sized by the keys.
  uint32_t* keptOrd = nullptr;
  int32_t* keptIds = nullptr;
  uint64_t* buf = nullptr;
  int64_t* bufW = nullptr;
  // Work carved from `work`.
  float *freeX = nullptr, *sampleX = nullptr, *c0 = nullptr, *c = nullptr, *candX = nullptr, *candScore = nullptr;
  uint8_t* reached = nullptr;
  int32_t *sampleSeedIds = nullptr, *cand = nullptr, *redo = nullptr;
  uint32_t *ord2 = nullptr, *range = nullptr, *hist = nullptr, *tau = nullptr;
  int64_t *finalCount = nullptr, *tiles = nullptr, *pqNeed = nullptr;
  unsigned long long *keptCount = nullptr, *pqInf = nullptr, *pqListed = nullptr;
  double* partial = nullptr;
  int64_t partials = 0;
  CutState* cuts = nullptr;
  RaScanTimes times;
  // A session's steps keep their shape (k, cap, list sizes): captured once a shape comes back.
  StepGraph graph;

  ~Impl() {
    for (cudaEvent_t e : ev)
      if (e) cudaEventDestroy(e);
    if (stream) cudaStreamDestroy(stream);
  }
};

bool RaScanStore::Supports(int headDim, int group) {
  return headDim >= 8 && headDim <= RaScanConfig::kMaxDim && headDim % 8 == 0 && group >= 1 && group <= RaScanConfig::kMaxGroup;
}

RaScanStore::RaScanStore(const RaScanConfig& cfg, const RaScanHead* heads) : impl_(std::make_unique<Impl>()) {
  Impl& I = *impl_;
  I.cfg = cfg;
  if (cfg.kvHeads < 1 || !Supports(cfg.headDim, std::max(1, cfg.maxGroup)) || cfg.tokens < 1 || cfg.tokens >= (int64_t(1) << 31))
    throw std::invalid_argument("RaScanStore: kvHeads >= 1, headDim a multiple of 8 in [8, 256], maxGroup in [1, 16], tokens in [1, 2^31)");
  const int H = cfg.kvHeads, d = cfg.headDim;
  const int64_t n = cfg.tokens;
  I.words = (n + 31) / 32;
  Check(cudaStreamCreateWithFlags(&I.stream, cudaStreamNonBlocking), "stream");
  for (cudaEvent_t& e : I.ev) Check(cudaEventCreate(&e), "event");
  const size_t codeBytes = size_t(n) * size_t(d / 2), keyBytes = size_t(n) * size_t(d) * 2, bitBytes = size_t(I.words) * 4;
  const size_t Hs = size_t(H), N = size_t(n);
  I.data.Need(Align(codeBytes * Hs) + Align(keyBytes * Hs) + 4 * Align(bitBytes * Hs) + Align(Hs * N * 4) * 2 + Align(Hs * N * 8) * 2,
                "cudaMalloc (code scan data)");
  char* at = static_cast<char*>(I.data.p);
  I.codes = Carve<uint8_t>(at, codeBytes * Hs);
  I.keys = Carve<uint16_t>(at, keyBytes / 2 * Hs);
  I.entryBits = Carve<uint32_t>(at, size_t(I.words) * Hs);
  I.seedBits = Carve<uint32_t>(at, size_t(I.words) * Hs);
  I.freeBits = Carve<uint32_t>(at, size_t(I.words) * Hs);
  I.takeBits = Carve<uint32_t>(at, size_t(I.words) * Hs);
  I.keptOrd = Carve<uint32_t>(at, Hs * N);
  I.keptIds = Carve<int32_t>(at, Hs * N);
  I.buf = Carve<uint64_t>(at, Hs * N);
  I.bufW = Carve<int64_t>(at, Hs * N);
  std::vector<uint32_t> bits(size_t(I.words));
  for (int h = 0; h < H; ++h) {
    const RaScanHead& hd = heads[h];
    Check(cudaMemcpy(I.codes + codeBytes * h, hd.codes, codeBytes, cudaMemcpyHostToDevice), "copy codes");
    Check(cudaMemcpy(I.keys + size_t(n) * d * h, hd.keys, keyBytes, cudaMemcpyHostToDevice), "copy keys");
    std::fill(bits.begin(), bits.end(), 0u);
    for (int64_t i = 0; i < hd.entryCount; ++i) {
      const int32_t id = hd.entries[i];
      if (id < 0 || id >= n) throw std::invalid_argument("RaScanStore: an entry point is out of range");
      bits[size_t(id) >> 5] |= 1u << (id & 31);
    }
    Check(cudaMemcpy(I.entryBits + size_t(I.words) * h, bits.data(), bitBytes, cudaMemcpyHostToDevice), "copy entry points");
  }
  Check(cudaMemset(I.seedBits, 0, 3 * Align(bitBytes * Hs)), "clear marks");
  const bool withValues = heads[0].values != nullptr;
  for (int h = 0; h < H; ++h)
    if ((heads[h].values != nullptr) != withValues) throw std::invalid_argument("RaScanStore: values for every head or for none");
  if (withValues) {
    I.vals.Need(keyBytes * Hs, "cudaMalloc (code scan values)");
    I.values = static_cast<uint16_t*>(I.vals.p);
    for (int h = 0; h < H; ++h)
      Check(cudaMemcpy(I.values + size_t(n) * d * h, heads[h].values, keyBytes, cudaMemcpyHostToDevice), "copy values");
    // At d = 256 a CTA's q rows and partial sums pass the default 48 KiB.
    Check(cudaFuncSetAttribute(AttendRows<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(AttendSmem(RaScanConfig::kMaxGroup, RaScanConfig::kMaxDim))), "attribute");
    Check(cudaFuncSetAttribute(AttendRows<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(AttendSmem(RaScanConfig::kMaxGroup, RaScanConfig::kMaxDim))), "attribute");
  }
  // ResolveCut holds up to ResolveHeld keys of the cut's bin in shared memory (96 KiB).
  Check(cudaFuncSetAttribute(ResolveCut<KeptCut>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(ResolveSmem<KeptCut>())), "attribute");
  Check(cudaFuncSetAttribute(ResolveCut<ScanFinalCut>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(ResolveSmem<ScanFinalCut>())), "attribute");
  if (heads[0].pq) AddPq(heads);
}

void RaScanStore::AddPq(const RaScanHead* heads) {
  Impl& I = *impl_;
  if (I.pqCodes) return;
  const int H = I.cfg.kvHeads, d = I.cfg.headDim;
  const int64_t n = I.cfg.tokens;
  for (int h = 0; h < H; ++h)
    if (!heads[h].pq) throw std::invalid_argument("RaScanStore: PQ codes for every head or for none");
  const size_t Hs = size_t(H), pqBytes = size_t(n) * size_t(d / 8), bitBytes = size_t(I.words) * 4;
  I.pqData.Need(Align(pqBytes * Hs) + Align(bitBytes * Hs), "cudaMalloc (code scan PQ codes)");
  char* at = static_cast<char*>(I.pqData.p);
  uint8_t* codes = Carve<uint8_t>(at, pqBytes * Hs);
  uint32_t* outlierBits = Carve<uint32_t>(at, size_t(I.words) * Hs);
  std::vector<uint32_t> bits(size_t(I.words));
  for (int h = 0; h < H; ++h) {
    Check(cudaMemcpy(codes + pqBytes * h, heads[h].pq, pqBytes, cudaMemcpyHostToDevice), "copy PQ codes");
    std::fill(bits.begin(), bits.end(), 0u);
    for (int64_t i = 0; i < heads[h].outlierCount; ++i) {
      const int32_t id = heads[h].outliers[i];
      if (id < 0 || id >= n) throw std::invalid_argument("RaScanStore: an outlier is out of range");
      bits[size_t(id) >> 5] |= 1u << (id & 31);
    }
    Check(cudaMemcpy(outlierBits + size_t(I.words) * h, bits.data(), bitBytes, cudaMemcpyHostToDevice), "copy outliers");
  }
  // The tables (4 quads at G = 16, 64 subspaces at d = 256: 32 KiB) beside PqSampleCut's sample orders pass the default 48 KiB.
  const int lutBytes = int(PqLutBytes(RaScanConfig::kMaxGroup, RaScanConfig::kMaxDim));
  for (const void* f : {(const void*)PqSampleCut<0>, (const void*)PqSampleCut<2>, (const void*)PqSampleCut<4>, (const void*)PqSampleCut<8>,
                        (const void*)PqScan<0>, (const void*)PqScan<2>, (const void*)PqScan<4>, (const void*)PqScan<8>})
    Check(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, lutBytes), "attribute");
  Check(cudaFuncSetAttribute(ResolveCut<PqKeptCut>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(ResolveSmem<PqKeptCut>())), "attribute");
  // Set last: a search with keep sees the codes whole or not at all.
  I.pqM = d / 4;
  I.pqRowBytes = d / 8;
  I.outlierBits = outlierBits;
  I.pqCodes = codes;
}

RaScanStore::~RaScanStore() = default;

const RaScanConfig& RaScanStore::Config() const { return impl_->cfg; }

int64_t RaScanStore::Bytes() const {
  const Impl& I = *impl_;
  return int64_t(I.data.bytes + I.pqData.bytes + I.work.bytes + I.in.bytes + I.out.bytes + I.vals.bytes + I.ain.bytes + I.aout.bytes + I.apartial.bytes);
}

RaScanTimes RaScanStore::LastTimes() const { return impl_->times; }

bool RaScanStore::HasValues() const { return impl_->values != nullptr; }

// A handful of launches and two copies, launched one by one: the list sizes
// change with the method's trim, and the step is short.
void RaScanStore::Attend(const RaAttendArgs& a) {
  Impl& I = *impl_;
  const RaScanConfig& cfg = I.cfg;
  const int H = cfg.kvHeads, d = cfg.headDim, G = a.group;
  if (!I.values) throw std::invalid_argument("RaScanStore: this store holds no values to attend");
  if (G < 1 || G > cfg.maxGroup) throw std::invalid_argument("RaScanStore: group must be in [1, maxGroup]");
  int64_t rangeRows = 0;
  for (int64_t r = 0; r < a.rangePairs; ++r) {
    const int32_t b = a.ranges[2 * r], e = a.ranges[2 * r + 1];
    if (b < (r > 0 ? a.ranges[2 * r - 1] : 0) || e < b || e > cfg.tokens)
      throw std::invalid_argument("RaScanStore: ranges must be ascending, disjoint [begin, end) pairs within [0, tokens)");
    rangeRows += e - b;
  }
  std::vector<int64_t> start(size_t(H) + 1, 0);
  int64_t longest = 0;
  for (int h = 0; h < H; ++h) {
    start[size_t(h) + 1] = start[size_t(h)] + rangeRows + a.counts[h];
    longest = std::max<int64_t>(longest, rangeRows + a.counts[h]);
  }
  const int64_t total = start[size_t(H)], R = AttendRowsPerCta(d), tiles = std::max<int64_t>(1, (longest + R - 1) / R);
  const size_t qN = size_t(H) * G * d;
  const size_t inBytes = Align(qN * 4) + Align(size_t(total) * 4 + 4) + Align((size_t(H) + 1) * 8);
  I.ain.Need(inBytes, "cudaMalloc (attend inputs)");
  I.ahin.Need(inBytes, "cudaHostAlloc (attend inputs)");
  char* hat = static_cast<char*>(I.ahin.p);
  char* dat = static_cast<char*>(I.ain.p);
  const auto stage = [&](const void* src, size_t bytes) {
    if (bytes > 0) std::memcpy(hat, src, bytes);
    void* dev = dat;
    hat += Align(bytes);
    dat += Align(bytes);
    return dev;
  };
  AttendParams p;
  p.H = H, p.G = G, p.d = d, p.scale = a.scale, p.keys = I.keys, p.values = I.values, p.n = cfg.tokens, p.tiles = tiles;
  p.q = static_cast<const float*>(stage(a.q, qN * 4));
  p.ids = reinterpret_cast<const int32_t*>(dat);
  GatherLists(reinterpret_cast<int32_t*>(hat), H, a.ids, a.counts, a.ranges, a.rangePairs, cfg.tokens, "ids");
  hat += Align(size_t(total) * 4 + 4);
  dat += Align(size_t(total) * 4 + 4);
  p.start = static_cast<const int64_t*>(stage(start.data(), (size_t(H) + 1) * 8));
  const size_t copyBytes = size_t(hat - static_cast<char*>(I.ahin.p));
  I.apartial.Need(size_t(H) * tiles * G * (d + 2) * 4, "cudaMalloc (attend partials)");
  p.partial = static_cast<float*>(I.apartial.p);
  const size_t outBytes = Align(qN * 4) + Align(size_t(H) * G * 4);
  I.aout.Need(outBytes, "cudaMalloc (attend answer)");
  I.ahout.Need(outBytes, "cudaHostAlloc (attend answer)");
  p.out = static_cast<float*>(I.aout.p);
  p.lse = reinterpret_cast<float*>(static_cast<char*>(I.aout.p) + Align(qN * 4));
  cudaStream_t s = I.stream;
  Check(cudaEventRecord(I.ev[8], s), "event");
  Check(cudaMemcpyAsync(I.ain.p, I.ahin.p, copyBytes, cudaMemcpyHostToDevice, s), "copy in");
  if (total > 0) {
    const size_t smem = AttendSmem(G, d);
    if (cfg.dtype == Dtype::kBf16) AttendRows<true><<<dim3(unsigned(tiles), unsigned(H)), kAttendThreads, smem, s>>>(p);
    else AttendRows<false><<<dim3(unsigned(tiles), unsigned(H)), kAttendThreads, smem, s>>>(p);
  }
  MergeRows<<<unsigned(H * G), unsigned(std::min(d, 256)), 0, s>>>(p);
  Check(cudaGetLastError(), "attend launch");
  Check(cudaMemcpyAsync(I.ahout.p, I.aout.p, outBytes, cudaMemcpyDeviceToHost, s), "copy out");
  Check(cudaEventRecord(I.ev[9], s), "event");
  Check(cudaStreamSynchronize(s), "attend");
  const char* hp = static_cast<const char*>(I.ahout.p);
  std::memcpy(a.out, hp, qN * 4);
  std::memcpy(a.lse, hp + Align(qN * 4), size_t(H) * G * 4);
  float v = 0;
  Check(cudaEventElapsedTime(&v, I.ev[8], I.ev[9]), "elapsed");
  I.times.attendMs = double(v);
}

void RaScanStore::Search(const RaScanArgs& a) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point t0 = Clock::now();
  Impl& I = *impl_;
  const RaScanConfig& cfg = I.cfg;
  const int H = cfg.kvHeads, d = cfg.headDim, G = a.group, G4 = (G + 3) / 4 * 4;
  const int64_t n = cfg.tokens;
  if (G < 1 || G > cfg.maxGroup) throw std::invalid_argument("RaScanStore: group must be in [1, maxGroup]");
  if (a.k < 1 || a.maxScanned < 1) throw std::invalid_argument("RaScanStore: k and maxScanned must be >= 1");
  const bool pq = a.keep > 0;
  if (pq && !I.pqCodes) throw std::invalid_argument("RaScanStore: this store holds no PQ codes (a search with keep needs them)");
  if (pq && (!a.pqLut || !a.pqBase || !a.pqDelta)) throw std::invalid_argument("RaScanStore: a search with keep needs the PQ tables");
  // The sample, as the host takes it.
  const int64_t want = std::min<int64_t>(n, std::min(kSampleMax, std::max(kSampleMin, n / kSampleShare)));
  const int64_t stride = std::max<int64_t>(1, n / want), off = stride / 2, m = (n - off + stride - 1) / stride;
  if (m > kSampleMaxKeys) throw std::logic_error("RaScanStore: the sample outgrows the kernels' shared arrays");
  // The host's M = cap − m, at most every key (maxScanned ≥ tokens + m: every key a candidate).
  const int64_t cand = std::min<int64_t>(n, std::max<int64_t>(0, a.maxScanned - m));
  const int64_t cap = cand + m, k = a.k;
  std::vector<int64_t> seedStart(size_t(H) + 1, 0), freeStart(size_t(H) + 1, 0);
  for (int h = 0; h < H; ++h) {
    seedStart[size_t(h) + 1] = seedStart[size_t(h)] + a.seedCounts[h];
    freeStart[size_t(h) + 1] = freeStart[size_t(h)] + a.freeCounts[h];
  }
  const int64_t seeds = seedStart[size_t(H)], frees = freeStart[size_t(H)];
  int64_t maxList = 1;
  for (int h = 0; h < H; ++h) maxList = std::max({maxList, int64_t(a.seedCounts[h]), int64_t(a.freeCounts[h])});
  // The lists' grids for the longest list rounded up (the kernels stride over each head's own count, read from
  // the device), and the lists' staged sizes in the graph key as the stage aligns them: a session's document
  // window shrinks a row a step as its own tokens grow, and exact sizes in the key made every step a new one.
  maxList = (maxList + 1023) / 1024 * 1024;

  // Work, grown to the largest step seen.
  const int64_t tilesPerHead = std::max<int64_t>(Tiles(n), Tiles(cap));
  const unsigned T = unsigned(kThreads);
  const auto cdiv = [](int64_t x, int64_t y) { return unsigned(std::max<int64_t>(1, (x + y - 1) / y)); };
  // The exact kernel's CTAs: about four candidates a warp (each CTA's sums are one partial).
  const unsigned exactCtas = cdiv(cand, kScanWarps * 4);
  if (cap > I.workCap || frees > I.workFree || k > I.workK || int64_t(exactCtas) > I.partials) {
    I.workCap = std::max(cap, I.workCap);
    I.workFree = std::max(frees, I.workFree);
    I.workK = std::max(k, I.workK);
    I.partials = std::max<int64_t>(exactCtas, I.partials);
    const size_t C = size_t(I.workCap), Hs = size_t(H), G16 = kScanMaxG;
    const size_t bytes = Align(size_t(I.workFree) * G16 * 4) + Align(Hs * m * G16 * 4) + 2 * Align(Hs * G16 * 4) + Align(Hs * C * G16 * 4) +
                         Align(Hs * C * 4) + Align(Hs * m) + Align(Hs * kSeedMax * 4) + Align(Hs * C * 4) + Align(Hs * 4) + Align(Hs * C * 4) +
                         Align(Hs * 6 * 4) + Align(Hs * kBins * 2 * 4) + Align(Hs * 4) + Align(Hs * 8) + Align(Hs * size_t(tilesPerHead) * 8) +
                         Align(Hs * 8) + Align(Hs * size_t(I.partials) * G16 * 8) + Align(Hs * sizeof(CutState) * 3) + 3 * Align(Hs * 8);
    I.work.Need(bytes, "cudaMalloc (code scan work)");
    char* at = static_cast<char*>(I.work.p);
    I.freeX = Carve<float>(at, size_t(I.workFree) * G16);
    I.sampleX = Carve<float>(at, Hs * m * G16);
    I.c0 = Carve<float>(at, Hs * G16);
    I.c = Carve<float>(at, Hs * G16);
    I.candX = Carve<float>(at, Hs * C * G16);
    I.candScore = Carve<float>(at, Hs * C);
    I.reached = Carve<uint8_t>(at, Hs * m);
    I.sampleSeedIds = Carve<int32_t>(at, Hs * kSeedMax);
    I.cand = Carve<int32_t>(at, Hs * C);
    I.redo = Carve<int32_t>(at, Hs);
    I.ord2 = Carve<uint32_t>(at, Hs * C);
    I.range = Carve<uint32_t>(at, Hs * 6);  // the candidates', the answer's and the PQ pass's cuts
    I.hist = Carve<uint32_t>(at, Hs * kBins * 2);
    I.tau = Carve<uint32_t>(at, Hs);
    I.finalCount = Carve<int64_t>(at, Hs);
    I.tiles = Carve<int64_t>(at, Hs * size_t(tilesPerHead));
    I.keptCount = Carve<unsigned long long>(at, Hs);
    I.partial = Carve<double>(at, Hs * size_t(I.partials) * G16);
    I.cuts = Carve<CutState>(at, Hs * 3);
    I.pqInf = Carve<unsigned long long>(at, Hs);
    I.pqListed = Carve<unsigned long long>(at, Hs);
    I.pqNeed = Carve<int64_t>(at, Hs);
  }

  // The step's inputs in one copy.
  const size_t qN = size_t(H) * G * d, w8N = size_t(H) * G4 * d, sN = size_t(H) * G4;
  const size_t lutN = pq ? size_t(H) * PqLutBytes(G, d) / 8 : 0;
  const size_t inBytes = Align(qN * 4) + Align(w8N) + 2 * Align(sN * 4) + Align(size_t(seeds) * 4 + 4) + Align(size_t(frees) * 4 + 4) +
                         2 * Align((size_t(H) + 1) * 8) + (pq ? Align(lutN * 8) + 2 * Align(sN * 4) : 0);
  I.in.Need(inBytes, "cudaMalloc (code scan inputs)");
  I.hin.Need(inBytes, "cudaHostAlloc (code scan inputs)");
  char* hat = static_cast<char*>(I.hin.p);
  char* dat = static_cast<char*>(I.in.p);
  const auto stage = [&](const void* src, size_t bytes) {
    std::memcpy(hat, src, bytes);
    void* dev = dat;
    hat += Align(bytes);
    dat += Align(bytes);
    return dev;
  };
  ScanParams p;
  p.H = H, p.G = G, p.G4 = G4, p.d = d, p.half = d / 2, p.n = n, p.words = I.words, p.scale = a.scale;
  p.m = m, p.stride = stride, p.off = off, p.sampleSeeds = int(std::min<int64_t>(kSeedMax, m / kSampleSeedShare));
  p.want = cand, p.cap = cap, p.k = k;
  p.codes = I.codes, p.keys = I.keys, p.entryBits = I.entryBits, p.seedBits = I.seedBits, p.freeBits = I.freeBits, p.takeBits = I.takeBits;
  p.q = static_cast<const float*>(stage(a.q, qN * 4));
  p.w8 = static_cast<const int8_t*>(stage(a.w8, w8N));
  p.qscale = static_cast<const float*>(stage(a.qscale, sN * 4));
  p.qbias = static_cast<const float*>(stage(a.qbias, sN * 4));
  const int32_t none = 0;  // a list's stand-in where it is empty
  p.seeds = reinterpret_cast<const int32_t*>(dat);
  if (seeds > 0) GatherLists(reinterpret_cast<int32_t*>(hat), H, a.seeds, a.seedCounts, nullptr, 0, n, "seeds");
  else std::memcpy(hat, &none, 4);
  hat += Align(seeds > 0 ? size_t(seeds) * 4 : 4);
  dat += Align(seeds > 0 ? size_t(seeds) * 4 : 4);
  p.freeIds = static_cast<const int32_t*>(stage(frees > 0 ? a.freeIds : &none, frees > 0 ? size_t(frees) * 4 : 4));
  p.seedStart = static_cast<const int64_t*>(stage(seedStart.data(), (size_t(H) + 1) * 8));
  p.freeStart = static_cast<const int64_t*>(stage(freeStart.data(), (size_t(H) + 1) * 8));
  PqParams pp;
  if (pq) {
    pp.quads = G4 / 4, pp.M = I.pqM, pp.rowBytes = I.pqRowBytes, pp.keep = a.keep;
    pp.codes = I.pqCodes, pp.outlierBits = I.outlierBits;
    pp.lut = static_cast<const uint64_t*>(stage(a.pqLut, lutN * 8));
    pp.base = static_cast<const float*>(stage(a.pqBase, sN * 4));
    pp.delta = static_cast<const float*>(stage(a.pqDelta, sN * 4));
    pp.inf = I.pqInf, pp.need = I.pqNeed, pp.listed = I.pqListed;
    pp.list = reinterpret_cast<int32_t*>(I.buf), pp.listCap = 2 * n;  // buf's n words a head, free between the cuts
  }
  p.freeX = I.freeX, p.sampleX = I.sampleX, p.reached = I.reached, p.c0 = I.c0, p.sampleSeedIds = I.sampleSeedIds;
  p.c = I.c, p.tau = I.tau, p.keptOrd = I.keptOrd, p.keptIds = I.keptIds, p.keptCount = I.keptCount, p.redo = I.redo;
  p.partial = I.partial, p.partials = int64_t(exactCtas);
  p.cand = I.cand, p.candX = I.candX, p.candScore = I.candScore, p.ord2 = I.ord2, p.finalCount = I.finalCount;
  const size_t outBytes = Align(size_t(H) * k * 4) * 2 + 3 * Align(size_t(H) * 8);
  I.out.Need(outBytes, "cudaMalloc (code scan answer)");
  I.hout.Need(outBytes, "cudaHostAlloc (code scan answer)");
  char* oat = static_cast<char*>(I.out.p);
  p.outIds = Carve<int32_t>(oat, size_t(H) * k);
  p.outScores = Carve<float>(oat, size_t(H) * k);
  p.outCounts = Carve<int64_t>(oat, size_t(H));
  p.outScanned = Carve<int64_t>(oat, size_t(H));
  int64_t* const outKept = Carve<int64_t>(oat, size_t(H));

  const bool bf16 = cfg.dtype == Dtype::kBf16;
  const size_t qSmem = size_t(G) * d * 4, copyBytes = size_t(hat - static_cast<char*>(I.hin.p));
  // A stage's end, with stage times only (a graph replays none).
  const auto mark = [&](int i, cudaStream_t s) {
    if (a.stageTimes) Check(cudaEventRecord(I.ev[i], s), "event");
  };
  // The step's ~35 copies, memsets and launches: replayed from a CUDA graph
  // where the shape comes back (native/cuda/step_graph.cuh), one by one with
  // stage times.
  const auto enqueue = [&](cudaStream_t s) {
  Check(cudaMemcpyAsync(I.in.p, I.hin.p, copyBytes, cudaMemcpyHostToDevice, s), "copy in");
  Check(cudaMemsetAsync(I.reached, 0, size_t(H) * m, s), "memset");
  Check(cudaMemsetAsync(I.range, 0xff, size_t(H) * 6 * 4, s), "memset");
  Check(cudaMemsetAsync(I.hist, 0, size_t(H) * kBins * 2 * 4, s), "memset");
  Check(cudaMemsetAsync(I.keptCount, 0, size_t(H) * 8, s), "memset");
  MarkList<true><<<dim3(cdiv(maxList, T), H), T, 0, s>>>(I.seedBits, I.words, p.seeds, p.seedStart);
  MarkList<true><<<dim3(cdiv(maxList, T), H), T, 0, s>>>(I.freeBits, I.words, p.freeIds, p.freeStart);
  const dim3 sampleGrid(cdiv(maxList + m, kScanWarps * 8), unsigned(H));
  if (bf16) SampleLogits<true><<<sampleGrid, T, qSmem, s>>>(p);
  else SampleLogits<false><<<sampleGrid, T, qSmem, s>>>(p);
  SampleReduce<<<H, kReduceThreads, 0, s>>>(p);
  if (pq) EnqueuePqThreshold(s, p, pp, H);
  else SampleCut<<<H, kReduceThreads, 0, s>>>(p);
  mark(1, s);
  // The codes: every key read once, those at or above the sample's threshold kept; heads that kept too few again.
  // L lanes a row, each 16-byte chunks of it: the largest power of two <= 8 dividing its chunks (d / 32; rows of
  // other widths are read a word at a time by one lane).
  const int chunks = d % 32 == 0 ? d / 32 : 0;
  // One lane a row by default: at d = 128 four lanes a row (16 bytes each, coalesced) took the scan from 0.31 to
  // 0.64 ms on an H100 at 1M keys, 8 heads (bench/results/ra-scan-gpu-1048576-h100-s29c.md, with an atomic a warp
  // on the head's count); KVRECALL_SCAN_LANES=1 puts them back for an A/B.
  static const bool kLanesAb = [] {
    const char* v = std::getenv("KVRECALL_SCAN_LANES");
    return v && v[0] == '1';
  }();
  const int lanes = !kLanesAb || chunks == 0 ? 1 : chunks % 8 == 0 ? 8 : chunks % 4 == 0 ? 4 : chunks % 2 == 0 ? 2 : 1;
  const dim3 scanGrid(cdiv(n, int64_t(T / lanes) * kScanPerThread), unsigned(H));
  const auto scan = [&](bool again) {
    switch (lanes) {
      case 8: ScanCodes<8><<<scanGrid, T, 0, s>>>(p, again); break;
      case 4: ScanCodes<4><<<scanGrid, T, 0, s>>>(p, again); break;
      case 2: ScanCodes<2><<<scanGrid, T, 0, s>>>(p, again); break;
      default: ScanCodes<1><<<scanGrid, T, 0, s>>>(p, again); break;
    }
  };
  // The kept keys are a few percent of n where the threshold holds: grids for that, the kernels stride past it.
  const int64_t keptGuess = std::min<int64_t>(n, 2 * cand + 4096);
  if (pq) {
    EnqueuePqPasses(s, p, pp, PqWork{I.keptOrd, I.keptIds, I.keptCount, I.range + size_t(H) * 4, I.cuts + 2 * H, I.buf, I.bufW, I.hist,
                                     I.takeBits, I.tiles, tilesPerHead}, H, cand);
  } else {
    scan(false);
    Decide<<<1, unsigned(std::max(32, H)), 0, s>>>(p, nullptr);
    scan(true);
  }
  mark(2, s);
  // The candidates: the best `cand` of what the scan kept, read back in id order.
  const KeptCut kc{I.keptOrd, I.keptIds, I.keptCount, n, cand};
  CutState* const cuts1 = I.cuts;
  CutState* const cuts2 = I.cuts + H;
  OrderRange<KeptCut><<<dim3(cdiv(keptGuess, int64_t(T) * kRangePer), H), T, 0, s>>>(kc, I.range);
  Histogram<KeptCut><<<dim3(cdiv(keptGuess, int64_t(T) * kHistPer), H), T, 0, s>>>(kc, I.range, I.hist);
  FindBin<KeptCut><<<H, kFindThreads, 0, s>>>(kc, I.hist, cuts1);
  CollectBin<KeptCut><<<dim3(cdiv(keptGuess, int64_t(T) * kScanPer), H), T, 0, s>>>(kc, I.range, cuts1, I.buf, I.bufW);
  ResolveCut<KeptCut><<<H, kResolveThreads, ResolveSmem<KeptCut>(), s>>>(kc, I.range, cuts1, I.buf, I.bufW, true);
  MarkTaken<<<dim3(cdiv(keptGuess, int64_t(T) * kScanPer), H), T, 0, s>>>(kc, I.range, cuts1, I.takeBits, I.words);
  const dim3 wordGrid(unsigned(Tiles(I.words)), unsigned(H));
  CountBits<<<wordGrid, T, 0, s>>>(I.takeBits, I.words, I.tiles, tilesPerHead);
  ScanTiles<<<H, kTileThreads, 0, s>>>(I.tiles, tilesPerHead, nullptr, I.words);
  PlaceBits<<<wordGrid, T, 0, s>>>(I.takeBits, I.words, I.tiles, tilesPerHead, I.cand, cap);
  mark(3, s);
  if (bf16) ExactCandidates<true><<<dim3(exactCtas, H), T, qSmem, s>>>(p, cuts1);
  else ExactCandidates<false><<<dim3(exactCtas, H), T, qSmem, s>>>(p, cuts1);
  mark(4, s);
  Refine<<<H, kReduceThreads, 0, s>>>(p, cuts1);
  FinalScores<<<dim3(cdiv(cap, T), H), T, 0, s>>>(p);
  // The answer: the best k of the listed keys.
  const ScanFinalCut fc{I.ord2, I.cand, I.finalCount, cap, k, n};
  Check(cudaMemsetAsync(I.hist, 0, size_t(H) * kBins * 2 * 4, s), "memset");
  uint32_t* const range2 = I.range + size_t(H) * 2;
  const dim3 finalGrid(cdiv(cap, int64_t(T) * kHistPer), unsigned(H));
  OrderRange<ScanFinalCut><<<dim3(cdiv(cap, int64_t(T) * kRangePer), H), T, 0, s>>>(fc, range2);
  Histogram<ScanFinalCut><<<finalGrid, T, 0, s>>>(fc, range2, I.hist);
  FindBin<ScanFinalCut><<<H, kFindThreads, 0, s>>>(fc, I.hist, cuts2);
  CollectBin<ScanFinalCut><<<dim3(cdiv(cap, int64_t(T) * kScanPer), H), T, 0, s>>>(fc, range2, cuts2, I.buf, I.bufW);
  ResolveCut<ScanFinalCut><<<H, kResolveThreads, ResolveSmem<ScanFinalCut>(), s>>>(fc, range2, cuts2, I.buf, I.bufW, true);
  const dim3 tileGrid2(unsigned(Tiles(cap)), unsigned(H));
  CountTaken<ScanFinalCut><<<tileGrid2, T, 0, s>>>(fc, range2, cuts2, I.tiles, tilesPerHead);
  ScanTiles<<<H, kTileThreads, 0, s>>>(I.tiles, tilesPerHead, I.finalCount, 0);
  PlaceTaken<ScanFinalCut><<<tileGrid2, T, 0, s>>>(fc, range2, cuts2, I.tiles, tilesPerHead, WriteAnswer{p});
  MarkList<false><<<dim3(cdiv(maxList, T), H), T, 0, s>>>(I.seedBits, I.words, p.seeds, p.seedStart);
  MarkList<false><<<dim3(cdiv(maxList, T), H), T, 0, s>>>(I.freeBits, I.words, p.freeIds, p.freeStart);
  Finish<<<dim3(1, H), 32, 0, s>>>(p, cuts2);
  if (pq) PqFinish<<<1, unsigned(std::max(32, H)), 0, s>>>(p, pp, outKept);
  mark(5, s);
  Check(cudaGetLastError(), "code scan launch");
  // The scores only where asked (a session's search takes the ids alone): half the answer's bytes at 1M.
  const size_t idBytes = Align(size_t(H) * k * 4), skip = a.outScores ? 0 : 2 * idBytes;
  if (skip > 0) Check(cudaMemcpyAsync(I.hout.p, I.out.p, idBytes, cudaMemcpyDeviceToHost, s), "copy out");
  Check(cudaMemcpyAsync(static_cast<char*>(I.hout.p) + skip, static_cast<char*>(I.out.p) + skip, outBytes - skip, cudaMemcpyDeviceToHost, s), "copy out");
  };
  cudaStream_t s = I.stream;
  Check(cudaEventRecord(I.ev[0], s), "event");
  if (a.stageTimes) {
    enqueue(s);
  } else {
    // Everything a launch bakes in: the buffers (their pointers), the sizes that set grids and copies, and the
    // by-value arguments (ScanParams' scalars follow from these).
    const struct {
      const void *in, *out, *work, *hin, *hout;
      int64_t G, k, cap, seeds, frees, maxList, exact, inBytes, outBytes, scaleBits, keep, scores;  // no padding: compared as bytes
    } key{I.in.p, I.out.p, I.work.p, I.hin.p, I.hout.p, G, k, cap, int64_t(Align(seeds > 0 ? size_t(seeds) * 4 : 4)),
          int64_t(Align(frees > 0 ? size_t(frees) * 4 : 4)), maxList, int64_t(exactCtas), int64_t(copyBytes), int64_t(outBytes),
          int64_t(FloatBits(a.scale)), a.keep, int64_t(a.outScores != nullptr)};
    I.graph.Run(s, &key, sizeof(key), enqueue);
  }
  Check(cudaEventRecord(I.ev[7], s), "event");
  Check(cudaStreamSynchronize(s), "code scan");
  // Copy the answer out of the pinned block.
  const char* hp = static_cast<const char*>(I.hout.p);
  const int32_t* ids = reinterpret_cast<const int32_t*>(hp);
  const float* scores = reinterpret_cast<const float*>(hp + Align(size_t(H) * k * 4));
  const int64_t* counts = reinterpret_cast<const int64_t*>(hp + 2 * Align(size_t(H) * k * 4));
  const int64_t* scanned = reinterpret_cast<const int64_t*>(hp + 2 * Align(size_t(H) * k * 4) + Align(size_t(H) * 8));
  const int64_t* kept = reinterpret_cast<const int64_t*>(hp + 2 * Align(size_t(H) * k * 4) + 2 * Align(size_t(H) * 8));
  // A head a task (as GatherLists): ~86K ids at 1M.
  ThreadPool::Get().ParallelFor(size_t(H), [&](size_t h) {
    const int64_t c = counts[h];
    std::copy_n(ids + h * size_t(k), c, a.outIds + h * size_t(k));
    if (a.outScores) std::copy_n(scores + h * size_t(k), c, a.outScores + h * size_t(k));
  });
  for (int h = 0; h < H; ++h) {
    a.outCounts[h] = counts[h];
    if (a.outScanned) a.outScanned[h] = scanned[h];
    if (a.outKept) a.outKept[h] = pq ? kept[h] : 0;
  }
  const auto ms = [&](int i, int j) {
    float v = 0;
    Check(cudaEventElapsedTime(&v, I.ev[i], I.ev[j]), "elapsed");
    return double(v);
  };
  I.times = RaScanTimes{};
  I.times.totalMs = ms(0, 7);
  if (a.stageTimes) {
    I.times.sampleMs = ms(0, 1);
    I.times.scanMs = ms(1, 2);
    I.times.cutMs = ms(2, 3);
    I.times.exactMs = ms(3, 4);
    I.times.finalMs = ms(4, 5);
  }
  I.times.hostMs = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

}  // namespace cuda
}  // namespace kvr
