// Device block pool: slots, page tables, pinned staging, eviction (see
// block_pool.h); its state is block_pool_impl.cuh's, range tables are
// block_pool_ranges.cu's.
#include "cuda/block_pool_impl.cuh"

namespace kvr {
namespace cuda {

BlockPool::BlockPool(const PoolConfig& cfg) : impl_(new Impl) {
  Impl& I = *impl_;
  I.cfg = cfg;
  if (cfg.headDim != 64 && cfg.headDim != 128) throw std::runtime_error("GpuPool: headDim must be 64 or 128");
  if (!IsWordDtype(cfg.dtype)) throw std::runtime_error("GpuPool: dtype must be f16 or bf16");
  if (cfg.blockSize < 1 || cfg.blockSize > 4096 || (cfg.blockSize & (cfg.blockSize - 1)))
    throw std::runtime_error("GpuPool: blockSize must be a power of two in [1, 4096]");
  while ((1 << I.blockShift) < cfg.blockSize) ++I.blockShift;
  I.blockWords = size_t(cfg.blockSize) * cfg.headDim;
  const size_t slotBytes = 2 * I.blockWords * sizeof(uint16_t);
  I.slots = cfg.budgetBytes / int64_t(slotBytes);
  if (I.slots < 1) throw std::runtime_error("GpuPool: budgetBytes holds no block");
  if (I.slots > (int64_t(1) << 31) - 1) throw std::runtime_error("GpuPool: too many slots");
  DeviceInfo dev = QueryDevice();
  if (!dev.ok) throw std::runtime_error("GpuPool: no CUDA device: " + dev.device);
  I.smCount = dev.smCount;
  Check(cudaSetDevice(0), "cudaSetDevice");
  Check(cudaMalloc(reinterpret_cast<void**>(&I.kPool), size_t(I.slots) * I.blockWords * 2), "cudaMalloc (K pool)");
  Check(cudaMalloc(reinterpret_cast<void**>(&I.vPool), size_t(I.slots) * I.blockWords * 2), "cudaMalloc (V pool)");
  Check(cudaStreamCreateWithFlags(&I.copyStream, cudaStreamNonBlocking), "stream");
  I.spares.stream = I.copyStream;
  Check(cudaStreamCreateWithFlags(&I.computeStream, cudaStreamNonBlocking), "stream");
  const int64_t perChunkBytes = std::max<int64_t>(cfg.stagingBytes / pool_detail::kChunks, int64_t(slotBytes) + 4096);
  I.perChunk = std::max<int64_t>(1, (perChunkBytes - 256) / int64_t(slotBytes + 4));
  I.headerBytes = Align(size_t(I.perChunk) * 4);
  I.chunkBytes = I.headerBytes + size_t(I.perChunk) * slotBytes;
  for (int c = 0; c < pool_detail::kChunks; ++c) {
    Check(cudaHostAlloc(reinterpret_cast<void**>(&I.hostStage[c]), I.chunkBytes, cudaHostAllocDefault), "cudaHostAlloc");
    Check(cudaMalloc(reinterpret_cast<void**>(&I.devStage[c]), I.chunkBytes), "cudaMalloc (staging)");
    Check(cudaEventCreateWithFlags(&I.stageDone[c], cudaEventDisableTiming), "event");
  }
  Check(cudaEventCreateWithFlags(&I.lastCopy, cudaEventDisableTiming), "event");
  Check(cudaEventCreateWithFlags(&I.lastCompute, cudaEventDisableTiming), "event");
  Check(cudaEventCreate(&I.kStart), "event");
  Check(cudaEventCreate(&I.kStop), "event");
  I.info.resize(size_t(I.slots));
  I.freeSlots.reserve(size_t(I.slots));
  for (int64_t s = I.slots - 1; s >= 0; --s) I.freeSlots.push_back(int32_t(s));
  I.st.slots = I.slots;
}

// What the constructor made is freed by Impl's destructor, which also runs
// when the constructor throws part way (GpuBackend then tries half the
// budget: a leaked K/V pool would keep the device's memory it gave up).
BlockPool::~BlockPool() = default;

BlockPool::Impl::~Impl() {
  if (copyStream) cudaStreamSynchronize(copyStream);
  if (computeStream) cudaStreamSynchronize(computeStream);
  // Range tables go back to the spares, which go while their stream still exists (their free waits on it).
  holds.clear();
  clients.clear();
  spares.Clear();
  for (int c = 0; c < kChunks; ++c) {
    if (hostStage[c]) cudaFreeHost(hostStage[c]);
    if (devStage[c]) cudaFree(devStage[c]);
    if (stageDone[c]) cudaEventDestroy(stageDone[c]);
  }
  for (cudaEvent_t e : {lastCopy, lastCompute, kStart, kStop})
    if (e) cudaEventDestroy(e);
  if (kPool) cudaFree(kPool);
  if (vPool) cudaFree(vPool);
  if (copyStream) cudaStreamDestroy(copyStream);
  if (computeStream) cudaStreamDestroy(computeStream);
  cudaGetLastError();
}

const PoolConfig& BlockPool::Config() const { return impl_->cfg; }
int64_t BlockPool::Slots() const { return impl_->slots; }

void BlockPool::Ensure(int64_t client, const int32_t* blocks, int64_t n, const uint16_t* k, const uint16_t* v,
                       int32_t* slotsOut, const EnsureOptions& o) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->EnsureLocked(client, blocks, n, k, v, slotsOut, o);
}

void BlockPool::Impl::EnsureLocked(int64_t client, const int32_t* blocks, int64_t n, const uint16_t* k,
                                   const uint16_t* v, int32_t* slotsOut, const EnsureOptions& o) {
  const Source source = o.source;
  Impl& I = *this;
  if (n > I.slots) throw std::runtime_error("GpuPool: " + std::to_string(n) + " blocks asked for, the pool holds " +
                                            std::to_string(I.slots));
  for (int64_t i = 0; i < n; ++i)
    if (blocks[i] < 0) throw std::runtime_error("GpuPool: negative block id");
  // Blocks of this call are held out of the eviction lists until it ends.
  std::vector<int32_t> held;
  held.reserve(size_t(n));
  // One table lookup per call, not per block (a dense step passes every block).
  auto found = I.clients.find(client);
  const std::vector<int32_t>* table = found == I.clients.end() ? nullptr : &found->second.table;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* e = table && size_t(blocks[i]) < table->size() ? &(*table)[size_t(blocks[i])] : nullptr;
    if (e && *e >= 0) {
      slotsOut[i] = *e;
      ++I.st.hits;
      if (I.info[*e].listed) {
        I.Unlist(*e);
        held.push_back(*e);
      }
    } else {
      slotsOut[i] = -1;
    }
  }
  std::string error;
  for (int64_t i = 0; i < n && error.empty(); ++i) {
    if (slotsOut[i] >= 0) continue;
    int32_t* e = I.TableEntry(client, blocks[i], true);
    if (*e >= 0) {  // repeated in this call
      slotsOut[i] = *e;
      continue;
    }
    bool evicted = false;
    const int32_t s = I.Allocate(&evicted);
    if (s < 0) {
      error = "GpuPool: no evictable slot left (too many pinned blocks)";
      break;
    }
    e = I.TableEntry(client, blocks[i], true);  // the eviction may have grown nothing, but stay safe
    *e = s;
    Impl::SlotInfo& si = I.info[s];
    si.client = client;
    si.block = blocks[i];
    si.everUsed = true;
    ++I.st.misses;
    ++I.st.used;
    slotsOut[i] = s;
    held.push_back(s);
    const size_t at = size_t(source == Source::kIndexed ? int64_t(blocks[i]) : i) * I.blockWords;
    I.Stage(s, k + at, v + at, evicted);
  }
  if (!I.batching) I.Flush();
  // Every block of the call is off the chains here (held, pinned, or new).
  for (int64_t i = 0; i < n; ++i) {
    if (slotsOut[i] < 0) continue;  // not reached after an error
    Impl::SlotInfo& si = I.info[slotsOut[i]];
    si.prio = o.priorities ? int(o.priorities[i]) : o.priority;
    if (error.empty() && o.hold && si.pins++ == 0) ++I.st.pinned;
  }
  for (int32_t s : held) I.List(s);  // skips what is now pinned
  if (!error.empty()) throw std::runtime_error(error);
}

