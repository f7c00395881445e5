// Device pool of fixed-size KV blocks (CUDA). Plain C++ interface: this header
// names no CUDA type, so the binding compiles with the host compiler.
//
// A slot holds one block of one pool client (a session/layer/kv head): K and V,
// each blockSize tokens x headDim 16-bit words (f16 or bf16). The pool is one
// cudaMalloc sized by a byte budget. Each client has a page table (logical
// block -> slot). Misses are copied through pinned host staging chunks: one
// host->device copy per chunk on the copy stream, then a scatter kernel into the
// slots; an event per chunk lets the compute stream wait only for the copies it
// needs. Eviction is LRU within a priority class (lowest class first); pinned
// slots are never evicted, so a NOSA-aware policy can be layered on top by
// pinning the query-agnostic blocks and raising the priority of stable ones.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/half.h"
#include "cuda/device_info.h"

namespace kvr {
namespace cuda {

struct PoolConfig {
  int64_t budgetBytes = 0;  // device bytes for K+V slots
  int blockSize = 64;       // tokens per block, a power of two
  int headDim = 128;        // 64 or 128
  Dtype dtype = Dtype::kF16;  // f16 or bf16
  int64_t stagingBytes = 64ll << 20;  // pinned host (and device) staging, split in 4 chunks
};

struct PoolStats {
  int64_t slots = 0, used = 0, pinned = 0;
  int64_t hits = 0, misses = 0, evictions = 0;
  int64_t bytesCopied = 0, copies = 0;
  // Range tables (HoldRange): blocks of the ranges held now (a block held by
  // two ranges counts twice), holds answered without per-block work, and
  // entries re-made block by block (first builds included).
  int64_t rangeHeld = 0, rangeReuses = 0, rangePatched = 0;
};

// One piece of a kv head's slot table: a held range's device table
// (HoldRange's id and its block count), or slot ids from the host.
struct TablePiece {
  int64_t hold = 0;             // > 0: a HoldRange id
  int64_t blocks = 0;           // the hold's block count (checked against it)
  std::vector<int32_t> slots;   // hold == 0: slot ids
};

struct AttendArgs {
  const float* q = nullptr;  // [qHeads, headDim]
  int qHeads = 0, kvHeads = 0;
  float scale = 1.f;
  std::vector<std::vector<int32_t>> tables;  // per kv head: slot ids, block order
  // Or, when set, per kv head its table as pieces back to back (held ranges
  // are copied device to device: no slot id of theirs crosses the bus).
  std::vector<std::vector<TablePiece>> pieces;
  std::vector<int64_t> validTokens;          // per kv head: tokens attended (<= blocks * blockSize)
  float* out = nullptr;  // [qHeads, headDim]
  float* lse = nullptr;  // [qHeads], natural log; -inf where nothing was attended
  int splits = 0;        // 0: chosen from the device's multiprocessor count
};

class BlockPool {
 public:
  explicit BlockPool(const PoolConfig& cfg);  // throws std::runtime_error
  ~BlockPool();
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  const PoolConfig& Config() const;
  int64_t Slots() const;

