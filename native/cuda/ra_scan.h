// Retrieval-attention's code scan on the device (issue #15): the search
// native/indexes/ra_graph_code_scan.h runs on the host, for every kv head of
// a layer-step in one call on one stream. Plain C++ interface: this header
// names no CUDA type, so the binding compiles with the host compiler.
//
// Why a scan and not the graph walk on the device: a walk in wide rounds
// keeps the host walk's recall (0.26 of the group's top 1% at 3% scored
// exactly, 1M keys), where every key's 4-bit code scored, then the best few
// exactly, recalls ~0.98 at the same exact count with no sequential depth
// (bench/results/ra-gpu-walk-feasibility-vm.md). Its price is bandwidth:
// the codes are a quarter of the keys' bytes, read whole every step.
//
// A search, per kv head h and its G query rows (the host's SearchAttention
// with RaSearchOptions::codeScan; ra_graph.h says what each step is for):
//  0. the free keys' exact logits (the caller's steady zone: attended anyway);
//  1. the strided sample's exact logits (n/512 keys, 64..4096), c0_g = the
//     log-partitions it and the free keys estimate, and the sample's best
//     min(16, m/64) keys by Σ_g exp(x_g − c0_g) as seeds;
//  2. every key's rank ρ = max_g (x̃_g − c0_g), x̃ the int8 form's code logits
//     (RaKeyCodes::QuantLogits: the same integers, one fmaf); entry points
//     and seeds rank +inf, free keys not at all; the best cap − m keys
//     (ties towards the lower id) scored exactly. With `keep` (the host's
//     scanKeep, ra_graph_code_scan.h SelectScanPq) ρ comes in two passes:
//     every key's 16-byte PQ code (ra_pq_codes.h: the same integer sums, one
//     fmaf) keeps the best max(cap − m − the +inf keys, keep) keys that are
//     not +inf or free, then those, the PQ codes' outliers and the +inf keys
//     are ranked by their 4-bit codes as above: a sixteenth of the key's
//     bytes read for every key, a quarter for a few percent of them;
//  3. the log-partitions refined: the keys scored, the free keys, the sample
//     keys not scored, and the rest of the keys at those's mean;
//  4. the best k of the keys scored (not free) and the sample's, by
//     ln((1/G) Σ_g exp(x_g − c_g)), ties towards the lower id.
// The exact dot products sum in another order than the host's, so a key
// whose rank or score ties another's within float rounding may fall on the
// other side of a cut; the tests compare with that tolerance.
#pragma once

#include <cstdint>
#include <memory>

#include "common/half.h"

