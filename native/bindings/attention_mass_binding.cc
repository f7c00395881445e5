// attentionMass({q, rows, headDim, keys, tokens, dtype, scale, ids, out}) -> Promise<void>
#include <napi.h>

#include <string>

#include "common/binding_args.h"
#include "kernels/attention_mass.h"

namespace kvr {
namespace {

Napi::Value AttentionMassJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = ArgObject(info);
  MassProblem p;
  p.rows = Int(o, "rows", 1, int64_t(1) << 20);
  p.headDim = int(Int(o, "headDim", 1, 1024));
  p.tokens = Int(o, "tokens", 0, int64_t(1) << 40);
  p.dtype = KeyDtype(o);
  p.scale = Float(o, "scale");
  auto q = TypedAt<float>(o, "q", size_t(p.rows) * p.headDim);
  auto keys = TypedAt<uint16_t>(o, "keys", size_t(p.tokens) * p.headDim);
  auto ids = TypedAt<int32_t>(o, "ids");
  p.count = int64_t(ids.ElementLength());
  if (p.count == 0) throw Napi::RangeError::New(env, "ids must not be empty");
  auto out = TypedAt<float>(o, "out", size_t(p.count));
  CheckIds(ids, p.tokens, "ids");
  p.q = q.Data();
  p.keys = keys.Data();
  p.ids = ids.Data();
  p.out = out.Data();
  return RunAsync(env, {q, keys, ids, out}, [p]() { AttentionMass(p); }, [](Napi::Env e) { return e.Undefined(); });
}

}  // namespace

void InitAttentionMass(Napi::Env env, Napi::Object exports) {
  exports.Set("attentionMass", Napi::Function::New(env, AttentionMassJs));
}

}  // namespace kvr
