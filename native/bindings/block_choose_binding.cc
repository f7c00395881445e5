// new BlockChooser({blocks, reps, heads: [{byImportance: Int32Array [blocks], importanceRank: Int32Array [blocks]}]})
//   one (document, layer)'s block summaries, every kv head: holds their importance orders (by reference:
//   they are the summaries' own, computed once and never changed).
// .step(params: Float64Array [reach, budget, maxNew (< 0: no limit), agnostic, agnosticClass, protectAgnostic
//         (0/1), prevStride, scores (0: none, 1: extra, 2: per row)],
//       exclude: Int32Array (blocks never chosen),
//       top: Int32Array[] (per head: the scorer's top rows, best first),
//       prev: Int32Array, prevCounts: Int32Array [heads] or empty (head h's previous blocks, ascending, at
//         prev[h*prevStride ..]; empty: a first step),
//       scores: Float32Array[] (per head: the scores of its previous blocks' rows b*reps + r in order (extra),
//         or every row's score (per row)) or undefined (none),
//       out: Int32Array [heads*cap], cls: Uint8Array [heads*cap], rows: Int32Array [heads*cap*reps],
//       counts: Int32Array [heads])  cap = min(max(budget, agnostic), blocks)
//   -> undefined: head h's chosen blocks ascending at out[h*cap ..] (counts[h] of them), their pool classes in
//   cls, their rows in rows[h*cap*reps ..] (native/kernels/block_choose.cc).
// Synchronous: a step's choice is O(candidates), microseconds, one call for every head; every id is checked
// before the flags are touched. Positional, each typed array read with one N-API call: a step's arguments are
// ~40 calls where an argument object with node-addon-api's checks took ~160 (13.5 us of a 40 us step warm on
// the 2-core VM; addon/block-choose.ts gives the call its names).
#include <napi.h>

