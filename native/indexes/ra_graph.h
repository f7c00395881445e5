// RetrievalAttention's attention-aware graph index over one kv head's keys.
//
// Decode queries are out of distribution with respect to keys, so a graph
// built from keys alone (key-kNN, HNSW) leads a greedy search astray. Here the
// prefill queries tie keys together instead: each query's exact top-kBuild
// keys form a query→key bipartite graph, which is projected onto the keys as
// RoarGraph does (the query's nearest key is linked to its other top keys,
// and they back to it), pruned to a bounded, diverse out-degree. A greedy
// beam search driven by a decode query then reaches the high-attention keys
// while scoring a small fraction of them.
//
// The index does not own the keys: every call takes the keys pointer ([n, d]
// 16-bit words, f16 or bf16), which must be the same keys it was built over.
//
// Code: ra_graph_build.cc (Build), ra_graph_search.cc (Search),
// ra_graph_codec.cc (Serialize, Deserialize), ra_graph_beam.h (the beam
// search that Search and Build's connectivity pass share),
// ra_graph_attention.cc (Search ranked by the group's attention),
// ra_graph_code_walk.h, ra_key_codes.h and ra_walk_lists.h (its code-gated
// walk).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "common/half.h"
#include "indexes/ra_key_codes.h"
#include "indexes/ra_pq_codes.h"
#include "indexes/ra_walk_lists.h"

