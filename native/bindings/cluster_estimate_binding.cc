// estimateClusters({q, qHeads, kvHeads, headDim, centroidStride, dtype, scale,
//   segments: [{heads: [{centroids, valueMeans, counts, tokenCluster, values,
//                        clusters, tokens, retrieved?, exact?, keyVars?, varScales?, keys?, varianceShare?,
//                        offsets?, members?}] (kvHeads)}],
//   out, lse, estimated, scanned?}) -> Promise<void>
// keyVars: Uint8Array [clusters, headDim] codes with varScales: Float32Array
// [clusters] (common/moment_code.h).
// offsets/members (the clusters' member lists, with keys): a partly attended
// cluster's remaining rows are weighed by their own logits.
#include <napi.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "common/binding_args.h"
#include "common/thread_pool.h"
#include "kernels/cluster_estimate.h"

namespace kvr {
namespace {

ClusterHead ReadHead(const Napi::Object& o, const EstimateProblem& p, std::vector<Napi::Value>& keep) {
  ClusterHead c;
  c.clusters = Int(o, "clusters", 0, int64_t(1) << 31);
  c.tokens = Int(o, "tokens", 0, int64_t(1) << 31);
  const size_t C = size_t(c.clusters), N = size_t(c.tokens), d = size_t(p.headDim);
  auto centroids = TypedAt<uint16_t>(o, "centroids", C * size_t(p.centroidStride));
  auto means = TypedAt<uint16_t>(o, "valueMeans", C * d);
  auto counts = TypedAt<int32_t>(o, "counts", C);
  auto tokenCluster = TypedAt<int32_t>(o, "tokenCluster", N);
  auto values = TypedAt<uint16_t>(o, "values", N * d);
  c.centroids = centroids.Data();
  c.valueMeans = means.Data();
  c.counts = counts.Data();
  c.tokenCluster = tokenCluster.Data();
  c.values = values.Data();
  keep.insert(keep.end(), {centroids, means, counts, tokenCluster, values});
  // The second-order estimate needs both: the variances and the keys the exact rows take out.
  auto keyVars = OptTypedAt<uint8_t>(o, "keyVars");
  auto keys = OptTypedAt<uint16_t>(o, "keys");
  if (bool(keyVars) != bool(keys)) throw Napi::TypeError::New(o.Env(), "keyVars and keys come together");
  if (keyVars) {
    if (keyVars->ElementLength() != C * d) throw Napi::RangeError::New(o.Env(), "keyVars must hold clusters x headDim codes");
    if (keys->ElementLength() != N * d) throw Napi::RangeError::New(o.Env(), "keys must hold tokens x headDim words");
    auto varScales = TypedAt<float>(o, "varScales");
    if (varScales.ElementLength() != C) throw Napi::RangeError::New(o.Env(), "varScales must hold clusters entries");
    c.keyVars = keyVars->Data();
    c.varScales = varScales.Data();
    keep.push_back(varScales);
    if (o.Has("varianceShare")) {
      c.varianceShare = Float(o, "varianceShare");
      if (!(c.varianceShare >= 0.f && c.varianceShare <= 4.f)) throw Napi::RangeError::New(o.Env(), "varianceShare must be in [0, 4]");
    }
    c.keys = keys->Data();
    keep.insert(keep.end(), {*keyVars, *keys});
  }
  auto offsets = OptTypedAt<int32_t>(o, "offsets");
  auto members = OptTypedAt<int32_t>(o, "members");
  if (bool(offsets) != bool(members)) throw Napi::TypeError::New(o.Env(), "offsets and members come together");
  if (offsets) {
    if (!c.keys) throw Napi::TypeError::New(o.Env(), "offsets and members need keyVars and keys");
    if (offsets->ElementLength() != C + 1) throw Napi::RangeError::New(o.Env(), "offsets must hold clusters + 1 entries");
    if (members->ElementLength() != N) throw Napi::RangeError::New(o.Env(), "members must hold tokens entries");
    // They address keys: checked before any is read (each against counts on the worker: CheckIndices).
    const int32_t* off = offsets->Data();
    if (off[0] != 0) throw Napi::RangeError::New(o.Env(), "offsets[0] must be 0");
    c.offsets = off;
    c.members = members->Data();
    keep.insert(keep.end(), {*offsets, *members});
  }
  if (auto r = OptTypedAt<int32_t>(o, "retrieved")) {
    CheckIds(*r, c.clusters, "retrieved");
    c.retrieved = r->Data();
    c.retrievedCount = int64_t(r->ElementLength());
    keep.push_back(*r);
  }
  if (auto e = OptTypedAt<int32_t>(o, "exact")) {
    CheckIds(*e, c.tokens, "exact");
    c.exact = e->Data();
    c.exactCount = int64_t(e->ElementLength());
    keep.push_back(*e);
  }
  return c;
}

// The per-token indices that address memory (tokenCluster into the
// clusters, members into the rows) and the member lists' offsets, checked
// on the worker before the kernel reads anything. O(tokens) per head: at 1M
// tokens and 8 heads 64 MiB a step, which one thread took ~9 ms to read
// (2-core VM), serial before the estimate's parallel work; so in chunks over
// the pool, each a branch-free maximum (a negative index is a large unsigned
// one). Only a chunk found bad is walked for the first offender's message.
constexpr int64_t kCheckChunk = 1 << 16;

template <typename T>
uint32_t MaxIndex(const T* v, int64_t b, int64_t e) {
  uint32_t m = 0;
  for (int64_t i = b; i < e; ++i) m = std::max(m, uint32_t(v[i]));
  return m;
}

void CheckIndices(const EstimateProblem& p) {
  struct Range {
    const ClusterHead* c;
    int64_t b, e;
  };
  std::vector<Range> ranges;
  for (const auto& seg : p.segments)
    for (const ClusterHead& c : seg)
      for (int64_t b = 0; b < std::max(c.tokens, c.clusters); b += kCheckChunk) ranges.push_back({&c, b, b + kCheckChunk});
  std::vector<uint8_t> bad(ranges.size());
  ThreadPool::Get().ParallelFor(ranges.size(), [&](size_t i) {
    const ClusterHead& c = *ranges[i].c;
    const int64_t tb = std::min(ranges[i].b, c.tokens), te = std::min(ranges[i].e, c.tokens);
    bool wrong = te > tb && MaxIndex(c.tokenCluster, tb, te) >= uint64_t(c.clusters);
    if (c.members && te > tb) wrong = wrong || MaxIndex(c.members, tb, te) >= uint64_t(c.tokens);
    if (c.offsets) {
      const int64_t cb = std::min(ranges[i].b, c.clusters), ce = std::min(ranges[i].e, c.clusters);
      int32_t diff = 0;
      for (int64_t k = cb; k < ce; ++k) diff |= ((c.offsets[k + 1] - c.offsets[k]) ^ c.counts[k]) | (c.counts[k] & INT32_MIN);
      // The last offset bounds every member list read: at most the tokens.
      wrong = wrong || diff != 0 || (ce == c.clusters && ce > cb && c.offsets[ce] > c.tokens);
    }
    bad[i] = wrong;
  });
  for (size_t i = 0; i < ranges.size(); ++i) {
    if (!bad[i]) continue;
    const ClusterHead& c = *ranges[i].c;
    if (c.offsets)
      for (int64_t k = std::min(ranges[i].b, c.clusters); k < std::min(ranges[i].e, c.clusters); ++k)
        if (c.offsets[k + 1] - c.offsets[k] != c.counts[k] || c.counts[k] < 0)
          throw std::out_of_range("offsets[" + std::to_string(k + 1) + "] - offsets[" + std::to_string(k) + "] is not counts[" + std::to_string(k) + "], or it is negative");
    if (c.offsets && c.offsets[c.clusters] > c.tokens) throw std::out_of_range("offsets[clusters] is past the tokens");
    for (int64_t k = std::min(ranges[i].b, c.tokens); k < std::min(ranges[i].e, c.tokens); ++k) {
      if (c.tokenCluster[k] < 0 || c.tokenCluster[k] >= c.clusters)
        throw std::out_of_range("tokenCluster[" + std::to_string(k) + "] is outside [0, clusters)");
      if (c.members && (c.members[k] < 0 || c.members[k] >= c.tokens))
        throw std::out_of_range("members[" + std::to_string(k) + "] is outside [0, tokens)");
    }
  }
}

Napi::Value EstimateJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = ArgObject(info);
  EstimateProblem p;
  std::vector<Napi::Value> keep;
  AttendCallAt(o, p, keep);
  p.centroidStride = int(Int(o, "centroidStride", p.headDim, 4096));
  auto estimated = TypedAt<float>(o, "estimated", size_t(p.kvHeads));
  keep.push_back(estimated);
  Napi::Array segs = ArrayAt(o, "segments");
  for (uint32_t s = 0; s < segs.Length(); ++s) {
    Napi::Array heads = ArrayOf(ObjectOf(segs.Get(s), "segments[" + std::to_string(s) + "]"), "heads", size_t(p.kvHeads));
    std::vector<ClusterHead> row;
    for (int h = 0; h < p.kvHeads; ++h) row.push_back(ReadHead(ObjectOf(heads.Get(h), "heads[" + std::to_string(h) + "]"), p, keep));
    p.segments.push_back(std::move(row));
  }
  float* est = estimated.Data();
  float* scannedOut = nullptr;
  if (auto sc = OptTypedAt<float>(o, "scanned")) {
    if (sc->ElementLength() != size_t(p.kvHeads)) throw Napi::RangeError::New(env, "scanned must hold kvHeads entries");
    scannedOut = sc->Data();
    keep.push_back(*sc);
  }
  // [0, kvHeads): tokens estimated; [kvHeads, 2 kvHeads): keys read for partly attended clusters' rows.
  auto counts = std::make_shared<std::vector<double>>(size_t(2 * p.kvHeads));
  p.estimated = counts->data();
  p.scanned = counts->data() + p.kvHeads;
  return RunAsync(env, std::move(keep), [p, counts, est, scannedOut]() {
    CheckIndices(p);
    EstimateClusters(p);
    for (int h = 0; h < p.kvHeads; ++h) {
      est[h] = float((*counts)[size_t(h)]);
      if (scannedOut) scannedOut[h] = float((*counts)[size_t(p.kvHeads + h)]);
    }
  }, [](Napi::Env e) { return e.Undefined(); });
}

}  // namespace

void InitClusterEstimate(Napi::Env env, Napi::Object exports) {
  exports.Set("estimateClusters", Napi::Function::New(env, EstimateJs));
}

}  // namespace kvr
