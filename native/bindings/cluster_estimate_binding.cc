// estimateClusters({q, qHeads, kvHeads, headDim, centroidStride, dtype, scale,
//   segments: [{heads: [{centroids, valueMeans, counts, tokenCluster, values,
//                        clusters, tokens, retrieved?, exact?, keyVars?, keys?, varianceShare?,
//                        offsets?, members?}] (kvHeads)}],
//   out, lse, estimated, scanned?}) -> Promise<void>
// offsets/members (the clusters' member lists, with keys): a partly attended
// cluster's remaining rows are weighed by their own logits.
#include <napi.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "common/binding_args.h"
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
  auto keyVars = OptTypedAt<uint16_t>(o, "keyVars");
  auto keys = OptTypedAt<uint16_t>(o, "keys");
  if (bool(keyVars) != bool(keys)) throw Napi::TypeError::New(o.Env(), "keyVars and keys come together");
  if (keyVars) {
    if (keyVars->ElementLength() != C * d) throw Napi::RangeError::New(o.Env(), "keyVars must hold clusters x headDim words");
    if (keys->ElementLength() != N * d) throw Napi::RangeError::New(o.Env(), "keys must hold tokens x headDim words");
    c.keyVars = keyVars->Data();
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
    // They address keys: checked once, before any is read.
    const int32_t* off = offsets->Data();
    if (off[0] != 0) throw Napi::RangeError::New(o.Env(), "offsets[0] must be 0");
    for (size_t i = 0; i < C; ++i)
      if (off[i + 1] - off[i] != c.counts[i]) throw Napi::RangeError::New(o.Env(), "offsets[" + std::to_string(i + 1) + "] - offsets[" + std::to_string(i) + "] is not counts[" + std::to_string(i) + "]");
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
// clusters, members into the rows), checked on the worker before the kernel
// reads anything: O(tokens) per head, kept off the event loop.
void CheckIndices(const EstimateProblem& p) {
  for (const auto& seg : p.segments)
    for (const ClusterHead& c : seg)
      for (int64_t i = 0; i < c.tokens; ++i) {
        if (c.tokenCluster[i] < 0 || c.tokenCluster[i] >= c.clusters)
          throw std::out_of_range("tokenCluster[" + std::to_string(i) + "] is outside [0, clusters)");
        if (c.members && (c.members[i] < 0 || c.members[i] >= c.tokens))
          throw std::out_of_range("members[" + std::to_string(i) + "] is outside [0, tokens)");
      }
}

Napi::Value EstimateJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = ArgObject(info);
  EstimateProblem p;
  const HeadShape shape = HeadShapeAt(o);
  p.qHeads = shape.qHeads;
  p.kvHeads = shape.kvHeads;
  p.headDim = shape.headDim;
  p.centroidStride = int(Int(o, "centroidStride", p.headDim, 4096));
  p.dtype = KeyDtype(o);
  p.scale = Float(o, "scale");
  AttendArrays io = AttendArraysAt(o, size_t(p.qHeads), size_t(p.headDim));
  auto estimated = TypedAt<float>(o, "estimated", size_t(p.kvHeads));
  p.q = io.q.Data();
  p.out = io.out.Data();
  p.lse = io.lse.Data();
  std::vector<Napi::Value> keep{io.q, io.out, io.lse, estimated};
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
