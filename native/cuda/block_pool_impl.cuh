// The block pool's state (block_pool.h's BlockPool::Impl), shared by its two
// translation units: block_pool.cu (slots, page tables, staging, eviction,
// the attend) and block_pool_ranges.cu (range tables: a client's contiguous
// block range kept as a device slot table, held by one count).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/thread_pool.h"
#include "cuda/block_pool.h"
#include "cuda/cuda_common.cuh"
#include "cuda/decode_kernel.h"

namespace kvr {
namespace cuda {
namespace pool_detail {

inline void CheckRc(int rc, const char* what) { Check(cudaError_t(rc), what); }

// A device buffer that only grows.
struct DevBuf {
  void* p = nullptr;
  size_t cap = 0;
  void Reserve(size_t bytes) {
    if (bytes <= cap) return;
    if (p) cudaFree(p);
    p = nullptr;
    cap = 0;
    Check(cudaMalloc(&p, bytes), "cudaMalloc (scratch)");
    cap = bytes;
  }
  ~DevBuf() {
    if (p) cudaFree(p);
  }
};
struct HostBuf {
  void* p = nullptr;
  size_t cap = 0;
  void Reserve(size_t bytes) {
    if (bytes <= cap) return;
    if (p) cudaFreeHost(p);
    p = nullptr;
    cap = 0;
    Check(cudaHostAlloc(&p, bytes, cudaHostAllocDefault), "cudaHostAlloc (scratch)");
    cap = bytes;
  }
  ~HostBuf() {
    if (p) cudaFreeHost(p);
  }
};

constexpr int kChunks = 4;

// A flush of at most this many bytes of blocks is copied into staging on the
// calling thread: 8 slots of 32 KiB, 24-36 us at the 7.3-10.9 GB/s one core
// copies from random places of a 1 GiB source (bench/results/flush-copy-vm.md).
// ParallelFor wakes every worker of the pool (15 on a 16-core host) for the
// batch, and they take its one mutex in turn: a fixed cost of the order of
// such a copy. With one worker (a 2-core machine) every flush is copied
// inline: there ParallelFor was never faster, 1.0-1.7x slower at every size.
constexpr size_t kInlineCopyBytes = size_t(256) << 10;
inline bool CopyInline(size_t bytes) { return bytes <= kInlineCopyBytes || ThreadPool::Get().Threads() <= 2; }

// A range table's memory: its device table and pinned mirror, cap entries each.
struct TableBuf {
  int32_t* dev = nullptr;
  int32_t* host = nullptr;
  size_t cap = 0;
};

// Range tables' memory no range uses now, kept for the next range that fits.
// Ranges are made and dropped on the step path (a window that grows, a ninth
// range of a client, a document released): there a cudaFree or cudaFreeHost
// would wait for the whole device (every stream's kernels) under the lock
// the pool's steps wait on, and a cudaHostAlloc costs more than the step. A
// reused table needs no wait: the attend that read it has returned (attends
// are synchronous, under the lock), and its next copy is ordered on the copy
// stream after any still running. Past kSpareEntries, tables are freed.
struct TableSpares {
  static constexpr size_t kSpareEntries = size_t(4) << 20;  // 16 MiB of device tables, as much pinned
  std::vector<TableBuf> bufs;
  size_t entries = 0;
  cudaStream_t stream = nullptr;  // the copy stream (a copy into a table may still run when it is freed)
  TableBuf Take(size_t count) {
    auto best = bufs.end();
    for (auto b = bufs.begin(); b != bufs.end(); ++b)
      if (b->cap >= count && (best == bufs.end() || b->cap < best->cap)) best = b;
    if (best != bufs.end()) {
      const TableBuf t = *best;
      *best = bufs.back();
      bufs.pop_back();
      entries -= t.cap;
      return t;
    }
    TableBuf t;
    t.cap = 64;  // powers of two, so that the tables of ranges of nearby sizes are interchangeable
    while (t.cap < count) t.cap *= 2;
    Check(cudaMalloc(reinterpret_cast<void**>(&t.dev), t.cap * 4), "cudaMalloc (range table)");
    const cudaError_t rc = cudaHostAlloc(reinterpret_cast<void**>(&t.host), t.cap * 4, cudaHostAllocDefault);
    if (rc != cudaSuccess) {
      cudaFree(t.dev);
      Check(rc, "cudaHostAlloc (range table)");
    }
    return t;
  }
  void Give(const TableBuf& t) {
    if (!t.dev) return;
    if (entries + t.cap > kSpareEntries) return Free(t);
    bufs.push_back(t);
    entries += t.cap;
  }
  void Free(const TableBuf& t) {
    if (stream) cudaStreamSynchronize(stream);
    cudaFree(t.dev);
    cudaFreeHost(t.host);
    cudaGetLastError();
  }
  void Clear() {
    for (const TableBuf& t : bufs) Free(t);
    bufs.clear();
    entries = 0;
  }
};

// A client's whole blocks [first, first + count) as one device slot table
// (HoldRange). Its entries stay true while no block of the range loses its
// slot: an eviction marks the entry dirty (a release drops the range), and
// the next hold re-makes only the dirty entries. While held (holds > 0) its
// slots are never evicted: eviction parks them off the LRU chains instead,
// and the last unhold lists them again. Its recency is lastUse, applied to
// its slots lazily: eviction moves a slot used since it was listed to the
// most recent end instead of taking it. Its memory comes from, and goes back
// to, the pool's spares.
struct Range {
  int64_t client = -1;
  int32_t first = 0, count = 0;
  int prio = 0;
  int32_t* dev = nullptr;   // [count] slot ids on the device: what the attend reads
  int32_t* host = nullptr;  // [count] pinned mirror: the source of its copies
  TableBuf buf;
  TableSpares* spares = nullptr;
  int holds = 0;
  bool build = true;            // every entry to make (new, or too many dirty)
  std::vector<int32_t> dirty;   // entries whose slot was taken since written
  std::vector<int32_t> parked;  // its slots off the chains while held
  uint64_t lastUse = 0;
  Range(TableSpares& s, size_t count) : buf(s.Take(count)), spares(&s) {
    dev = buf.dev;
    host = buf.host;
  }
  Range(const Range&) = delete;
  Range& operator=(const Range&) = delete;
  bool Contains(int32_t block) const { return block >= first && int64_t(block) - first < count; }
  bool Clean() const { return !build && dirty.empty(); }
  void Taken(int32_t entry) {
    if (build) return;
    if (dirty.size() >= std::max<size_t>(16, size_t(count) / 4)) {
      build = true;
      dirty.clear();
    } else {
      dirty.push_back(entry);
    }
  }
  ~Range() { spares->Give(buf); }
};

// Ranges a client keeps beside its page table (sinks, window, a whole
// document: a few); past this, the least recently used unheld one goes.
constexpr size_t kMaxRanges = 8;

}  // namespace pool_detail

struct BlockPool::Impl {
  using Range = pool_detail::Range;
  using DevBuf = pool_detail::DevBuf;
  using HostBuf = pool_detail::HostBuf;
  static constexpr int kChunks = pool_detail::kChunks;

