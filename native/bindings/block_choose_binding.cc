// new BlockChooser({blocks, reps, heads: [{byImportance: Int32Array [blocks], importanceRank: Int32Array [blocks]}]})
//   one (document, layer)'s block summaries, every kv head: holds their importance orders (by reference:
//   they are the summaries' own, computed once and never changed) and a flags scratch of one byte per block.
// .step({reach, budget, maxNew (< 0: no limit), agnostic, agnosticClass, protectAgnostic,
//        exclude: Int32Array (blocks never chosen),
//        top: Int32Array[] (per head: the scorer's top rows, best first),
//        prev?: Int32Array, prevStride?, prevCounts?: Int32Array [heads] (head h's previous blocks, ascending,
//          at prev[h*prevStride ..]),
//        extraScores?: Float32Array[] (per head: the scores of its previous blocks' rows, b*reps + r, in order)
//          or rowScores?: Float32Array[] (per head: every row's score),
//        out: Int32Array [heads*cap], cls: Uint8Array [heads*cap], rows: Int32Array [heads*cap*reps],
//        counts: Int32Array [heads]}),  cap = min(max(budget, agnostic), blocks)
//   -> undefined: head h's chosen blocks ascending at out[h*cap ..] (counts[h] of them), their pool classes in
//   cls, their rows in rows[h*cap*reps ..] (native/kernels/block_choose.cc).
// Synchronous: a step's choice is O(candidates), microseconds, one call for every head; every id is checked
// before the flags are touched.
#include <napi.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "common/binding_args.h"
#include "kernels/block_choose.h"

namespace kvr {
namespace {

// ids[i] in [0, limit) for every i; the message is built only for a bad id.
void CheckRange(Napi::Env env, const int32_t* ids, size_t n, int64_t limit, const char* what, int64_t head) {
  for (size_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= limit)
      throw Napi::RangeError::New(env, std::string(what) + (head >= 0 ? "[head " + std::to_string(head) + "]" : "") + "[" + std::to_string(i) +
                                           "] = " + std::to_string(ids[i]) + " is outside [0, " + std::to_string(limit) + ")");
}

class BlockChooserJs : public Napi::ObjectWrap<BlockChooserJs> {
 public:
  static Napi::Function Define(Napi::Env env) { return DefineClass(env, "BlockChooser", {InstanceMethod("step", &BlockChooserJs::Step)}); }

  explicit BlockChooserJs(const Napi::CallbackInfo& info) : Napi::ObjectWrap<BlockChooserJs>(info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    blocks_ = Int(o, "blocks", 1, int64_t(1) << 30);
    reps_ = Int(o, "reps", 1, 64);
    if (blocks_ * reps_ > (int64_t(1) << 31) - 1) throw Napi::RangeError::New(env, "blocks · reps must fit an int32 row id");
    Napi::Array heads = ArrayAt(o, "heads");
    if (heads.Length() < 1 || heads.Length() > 1024) throw Napi::RangeError::New(env, "heads must hold 1 to 1024 entries");
    for (uint32_t h = 0; h < heads.Length(); ++h) {
      Napi::Object ho = ObjectOf(heads.Get(h), "heads entry");
      auto order = TypedAt<int32_t>(ho, "byImportance", size_t(blocks_));
      auto rank = TypedAt<int32_t>(ho, "importanceRank", size_t(blocks_));
      CheckRange(env, order.Data(), size_t(blocks_), blocks_, "byImportance", h);
      // The pointers stay valid while the references hold the arrays: their buffers are not detached or moved
      // (Typed's check has put an in-heap array's data off the heap for good).
      order_.push_back(order.Data());
      rank_.push_back(rank.Data());
      refs_.push_back(Napi::Persistent(order));
      refs_.push_back(Napi::Persistent(rank));
    }
    flags_.assign(size_t(blocks_), 0);
  }

 private:
  int64_t blocks_ = 0, reps_ = 1;
  std::vector<const int32_t*> order_, rank_;
  std::vector<Napi::Reference<Napi::Int32Array>> refs_;
  std::vector<uint8_t> flags_;