namespace kvr {

struct RaGraphParams {
  // Out-degree bound of the projected graph (bridging may add a few:
  // maxDegree()). 16 with keyNeighbors 8: on workload/ at 64K-256K keys, 1%
  // of them asked, that gives more top-k recall per key scanned than 32
  // projected edges alone, or than 32 + 8.
  int degree = 16;
  int kBuild = 64;             // exact top-k keys per build query
  int64_t maxQueries = 8192;   // build queries are subsampled (seeded) to at most this many
  uint64_t seed = 1;
  // Positional neighbours linked each side (t-1..t-p, t+1..t+p), beyond
  // `degree`: adjacent post-RoPE keys are near in key space and a span's
  // tokens are attended together; with p >= 1 every key is reachable from
  // any other, including keys no build query retrieved. 0 = none.
  int positional = 1;
  // Key-key edges per key, beyond `degree` and the positional ones: the key's
  // nearest keys by cosine after centring (the keys' mean removed, so the
  // outlier channels every key shares do not decide it), found by a beam
  // search of keyEf over the graph being built, started from the key's own
  // edges (RoarGraph's connectivity enhancement). A decode query's top keys
  // beyond what the prefill queries saw are, for the most part, keys whose
  // content happens to align with it; their centred neighbours align with it
  // too. 0 = none.
  int keyNeighbors = 8;
  int keyEf = 48;
};

struct RaBuildInput {
  const uint16_t* keys = nullptr;  // [tokens, headDim]
  int64_t tokens = 0;
  int headDim = 0;
  Dtype dtype = Dtype::kF16;
  // Prefill query rows [queryCount, headDim]; the q heads of a GQA group are
  // just separate rows. queryCount == 0 builds a key-to-key graph instead.
  const float* queries = nullptr;
  int64_t queryCount = 0;
};

// Timings and counts from Build; not serialized.
struct RaBuildStats {
  int64_t queriesUsed = 0;   // build queries after subsampling (pseudo-queries when none were given)
  int64_t unretrieved = 0;   // keys in no build query's top-kBuild list (linked by the connectivity pass)
  int64_t bridged = 0;       // edges added so that every key is reachable from the entry points
  double knnSeconds = 0, projectSeconds = 0, keySeconds = 0, connectSeconds = 0;
};

// How a search ranks a key for a GQA group of query rows.
enum class RaAggregate {
  // The largest q·k over the group's rows (unscaled); an exhaustive search
  // returns exactly topk.cc's top-k.
  kMax = 0,
  // The group's attention: the key's softmax probability summed over the
  // rows, Σ_h exp(scale·q_h·k − lse_h), the ranking of the set that
  // maximises the group's attention recall (what the group attends). lse_h,
  // each row's log-partition, is estimated from a strided sample of the keys
  // (n/512 of them, 64..4096; scored, so counted as scanned) and refined
  // after the walk from the keys it scored plus the sample's unreached keys
  // extrapolated over the keys it did not reach; exact when every key was
  // scored. The max over rows is the wrong ranking when the rows' partitions
  // differ: a row with a few very high scores (a heavy hitter) outranks, key
  // for key, the spread-out mass of another row.
  kAttention = 1,
};

// Where a search's time went (RaSearchOptions::profile; kAttention only), in
// the thread's CPU milliseconds; scoreMs by the wall clock per batch of keys
// (an expanded node's new neighbours). The timing has a cost, so it is
// measured only when asked.
struct RaSearchProfile {
  double sampleMs = 0;  // scoring the strided sample, lse estimate, sample seeds
  double walkMs = 0;    // the beam search, scoring included
  double scoreMs = 0;   // of walkMs: reading and scoring keys (the dot products and the rank)
  double refineMs = 0;  // lse refined
  double finalMs = 0;   // the bound, the final scores and the sort
  int64_t finalScored = 0;  // keys given a final score (the rest were ruled out by the bound)
};

struct RaSearchOptions {
  // Extra start keys besides the entry points; ids outside [0, n) ignored.
  const int32_t* seeds = nullptr;
  size_t seedCount = 0;
  // Free start keys: keys whose scores the caller computes anyway (a
  // session's steady zone, the sinks and the window it attends in full).
  // The walk starts from them too, but they are not counted in `scanned` or
  // against maxScanned, and the result leaves them out: it is the top k of
  // the other keys (an exhaustive search returns exactly that). Ids outside
  // [0, n) are ignored. For kAttention their logits still count, exactly,
  // in the rows' refined log-partitions.
  const int32_t* freeSeeds = nullptr;
  size_t freeSeedCount = 0;
  // The quality bound (>= 0) in the ranking score's units: raw q·k for kMax,
  // logits (natural log of probability) for kAttention.
  float margin = 3.0e38f;
  RaAggregate aggregate = RaAggregate::kMax;
  // Softmax scale for kAttention; 0 means 1/√headDim.
  float scale = 0.f;
  // A cap on the keys scored (0 = none): the walk stops expanding once it
  // has scored this many (kAttention's sample included), whatever ef and
  // margin say; it may pass the cap by one neighbour list.
  int64_t maxScanned = 0;
  // Filled when set (kAttention only).
  RaSearchProfile* profile = nullptr;
  // Candidates expanded a round of the walk (ra_graph_beam.h): their new
  // neighbours are scored as one stream. 1 is the walk one candidate at a
  // time, as before this option (the same ids); values below 1 count as 1.
  // The default. 8 took 0.89-0.92 of its CPU a
  // search at 1M on the 2-core VM (bench/results/ra-search-1048576-vm-r5.md)
  // but 1.13 of its layer-step capped at 3% on the 16-core GPU host, 10
  // pairs alternated (ra-search-1048576-h100-r5.md): not the default where
  // the target is set.
  int expandWidth = 1;
  // The beam walk's shape counted into the result (rounds, expanded,
  // startKeys, peakCandidates; kAttention's beam walk only), and, with
  // poolCap > 0, its candidates cut to their best poolCap after every round,
  // as a GPU walk's fixed pool in shared memory would (bench/ra-gpu-walk.ts:
  // an experiment; 0, the default, the unbounded heap).
  bool walkStats = false;
  int64_t poolCap = 0;
  // The code-gated walk (kAttention only; ra_graph_code_walk.h) in place of
  // the beam walk: each key met is read first as its 4-bit code
  // (ra_key_codes.h, made from the keys on the first such search) and scored
  // exactly only if the code's approximate walk score is >= τ − codeDelta,
  // τ being the strided sample's (codeQuantile · 1%)-quantile of that score;
  // the others are queued by the approximate score. ef, margin and
  // expandWidth do not apply (codeWidth does): it runs until maxScanned (keys scored exactly)
  // or maxCodes (codes read) stops it, or every reachable key was met. On the
  // generator at 1M keys (q = 1, δ = 0.5, caps 3% / 40%) it recalls 0.93-0.94
  // of the group's top 1% with 2.2-2.4% scored exactly, as
  // bench/retrieval-code-walk.ts's simulation did, where the beam walk capped
  // at 3% recalls 0.24-0.27; but it takes ~62 ms of CPU a search on the
  // 2-core VM against ~8.6 ms (bench/results/ra-search-1048576-vm-codes.md):
  // ~420K codes read, each a random line. Off by default.
  // The cutoff moves with the caps (codeAdapt): τ − δ + codeAdapt · (the
  // share of the exact cap the walk has used − the share of the codes' cap),
  // so it tightens while keys scored exactly run ahead of the codes read and
  // loosens while they lag, and the walk meets both caps near together. A
  // fixed cutoff's best setting moved with size, configuration and seed: q 1,
  // δ 0.5 let the exact cap stop the walk first at 64K-256K (0.88 of the top
  // 1%), and a stricter one let the codes' cap stop it first elsewhere (0.78
  // on a second seed); q 1, δ 1, codeAdapt 2 recalls 0.93-0.99 in both
  // configurations at 64K-256K on two seeds and 0.954 / 0.975 at 1M, at
  // 1M as much CPU (bench/results/retrieval-code-cut-*-vm.md;
  // index/retrieval-attention.ts). codeAdapt 0: the fixed cutoff τ − δ.
  bool codeWalk = false;
  float codeQuantile = 1.f;  // in (0, 100]
  float codeDelta = 1.f;     // logits, >= 0; +inf: every key met is scored exactly
  float codeAdapt = 2.f;     // logits, >= 0: 0 keeps the cutoff fixed; needs both caps
  int64_t maxCodes = 0;      // a cap on the codes read (0 = none)
  // Candidates the code walk expands a round, their lists and codes fetched
  // side by side (values below 1 count as 1). It reads ~10 codes an
  // expansion, each a miss: one at a time took ~150 ms a search at 1M keys
  // (caps 3% / 40%) on the 2-core VM, 8 at a time ~80 ms, 16 no less, the
  // same recall to 3 digits. Since the codes are scored in int8 (~30 ms at
  // 8), each round's waits on its lists weigh more: 16 took 0.86-0.92 of 8's
  // CPU at 1M and 0.91-0.96 at 256K, about the same at 64K, alternated
  // (bench/results/ra-search-codewidth-*-vm.md), the same recall to 3 digits.
  int codeWidth = 16;
  // The code scan (kAttention only; ra_graph_code_scan.h) in place of either
  // walk: every key's code scored in the int8 form, then exactly the best
  // maxScanned − (the sample's size) keys by ρ = max_h (x̃_h − c0_h), entry
  // points and seeds first, free keys never; maxScanned must be > 0. ef,
  // margin and the walks' knobs do not apply. On the generator at 1M keys it
  // recalled 0.98 of the group's top 1% with 2.4% scored exactly
  // (bench/results/ra-gpu-walk-feasibility-vm.md, section 2). Off by default.
  bool codeScan = false;
  // The code scan's pass split into pool tasks of this many keys (0: one
  // pass on the searching thread), for a search whose layer-step leaves
  // cores idle (fewer kv heads than cores). The same ids either way.
  int64_t scanChunk = 0;
  // The code scan's first pass on product-quantized codes (ra_pq_codes.h,
  // 1/16 of the f16 key's bytes at d = 128) where > 0: every key's PQ code
  // ranked by ρ as above, the best max(scanKeep · n, maxScanned − m) of them
  // and the PQ codes' outliers (a channel past 5σ) ranked again by their
  // 4-bit codes, and the best of those scored exactly. The code bytes read
  // a search fall from n·d/2 to n·d/8 + kept·d/2: at 1M keys, 3% exact and
  // scanKeep 0.08 the search read 11.2% of the keys' bytes against 28.0%
  // (0.30 / 0.31 of hnsw's at its best ef), recalling 0.932 / 0.964 of the
  // top 1% against 0.993 / 0.995 (default / broad configuration,
  // bench/results/ra-code-scan-1048576{,-broad}-vm-pq.md). 0 (the default):
  // every key's 4-bit code, the scan as above. In (0, 1].
  double scanKeep = 0;
};

struct RaSearchResult {
  int64_t count = 0;      // ids written: min(k, tokens)
  int64_t scanned = 0;    // keys whose score was computed (exactly)
  int64_t codesRead = 0;  // keys read as codes (codeWalk, codeScan: n; not counted in scanned)
  int64_t codesKept = 0;  // scanKeep: the keys whose 4-bit code was read after their PQ code (in codesRead)
  // The beam walk's shape (kAttention, not the code walk; ra_graph_beam.h's
  // WalkStats): its rounds of up to expandWidth expansions (its sequential
  // depth), the candidates it expanded, the keys it scored before its first
  // round (entry points and seeds; the sample is apart), and its candidate
  // heap's largest size after a round.
  int64_t rounds = 0;
  int64_t expanded = 0;
  int64_t startKeys = 0;
  int64_t peakCandidates = 0;
};

class RaGraph {
 public:
  // Cost: the exact top-kBuild scan is M·n·d multiply-adds with
  // M = min(queryCount, maxQueries) (min(n, maxQueries) pseudo-queries when
  // queryCount == 0), a blocked f32 GEMM-like kernel over widened key tiles
  // on all cores (measured ~40 GFLOP/s per Zen 3 core, e.g. 2.5 s on 2 cores
  // for M = 8192, n = 64K, d = 128: it dominates). Projection and pruning are
  // O(M·kBuild + n·degree·4·degree·d); the connectivity pass is one small beam
  // search per key that no build query retrieved. Memory: ~5·M·kBuild int32
  // transient + the graph.
  static RaGraph Build(const RaBuildInput& in, const RaGraphParams& params, RaBuildStats* stats = nullptr);