  PoolConfig cfg;
  int blockShift = 0;
  int64_t slots = 0;
  size_t blockWords = 0;  // per K (and per V) block
  int smCount = 132;
  uint16_t* kPool = nullptr;
  uint16_t* vPool = nullptr;
  cudaStream_t copyStream = nullptr, computeStream = nullptr;

  // Staging: chunk c = [int32 slots x perChunk | perChunk x (K block, V block)].
  size_t chunkBytes = 0, headerBytes = 0;
  int64_t perChunk = 0;
  uint8_t* hostStage[kChunks] = {};
  uint8_t* devStage[kChunks] = {};
  cudaEvent_t stageDone[kChunks] = {};
  bool stageBusy[kChunks] = {};
  int cur = 0;        // chunk being filled
  uint64_t flushes = 0, flushedAt[kChunks] = {};  // flushes so far; the flush that made each chunk busy
  int64_t curN = 0;   // blocks staged in it
  bool curNeedsComputeWait = false;
  std::vector<std::pair<const uint16_t*, const uint16_t*>> curSrc;  // host K,V sources of the staged blocks
  // Set by the calls over several clients (EnsureMany with hold, HoldRanges):
  // EnsureLocked leaves its staged misses to the call's one flush at its end.
  bool batching = false;

  cudaEvent_t lastCopy = nullptr, lastCompute = nullptr, kStart = nullptr, kStop = nullptr;
  bool copyPending = false, computePending = false;
  float lastMs = 0.f;

  struct SlotInfo {
    int64_t client = -1;
    int32_t block = -1;
    int prio = 0;
    int pins = 0;  // holders that keep the slot out of eviction (a count: steps overlap)
    bool listed = false;
    bool everUsed = false;
    int32_t prev = -1, next = -1;  // neighbours in its class's LRU chain
    uint64_t stamp = 0;            // clock when last listed (its recency)
    Range* parkedBy = nullptr;     // the held range it was parked for (off the chains until unheld)
  };
  // Least recent first. Intrusive (indices in SlotInfo), so touching a block
  // allocates nothing: a dense step touches every block of the context.
  struct Chain {
    int32_t head = -1, tail = -1;
  };
  // A pool client: its page table (logical block -> slot, -1 where absent) and its range tables.
  struct Client {
    std::vector<int32_t> table;
    std::vector<std::shared_ptr<Range>> ranges;
  };
  // A HoldRange's answer: the range (kept alive past a release) and the part of it asked for.
  struct Hold {
    std::shared_ptr<Range> range;
    int32_t offset = 0, count = 0;
  };
  std::vector<SlotInfo> info;
  std::vector<int32_t> freeSlots;
  std::map<int, Chain> lru;  // priority -> slots, least recent first; no empty chains
  std::unordered_map<int64_t, Client> clients;
  std::unordered_map<int64_t, Hold> holds;
  int64_t nextHold = 1;
  uint64_t clock = 0;  // recency: every listing and every range use advance it
  PoolStats st;

