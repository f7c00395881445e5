// Device block scoring for JS (native/cuda/block_scores.{h,cu}; compiled by
// the host compiler, the kernels by nvcc when binding.gyp finds it, with
// KVR_CUDA=1).
//
// blockScoresSupported(headDim, group) -> boolean
//   whether new BlockScores / topk can take that shape here (false in a build
//   without CUDA, or whose host kernels do not sum in the AVX2 order the
//   device reproduces).
// new BlockScores({heads: Uint16Array[] ([blocks, headDim] each), blocks, headDim, dtype})
//   uploads every head's block means; throws without a device or memory.
//   .topk({q: Float32Array [heads*group*headDim], group, k,
//          outIds: Int32Array [heads*kk], outScores: Float32Array [heads*kk],
//          extraIds?: Int32Array, extraCounts?: Int32Array [heads], extraScores?: Float32Array,
//          reps?: number, sync?: boolean, times?: boolean, deviceTime?: boolean}) -> Promise<kk> (sync: kk),
//          kk = min(k, blocks / reps)
//     head h's best kk blocks at outIds[h*kk ..], best first (ties: lower id); with reps (a power of two
//     in [1, 16] dividing blocks) its best kk groups of reps rows, each ranked by its best row, as the
//     group's first row (group * reps) with that row's score (extra ids stay rows);
//     extraScores[i]: the score of extraIds[i], head by head (extraCounts).
//   .bytes() -> device bytes held / .close()
//   .pipedScores() -> whether the score kernel is ScoreBlocksPiped where it fits (unless KVRECALL_BLOCK_SCORES_PIPED=0)
//   .slicedSelect() -> whether the select runs in two launches where it fits (unless KVRECALL_BLOCK_SELECT_SLICED=0)
//   .lastTimes() -> {scoreMs, selectMs (kernels, events; with times), deviceMs (the call on the device, events; with
//     deviceTime), prepMs, issueMs, waitMs, copyOutMs (host)} of the last topk
#include <napi.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "common/binding_args.h"
#include "common/class_registry.h"

#ifdef KVR_CUDA
#include "cuda/block_scores.h"
#endif