  // Best-first beam search from the entry points with beam width
  // max(ef, k); a key's score is the largest q·k over the group's `group`
  // query rows q [group, headDim], computed exactly as topk.cc does. Writes
  // min(k, tokens) ids and scores, best first (ties towards the lower id).
  // It stops when the best unexpanded candidate is worse than the beam's
  // worst (beam full), or, with a finite `margin` (score units, >= 0), as
  // soon as it scores below the current k-th best minus `margin`: nothing
  // reached from it is likely to enter the top k (the quality bound; the
  // beam then only caps the work). With ef >= tokens and no margin the
  // search visits every key and the result equals the exact top-k. `seeds` are extra starting keys besides the graph's entry
  // points (e.g. the previous decode step's results, or the recent window:
  // decode queries change little from step to step); ids outside [0, n) are
  // ignored. Thread-safe: concurrent searches on one graph are fine.
  RaSearchResult Search(const uint16_t* keys, Dtype dtype, const float* q, int group, int k, int64_t ef,
                        int32_t* outIds, float* outScores, const int32_t* seeds = nullptr,
                        size_t seedCount = 0, float margin = kNoMargin) const;
  static constexpr float kNoMargin = 3.0e38f;
  // The same with the ranking chosen (RaSearchOptions). For kAttention the
  // scores written are log((1/group) Σ_h p_h): the log of the group's mean
  // probability as estimated; with ef >= tokens and no margin every key is
  // scored and the ids are the exact top-k of the group's mean probability.
  RaSearchResult Search(const uint16_t* keys, Dtype dtype, const float* q, int group, int k, int64_t ef,
                        int32_t* outIds, float* outScores, const RaSearchOptions& opt) const;