#include <algorithm>
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
  }

 private:
  int64_t blocks_ = 0, reps_ = 1;
  std::vector<const int32_t*> order_, rank_;
  std::vector<Napi::Reference<Napi::Int32Array>> refs_;

  Napi::Value Step(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 10) throw Napi::TypeError::New(env, "step takes 10 arguments");
    const int64_t H = int64_t(order_.size()), R = reps_;
    size_t n = 0;
    const double* p = Data<double>(env, info[0], "params", 8, &n);
    auto integer = [&](int i, const char* what, int64_t lo, int64_t hi) {
      if (!(p[i] >= double(lo) && p[i] <= double(hi)) || p[i] != double(int64_t(p[i])))  // the range before the cast (NaN fails it)
        throw Napi::RangeError::New(env, std::string(what) + " must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
      return int64_t(p[i]);
    };
    BlockStep s;
    s.blocks = blocks_, s.reps = R;
    s.reach = integer(0, "reach", 0, int64_t(1) << 31);
    s.budget = integer(1, "budget", 0, int64_t(1) << 31);
    s.maxNew = integer(2, "maxNew", -1, int64_t(1) << 31);
    s.agnostic = integer(3, "agnostic", 0, blocks_);
    s.agnosticClass = integer(4, "agnosticClass", 0, int64_t(1) << 31);
    s.protectAgnostic = p[5] != 0;
    const int64_t prevStride = integer(6, "prevStride", 0, int64_t(1) << 31), scoreKind = integer(7, "scores kind", 0, 2);
    size_t excludeN = 0;
    s.exclude = Data<int32_t>(env, info[1], "exclude", 0, &excludeN), s.excludeN = int64_t(excludeN);
    CheckRange(env, s.exclude, excludeN, blocks_, "exclude", -1);
    const int64_t cap = std::min(std::max(s.budget, s.agnostic), blocks_);
    size_t prevN = 0, prevCountsN = 0;
    const int32_t* prev = Data<int32_t>(env, info[3], "prev", 0, &prevN);
    const int32_t* prevCounts = Data<int32_t>(env, info[4], "prevCounts", 0, &prevCountsN);
    const bool first = prevCountsN == 0;
    if (!first && int64_t(prevCountsN) < H) throw Napi::RangeError::New(env, "prevCounts must be empty or hold one count per head");
    if (!first && scoreKind == 0) throw Napi::TypeError::New(env, "scores are needed with previous blocks");
    int32_t* out = Data<int32_t>(env, info[6], "out", size_t(H * cap), &n);
    uint8_t* cls = Data<uint8_t>(env, info[7], "cls", size_t(H * cap), &n);
    int32_t* rows = Data<int32_t>(env, info[8], "rows", size_t(H * cap * R), &n);
    int32_t* counts = Data<int32_t>(env, info[9], "counts", size_t(H), &n);

    // Every head's inputs checked before any head's choice touches the flags.
    std::vector<BlockStepHead> heads(static_cast<size_t>(H));
    for (int64_t h = 0; h < H; ++h) {
      BlockStepHead& c = heads[size_t(h)];
      size_t topN = 0;
      c.topRows = Data<int32_t>(env, Element(env, info[2], h, H, "top"), "top entry", 0, &topN), c.topRowsN = int64_t(topN);
      CheckRange(env, c.topRows, topN, blocks_ * R, "top", h);
      if (!first) {
        const int64_t count = prevCounts[h];
        if (count < 0 || count > prevStride || h * prevStride + count > int64_t(prevN))
          throw Napi::RangeError::New(env, "prevCounts[" + std::to_string(h) + "] = " + std::to_string(count) + " does not fit prev at stride " + std::to_string(prevStride));
        c.prev = prev + h * prevStride, c.prevN = count;
        CheckRange(env, c.prev, size_t(count), blocks_, "prev", h);
        const bool perRow = scoreKind == 2;
        const float* sc = Data<float>(env, Element(env, info[5], h, H, "scores"), perRow ? "rowScores entry" : "extraScores entry", size_t(perRow ? blocks_ * R : count * R), &n);
        (perRow ? c.rowScores : c.prevRowScores) = sc;
      }
      c.byImportance = order_[size_t(h)], c.importanceRank = rank_[size_t(h)];
      c.out = out + h * cap, c.cls = cls + h * cap, c.outRows = rows + h * cap * R;
    }
    ChooseStepBlocksHeads(s, heads.data(), H, counts);
    return env.Undefined();
  }

  // A typed array's data, of element type T and at least minLength elements, in one N-API call.
 public:
  template <typename T>
  static T* Data(Napi::Env env, napi_value v, const char* what, size_t minLength, size_t* length) {
    napi_typedarray_type type;
    void* data = nullptr;
    if (napi_get_typedarray_info(env, v, &type, length, &data, nullptr, nullptr) != napi_ok || type != TypedArrayKind<T>())
      throw Napi::TypeError::New(env, std::string("Expected ") + TypeName(TypedArrayKind<T>()) + " for " + what);
    if (*length < minLength)
      throw Napi::RangeError::New(env, std::string(what) + " holds " + std::to_string(*length) + " elements, needs " + std::to_string(minLength));
    return static_cast<T*>(data);
  }

  // Entry h of an array of `heads` entries.
  static napi_value Element(Napi::Env env, napi_value array, int64_t h, int64_t heads, const char* what) {
    uint32_t length = 0;
    if (h == 0 && (napi_get_array_length(env, array, &length) != napi_ok || int64_t(length) != heads))
      throw Napi::RangeError::New(env, std::string(what) + " must hold one array per head (" + std::to_string(heads) + ")");
    napi_value v;
    if (napi_get_element(env, array, uint32_t(h), &v) != napi_ok) throw Napi::Error::New(env, std::string("reading ") + what);
    return v;
  }
};

// augmentRows(q: Float32Array [rows*headDim], group, headDim, shares: Float64Array [rows/group], out: Float32Array
//   [rows*(headDim+8)], zero) -> undefined: the summary scoring's query rows (kernels/block_choose.h).
Napi::Value AugmentRowsJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 5) throw Napi::TypeError::New(env, "augmentRows takes 5 arguments");
  const int64_t group = IntArg(info, 1, "group", 1, 1 << 20), headDim = IntArg(info, 2, "headDim", 1, 1 << 20);
  size_t qn = 0, sn = 0, on = 0;
  const float* q = BlockChooserJs::Data<float>(env, info[0], "q", 0, &qn);
  if (qn % size_t(headDim * group) != 0) throw Napi::RangeError::New(env, "q must hold whole groups of headDim rows");
  const int64_t rows = int64_t(qn) / headDim;
  const double* shares = BlockChooserJs::Data<double>(env, info[3], "shares", size_t(rows / group), &sn);
  float* out = BlockChooserJs::Data<float>(env, info[4], "out", size_t(rows * (headDim + 8)), &on);
  AugmentQueryRows(q, rows, group, headDim, shares, out);
  return env.Undefined();
}

}  // namespace

void InitBlockChoose(Napi::Env env, Napi::Object exports) {
  exports.Set("BlockChooser", BlockChooserJs::Define(env));
  exports.Set("augmentRows", Napi::Function::New(env, AugmentRowsJs));
}

}  // namespace kvr
