// The wave index's decode step on the GPU (issue #13 items 1-2): a
// device-resident cluster store per (segment, layer) holding every kv head's
// clusters, and one call per layer-step that selects the retrieval zone and
// estimates the rest. Plain C++ interface: this header names no CUDA type, so
// the binding compiles with the host compiler.
//
// A step, for every kv head at once, on one stream:
//  1. every cluster scored by an optimistic score and ranked (score
//     descending, id ascending); the best clusters taken until they hold
//     `target` tokens (the last one cut, its first members kept), at most
//     `maxClusters`. The score, max over the GQA group, is either
//       kSpread: q·mu + spread·sqrt((q·a)² + Σ_j q_j² var_j)
//                (native/kernels/cluster_rank.h; a: the scaled principal axis)
//       kRadius: q·mu + share·‖q‖·radius (the older score);
//  2. their members rescored exactly (max over the group of q·k) and the best
//     `budget` kept, ties towards the lower id (a set: returned in cluster
//     order; both cuts by threshold, not by sorting, wave_select.cuh);
//  3. the estimation zone: every cluster minus the rows attended exactly (the
//     selection plus the given sinks/window rows) as a partial (out, lse) per
//     q head, with native/kernels/cluster_estimate's semantics: second order
//     with kSpread (logit s q·mu + share·s²/2 Σ q_j² var_j capped at
//     s (q·mu + ‖q‖ r); a partly attended cluster by the rows it has left,
//     each by its own logit (restRows) or by their moments), first order
//     with kRadius.
// kSpread is index/wave/cluster-index.ts's searchHeads (default ranking)
// followed by estimateClusters with estimateArgs(ids) (restRows) or
// estimateArgs(ids, 'moments'); kRadius is searchHeads(..., 'radius')
// followed by estimateArgs(ids, 'first'). Scores
// are summed in the order of the host's AVX2 Dot (native/common/simd_math.h)
// over the same decoded moments (common/moment_code.h: one f32 product per
// code, host and device alike) and combined with the host's roundings, so they are bit for bit the host's
// and the selection is the host's; the estimate is f32 with a max shift per
// tile of clusters, tiles merged in float64.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/half.h"

