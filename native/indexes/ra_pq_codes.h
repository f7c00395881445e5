// Product-quantized codes of one kv head's keys, 4 bits per 4 channels: the
// code scan's optional first pass (ra_graph_code_scan.h, RaSearchOptions::
// scanKeep), read for every key where the 4-bit codes (ra_key_codes.h) are
// then read only for the keys it keeps.
//
// Why: the code scan reads every key's 4-bit code, 1/4 of the f16 key's
// bytes; with the 3% scored exactly that was 0.66-0.79 of the bytes hnsw
// reads at its best ef at 1M keys (issue #15 asks <= 1/3). No code of ~1/16
// of the key's bytes ranks well enough alone: on the generator's keys
// (RoPE-rotated, nearly Gaussian in every direction the queries weigh) a
// 16-byte code is near the rate-distortion bound of 1 bit a channel (its
// logits correlate ~0.85 with the exact ones) and its best 3% hold ~0.7 of
// the group's top 1% (PQ; 1 bit a channel 0.63, PCA transform codes
// 0.5-0.73, RaBitQ's sign code 0.17 at 256K keys; bench/ra-small-codes.py).
// As a filter it serves: the 4-bit codes of its best 8% (and the outliers
// below) then ranked as the one-pass scan ranks every key, the scan recalled
// 0.932 / 0.964 of the top 1% at 1M keys (default / broad configuration)
// against the one pass's 0.993 / 0.995, at the oracle's output error within
// 0.002, reading 11.2% of the keys' bytes against 28.0%
// (bench/results/ra-code-scan-1048576{,-broad}-vm-pq.md).
//
// Layout: channel j belongs to subspace j / 4 (M = ceil(d/4) subspaces, the
// last zero-padded); each subspace has 16 centroids (k-means over a strided
// sample of the keys, ra_pq_codes.cc), and a key's code in subspace s is its
// nearest centroid's index (squared distance, ties towards the lower index).
// A row is ceil(M/2) bytes (16 at d = 128: 1/16 of the f16 key): byte i holds
// subspace 2i in its low nibble and 2i + 1 in its high one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/half.h"

namespace kvr {

// A query group's look-up tables (RaPqCodes::Prepare). For head h,
// T_hsc = scale · q_h[4s..4s+3] · centroid_sc is the subspace's share of the
// approximate logit x̂_h = Σ_s T_h,s,code_s (summed in double for the tests'
// reference). The scan adds integers: u_hsc = round((T_hsc − min_c T_hsc) /
// Δ_h) in [0, L], L = min(255, floor(65535 / M)), Δ_h = max_s (max_c − min_c
// of T_hs·) / L, and x̃_h = base_h + Δ_h · Σ_s u_h,s,code_s with base_h =
// Σ_s min_c T_hsc. Each u is within Δ_h / 2 of the table's value, so
// |x̃_h − x̂_h| <= M · Δ_h / 2 (real arithmetic; float rounding adds a few
// ulps). Four heads' u go in one 64-bit word, 16 bits a head: a key's four
// sums are M word additions (at most M · L <= 65535 a lane, no carry).
struct RaPqQuery {
  int G = 0;
  int quads = 0;               // ceil(G / 4)
  int M = 0;                   // subspaces
  std::vector<uint64_t> lut;   // [quads, M, 16]: head 4·quad + l's u in bits 16l..16l+15
  // [quads, ceil(M/2), 256]: a row byte's two subspaces' words added, so a
  // key's sums are one load a byte: a search at 1M keys (scanKeep 0.08)
  // took 37.7 ms of CPU with a load a nibble, 25.0 so (2-core VM).
  std::vector<uint64_t> pairs;
  std::vector<float> base;     // [4·quads] (padded heads 0)
  std::vector<float> delta;    // [4·quads]
  std::vector<double> table;   // [G, M, 16]: T_hsc in double (tests, tools)
};

class RaPqCodes {
 public:
  static constexpr int kSub = 4;          // channels a subspace
  static constexpr int kCentroids = 16;   // a 4-bit code
  static constexpr int64_t kTrainMax = 32768;  // keys the k-means sees (strided)
  static constexpr int kIterations = 20;
  // A key with a channel this far out is an outlier (outliers()): kept for
  // the 4-bit codes whatever its PQ code says. A feature planted along a few
  // channels (the generator's needles and salient keys, 8-24σ out) lies far
  // outside every centroid, and its PQ code loses it: a needle at 33.9
  // logits (the other keys' 99th percentile at 17.5) scored 12.6, below the
  // median, where its 4-bit code, clamped at 3σ, still scored 18.9. On the
  // generator's keys 0.39% of them are outliers at 5σ (at 8σ as many), its
  // Gaussian noise ~7e-5 (bench/ra-small-codes.py).
  static constexpr double kOutlierSigmas = 5.0;

  // k-means of each subspace over min(n, kTrainMax) strided keys on the
  // native pool (a task a subspace), then every key's codes (tasks of rows).
  // Deterministic: the same codes whatever the pool's size.
  static RaPqCodes Build(const uint16_t* keys, int64_t n, int d, Dtype dtype);

  int64_t tokens() const { return n_; }
  int headDim() const { return d_; }
  int subspaces() const { return M_; }
  size_t rowBytes() const { return rowBytes_; }
  const uint8_t* Row(int64_t id) const { return codes_.data() + size_t(id) * rowBytes_; }
  int Code(const uint8_t* row, int s) const { return (s & 1) ? (row[s >> 1] >> 4) : (row[s >> 1] & 15); }
  // [M, 16, 4]: the centroids (channels past d zero).
  const std::vector<float>& centroids() const { return centroids_; }
  // The outliers, ascending: keys with a channel more than kOutlierSigmas σ
  // from the channel's mean over the head's keys.
  const std::vector<int32_t>& outliers() const { return outliers_; }
  size_t Bytes() const {
    return codes_.size() + centroids_.size() * sizeof(float) + outliers_.size() * sizeof(int32_t);
  }

  // pairs: the byte tables the host's scan sums by (RaPqQuery::pairs); the
  // device scan sums the nibble tables and leaves them out.
  void Prepare(const float* q, int G, float scale, RaPqQuery& out, bool pairs = true) const;
  // x[h·ld + i] = x̃_h of key ids[i] (the integer form above), i < count.
  void Logits(const RaPqQuery& pq, const int32_t* ids, size_t count, float* x, size_t ld) const;
  // out[i] = max_h (x̃_h − c0_h) for key ids[i] / for the keys first + i.
  void MaxShiftedIds(const RaPqQuery& pq, const float* c0, const int32_t* ids, size_t count, float* out) const;
  void MaxShiftedRows(const RaPqQuery& pq, const float* c0, int64_t first, size_t count, float* out) const;

 private:
  int64_t n_ = 0;
  int d_ = 0;
  int M_ = 0;
  size_t rowBytes_ = 0;
  std::vector<float> centroids_;
  std::vector<uint8_t> codes_;  // [n, rowBytes_]
  std::vector<int32_t> outliers_;
};

}  // namespace kvr