namespace kvr {
namespace cuda {

// One kv head's data, in host memory (copied to the device by the store).
struct RaScanHead {
  const uint8_t* codes = nullptr;    // [tokens, headDim / 2]: ra_key_codes.h's rows
  const uint16_t* keys = nullptr;    // [tokens, headDim]
  const uint16_t* values = nullptr;  // [tokens, headDim]; every head's or none (the store then attends nothing)
  const int32_t* entries = nullptr;  // the graph's entry points, each in [0, tokens)
  int64_t entryCount = 0;
  // The keys' PQ codes (RaPqCodes rows, [tokens, headDim / 8]) and their
  // outliers (ids in [0, tokens)); every head's or none (searches then take
  // no `keep`).
  const uint8_t* pq = nullptr;
  const int32_t* outliers = nullptr;
  int64_t outlierCount = 0;
};

struct RaScanConfig {
  int kvHeads = 0;
  int headDim = 0;  // a multiple of 8, at most kMaxDim
  Dtype dtype = Dtype::kF16;
  int64_t tokens = 0;  // keys per kv head, below 2^31
  int maxGroup = 0;    // the largest G a search may bring, at most kMaxGroup
  static constexpr int kMaxDim = 256;
  static constexpr int kMaxGroup = 16;
};

// One layer-step's search for every kv head. Lists per head are back to back,
// head h's at the sum of the counts before it.
struct RaScanArgs {
  int group = 0;        // G: query rows per kv head, at most the config's maxGroup
  float scale = 0.f;    // softmax scale
  int64_t k = 0;        // ids wanted per head
  int64_t maxScanned = 0;  // cap: keys scored exactly per head, the sample included
  const float* q = nullptr;         // [kvHeads * G, headDim]
  // RaKeyCodes::Prepare's int8 form per head: w8 [kvHeads, G4, headDim] in
  // nibble order, qscale and qbias [kvHeads, G4]; G4 = G rounded up to 4.
  const int8_t* w8 = nullptr;
  const float* qscale = nullptr;
  const float* qbias = nullptr;
  // Extra start keys (the last step's ids), in [0, tokens): a list a head
  // (seedCounts[h] ids at seeds[h]), read where they lie (the binding's JS
  // arrays: ~86K ids a step at 1M, copied once, into the pinned stage).
  const int32_t* const* seeds = nullptr;
  const int32_t* seedCounts = nullptr;  // [kvHeads]
  const int32_t* freeIds = nullptr;  // free keys, distinct within a head, in [0, tokens)
  const int32_t* freeCounts = nullptr;  // [kvHeads]
  // The two-pass form where keep > 0 (a store holding PQ codes): at least
  // `keep` keys kept by the PQ codes for the 4-bit ones; RaPqCodes::Prepare's
  // integer tables per head, lut [kvHeads, quads, headDim / 4, 16] (quads =
  // G rounded up to 4, over 4), base and delta [kvHeads, 4 · quads].
  int64_t keep = 0;
  const uint64_t* pqLut = nullptr;
  const float* pqBase = nullptr;
  const float* pqDelta = nullptr;
  int32_t* outIds = nullptr;     // [kvHeads, k]: head h's ids (a set, in no order) ...
  float* outScores = nullptr;    // [kvHeads, k]: ... with their scores (step 4's), where given
  int64_t* outCounts = nullptr;  // [kvHeads]: ids written, min(k, keys scored that are not free)
  int64_t* outScanned = nullptr;  // [kvHeads]: keys scored exactly (sample + candidates, each once)
  int64_t* outKept = nullptr;     // [kvHeads], with keep: keys whose 4-bit code was read (the +inf keys not counted)
  // Per-stage CUDA event times in LastTimes (a bench's question).
  bool stageTimes = false;
};

// Attention over listed rows of every kv head (RaScanStore::Attend): head
// h's G query rows over the rows of `ranges` and its list ids[h] (counts[h]
// of them), each row's logit scale·q·k, normalised over the head's rows
// alone (the caller merges other parts by log-sum-exp). A row listed twice
// is attended twice.
struct RaAttendArgs {
  int group = 0;
  float scale = 0.f;
  const float* q = nullptr;          // [kvHeads * G, headDim]
  const int32_t* const* ids = nullptr;  // a list a head, each id in [0, tokens), read where it lies
  const int32_t* counts = nullptr;   // [kvHeads]
  // [begin, end) pairs every head attends besides its list (a document's
  // sinks and window), each within [0, tokens): expanded on the host into
  // the staged lists, never made as id arrays in JS.
  const int32_t* ranges = nullptr;
  int64_t rangePairs = 0;
  float* out = nullptr;              // [kvHeads * G, headDim]: Σ p·v; zero for a head with no rows
  float* lse = nullptr;              // [kvHeads * G]: ln Σ exp(logit); -inf for a head with no rows
};

struct RaScanTimes {
  double totalMs = 0;  // the call on the device: copies in, kernels, copies out (events)
  double sampleMs = 0, scanMs = 0, cutMs = 0, exactMs = 0, finalMs = 0;  // with stageTimes
  double hostMs = 0;   // the call's wall time on the host
  double attendMs = 0;  // the last Attend on the device (events)
};

class RaScanStore {
 public:
  static bool Supports(int headDim, int group);
  // Uploads every head's codes, keys, values (where given) and entry points;
  // throws without a device or memory.
  RaScanStore(const RaScanConfig& cfg, const RaScanHead* heads);
  ~RaScanStore();
  RaScanStore(const RaScanStore&) = delete;
  RaScanStore& operator=(const RaScanStore&) = delete;

  const RaScanConfig& Config() const;
  // Device bytes held: the data, then the per-step buffers sized by the
  // largest (k, maxScanned, lists) seen so far.
  int64_t Bytes() const;
  // Not thread-safe: one search or attend at a time on a store (the binding queues them).
  void Search(const RaScanArgs& a);
  // Whether the store holds values (every head's were given): Attend needs them.
  bool HasValues() const;
  // Uploads every head's PQ codes and outliers (RaScanHead's pq, outliers)
  // to a store made without them; nothing where it holds them (searches
  // with keep need them: the binding knows whether it gave them). Not
  // thread-safe, as Search.
  void AddPq(const RaScanHead* heads);
  void Attend(const RaAttendArgs& a);
  RaScanTimes LastTimes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace cuda
}  // namespace kvr