  DevBuf dIn, dPart, dOutBuf, dTab;
  HostBuf hIn, hOut;
  pool_detail::TableSpares spares;  // freed after every range (Impl's destructor)
  std::mutex mu;
  ~Impl();  // block_pool.cu: frees what the constructor made, all or part of it

  void Unlist(int32_t s) {
    SlotInfo& si = info[s];
    if (!si.listed) return;
    auto c = lru.find(si.prio);
    Chain& l = c->second;
    if (si.prev >= 0) info[si.prev].next = si.next;
    else l.head = si.next;
    if (si.next >= 0) info[si.next].prev = si.prev;
    else l.tail = si.prev;
    si.prev = si.next = -1;
    if (l.head < 0) lru.erase(c);
    si.listed = false;
  }
  void List(int32_t s) {  // at the most recent end of its class
    SlotInfo& si = info[s];
    if (si.listed || si.pins > 0 || si.client < 0 || si.parkedBy) return;
    Chain& l = lru[si.prio];
    si.prev = l.tail;
    si.next = -1;
    if (l.tail >= 0) info[l.tail].next = s;
    else l.head = s;
    l.tail = s;
    si.listed = true;
    si.stamp = ++clock;
  }
  // Frees every slot of a client and drops its ranges (the caller erases the client).
  int64_t FreeClient(Client& c);
  int32_t* TableEntry(int64_t client, int32_t block, bool create) {
    auto t = clients.find(client);
    if (t == clients.end()) {
      if (!create) return nullptr;
      t = clients.emplace(client, Client()).first;
    }
    std::vector<int32_t>& table = t->second.table;
    if (size_t(block) >= table.size()) {
      if (!create) return nullptr;
      table.resize(size_t(block) + 1, -1);
    }
    return &table[size_t(block)];
  }
  // A held range of the client over this block, if any.
  Range* HeldOver(int64_t client, int32_t block) {
    auto c = clients.find(client);
    if (c == clients.end()) return nullptr;
    for (auto& r : c->second.ranges)
      if (r->holds > 0 && r->Contains(block)) return r.get();
    return nullptr;
  }
  // A free slot, or the least recent one of the lowest class (-1 if none).
  // A slot of a held range is parked instead of taken; one whose range was
  // used since the slot was listed goes to the most recent end (its touch,
  // deferred from the hold to here). Each slot is seen at most twice a call.
  int32_t Allocate(bool* evicted) {
    *evicted = false;
    if (!freeSlots.empty()) {
      int32_t s = freeSlots.back();
      freeSlots.pop_back();
      *evicted = info[s].everUsed;
      return s;
    }
    while (!lru.empty()) {
      const int32_t s = lru.begin()->second.head;
      SlotInfo& si = info[s];
      auto c = clients.find(si.client);
      Range* held = nullptr;
      uint64_t used = 0;
      if (c != clients.end())
        for (auto& r : c->second.ranges) {
          if (!r->Contains(si.block)) continue;
          if (r->holds > 0) {
            held = r.get();
            break;
          }
          used = std::max(used, r->lastUse);
        }
      Unlist(s);
      if (held) {
        si.parkedBy = held;
        held->parked.push_back(s);
        continue;
      }
      if (used > si.stamp) {
        List(s);
        continue;
      }
      if (c != clients.end()) {
        std::vector<int32_t>& table = c->second.table;
        if (size_t(si.block) < table.size()) table[size_t(si.block)] = -1;
        for (auto& r : c->second.ranges)
          if (r->Contains(si.block)) r->Taken(si.block - r->first);
      }
      si.client = -1;
      si.block = -1;
      ++st.evictions;
      --st.used;
      *evicted = true;
      return s;
    }
    return -1;
  }
  // The last hold of a range ended: its parked slots go back on the chains (most recent), or stay parked for another held range over them.
  void Unpark(Range& r) {
    for (int32_t s : r.parked) {
      SlotInfo& si = info[s];
      if (si.parkedBy != &r) continue;  // freed since (a release), maybe reused
      si.parkedBy = nullptr;
      if (Range* other = HeldOver(si.client, si.block)) {
        si.parkedBy = other;
        other->parked.push_back(s);
      } else {
        List(s);
      }
    }
    r.parked.clear();
  }
  void Unhold(Range& r) {
    if (r.holds == 0) return;  // its client was released under it
    if (--r.holds > 0) return;
    st.rangeHeld -= r.count;
    Unpark(r);
  }
  void PinLocked(int64_t client, const int32_t* blocks, int64_t n, bool pinned);
  // Runs f with batching set, then flushes (also when f throws).
  template <typename F>
  void Batched(F&& f) {
    batching = true;
    try {
      f();
    } catch (...) {
      batching = false;
      Flush();
      throw;
    }
    batching = false;
    Flush();
  }
  // Ensure without the lock (HoldRange patches its dirty entries through it).
  void EnsureLocked(int64_t client, const int32_t* blocks, int64_t n, const uint16_t* k, const uint16_t* v,
                    int32_t* slotsOut, const EnsureOptions& o);
  // Launches the decode (p's q, tables, offsets, valid counts and extra part
  // set by the caller, on the device), waits, and copies out and lse to a's.
  void Decode(DecodeParams& p, const AttendArgs& a, int splits);
  // block_pool_ranges.cu: the range serving [first, first + count) of a
  // client (made when none does), its dirty entries made resident again, and
  // the attend over AttendArgs' pieces.
  std::shared_ptr<Range> RangeFor(Client& c, int64_t client, int32_t first, int32_t count, int priority);
  int64_t HoldLocked(int64_t client, int32_t first, int32_t count, const uint16_t* k, const uint16_t* v, int priority);
  int64_t Patch(Range& r, const uint16_t* k, const uint16_t* v);
  void AttendPieces(const AttendArgs& a);