  // Little-endian blob (version 4): magic, version, header, CSR offsets (int64, n+1),
  // neighbours (int32), entry points (int32), Checksum64 (common/checksum.h)
  // of all that.
  std::vector<uint8_t> Serialize() const;
  // Throws std::runtime_error on any inconsistency (magic, version, sizes,
  // offsets, ids out of range, checksum); never reads out of bounds. A blob
  // of an older version throws "ra-graph blob version V is stale ...": its
  // index must be rebuilt from the keys.
  static RaGraph Deserialize(const uint8_t* data, size_t size);

  int64_t tokens() const { return n_; }
  int headDim() const { return d_; }
  const RaGraphParams& params() const { return params_; }
  int64_t queriesUsed() const { return queriesUsed_; }
  int64_t edges() const { return int64_t(neighbors_.size()); }
  int64_t maxDegree() const;
  const std::vector<int32_t>& entries() const { return entries_; }
  // CSR view (for tests and tools).
  const std::vector<int64_t>& offsets() const { return offsets_; }
  const std::vector<int32_t>& neighbors() const { return neighbors_; }

 private:
  RaSearchResult SearchAttention(const uint16_t* keys, Dtype dtype, const float* q, int group, int k, int64_t ef,
                                 int32_t* outIds, float* outScores, const RaSearchOptions& opt) const;