  // Where Ensure reads block i: kPacked, k and v hold the n requested blocks
  // back to back; kIndexed, they are a whole segment (a head's rows) and
  // block b is at b*blockSize*headDim, so nothing is gathered for hits.
  enum class Source { kPacked, kIndexed };
  struct EnsureOptions {
    int priority = 0;                    // eviction class of every block of the call
    const uint8_t* priorities = nullptr;  // or one per block
    Source source = Source::kPacked;
    bool hold = false;  // pin every block (as Pin) before returning: a step holds what its attend reads
  };
  // Makes blocks[i] of `client` resident, each blockSize*headDim words of K
  // and of V. Hits are touched, misses copied (async). slotsOut[i] receives
  // the slot. Throws when more blocks are asked for than can be resident at
  // once (nothing is held then).
  void Ensure(int64_t client, const int32_t* blocks, int64_t n, const uint16_t* k, const uint16_t* v, int32_t* slotsOut,
              const EnsureOptions& options);
  // One client's blocks in a call over several clients (EnsureMany, PinMany).
  struct ClientBlocks {
    int64_t client = 0;
    const int32_t* blocks = nullptr;
    int64_t n = 0;
    const uint16_t* k = nullptr;  // EnsureMany: the client's whole rows (kIndexed)
    const uint16_t* v = nullptr;
    const uint8_t* priorities = nullptr;  // EnsureMany: one class per block, or none (options.priority)
  };
  // Ensure (kIndexed) of each item in turn, as that many calls would, in
  // one: with options.hold, every item's misses are copied by one flush (one
  // host->device copy and one scatter launch per staging chunk filled) and
  // all are held or none (it throws, its holds undone; the blocks made
  // resident stay so). Without hold each item flushes its own: a staged
  // slot no hold keeps could be taken by the next item before its copy.
  // options.source and priorities are ignored. slotsOut: every item's slots
  // back to back.
  void EnsureMany(const ClientBlocks* items, int n, const EnsureOptions& options, int32_t* slotsOut);
  // Slot of each block, or -1; touches residents; counts hits and misses.
  void Lookup(int64_t client, const int32_t* blocks, int64_t n, int32_t* slotsOut);
  // Pinned blocks are never evicted; pins count (a block pinned twice needs
  // two unpins), so overlapping steps can each hold what their attend reads.
  void Pin(int64_t client, const int32_t* blocks, int64_t n, bool pinned);
  // Pin of each item's blocks (k, v and priorities unused), in one call.
  void PinMany(const ClientBlocks* items, int n, bool pinned);
  // Moves resident blocks to another eviction class (lower goes first).
  void Prefer(int64_t client, const int32_t* blocks, int64_t n, int priority);
  // Drops every block of a client (e.g. when a session ends). Pinned blocks
  // go too: the caller waits until no attend reads them.
  void Release(int64_t client);
  // Release of every client in [first, last) (a deleted document's segment:
  // all its layers and heads); returns the blocks freed.
  int64_t ReleaseRange(int64_t first, int64_t last);

  // Blocks [first, first + count) of `client`, read from whole-head k and v
  // as Ensure's kIndexed, made resident and held for an attend (unhold with
  // Unhold once it has returned): returns the hold's id for AttendArgs'
  // pieces. The range's slot table lives on the device; while no block of
  // it lost its slot since the last hold (a still-valid table, or one
  // containing this range), this is O(1): no page-table lookup, touch or
  // pin per block. Otherwise only the blocks that lost their slots are
  // made resident again (all of them the first time), each as Ensure does.
  // A held range's slots are never evicted. Throws as Ensure does (nothing
  // is held then).
  int64_t HoldRange(int64_t client, int32_t first, int32_t count, const uint16_t* k, const uint16_t* v, int priority);
  // HoldRange of the same blocks of n clients (a part's kv heads: k[i], v[i]
  // client i's rows) in one call; ids[i] receives client i's hold. All or
  // none: when one throws, the holds made before it are ended. The clients'
  // patched misses are copied by one flush (a held range's slots are never
  // taken, so none staged can be before its copy).
  void HoldRanges(const int64_t* clients, int n, int32_t first, int32_t count, const uint16_t* const* k,
                  const uint16_t* const* v, int priority, int64_t* ids);
  // Ends holds (an unknown id is an error, and then none ends).
  void Unhold(const int64_t* ids, int n);
  void Unhold(int64_t hold) { Unhold(&hold, 1); }

  // Decode attention over slot tables; blocks until out/lse are written.
  void Attend(const AttendArgs& a);
  // Waits for every copy and kernel of the pool.
  void Sync();

  PoolStats Stats() const;
  void ResetCounters();
  // Pure pinned host->device bandwidth of the staging buffers: bytes/second.
  double ProbeH2D(int64_t bytes, int iters);
  // Last Attend's kernel time (split + merge), milliseconds, from events.
  float LastKernelMs() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace cuda
}  // namespace kvr