void BlockPool::Lookup(int64_t client, const int32_t* blocks, int64_t n, int32_t* slotsOut) {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> lock(I.mu);
  for (int64_t i = 0; i < n; ++i) {
    int32_t* e = blocks[i] >= 0 ? I.TableEntry(client, blocks[i], false) : nullptr;
    if (e && *e >= 0) {
      slotsOut[i] = *e;
      ++I.st.hits;
      if (I.info[*e].listed) {
        I.Unlist(*e);
        I.List(*e);
      }
    } else {
      slotsOut[i] = -1;
      ++I.st.misses;
    }
  }
}

void BlockPool::EnsureMany(const ClientBlocks* items, int n, const EnsureOptions& options, int32_t* slotsOut) {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> lock(I.mu);
  EnsureOptions o = options;
  o.source = Source::kIndexed;
  int i = 0;
  int64_t at = 0;
  auto each = [&] {
    for (; i < n; at += items[i].n, ++i) {
      o.priorities = items[i].priorities;
      I.EnsureLocked(items[i].client, items[i].blocks, items[i].n, items[i].k, items[i].v, slotsOut + at, o);
    }
  };
  if (!o.hold) return each();
  try {
    I.Batched(each);
  } catch (...) {
    for (int j = 0; j < i; ++j) I.PinLocked(items[j].client, items[j].blocks, items[j].n, false);  // all or none held
    throw;
  }
}