  // Copies of the rows every attention search reads, the strided sample's
  // (m of them) then the entry points', made on the first search and again
  // when a search brings another keys pointer: ~1.6 MB at 1M keys, d=128
  // (0.6% of the keys). Shared by the searches running on the graph.
  struct FixedRows {
    std::mutex lock;
    const uint16_t* keys = nullptr;  // the keys they were copied from
    std::shared_ptr<const std::vector<uint16_t>> rows;
  };
  std::shared_ptr<const std::vector<uint16_t>> FixedRowsFor(const uint16_t* keys, int64_t m, int64_t off,
                                                            int64_t stride) const;

  // The keys' 4-bit codes for the code-gated walk, made from the keys on the
  // first search that asks and again when a search brings another keys
  // pointer or dtype; searches wait for the one that makes them. Not stored
  // with the graph: three passes over the keys make them (0.34 s a head at
  // 1M keys on 2 cores), where the blob would grow by 64 MB a head (1M keys,
  // d = 128: what they hold in memory), more than the graph itself.
  struct CodeCache {
    std::mutex lock;
    const uint16_t* keys = nullptr;
    Dtype dtype = Dtype::kF16;
    std::shared_ptr<const RaKeyCodes> codes;
    // The PQ codes (scanKeep), made apart, for the keys and dtype they name.
    const uint16_t* pqKeys = nullptr;
    Dtype pqDtype = Dtype::kF16;
    std::shared_ptr<const RaPqCodes> pq;
  };

 public:
  // The codes of `keys` (made now if this graph has none of them yet).
  std::shared_ptr<const RaKeyCodes> KeyCodesFor(const uint16_t* keys, Dtype dtype) const;
  // Bytes of the codes held now (0 before a code-gated search).
  size_t KeyCodeBytes() const;
  // The PQ codes of `keys` (scanKeep), made now where this graph has none of them yet.
  std::shared_ptr<const RaPqCodes> PqCodesFor(const uint16_t* keys, Dtype dtype) const;
  // The lists in the code walk's slots (ra_walk_lists.h), made on the first
  // call; null where they cannot hold the graph (the walk reads the CSR).
  std::shared_ptr<const RaWalkLists> WalkListsFor() const;
  // Bytes of those slots held now (0 before a code-gated search).
  size_t WalkListBytes() const;

 private:
  int64_t n_ = 0;
  int d_ = 0;
  RaGraphParams params_;
  int64_t queriesUsed_ = 0;
  std::vector<int64_t> offsets_;    // [n + 1]
  std::vector<int32_t> neighbors_;  // [offsets_[n]]
  std::vector<int32_t> entries_;
  std::shared_ptr<FixedRows> fixed_ = std::make_shared<FixedRows>();
  std::shared_ptr<CodeCache> codes_ = std::make_shared<CodeCache>();
  struct ListCache {
    std::mutex lock;
    bool tried = false;
    std::shared_ptr<const RaWalkLists> lists;
  };
  std::shared_ptr<ListCache> lists_ = std::make_shared<ListCache>();
};

}  // namespace kvr