  // The chunk to fill next: the lowest one whose copy is done, so that a
  // step's staging stays in the same cache-warm memory (filling the 4 in
  // turn cost a step of 31 misses 3-25% more host time: bench/native/pool_step.cc);
  // when all are in flight, the one flushed first, waited for.
  void OpenChunk() {
    int oldest = -1;
    for (int c = 0; c < kChunks; ++c) {
      if (stageBusy[c]) {
        const cudaError_t rc = cudaEventQuery(stageDone[c]);
        if (rc == cudaErrorNotReady) {
          cudaGetLastError();  // not an error: the scatter's launch check must not read it
          if (oldest < 0 || flushedAt[c] < flushedAt[oldest]) oldest = c;
          continue;
        }
        Check(rc, "staging query");
        stageBusy[c] = false;
      }
      cur = c;
      return;
    }
    Check(cudaEventSynchronize(stageDone[oldest]), "staging wait");
    stageBusy[oldest] = false;
    cur = oldest;
  }
  void Stage(int32_t slot, const uint16_t* k, const uint16_t* v, bool evicted) {
    if (curN == 0) OpenChunk();
    reinterpret_cast<int32_t*>(hostStage[cur])[curN] = slot;
    curSrc.emplace_back(k, v);
    curNeedsComputeWait |= evicted;
    ++curN;
    if (curN == perChunk) Flush();
  }
  void Flush() {
    if (curN == 0) return;
    const size_t bb = blockWords * sizeof(uint16_t);
    uint8_t* data = hostStage[cur] + headerBytes;
    auto copy = [&](size_t i) {
      std::memcpy(data + i * 2 * bb, curSrc[i].first, bb);
      std::memcpy(data + i * 2 * bb + bb, curSrc[i].second, bb);
    };
    if (pool_detail::CopyInline(size_t(curN) * 2 * bb))
      for (size_t i = 0; i < size_t(curN); ++i) copy(i);
    else
      ThreadPool::Get().ParallelFor(size_t(curN), copy);
    // A slot that held another block may still be read by an attend in flight.
    if (curNeedsComputeWait && computePending) Check(cudaStreamWaitEvent(copyStream, lastCompute, 0), "wait compute");
    const size_t bytes = headerBytes + size_t(curN) * 2 * bb;
    Check(cudaMemcpyAsync(devStage[cur], hostStage[cur], bytes, cudaMemcpyHostToDevice, copyStream), "H2D");
    pool_detail::CheckRc(LaunchScatter(reinterpret_cast<const uint16_t*>(devStage[cur] + headerBytes),
                          reinterpret_cast<const int32_t*>(devStage[cur]), curN, int64_t(blockWords), kPool, vPool,
                          copyStream),
            "scatter");
    Check(cudaEventRecord(stageDone[cur], copyStream), "event");
    Check(cudaEventRecord(lastCopy, copyStream), "event");
    stageBusy[cur] = true;
    flushedAt[cur] = ++flushes;
    copyPending = true;
    st.bytesCopied += int64_t(bytes);
    ++st.copies;
    curN = 0;
    curNeedsComputeWait = false;
    curSrc.clear();
  }
};
}  // namespace cuda
}  // namespace kvr