namespace kvr {
namespace {

#if defined(KVR_CUDA) && defined(KVR_X86_SIMD)

Napi::Value Supported(const Napi::CallbackInfo& info) {
  const int64_t d = IntArg(info, 0, "headDim", 1, 1 << 20), g = IntArg(info, 1, "group", 1, 1 << 20);
  return Napi::Boolean::New(info.Env(), cuda::BlockScores::Supports(int(d), int(g)));
}

class BlockScoresJs : public Napi::ObjectWrap<BlockScoresJs> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "BlockScores",
                       {InstanceMethod("topk", &BlockScoresJs::TopK), InstanceMethod("bytes", &BlockScoresJs::Bytes),
                        InstanceMethod("lastTimes", &BlockScoresJs::LastTimes), InstanceMethod("graphCaptures", &BlockScoresJs::GraphCaptures),
                        InstanceMethod("pipedScores", &BlockScoresJs::PipedScores), InstanceMethod("slicedSelect", &BlockScoresJs::SlicedSelect),
                        InstanceMethod("close", &BlockScoresJs::Close)});
  }

  explicit BlockScoresJs(const Napi::CallbackInfo& info) : Napi::ObjectWrap<BlockScoresJs>(info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    cuda::BlockScoresConfig c;
    c.blocks = Int(o, "blocks", 1, int64_t(1) << 30);
    c.headDim = int(Int(o, "headDim", 1, 1024));
    c.dtype = KeyDtype(o);
    if (!cuda::BlockScores::Supports(c.headDim, 1)) throw Napi::RangeError::New(env, "headDim must be a multiple of 8");
    Napi::Array heads = ArrayAt(o, "heads");
    c.heads = int(heads.Length());
    if (c.heads < 1 || c.heads > 1024) throw Napi::RangeError::New(env, "heads must hold 1 to 1024 arrays");
    std::vector<const uint16_t*> means;
    for (int h = 0; h < c.heads; ++h)
      means.push_back(Typed<uint16_t>(heads.Get(uint32_t(h)), "heads entry", size_t(c.blocks) * c.headDim).Data());
    scores_ = Guard(env, [&] { return std::make_shared<cuda::BlockScores>(c, means.data()); });
  }

 private:
  std::shared_ptr<cuda::BlockScores> scores_;

  std::shared_ptr<cuda::BlockScores> Live(Napi::Env env) {
    if (!scores_) throw Napi::Error::New(env, "BlockScores is closed");
    return scores_;
  }

  Napi::Value TopK(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    std::shared_ptr<cuda::BlockScores> s = Live(env);
    const cuda::BlockScoresConfig& c = s->Config();
    cuda::BlockTopKArgs a;
    a.group = int(Int(o, "group", 1, 1024));
    if (!cuda::BlockScores::Supports(c.headDim, a.group)) throw Napi::RangeError::New(env, "group * headDim is beyond the device scorer");
    a.k = Int(o, "k", 0, int64_t(1) << 30);
    a.reps = int(OptInt(o, "reps", 1, 16, 1));
    if (!cuda::BlockScores::SupportsReps(c.blocks, a.reps)) throw Napi::RangeError::New(env, "reps must be a power of two dividing blocks");
    const size_t kk = size_t(std::min<int64_t>(a.k, c.blocks / a.reps));
    auto q = TypedAt<float>(o, "q", size_t(c.heads) * a.group * c.headDim);
    TopkOutputs res = TopkOutputsAt(o, size_t(c.heads) * kk);
    a.q = q.Data();
    a.outIds = res.ids.Data();
    a.outScores = res.scores.Data();
    std::vector<Napi::Value> hold{q, res.ids, res.scores};
    if (auto ids = OptTypedAt<int32_t>(o, "extraIds")) {
      CheckIds(*ids, c.blocks, "extraIds");
      auto counts = TypedAt<int32_t>(o, "extraCounts", size_t(c.heads));
      int64_t total = 0;
      for (int h = 0; h < c.heads; ++h) {
        if (counts[size_t(h)] < 0) throw Napi::RangeError::New(env, "extraCounts: negative count");
        total += counts[size_t(h)];
      }
      if (total != int64_t(ids->ElementLength())) throw Napi::RangeError::New(env, "extraCounts must sum to extraIds.length");
      auto out = TypedAt<float>(o, "extraScores", size_t(total));
      a.extraIds = ids->Data();
      a.extraCounts = counts.Data();
      a.extraTotal = total;
      a.extraScores = out.Data();
      hold.insert(hold.end(), {*ids, counts, out});
    }
    a.times = Flag(o, "times", false);
    a.deviceTime = Flag(o, "deviceTime", false);
    if (Flag(o, "sync", false)) return Napi::Number::New(env, double(Guard(env, [&] { return s->TopK(a); })));
    auto count = std::make_shared<int64_t>(0);
    return RunAsync(
        env, std::move(hold), [s, a, count]() { *count = s->TopK(a); },
        [count](Napi::Env e) { return Napi::Number::New(e, double(*count)); });
  }

  Napi::Value Bytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), scores_ ? double(scores_->DeviceBytes()) : 0.0);
  }

  Napi::Value GraphCaptures(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), scores_ ? double(scores_->GraphCaptures()) : 0.0);
  }

  Napi::Value PipedScores(const Napi::CallbackInfo& info) {
    return Napi::Boolean::New(info.Env(), scores_ ? scores_->PipedScores() : false);
  }

  Napi::Value SlicedSelect(const Napi::CallbackInfo& info) {
    return Napi::Boolean::New(info.Env(), scores_ ? scores_->SlicedSelect() : false);
  }

  Napi::Value LastTimes(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const cuda::BlockTopKTimes t = scores_ ? scores_->LastTimes() : cuda::BlockTopKTimes{};
    Napi::Object o = Napi::Object::New(env);
    o.Set("scoreMs", Napi::Number::New(env, t.scoreMs));
    o.Set("selectMs", Napi::Number::New(env, t.selectMs));
    o.Set("deviceMs", Napi::Number::New(env, t.deviceMs));
    o.Set("prepMs", Napi::Number::New(env, t.prepMs));
    o.Set("issueMs", Napi::Number::New(env, t.issueMs));
    o.Set("waitMs", Napi::Number::New(env, t.waitMs));
    o.Set("copyOutMs", Napi::Number::New(env, t.copyOutMs));
    return o;
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    scores_.reset();  // a topk in flight keeps its own reference
    return info.Env().Undefined();
  }
};

#else  // no CUDA build, or host kernels the device does not reproduce

Napi::Value Supported(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), false); }

struct BlockScoresJs {
  static Napi::Function Define(Napi::Env env) {
#ifdef KVR_CUDA
    return Unavailable::Define(env, "BlockScores", "device block scores reproduce the host's AVX2 sums: not on this host");
#else
    return Unavailable::Define(env, "BlockScores", "kvrecall was built without CUDA");
#endif
  }
};

#endif

}  // namespace

void InitBlockScores(Napi::Env env, Napi::Object exports) {
  exports.Set("blockScoresSupported", Napi::Function::New(env, Supported));
  exports.Set("BlockScores", BlockScoresJs::Define(env));
}

}  // namespace kvr
