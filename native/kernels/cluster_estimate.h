// The estimation zone (RetroInfer's wave index): attention over the tokens a
// step does not attend exactly, estimated from cluster summaries. A cluster c
// of n_c tokens with centroid mu_c and value mean vbar_c contributes about
// n_c * exp(s q.mu_c) to the softmax normaliser and exp(s q.mu_c) * n_c vbar_c
// to the numerator. Clusters the step retrieved whole are left out; a token
// attended exactly inside a cluster that was not retrieved (a sink, the
// window, another method's pick) is removed from its cluster's terms, so no
// token is counted twice. The result is a partial attention (out, lse) over
// the estimated tokens, merged with the exact part by log-sum-exp.
//
// Each estimated token weighs exp(s q.mu_c), below the mean of exp(s q.k)
// over the cluster (Jensen): on the generator that bias, not the value mean,
// is nearly all of the estimate's error (with each cluster's true mass and
// its value mean the error is 0.002-0.007; with n exp(s q.mu) it is
// 0.04-0.11). Given each cluster's per-channel key variance sigma^2_c
// (`keyVars`), the logit is second order, s q.mu + s^2 sum_j q_j^2
// sigma^2_cj / 2 (the Gaussian moment along q with the channels taken
// independent; times the head's calibrated varianceShare, since correlated
// channels make it overstate the spread), capped at s (q.mu + |q| r_c), which no member's logit
// exceeds. A cluster partly attended exactly is estimated from the moments
// of the rows it has left (mean, per-channel variance and value sum with
// the exact rows' keys and values taken out), since those rows are the
// cluster's high scorers. Measured on the generator (32K tokens, 2% exact,
// the exact top-k chosen): error 0.036 / 0.109 (default / broad
// configuration) first order, 0.015 / 0.016 second order with the rest's
// moments. Given the clusters' member lists (`offsets`, `members`), the
// rows a partly attended cluster has left are weighed by their own logits
// (their keys are read, a few per such cluster; their values stay the
// rest's mean): the moments of one to seven rows are a poor Gaussian, and
// at 128K tokens (2% exact) that mass was most of what was left of the
// error: wave 0.021 -> 0.009 (default), 0.012 -> 0.007 (broad). An isotropic spread in place of per-channel variances failed
// (0.21 -> 0.77 at 128K: queries lie along channels where keys barely
// vary). Without keyVars the estimate is first order, as the GPU wave step
// computes it.
#pragma once

#include <cstdint>
#include <vector>

#include "common/half.h"

namespace kvr {

// One document segment's clusters for one kv head.
struct ClusterHead {
  const uint16_t* centroids = nullptr;  // [clusters, centroidStride] storage words; the first headDim are the centroid
  const uint16_t* valueMeans = nullptr; // [clusters, headDim]
  const int32_t* counts = nullptr;      // [clusters]
  const int32_t* tokenCluster = nullptr;// [tokens]: the cluster of each row
  const uint16_t* values = nullptr;     // [tokens, headDim]: the segment's V rows
  const uint8_t* keyVars = nullptr;     // [clusters, headDim]: per-channel key variance, 8-bit codes (common/moment_code.h; optional: second order)
  const float* varScales = nullptr;     // [clusters]: their scales (with keyVars)
  const uint16_t* keys = nullptr;       // [tokens, headDim]: the segment's K rows (with keyVars)
  const int32_t* offsets = nullptr;     // [clusters + 1]: cluster c's members are members[offsets[c] .. offsets[c + 1]) (optional, with keys)
  const int32_t* members = nullptr;     // rows, grouped by cluster
  float varianceShare = 1.f;            // the share of the second-order term this head takes (index/wave/variance-share.ts)
  int64_t clusters = 0, tokens = 0;
  const int32_t* retrieved = nullptr;   // clusters attended whole (not estimated)
  int64_t retrievedCount = 0;
  const int32_t* exact = nullptr;       // rows attended exactly (members of retrieved clusters are ignored)
  int64_t exactCount = 0;
};

struct EstimateProblem {
  const float* q = nullptr;  // [qHeads, headDim]
  int qHeads = 0, kvHeads = 0, headDim = 0, centroidStride = 0;
  Dtype dtype = Dtype::kF16;
  float scale = 1.f;
  std::vector<std::vector<ClusterHead>> segments;  // [segment][kv head]
  float* out = nullptr;        // [qHeads, headDim]
  float* lse = nullptr;        // [qHeads]; -inf where nothing is estimated
  double* estimated = nullptr; // [kvHeads]: tokens covered by estimates
  double* scanned = nullptr;   // [kvHeads]: keys read for the rows partly attended clusters have left
};

void EstimateClusters(const EstimateProblem& p);

}  // namespace kvr