  Napi::Value Step(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    const int64_t H = int64_t(order_.size()), R = reps_;
    BlockStep s;
    s.blocks = blocks_, s.reps = R;
    s.reach = Int(o, "reach", 0, int64_t(1) << 31);
    s.budget = Int(o, "budget", 0, int64_t(1) << 31);
    s.maxNew = Int(o, "maxNew", -1, int64_t(1) << 31);
    s.agnostic = Int(o, "agnostic", 0, blocks_);
    s.agnosticClass = Int(o, "agnosticClass", 0, int64_t(1) << 31);
    s.protectAgnostic = Flag(o, "protectAgnostic", false);
    auto exclude = TypedAt<int32_t>(o, "exclude");
    CheckRange(env, exclude.Data(), exclude.ElementLength(), blocks_, "exclude", -1);
    s.exclude = exclude.Data(), s.excludeN = int64_t(exclude.ElementLength());
    s.flags = flags_.data();

    Napi::Array top = ArrayAt(o, "top");
    if (int64_t(top.Length()) != H) throw Napi::RangeError::New(env, "top must hold one array per head (" + std::to_string(H) + ")");
    auto prevCounts = OptTypedAt<int32_t>(o, "prevCounts", size_t(H));
    std::optional<Napi::Int32Array> prev;
    int64_t prevStride = 0;
    std::optional<Napi::Array> scores;
    bool perRow = false;
    if (prevCounts) {
      prev = TypedAt<int32_t>(o, "prev");
      prevStride = Int(o, "prevStride", 0, int64_t(1) << 31);
      Napi::Value extra = o.Get("extraScores");
      perRow = Absent(extra);
      scores = perRow ? ArrayAt(o, "rowScores") : ObjectOf(extra, "extraScores").As<Napi::Array>();
      if (!scores->IsArray() || int64_t(scores->Length()) != H)
        throw Napi::RangeError::New(env, std::string(perRow ? "rowScores" : "extraScores") + " must hold one array per head");
    }
    const int64_t cap = std::min(std::max(s.budget, s.agnostic), blocks_);
    auto out = TypedAt<int32_t>(o, "out", size_t(H * cap));
    auto cls = TypedAt<uint8_t>(o, "cls", size_t(H * cap));
    auto rows = TypedAt<int32_t>(o, "rows", size_t(H * cap * R));
    auto counts = TypedAt<int32_t>(o, "counts", size_t(H));

    // Every head's inputs checked before any head's choice touches the flags.
    std::vector<BlockStepHead> heads(static_cast<size_t>(H));
    for (int64_t h = 0; h < H; ++h) {
      BlockStepHead& c = heads[size_t(h)];
      auto rowsOf = Typed<int32_t>(top.Get(uint32_t(h)), "top entry");
      CheckRange(env, rowsOf.Data(), rowsOf.ElementLength(), blocks_ * R, "top", h);
      c.topRows = rowsOf.Data(), c.topRowsN = int64_t(rowsOf.ElementLength());
      if (prevCounts) {
        const int64_t n = (*prevCounts)[size_t(h)];
        if (n < 0 || n > prevStride || h * prevStride + n > int64_t(prev->ElementLength()))
          throw Napi::RangeError::New(env, "prevCounts[" + std::to_string(h) + "] = " + std::to_string(n) + " does not fit prev at stride " + std::to_string(prevStride));
        c.prev = prev->Data() + h * prevStride, c.prevN = n;
        CheckRange(env, c.prev, size_t(n), blocks_, "prev", h);
        auto sc = Typed<float>(scores->Get(uint32_t(h)), perRow ? "rowScores entry" : "extraScores entry", size_t(perRow ? blocks_ * R : n * R));
        (perRow ? c.rowScores : c.prevRowScores) = sc.Data();
      }
      c.byImportance = order_[size_t(h)], c.importanceRank = rank_[size_t(h)];
      c.out = out.Data() + h * cap, c.cls = cls.Data() + h * cap, c.outRows = rows.Data() + h * cap * R;
    }
    for (int64_t h = 0; h < H; ++h) counts[size_t(h)] = int32_t(ChooseStepBlocks(s, heads[size_t(h)]));
    return env.Undefined();
  }
};

}  // namespace

void InitBlockChoose(Napi::Env env, Napi::Object exports) { exports.Set("BlockChooser", BlockChooserJs::Define(env)); }

}  // namespace kvr
