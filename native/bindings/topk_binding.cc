// topk({q, group, headDim, keys, tokens, dtype, k, outIds, outScores, allScores?}) -> Promise<number>
// allScores (Float32Array [tokens]), when given, receives every row's score.
#include <napi.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "common/binding_args.h"
#include "kernels/topk.h"

namespace kvr {
namespace {

Napi::Value TopkJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = ArgObject(info);
  TopkProblem p;
  p.group = int(Int(o, "group", 1, 1024));
  p.headDim = int(Int(o, "headDim", 1, 1024));
  p.tokens = Int(o, "tokens", 0, int64_t(1) << 40);
  p.dtype = KeyDtype(o);
  p.k = int(Int(o, "k", 0, int64_t(1) << 30));
  const size_t keep = size_t(std::min<int64_t>(p.k, p.tokens));
  auto q = TypedAt<float>(o, "q", size_t(p.group) * p.headDim);
  auto keys = TypedAt<uint16_t>(o, "keys", size_t(p.tokens) * p.headDim);
  TopkOutputs res = TopkOutputsAt(o, keep);
  p.q = q.Data();
  p.keys = keys.Data();
  p.outIds = res.ids.Data();
  p.outScores = res.scores.Data();
  std::vector<Napi::Value> hold{q, keys, res.ids, res.scores};
  if (auto all = OptTypedAt<float>(o, "allScores", size_t(p.tokens))) {
    p.allScores = all->Data();
    hold.push_back(*all);
  }
  auto count = std::make_shared<int64_t>(0);
  return RunAsync(
      env, hold, [p, count]() { *count = TopK(p); },
      [count](Napi::Env e) { return Napi::Number::New(e, double(*count)); });
}

// topkHeads({q: [heads*group, headDim], group, headDim, dtype, k,
//            heads: [{keys, tokens, outIds, outScores, allScores?, rows?}]}) -> Promise<number[]>
// rows (Int32Array): scan only those rows of keys (a candidate list).
// One scan per kv head (head h scores with query rows h*group ..), all in one
// worker: a decode step selects for every kv head with one call.
Napi::Value TopkHeadsJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = ArgObject(info);
  const int group = int(Int(o, "group", 1, 1024)), headDim = int(Int(o, "headDim", 1, 1024));
  const Dtype dtype = KeyDtype(o);
  const int k = int(Int(o, "k", 0, int64_t(1) << 30));
  Napi::Array heads = ArrayAt(o, "heads");
  const uint32_t n = heads.Length();
  auto q = TypedAt<float>(o, "q", size_t(n) * group * headDim);
  std::vector<Napi::Value> hold{q};
  auto problems = std::make_shared<std::vector<TopkProblem>>(n);
  for (uint32_t h = 0; h < n; ++h) {
    Napi::Object ho = ObjectOf(heads.Get(h), "heads[" + std::to_string(h) + "]");
    TopkProblem& p = (*problems)[h];
    p.group = group;
    p.headDim = headDim;
    p.dtype = dtype;
    p.k = k;
    p.tokens = Int(ho, "tokens", 0, int64_t(1) << 40);
    auto rows = OptTypedAt<int32_t>(ho, "rows");
    if (rows) {
      CheckIds(*rows, p.tokens, "rows");
      p.rows = rows->Data();
      p.rowCount = int64_t(rows->ElementLength());
      p.hasRows = true;
      hold.push_back(*rows);
    }
    const size_t keep = size_t(std::min<int64_t>(p.k, ScanCount(p)));
    auto keys = TypedAt<uint16_t>(ho, "keys", size_t(p.tokens) * headDim);
    TopkOutputs res = TopkOutputsAt(ho, keep);
    p.q = q.Data() + size_t(h) * group * headDim;
    p.keys = keys.Data();
    p.outIds = res.ids.Data();
    p.outScores = res.scores.Data();
    hold.insert(hold.end(), {keys, res.ids, res.scores});
    if (auto all = OptTypedAt<float>(ho, "allScores", size_t(p.tokens))) {
      if (rows) throw Napi::RangeError::New(env, "allScores scores every row: not with rows");
      p.allScores = all->Data();
      hold.push_back(*all);
    }
  }
  auto counts = std::make_shared<std::vector<int64_t>>(n);
  return RunAsync(
      env, hold,
      [problems, counts]() { TopKMany(problems->data(), problems->size(), counts->data()); },
      [counts](Napi::Env e) {
        auto a = Napi::Array::New(e, counts->size());
        for (size_t h = 0; h < counts->size(); ++h) a.Set(uint32_t(h), Napi::Number::New(e, double((*counts)[h])));
        return a;
      });
}

}  // namespace

void InitTopk(Napi::Env env, Napi::Object exports) {
  exports.Set("topk", Napi::Function::New(env, TopkJs));
  exports.Set("topkHeads", Napi::Function::New(env, TopkHeadsJs));
}

}  // namespace kvr