void BlockPool::Pin(int64_t client, const int32_t* blocks, int64_t n, bool pinned) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->PinLocked(client, blocks, n, pinned);
}

void BlockPool::PinMany(const ClientBlocks* items, int n, bool pinned) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  for (int i = 0; i < n; ++i) impl_->PinLocked(items[i].client, items[i].blocks, items[i].n, pinned);
}

void BlockPool::Impl::PinLocked(int64_t client, const int32_t* blocks, int64_t n, bool pinned) {
  auto found = clients.find(client);
  if (found == clients.end()) return;
  const std::vector<int32_t>& table = found->second.table;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* e = blocks[i] >= 0 && size_t(blocks[i]) < table.size() ? &table[size_t(blocks[i])] : nullptr;
    if (!e || *e < 0) continue;
    SlotInfo& si = info[*e];
    if (pinned) {
      if (si.pins++ == 0) {
        Unlist(*e);
        ++st.pinned;
      }
    } else if (si.pins > 0 && --si.pins == 0) {
      --st.pinned;
      List(*e);
    }
  }
}

void BlockPool::Prefer(int64_t client, const int32_t* blocks, int64_t n, int priority) {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> lock(I.mu);
  for (int64_t i = 0; i < n; ++i) {
    int32_t* e = blocks[i] >= 0 ? I.TableEntry(client, blocks[i], false) : nullptr;
    if (!e || *e < 0) continue;
    const bool was = I.info[*e].listed;
    I.Unlist(*e);
    I.info[*e].prio = priority;
    if (was) I.List(*e);
  }
}

int64_t BlockPool::Impl::FreeClient(Client& c) {
  int64_t n = 0;
  for (int32_t s : c.table) {
    if (s < 0) continue;
    Unlist(s);
    SlotInfo& si = info[s];
    if (si.pins > 0) --st.pinned;
    si.pins = 0;
    si.parkedBy = nullptr;
    si.client = -1;
    si.block = -1;
    --st.used;
    freeSlots.push_back(s);
    ++n;
  }
  // A hold still open on one of its ranges (the caller's to avoid) keeps the range's memory, holding nothing.
  for (auto& r : c.ranges) {
    if (r->holds > 0) st.rangeHeld -= r->count;
    r->holds = 0;
    r->parked.clear();
  }
  c.ranges.clear();
  return n;
}

