// topk({q, group, headDim, keys, tokens, dtype, k, outIds, outScores, allScores?}) -> Promise<number>
// allScores (Float32Array [tokens]), when given, receives every row's score.
#include <napi.h>

#include <vector>

#include "binding_args.h"
#include "topk.h"

namespace kvr {
namespace {

Napi::Value TopkJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = info[0].As<Napi::Object>();
  TopkProblem p;
  p.group = int(Int(o, "group", 1, 1024));
  p.headDim = int(Int(o, "headDim", 1, 1024));
  p.tokens = Int(o, "tokens", 0, int64_t(1) << 40);
  p.dtype = KeyDtype(o);
  p.k = int(Int(o, "k", 0, int64_t(1) << 30));
  const size_t keep = size_t(std::min<int64_t>(p.k, p.tokens));
  auto q = Typed<float>(o.Get("q"), "q", size_t(p.group) * p.headDim);
  auto keys = Typed<uint16_t>(o.Get("keys"), "keys", size_t(p.tokens) * p.headDim);
  auto ids = Typed<int32_t>(o.Get("outIds"), "outIds", keep);
  auto scores = Typed<float>(o.Get("outScores"), "outScores", keep);
  p.q = q.Data();
  p.keys = keys.Data();
  p.outIds = ids.Data();
  p.outScores = scores.Data();
  std::vector<Napi::Value> hold{q, keys, ids, scores};
  if (o.Has("allScores") && !o.Get("allScores").IsUndefined()) {
    auto all = Typed<float>(o.Get("allScores"), "allScores", size_t(p.tokens));
    p.allScores = all.Data();
    hold.push_back(all);
  }
  auto count = std::make_shared<int64_t>(0);
  return RunAsync(
      env, hold, [p, count]() { *count = TopK(p); },
      [count](Napi::Env e) { return Napi::Number::New(e, double(*count)); });
}

}  // namespace

void InitTopk(Napi::Env env, Napi::Object exports) { exports.Set("topk", Napi::Function::New(env, TopkJs)); }

}  // namespace kvr
