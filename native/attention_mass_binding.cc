// attentionMass({q, rows, headDim, keys, tokens, dtype, scale, ids, out}) -> Promise<void>
#include <napi.h>

#include <string>

#include "attention_mass.h"
#include "binding_args.h"

namespace kvr {
namespace {

Napi::Value AttentionMassJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = info[0].As<Napi::Object>();
  MassProblem p;
  p.rows = Int(o, "rows", 1, int64_t(1) << 20);
  p.headDim = int(Int(o, "headDim", 1, 1024));
  p.tokens = Int(o, "tokens", 0, int64_t(1) << 40);
  p.dtype = KeyDtype(o);
  Napi::Value scale = o.Get("scale");
  if (!scale.IsNumber()) throw Napi::TypeError::New(env, "Expected a number for scale");
  p.scale = scale.As<Napi::Number>().FloatValue();
  auto q = Typed<float>(o.Get("q"), "q", size_t(p.rows) * p.headDim);
  auto keys = Typed<uint16_t>(o.Get("keys"), "keys", size_t(p.tokens) * p.headDim);
  auto ids = Typed<int32_t>(o.Get("ids"), "ids");
  p.count = int64_t(ids.ElementLength());
  if (p.count == 0) throw Napi::RangeError::New(env, "ids must not be empty");
  auto out = Typed<float>(o.Get("out"), "out", size_t(p.count));
  for (size_t i = 0; i < ids.ElementLength(); ++i)
    if (ids[i] < 0 || ids[i] >= p.tokens)
      throw Napi::RangeError::New(env, "id " + std::to_string(ids[i]) + " outside [0, " + std::to_string(p.tokens) + ")");
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
