// outlierScores({keys: Uint16Array [tokens, headDim], dtype, tokens, headDim, out: Float32Array [tokens]}) -> Promise<void>
#include <napi.h>

#include "common/binding_args.h"
#include "kernels/outlier_scores.h"

namespace kvr {
namespace {

Napi::Value OutlierScoresJs(const Napi::CallbackInfo& info) {
  Napi::Object o = ArgObject(info);
  const int64_t n = Int(o, "tokens", 0, int64_t(1) << 31);
  const int d = int(Int(o, "headDim", 1, 4096));
  const Dtype dtype = ParseDtype(o, "dtype");
  auto keys = TypedAt<uint16_t>(o, "keys", size_t(n) * size_t(d));
  auto out = TypedAt<float>(o, "out", size_t(n));
  const uint16_t* k = keys.Data();
  float* z = out.Data();
  return RunAsync(info.Env(), {keys, out}, [k, dtype, n, d, z]() { OutlierScores(k, dtype, n, d, z); }, [](Napi::Env e) { return e.Undefined(); });
}

}  // namespace

void InitOutlierScores(Napi::Env env, Napi::Object exports) {
  exports.Set("outlierScores", Napi::Function::New(env, OutlierScoresJs));
}

}  // namespace kvr
