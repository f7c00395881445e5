// Range tables of the block pool (block_pool.h HoldRange): a client's whole
// blocks [first, first + count) (sinks, a window, a whole document) kept as
// a slot table on the device, so that a step reading them again while none
// of them lost its slot does O(1) host work per range: no page-table lookup,
// touch or pin per block, and no slot id crosses the bus (the attend copies
// the tables device to device, one gather launch for every piece of every
// head). Eviction keeps the guarantee per-block pins gave: it parks a held
// range's slots instead of taking them (block_pool_impl.cuh Allocate).
#include <numeric>

#include "cuda/block_pool_impl.cuh"

namespace kvr {
namespace cuda {
namespace {

struct GatherPiece {
  const int32_t* src;
  int64_t dst;
  int64_t n;
};

// Piece blockIdx.y of a head's table to its place in the step's table.
__global__ void GatherTables(const GatherPiece* pieces, int32_t* out) {
  const GatherPiece p = pieces[blockIdx.y];
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += int64_t(gridDim.x) * blockDim.x)
    out[p.dst + i] = p.src[i];
}

}  // namespace

std::shared_ptr<pool_detail::Range> BlockPool::Impl::RangeFor(Client& c, int64_t client, int32_t first, int32_t count,
                                                              int priority) {
  // A clean range containing the asked one serves it as it is (a window
  // shrinking from its front); one equal to it is patched; else a new one.
  std::shared_ptr<Range> equal;
  for (auto& r : c.ranges) {
    if (!(r->first <= first && int64_t(first) + count <= int64_t(r->first) + r->count)) continue;
    if (r->Clean()) return r;
    if (r->first == first && r->count == count) equal = r;
  }
  if (equal) return equal;
  // Unheld ranges inside the new one go (it serves them); past kMaxRanges, the least recently used unheld one.
  c.ranges.erase(std::remove_if(c.ranges.begin(), c.ranges.end(),
                                [&](const std::shared_ptr<Range>& r) {
                                  return r->holds == 0 && r->first >= first &&
                                         int64_t(r->first) + r->count <= int64_t(first) + count;
                                }),
                 c.ranges.end());
  while (c.ranges.size() >= pool_detail::kMaxRanges) {
    auto oldest = c.ranges.end();
    for (auto r = c.ranges.begin(); r != c.ranges.end(); ++r)
      if ((*r)->holds == 0 && (oldest == c.ranges.end() || (*r)->lastUse < (*oldest)->lastUse)) oldest = r;
    if (oldest == c.ranges.end()) break;
    c.ranges.erase(oldest);
  }
  auto r = std::make_shared<Range>(spares, size_t(count));
  r->client = client;
  r->first = first;
  r->count = count;
  r->prio = priority;
  c.ranges.push_back(r);
  return r;
}

int64_t BlockPool::Impl::Patch(Range& r, const uint16_t* k, const uint16_t* v) {
  std::vector<int32_t> entries;
  if (r.build) {
    entries.resize(size_t(r.count));
    std::iota(entries.begin(), entries.end(), 0);
  } else {
    entries = r.dirty;
    std::sort(entries.begin(), entries.end());
    entries.erase(std::unique(entries.begin(), entries.end()), entries.end());
  }
  if (entries.empty()) return 0;
  const int64_t n = int64_t(entries.size());
  std::vector<int32_t> blocks(entries.size()), got(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) blocks[i] = r.first + entries[i];
  EnsureOptions o;
  o.priority = r.prio;
  o.source = Source::kIndexed;
  // The range is held: the misses' evictions park its other slots, never take them.
  EnsureLocked(r.client, blocks.data(), n, k, v, got.data(), o);
  for (size_t i = 0; i < entries.size(); ++i) r.host[entries[i]] = got[i];
  // The mirror's changed span to the device, ordered before the attend that reads it (it waits for lastCopy).
  const size_t lo = size_t(entries.front()), hi = size_t(entries.back()) + 1;
  Check(cudaMemcpyAsync(r.dev + lo, r.host + lo, (hi - lo) * 4, cudaMemcpyHostToDevice, copyStream), "H2D (range table)");
  Check(cudaEventRecord(lastCopy, copyStream), "event");
  copyPending = true;
  r.build = false;
  r.dirty.clear();
  st.rangePatched += n;
  return n;
}

int64_t BlockPool::Impl::HoldLocked(int64_t client, int32_t first, int32_t count, const uint16_t* k,
                                    const uint16_t* v, int priority) {
  if (first < 0 || count < 1) throw std::runtime_error("GpuPool: a range needs first >= 0 and count >= 1");
  if (count > slots)
    throw std::runtime_error("GpuPool: " + std::to_string(count) + " blocks asked for, the pool holds " +
                             std::to_string(slots));
  std::shared_ptr<Range> r = RangeFor(clients[client], client, first, count, priority);
  // Held before the patch: its own misses must not take the range's other slots.
  if (r->holds++ == 0) st.rangeHeld += r->count;
  int64_t patched = 0;
  try {
    patched = Patch(*r, k, v);
  } catch (...) {
    Unhold(*r);
    throw;
  }
  if (patched == 0) ++st.rangeReuses;
  st.hits += count - patched;  // a patched range is the one asked for: Ensure counted its patched blocks
  r->lastUse = ++clock;        // its slots' touch, applied when eviction reaches them
  const int64_t id = nextHold++;
  holds.emplace(id, Hold{r, first - r->first, count});
  return id;
}

int64_t BlockPool::HoldRange(int64_t client, int32_t first, int32_t count, const uint16_t* k, const uint16_t* v,
                             int priority) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->HoldLocked(client, first, count, k, v, priority);
}

