// rankClusterHeads({q: [heads*group, headDim], group, headDim, centroidStride, dtype, k, spread,
//                   heads: [{centroids, axes, axisScales, vars, varScales, clusters, outIds, outScores,
//                            offsets?, members?, outRows?}]}) -> Promise<{ids: number[], rows: number[]}>
// With offsets (Int32Array [clusters + 1]), members and outRows, the best
// clusters' members are copied into outRows, best cluster first, until it is full.
// axes: Int8Array, vars: Uint8Array [clusters, headDim] codes with their
// scales, Float32Array [clusters] (common/moment_code.h).
// One ranking per kv head (head h scores with query rows h*group ..), all in
// one worker: a decode step ranks every kv head's clusters with one call.
#include <napi.h>

#include <memory>
#include <string>
#include <vector>

#include "common/binding_args.h"
#include "kernels/cluster_rank.h"

namespace kvr {
namespace {

Napi::Value RankClusterHeadsJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = ArgObject(info);
  const int group = int(Int(o, "group", 1, 1024)), headDim = int(Int(o, "headDim", 1, 1024));
  const int stride = int(Int(o, "centroidStride", headDim, 4096));
  const Dtype dtype = KeyDtype(o);
  const int k = int(Int(o, "k", 0, int64_t(1) << 30));
  const float spread = Float(o, "spread");
  Napi::Array heads = ArrayAt(o, "heads");
  const uint32_t n = heads.Length();
  auto q = TypedAt<float>(o, "q", size_t(n) * group * headDim);
  std::vector<Napi::Value> hold{q};
  auto problems = std::make_shared<std::vector<ClusterRankProblem>>(n);
  for (uint32_t h = 0; h < n; ++h) {
    Napi::Object ho = ObjectOf(heads.Get(h), "heads[" + std::to_string(h) + "]");
    ClusterRankProblem& p = (*problems)[h];
    p.group = group;
    p.headDim = headDim;
    p.centroidStride = stride;
    p.dtype = dtype;
    p.k = k;
    p.spread = spread;
    p.clusters = Int(ho, "clusters", 0, int64_t(1) << 31);
    const size_t C = size_t(p.clusters), keep = size_t(std::min<int64_t>(p.k, p.clusters));
    auto centroids = TypedAt<uint16_t>(ho, "centroids", C * size_t(stride));
    auto axes = TypedAt<int8_t>(ho, "axes", C * size_t(headDim));
    auto vars = TypedAt<uint8_t>(ho, "vars", C * size_t(headDim));
    auto axisScales = TypedAt<float>(ho, "axisScales", C), varScales = TypedAt<float>(ho, "varScales", C);
    TopkOutputs res = TopkOutputsAt(ho, keep);
    p.q = q.Data() + size_t(h) * group * headDim;
    p.centroids = centroids.Data();
    p.axes = axes.Data();
    p.vars = vars.Data();
    p.axisScales = axisScales.Data();
    p.varScales = varScales.Data();
    p.outIds = res.ids.Data();
    p.outScores = res.scores.Data();
    hold.insert(hold.end(), {centroids, axes, vars, axisScales, varScales, res.ids, res.scores});
    if (auto rows = OptTypedAt<int32_t>(ho, "outRows")) {
      auto offsets = TypedAt<int32_t>(ho, "offsets", C + 1);
      auto members = OptTypedAt<int32_t>(ho, "members");
      if (!members) throw Napi::TypeError::New(env, "outRows needs offsets and members");
      // The offsets address members: checked once, before any copy.
      const int32_t* off = offsets.Data();
      if (off[0] != 0) throw Napi::RangeError::New(env, "offsets[0] must be 0");
      for (size_t c = 0; c < C; ++c)
        if (off[c + 1] < off[c]) throw Napi::RangeError::New(env, "offsets must not decrease");
      if (size_t(off[C]) > members->ElementLength()) throw Napi::RangeError::New(env, "offsets run past members");
      p.offsets = off;
      p.members = members->Data();
      p.outRows = rows->Data();
      p.maxRows = int64_t(rows->ElementLength());
      hold.insert(hold.end(), {offsets, *members, *rows});
    }
  }
  auto counts = std::make_shared<std::vector<ClusterRankCounts>>(n);
  return RunAsync(
      env, hold, [problems, counts]() { RankClustersMany(problems->data(), problems->size(), counts->data()); },
      [counts](Napi::Env e) {
        auto ids = Napi::Array::New(e, counts->size()), rows = Napi::Array::New(e, counts->size());
        for (size_t h = 0; h < counts->size(); ++h) {
          ids.Set(uint32_t(h), Napi::Number::New(e, double((*counts)[h].ids)));
          rows.Set(uint32_t(h), Napi::Number::New(e, double((*counts)[h].rows)));
        }
        auto out = Napi::Object::New(e);
        out.Set("ids", ids);
        out.Set("rows", rows);
        return out;
      });
}

}  // namespace

void InitClusterRank(Napi::Env env, Napi::Object exports) {
  exports.Set("rankClusterHeads", Napi::Function::New(env, RankClusterHeadsJs));
}

}  // namespace kvr