namespace kvr {
namespace cuda {

struct WaveStoreConfig {
  int kvHeads = 0;
  int headDim = 0;  // a multiple of 8, at most 1024 (Supports)
  Dtype dtype = Dtype::kF16;
  int64_t tokens = 0;  // the segment's rows per kv head
  // 0: the dense store, every head's K and V on the device. > 0: the paged
  // store: K and V in pinned, mapped host memory and a device cache of this
  // many (head, row) slots shared by the heads (native/cuda/wave_cache.cuh).
  // A step whose rows exceed it fails (CacheRowsBound sizes it; Rest is
  // refused on a paged store).
  int64_t cacheRows = 0;
  // The paged store only: > 0, the bytes (K and V) a step may copy into the
  // cache from step pageCapFrom on (counted from the store's construction,
  // or the cache's last emptying), each kv head an equal share; what the
  // cache lacks past it is not rescored and is left to the estimate
  // (native/cuda/wave_page_cap.cuh). 0: every row the step reads is paged.
  int64_t pageCapBytes = 0;
  int pageCapFrom = 16;
};

// One kv head's clusters as the wave artifact holds them, and its rows.
struct WaveHeadHost {
  const uint16_t* centroids = nullptr;   // [clusters, headDim + 8]: centroid, radius, padding
  const uint16_t* valueMeans = nullptr;  // [clusters, headDim]
  // The key moments in 8 bits, a scale per cluster (common/moment_code.h):
  const int8_t* keyAxes = nullptr;       // [clusters, headDim]: principal axis scaled by its std (kSpread ranking)
  const float* axisScales = nullptr;     // [clusters]
  const uint8_t* keyVars = nullptr;      // [clusters, headDim]: per-channel key variance (kSpread ranking and estimate)
  const float* varScales = nullptr;      // [clusters]
  float varianceShare = 1.f;             // the share of the second-order term this head takes (its artifact's; 1: all of it)
  const int32_t* counts = nullptr;       // [clusters]; must be tokenCluster's histogram
  const int32_t* tokenCluster = nullptr; // [tokens], each in [0, clusters)
  const uint16_t* keys = nullptr;        // [tokens, headDim] (rescoring)
  const uint16_t* values = nullptr;      // [tokens, headDim] (exact rows leave their cluster's estimate)
  int64_t clusters = 0;
};

enum class WaveRanking { kSpread, kRadius };

struct WaveStepArgs {
  const float* q = nullptr;         // [qHeads, headDim]
  WaveRanking ranking = WaveRanking::kSpread;
  // [qHeads]: kRadius: share·‖q‖ (the optimistic query's column headDim);
  // kSpread: ‖q‖ as the host's estimate computes it (sqrt of its Dot(q, q)),
  // for the cap of the second-order logit.
  const float* normTerms = nullptr;
  float spread = 2.f;               // kSpread: standard deviations (index/wave's SPREAD)
  int qHeads = 0;
  float scale = 1.f;
  std::vector<int64_t> budget;       // [kvHeads]: tokens kept
  std::vector<int64_t> target;       // [kvHeads]: candidate tokens (probe × budget)
  std::vector<int64_t> maxClusters;  // [kvHeads]: clusters ranked at most
  // Rows dropped from the kept ids (at most two [lo, hi) ranges: the sinks and
  // window a caller attends anyway), and ids kept at most per kv head after
  // that (empty: budget), as index/static-plus-retrieved.ts keeps them.
  std::vector<std::pair<int64_t, int64_t>> skip;
  std::vector<int64_t> keep;
  const int32_t* exact = nullptr;    // rows attended exactly besides the selection, every head
  int64_t exactCount = 0;
  bool estimate = true;
  // kSpread: a partly attended cluster's remaining rows weigh by their own
  // logits (estimateArgs 'rows', the engine's default), else by their
  // moments ('moments').
  bool restRows = true;
  // The retrieval and steady zones (the selection and `exact`, a row listed
  // twice once) attended exactly from the store's K and V and merged into
  // out/lse with the estimate (when estimate): the layer's attention over
  // the whole segment. Else out/lse are the estimate alone.
  bool attend = false;
  // The kept ids read back (false: only their counts, idCounts: the engine
  // needs the ids only when a caller asks for the selection, and reading
  // [kvHeads, width] back costs more host time than the rest of the answer).
  bool ids = true;
  // Per-stage CUDA event times in `stages` (false: `ms` only): a bench's
  // question, a dozen driver calls per step that the engine does not need.
  bool stageTimes = true;
  // Without stage times, the step's launches replayed from a CUDA graph
  // captured once per shape (native/cuda/step_graph.cuh): one launch instead
  // of ~40 (false: launched one by one, a bench's comparison).
  bool graph = true;
  // Host work run on the calling thread while the device runs the step
  // (after its launches, before the wait): the binding attends a session's
  // own tokens there, so a layer-step is one native call with nothing on
  // another thread (engine/wave-on-device.ts). What it throws is thrown
  // after the stream has been waited for.
  std::function<void()> overlap;
  // A capped paged store's per-step detail (a test's or a bench's question):
  // momentClusters in the result.
  bool detail = false;
};

struct WaveStepResult {
  int64_t width = 0;              // ids per head in `ids`
  std::vector<int32_t> ids;       // [kvHeads, width]: head h's first idCounts[h], in cluster order (a set); empty unless args.ids
  std::vector<int64_t> idCounts;  // [kvHeads]
  std::vector<int64_t> candidates;// [kvHeads]: members rescored
  std::vector<float> out;         // [qHeads, headDim]: the estimate, or with attend the whole attention
  std::vector<float> lse;         // [qHeads]; -inf where nothing is estimated (or attended)
  std::vector<double> estimated;  // [kvHeads]: tokens the estimate covers
  float ms = 0;                   // the whole step on the stream (inputs in to outputs out), CUDA events
  std::vector<std::pair<std::string, float>> stages;  // ms per stage, in order (with args.stageTimes)
  // Host ms around the stream, in order (steady clock): prep (inputs laid
  // out, up to the first launch), launch (every launch issued), overlap
  // (args.overlap's work, when given), wait (the stream synchronised after
  // it), copy (the outputs read back into this result).
  std::vector<std::pair<std::string, float>> host;
  int64_t graphCaptures = 0;  // graphs this store has captured so far (a steady shape: one)
  // The paged store: rows this step copied from the host into the cache, and their bytes (K and V); 0 for the dense store.
  int64_t misses = 0;
  int64_t bytesIn = 0;
  // A capped paged store (pageCapBytes > 0): per kv head, the candidates
  // rescored (those the cache held or the step paged; `candidates` less the
  // rest), and the rows the sinks/window rows' clusters paged (outside the
  // share, before it). Empty otherwise.
  std::vector<int64_t> rescored;
  std::vector<int64_t> exactMisses;
  // With args.detail on a capped store: per kv head, the partly attended
  // clusters (indices within the head) whose rest the estimate took from
  // their moments because the cap left some of their rows unread (the
  // others' rest: their rows' own logits, as uncapped).
  std::vector<std::vector<int32_t>> momentClusters;
};

// The estimation zone of another method's selection (issue #13 items 3-4):
// every cluster minus the rows the caller attends exactly, given per kv head,
// as estimateClusters over estimateArgs(rows, order) computes it (index/wave/
// cluster-index.ts; the engine's estimateRest), with no ranking or rescoring:
// the store selects nothing and attends nothing.
enum class WaveRestOrder { kRows, kMoments, kFirst };

struct WaveRestArgs {
  const float* q = nullptr;          // [qHeads, headDim]
  const float* normTerms = nullptr;  // [qHeads]: ‖q‖ as the host's estimate computes it (sqrt of its Dot(q, q))
  int qHeads = 0;
  float scale = 1.f;
  // Head h's rows attended exactly: its [lo, hi) ranges (pairs
  // rangeStart[h] .. rangeStart[h + 1] of `ranges`, flat), then its ids
  // (idStart[h] .. idStart[h + 1] of `ids`). A row listed twice is attended
  // once. Ranges within [0, tokens), ids in [0, tokens) (the binding checks
  // the ids).
  std::vector<int32_t> ranges;
  std::vector<int64_t> rangeStart;  // [kvHeads + 1]
  std::vector<int32_t> ids;
  std::vector<int64_t> idStart;     // [kvHeads + 1]
  // kRows: second order, a partly attended cluster's remaining rows by their
  // own logits (estimateArgs' 'rows', the engine's); kMoments: by their
  // moments; kFirst: first order.
  WaveRestOrder order = WaveRestOrder::kRows;
  bool stageTimes = false;  // as WaveStepArgs
  bool graph = true;        // as WaveStepArgs: without stage times, the launches replayed from a graph
};

struct WaveRestResult {
  std::vector<float> out;         // [qHeads, headDim]: the estimate
  std::vector<float> lse;         // [qHeads]; -inf where nothing is estimated
  std::vector<double> estimated;  // [kvHeads]: tokens the estimate covers
  std::vector<double> scanned;    // [kvHeads]: keys read for the rows partly attended clusters have left (kRows)
  std::vector<int64_t> rows;      // [kvHeads]: exact rows given (a row listed twice counts twice)
  float ms = 0;                   // inputs in to outputs out on the stream, CUDA events
  std::vector<std::pair<std::string, float>> stages;  // with stageTimes
  std::vector<std::pair<std::string, float>> host;    // prep, launch, wait, copy
  int64_t graphCaptures = 0;      // graphs the store's rest calls have captured so far
};

struct WaveStoreBytes {
  int64_t summaries = 0;  // centroids, value means, key axes and variances, counts, member lists, token->cluster
  int64_t moments = 0;    // of which the key axes and variances (what kSpread adds)
  int64_t maps = 0;       // of which the member lists and token->cluster maps (2 bytes a row each where they fit, else 4)
  int64_t kv = 0;         // the K and V rows held for rescoring and exact rows (0 for a paged store)
  int64_t cache = 0;      // the paged store's row cache: its slots' K and V, the row->slot map, the slots' owners and stamps, the miss list
  int64_t cacheRows = 0;  // its slots
  int64_t scratch = 0;    // per-step buffers
};

class WaveStore {
 public:
  // Copies every head's arrays to the device. Throws std::runtime_error (no
  // device, out of memory, a shape Supports refuses).
  WaveStore(const WaveStoreConfig& cfg, const WaveHeadHost* heads);
  ~WaveStore();
  WaveStore(const WaveStore&) = delete;
  WaveStore& operator=(const WaveStore&) = delete;

  static bool Supports(int headDim);
  const WaveStoreConfig& Config() const;
  int64_t Clusters(int head) const;
  WaveStoreBytes Bytes() const;

  // One layer-step; blocks until the outputs are on the host. Calls from
  // several threads take turns.
  WaveStepResult Step(const WaveStepArgs& a);
  // The estimate of what another method's selection leaves out (WaveRestArgs);
  // takes turns with Step. Throws on a paged store (its rows may exceed the cache).
  WaveRestResult Rest(const WaveRestArgs& a);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace cuda
}  // namespace kvr
