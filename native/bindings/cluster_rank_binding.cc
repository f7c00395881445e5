// rankClusterHeads({q: [heads*group, headDim], group, headDim, centroidStride, dtype, k, spread,
//                   heads: [{centroids, axes, vars, clusters, outIds, outScores}]}) -> Promise<number[]>
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
    auto axes = TypedAt<uint16_t>(ho, "axes", C * size_t(headDim));
    auto vars = TypedAt<uint16_t>(ho, "vars", C * size_t(headDim));
    TopkOutputs res = TopkOutputsAt(ho, keep);
    p.q = q.Data() + size_t(h) * group * headDim;
    p.centroids = centroids.Data();
    p.axes = axes.Data();
    p.vars = vars.Data();
    p.outIds = res.ids.Data();
    p.outScores = res.scores.Data();
    hold.insert(hold.end(), {centroids, axes, vars, res.ids, res.scores});
  }
  auto counts = std::make_shared<std::vector<int64_t>>(n);
  return RunAsync(
      env, hold, [problems, counts]() { RankClustersMany(problems->data(), problems->size(), counts->data()); },
      [counts](Napi::Env e) {
        auto a = Napi::Array::New(e, counts->size());
        for (size_t h = 0; h < counts->size(); ++h) a.Set(uint32_t(h), Napi::Number::New(e, double((*counts)[h])));
        return a;
      });
}

}  // namespace

void InitClusterRank(Napi::Env env, Napi::Object exports) {
  exports.Set("rankClusterHeads", Napi::Function::New(env, RankClusterHeadsJs));
}

}  // namespace kvr