void BlockPool::Release(int64_t client) {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> lock(I.mu);
  auto t = I.clients.find(client);
  if (t == I.clients.end()) return;
  I.FreeClient(t->second);
  I.clients.erase(t);
}

int64_t BlockPool::ReleaseRange(int64_t first, int64_t last) {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> lock(I.mu);
  int64_t n = 0;
  // One pass over the clients with tables (a few per layer and head of the open documents), not over the range.
  for (auto t = I.clients.begin(); t != I.clients.end();) {
    if (t->first >= first && t->first < last) {
      n += I.FreeClient(t->second);
      t = I.clients.erase(t);
    } else {
      ++t;
    }
  }
  return n;
}

void BlockPool::Attend(const AttendArgs& a) {
  Impl& I = *impl_;
  if (!a.pieces.empty()) return I.AttendPieces(a);
  const int d = I.cfg.headDim;
  if (a.qHeads <= 0 || a.kvHeads <= 0 || a.qHeads % a.kvHeads) throw std::runtime_error("GpuPool: bad head counts");
  if (int(a.tables.size()) != a.kvHeads || int(a.validTokens.size()) != a.kvHeads)
    throw std::runtime_error("GpuPool: one table and one valid count per kv head");
  int64_t total = 0, maxTokens = 0;
  for (int h = 0; h < a.kvHeads; ++h) {
    const int64_t need = (a.validTokens[h] + I.cfg.blockSize - 1) >> I.blockShift;
    if (a.validTokens[h] < 0 || int64_t(a.tables[h].size()) < need)
      throw std::runtime_error("GpuPool: table " + std::to_string(h) + " has fewer blocks than validTokens needs");
    for (int64_t i = 0; i < need; ++i)
      if (a.tables[h][size_t(i)] < 0 || a.tables[h][size_t(i)] >= I.slots)
        throw std::runtime_error("GpuPool: slot id outside the pool");
    total += int64_t(a.tables[h].size());
    maxTokens = std::max(maxTokens, a.validTokens[h]);
  }
  std::lock_guard<std::mutex> lock(I.mu);
  const int splits = a.splits > 0 ? a.splits : ChooseSplits(I.smCount, a.qHeads, a.kvHeads, maxTokens);
  const size_t qBytes = size_t(a.qHeads) * d * 4;
  // Packed inputs: q | tableOffset | validTokens | tables.
  const size_t oQ = 0, oOff = Align(oQ + qBytes),
               oVal = Align(oOff + size_t(a.kvHeads) * 8), oTab = Align(oVal + size_t(a.kvHeads) * 8),
               inBytes = Align(oTab + size_t(std::max<int64_t>(total, 1)) * 4);
  I.hIn.Reserve(inBytes);
  I.dIn.Reserve(inBytes);
  uint8_t* h = static_cast<uint8_t*>(I.hIn.p);
  std::memcpy(h + oQ, a.q, qBytes);
  int64_t* off = reinterpret_cast<int64_t*>(h + oOff);
  int64_t* val = reinterpret_cast<int64_t*>(h + oVal);
  int32_t* tab = reinterpret_cast<int32_t*>(h + oTab);
  int64_t pos = 0;
  for (int k = 0; k < a.kvHeads; ++k) {
    off[k] = pos;
    val[k] = a.validTokens[k];
    std::memcpy(tab + pos, a.tables[k].data(), a.tables[k].size() * 4);
    pos += int64_t(a.tables[k].size());
  }
  cudaStream_t s = I.computeStream;
  uint8_t* dIn = static_cast<uint8_t*>(I.dIn.p);
  Check(cudaMemcpyAsync(dIn, h, inBytes, cudaMemcpyHostToDevice, s), "H2D (attend inputs)");
  if (I.copyPending) Check(cudaStreamWaitEvent(s, I.lastCopy, 0), "wait copies");
  DecodeParams p;
  p.q = reinterpret_cast<const float*>(dIn + oQ);
  p.tables = reinterpret_cast<const int32_t*>(dIn + oTab);
  p.tableOffset = reinterpret_cast<const int64_t*>(dIn + oOff);
  p.validTokens = reinterpret_cast<const int64_t*>(dIn + oVal);
  p.maxTokens = maxTokens;
  I.Decode(p, a, splits);
}

