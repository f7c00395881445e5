// chooseBlocks({blocks, budget, maxNew (< 0: no limit), protectAgnostic, agnosticClass,
//               heads: [{top: Int32Array, prev: Int32Array (ascending), prevScores: Float32Array [prev],
//                        agnostic: Int32Array, importanceRank: Int32Array [blocks], flags: Uint8Array [blocks] (zero),
//                        out: Int32Array, cls: Uint8Array (each min(max(budget, agnostic), blocks) at least)}]})
//   -> number[]: blocks chosen per head (out ascending, cls their pool classes)
// Synchronous: a step's choice is O(candidates), microseconds; every id is
// checked against `blocks` before the flags are touched.
#include <napi.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common/binding_args.h"
#include "kernels/block_choose.h"

namespace kvr {
namespace {

Napi::Value ChooseBlocksJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = ArgObject(info);
  const int64_t blocks = Int(o, "blocks", 0, int64_t(1) << 31);
  const int64_t budget = Int(o, "budget", 0, int64_t(1) << 31);
  const int64_t maxNew = Int(o, "maxNew", -1, int64_t(1) << 31);
  const int64_t agnosticClass = Int(o, "agnosticClass", 0, int64_t(1) << 31);
  const bool protect = Flag(o, "protectAgnostic", false);
  Napi::Array heads = ArrayAt(o, "heads");
  std::vector<BlockChoice> choices(heads.Length());
  for (uint32_t h = 0; h < heads.Length(); ++h) {
    const std::string at = "heads[" + std::to_string(h) + "].";
    Napi::Object ho = ObjectOf(heads.Get(h), "heads[" + std::to_string(h) + "]");
    auto top = TypedAt<int32_t>(ho, "top"), prev = TypedAt<int32_t>(ho, "prev"), agnostic = TypedAt<int32_t>(ho, "agnostic");
    CheckIds(top, blocks, at + "top");
    CheckIds(prev, blocks, at + "prev");
    CheckIds(agnostic, blocks, at + "agnostic");
    auto prevScores = TypedAt<float>(ho, "prevScores", prev.ElementLength());
    auto rank = TypedAt<int32_t>(ho, "importanceRank", size_t(blocks));
    auto flags = TypedAt<uint8_t>(ho, "flags", size_t(blocks));
    // Chosen blocks are distinct: at most `blocks` of them.
    const size_t capacity = size_t(std::min(std::max<int64_t>(budget, int64_t(agnostic.ElementLength())), blocks));
    auto out = TypedAt<int32_t>(ho, "out", capacity);
    auto cls = TypedAt<uint8_t>(ho, "cls", capacity);
    BlockChoice& c = choices[h];
    c.blocks = blocks;
    c.top = top.Data(), c.topN = int64_t(top.ElementLength());
    c.prev = prev.Data(), c.prevScores = prevScores.Data(), c.prevN = int64_t(prev.ElementLength());
    c.agnostic = agnostic.Data(), c.agnosticN = int64_t(agnostic.ElementLength());
    c.importanceRank = rank.Data(), c.agnosticClass = agnosticClass, c.protectAgnostic = protect;
    c.budget = budget, c.maxNew = maxNew;
    c.flags = flags.Data(), c.out = out.Data(), c.cls = cls.Data();
  }
  Napi::Array counts = Napi::Array::New(env, choices.size());
  for (size_t h = 0; h < choices.size(); ++h) counts.Set(uint32_t(h), Napi::Number::New(env, double(ChooseBlocks(choices[h]))));
  return counts;
}

}  // namespace

void InitBlockChoose(Napi::Env env, Napi::Object exports) { exports.Set("chooseBlocks", Napi::Function::New(env, ChooseBlocksJs)); }

}  // namespace kvr