void BlockPool::HoldRanges(const int64_t* clients, int n, int32_t first, int32_t count, const uint16_t* const* k,
                           const uint16_t* const* v, int priority, int64_t* ids) {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> lock(I.mu);
  int i = 0;
  try {
    // One flush for every client's patched misses: their slots are in ranges held from here on, never taken.
    I.Batched([&] {
      for (; i < n; ++i) ids[i] = I.HoldLocked(clients[i], first, count, k[i], v[i], priority);
    });
  } catch (...) {
    for (int j = 0; j < i; ++j) {  // all or none held
      auto h = I.holds.find(ids[j]);
      I.Unhold(*h->second.range);
      I.holds.erase(h);
    }
    throw;
  }
}

void BlockPool::Unhold(const int64_t* ids, int n) {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> lock(I.mu);
  for (int i = 0; i < n; ++i)
    if (!I.holds.count(ids[i])) throw std::runtime_error("GpuPool: no hold " + std::to_string(ids[i]));
  for (int i = 0; i < n; ++i) {
    auto h = I.holds.find(ids[i]);
    if (h == I.holds.end()) continue;  // the same id twice in the list
    I.Unhold(*h->second.range);
    I.holds.erase(h);
  }
}

void BlockPool::Impl::AttendPieces(const AttendArgs& a) {
  if (a.qHeads <= 0 || a.kvHeads <= 0 || a.qHeads % a.kvHeads) throw std::runtime_error("GpuPool: bad head counts");
  if (int(a.pieces.size()) != a.kvHeads || int(a.validTokens.size()) != a.kvHeads)
    throw std::runtime_error("GpuPool: one table and one valid count per kv head");
  int64_t total = 0, maxTokens = 0, hostSlots = 0, nPieces = 0, longest = 0;
  for (int h = 0; h < a.kvHeads; ++h) {
    int64_t blocks = 0;
    for (const TablePiece& p : a.pieces[h]) {
      const int64_t n = p.hold > 0 ? p.blocks : int64_t(p.slots.size());
      if (p.hold <= 0) {
        for (int32_t s : p.slots)
          if (s < 0 || s >= slots) throw std::runtime_error("GpuPool: slot id outside the pool");
        hostSlots += n;
      }
      if (n > 0) ++nPieces;
      longest = std::max(longest, n);
      blocks += n;
    }
    if (a.validTokens[h] < 0 || blocks < ((a.validTokens[h] + cfg.blockSize - 1) >> blockShift))
      throw std::runtime_error("GpuPool: table " + std::to_string(h) + " has fewer blocks than validTokens needs");
    total += blocks;
    maxTokens = std::max(maxTokens, a.validTokens[h]);
  }
  if (nPieces > 65535) throw std::runtime_error("GpuPool: more than 65535 table pieces in one attend");
  std::lock_guard<std::mutex> lock(mu);
  const int d = cfg.headDim;
  const int splits = a.splits > 0 ? a.splits : ChooseSplits(smCount, a.qHeads, a.kvHeads, maxTokens);
  const size_t qBytes = size_t(a.qHeads) * d * 4;
  // Packed inputs: q | tableOffset | validTokens | host slots | gather pieces.
  const size_t oQ = 0, oOff = Align(oQ + qBytes),
               oVal = Align(oOff + size_t(a.kvHeads) * 8), oHost = Align(oVal + size_t(a.kvHeads) * 8),
               oPieces = Align(oHost + size_t(hostSlots) * 4),
               inBytes = Align(oPieces + size_t(std::max<int64_t>(nPieces, 1)) * sizeof(GatherPiece));
  hIn.Reserve(inBytes);
  dIn.Reserve(inBytes);
  dTab.Reserve(size_t(std::max<int64_t>(total, 1)) * 4);
  uint8_t* h = static_cast<uint8_t*>(hIn.p);
  uint8_t* dev = static_cast<uint8_t*>(dIn.p);
  std::memcpy(h + oQ, a.q, qBytes);
  int64_t* off = reinterpret_cast<int64_t*>(h + oOff);
  int64_t* val = reinterpret_cast<int64_t*>(h + oVal);
  int32_t* host = reinterpret_cast<int32_t*>(h + oHost);
  GatherPiece* pieces = reinterpret_cast<GatherPiece*>(h + oPieces);
  int64_t pos = 0, hostAt = 0, at = 0;
  for (int k = 0; k < a.kvHeads; ++k) {
    off[k] = pos;
    val[k] = a.validTokens[k];
    for (const TablePiece& p : a.pieces[k]) {
      GatherPiece g{nullptr, pos, 0};
      if (p.hold > 0) {
        // Resolved under the lock: an unhold (the caller's after this attend) cannot race it.
        auto held = holds.find(p.hold);
        if (held == holds.end()) throw std::runtime_error("GpuPool: no hold " + std::to_string(p.hold));
        // Its client released (a misuse: GpuBackend frees no segment a step reads): its slots may be another's now.
        if (held->second.range->holds == 0)
          throw std::runtime_error("GpuPool: hold " + std::to_string(p.hold) + "'s client was released under it");
        if (held->second.count != p.blocks)
          throw std::runtime_error("GpuPool: hold " + std::to_string(p.hold) + " has " +
                                   std::to_string(held->second.count) + " blocks, not " + std::to_string(p.blocks));
        g.src = held->second.range->dev + held->second.offset;
        g.n = p.blocks;
      } else {
        std::memcpy(host + hostAt, p.slots.data(), p.slots.size() * 4);
        g.src = reinterpret_cast<const int32_t*>(dev + oHost) + hostAt;
        g.n = int64_t(p.slots.size());
        hostAt += g.n;
      }
      if (g.n > 0) pieces[at++] = g;
      pos += g.n;
    }
  }
  cudaStream_t s = computeStream;
  Check(cudaMemcpyAsync(dev, h, inBytes, cudaMemcpyHostToDevice, s), "H2D (attend inputs)");
  // Copies of misses and of range tables' patches come first.
  if (copyPending) Check(cudaStreamWaitEvent(s, lastCopy, 0), "wait copies");
  int32_t* table = static_cast<int32_t*>(dTab.p);
  if (nPieces > 0) {
    const dim3 grid(unsigned(std::min<int64_t>((longest + 255) / 256, 128)), unsigned(nPieces));
    GatherTables<<<grid, 256, 0, s>>>(reinterpret_cast<const GatherPiece*>(dev + oPieces), table);
    Check(cudaGetLastError(), "gather tables launch");
  }
  DecodeParams p;
  p.q = reinterpret_cast<const float*>(dev + oQ);
  p.tables = table;
  p.tableOffset = reinterpret_cast<const int64_t*>(dev + oOff);
  p.validTokens = reinterpret_cast<const int64_t*>(dev + oVal);
  p.maxTokens = maxTokens;
  Decode(p, a, splits);
}

}  // namespace cuda
}  // namespace kvr