void BlockPool::Impl::Decode(DecodeParams& p, const AttendArgs& a, int splits) {
  const int d = cfg.headDim;
  const size_t qBytes = size_t(a.qHeads) * d * 4;
  const size_t partOutBytes = Align(size_t(a.qHeads) * splits * d * 4);
  dPart.Reserve(partOutBytes + Align(size_t(a.qHeads) * splits * 4));
  const size_t outBytes = Align(qBytes) + Align(size_t(a.qHeads) * 4);
  dOutBuf.Reserve(outBytes);
  hOut.Reserve(outBytes);
  cudaStream_t s = computeStream;
  p.kPool = kPool;
  p.vPool = vPool;
  p.blockShift = blockShift;
  p.headDim = d;
  p.dtype = cfg.dtype;
  p.qHeads = a.qHeads;
  p.kvHeads = a.kvHeads;
  p.scale = a.scale;
  p.splits = splits;
  p.partOut = static_cast<float*>(dPart.p);
  p.partLse = reinterpret_cast<float*>(static_cast<uint8_t*>(dPart.p) + partOutBytes);
  uint8_t* dOut = static_cast<uint8_t*>(dOutBuf.p);
  p.out = reinterpret_cast<float*>(dOut);
  p.lse = reinterpret_cast<float*>(dOut + Align(qBytes));
  Check(cudaEventRecord(kStart, s), "event");
  pool_detail::CheckRc(LaunchDecode(p, s), "decode kernel launch");
  Check(cudaEventRecord(kStop, s), "event");
  Check(cudaMemcpyAsync(hOut.p, dOut, outBytes, cudaMemcpyDeviceToHost, s), "D2H");
  Check(cudaEventRecord(lastCompute, s), "event");
  computePending = true;
  Check(cudaStreamSynchronize(s), "decode kernel");
  cudaEventElapsedTime(&lastMs, kStart, kStop);
  std::memcpy(a.out, hOut.p, qBytes);
  std::memcpy(a.lse, static_cast<uint8_t*>(hOut.p) + Align(qBytes), size_t(a.qHeads) * 4);
}

void BlockPool::Sync() {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> lock(I.mu);
  Check(cudaStreamSynchronize(I.copyStream), "sync copies");
  Check(cudaStreamSynchronize(I.computeStream), "sync compute");
}

PoolStats BlockPool::Stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->st;
}

void BlockPool::ResetCounters() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  PoolStats& s = impl_->st;
  s.hits = s.misses = s.evictions = s.bytesCopied = s.copies = s.rangeReuses = s.rangePatched = 0;
}

float BlockPool::LastKernelMs() const { return impl_->lastMs; }

double BlockPool::ProbeH2D(int64_t bytes, int iters) {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> lock(I.mu);
  Check(cudaStreamSynchronize(I.copyStream), "sync");
  pool_detail::HostBuf hb;
  pool_detail::DevBuf db;
  hb.Reserve(size_t(bytes));
  db.Reserve(size_t(bytes));
  std::memset(hb.p, 1, size_t(bytes));
  cudaEvent_t e0, e1;
  Check(cudaEventCreate(&e0), "event");
  Check(cudaEventCreate(&e1), "event");
  Check(cudaMemcpyAsync(db.p, hb.p, size_t(bytes), cudaMemcpyHostToDevice, I.copyStream), "H2D");  // warm-up
  Check(cudaEventRecord(e0, I.copyStream), "event");
  for (int i = 0; i < iters; ++i)
    Check(cudaMemcpyAsync(db.p, hb.p, size_t(bytes), cudaMemcpyHostToDevice, I.copyStream), "H2D");
  Check(cudaEventRecord(e1, I.copyStream), "event");
  Check(cudaEventSynchronize(e1), "sync");
  float ms = 0.f;
  cudaEventElapsedTime(&ms, e0, e1);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return double(bytes) * iters / (double(ms) / 1e3);
}

}  // namespace cuda
}  // namespace kvr
