// clusterSummary({keys, values: Uint16Array [tokens, headDim], dtype, tokens, headDim, stride,
//                 cluster: Int32Array [tokens], clusters, axisIterations,
//                 centroids: Float32Array [clusters, stride], valueMeans, keyVars, keyAxes: Float32Array [clusters, headDim]})
//   -> Promise<void>   (native/kernels/cluster_summary.h)
#include <napi.h>

#include "common/binding_args.h"
#include "kernels/cluster_summary.h"

namespace kvr {
namespace {

Napi::Value ClusterSummaryJs(const Napi::CallbackInfo& info) {
  Napi::Object o = ArgObject(info);
  ClusterSummaryProblem p;
  p.tokens = Int(o, "tokens", 0, int64_t(1) << 31);
  p.headDim = int(Int(o, "headDim", 1, 4096));
  p.stride = int(Int(o, "stride", p.headDim + 1, 8192));
  p.dtype = KeyDtype(o);
  p.clusters = Int(o, "clusters", 0, int64_t(1) << 31);
  p.axisIterations = int(Int(o, "axisIterations", 0, 100));
  const size_t rows = size_t(p.tokens) * size_t(p.headDim), cells = size_t(p.clusters) * size_t(p.headDim);
  auto keys = TypedAt<uint16_t>(o, "keys", rows);
  auto values = TypedAt<uint16_t>(o, "values", rows);
  auto cluster = TypedAt<int32_t>(o, "cluster", size_t(p.tokens));
  auto centroids = TypedAt<float>(o, "centroids", size_t(p.clusters) * size_t(p.stride));
  auto valueMeans = TypedAt<float>(o, "valueMeans", cells);
  auto keyVars = TypedAt<float>(o, "keyVars", cells);
  auto keyAxes = TypedAt<float>(o, "keyAxes", cells);
  p.keys = keys.Data();
  p.values = values.Data();
  p.cluster = cluster.Data();
  p.centroids = centroids.Data();
  p.valueMeans = valueMeans.Data();
  p.keyVars = keyVars.Data();
  p.keyAxes = keyAxes.Data();
  return RunAsync(info.Env(), {keys, values, cluster, centroids, valueMeans, keyVars, keyAxes}, [p]() { ClusterSummary(p); },
                  [](Napi::Env e) { return e.Undefined(); });
}

}  // namespace

void InitClusterSummary(Napi::Env env, Napi::Object exports) {
  exports.Set("clusterSummary", Napi::Function::New(env, ClusterSummaryJs));
}

}  // namespace kvr
