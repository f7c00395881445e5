// attend({q, qHeads, kvHeads, headDim, dtype, scale, segments, out, lse}) -> Promise<void>
// segments: [{k: Uint16Array[kvHeads], v: Uint16Array[kvHeads], tokens,
//             begin, end, ids?: Int32Array[kvHeads]}]
#include <napi.h>

#include <string>

#include "attention.h"
#include "binding_args.h"

namespace kvr {
namespace {

AttnSegment ReadSegment(const Napi::Object& s, const AttnProblem& p, std::vector<Napi::Value>& keep) {
  AttnSegment seg;
  seg.tokens = Int(s, "tokens", 0, int64_t(1) << 40);
  const size_t rows = size_t(seg.tokens) * p.headDim;
  Napi::Array k = ArrayOf(s, "k", p.kvHeads), v = ArrayOf(s, "v", p.kvHeads);
  for (int h = 0; h < p.kvHeads; ++h) {
    auto kh = Typed<uint16_t>(k.Get(h), "segment k", rows);
    auto vh = Typed<uint16_t>(v.Get(h), "segment v", rows);
    seg.k.push_back(kh.Data());
    seg.v.push_back(vh.Data());
    keep.push_back(kh);
    keep.push_back(vh);
  }
  Napi::Value ids = s.Get("ids");
  if (ids.IsUndefined() || ids.IsNull()) {
    seg.begin = Int(s, "begin", 0, seg.tokens);
    seg.end = Int(s, "end", seg.begin, seg.tokens);
    return seg;
  }
  Napi::Array perHead = ArrayOf(s, "ids", p.kvHeads);
  for (int h = 0; h < p.kvHeads; ++h) {
    auto ih = Typed<int32_t>(perHead.Get(h), "segment ids");
    for (size_t i = 0; i < ih.ElementLength(); ++i)
      if (ih[i] < 0 || ih[i] >= seg.tokens)
        throw Napi::RangeError::New(s.Env(), "segment id " + std::to_string(ih[i]) + " outside [0, " +
                                                 std::to_string(seg.tokens) + ")");
    seg.ids.push_back(ih.Data());
    seg.idCount.push_back(int64_t(ih.ElementLength()));
    keep.push_back(ih);
  }
  return seg;
}

Napi::Value AttendJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = info[0].As<Napi::Object>();
  AttnProblem p;
  p.qHeads = int(Int(o, "qHeads", 1, 1024));
  p.kvHeads = int(Int(o, "kvHeads", 1, 1024));
  p.headDim = int(Int(o, "headDim", 1, 1024));
  if (p.qHeads % p.kvHeads != 0) throw Napi::RangeError::New(env, "qHeads must be a multiple of kvHeads");
  p.dtype = StorageDtype(o, "dtype");
  if (p.dtype == Dtype::kF32) throw Napi::RangeError::New(env, "KV storage must be f16 or bf16");
  Napi::Value scale = o.Get("scale");
  if (!scale.IsNumber()) throw Napi::TypeError::New(env, "Expected a number for scale");
  p.scale = scale.As<Napi::Number>().FloatValue();
  std::vector<Napi::Value> keep;
  const size_t qLen = size_t(p.qHeads) * p.headDim;
  auto q = Typed<float>(o.Get("q"), "q", qLen);
  auto out = Typed<float>(o.Get("out"), "out", qLen);
  auto lse = Typed<float>(o.Get("lse"), "lse", size_t(p.qHeads));
  p.q = q.Data();
  p.out = out.Data();
  p.lse = lse.Data();
  keep.insert(keep.end(), {q, out, lse});
  Napi::Value segs = o.Get("segments");
  if (!segs.IsArray()) throw Napi::TypeError::New(env, "Expected an array for segments");
  Napi::Array arr = segs.As<Napi::Array>();
  for (uint32_t i = 0; i < arr.Length(); ++i) {
    Napi::Value s = arr.Get(i);
    if (!s.IsObject()) throw Napi::TypeError::New(env, "Expected an object for each segment");
    p.segments.push_back(ReadSegment(s.As<Napi::Object>(), p, keep));
  }
  return RunAsync(env, std::move(keep), [p]() { Attend(p); }, [](Napi::Env e) { return e.Undefined(); });
}

}  // namespace

void InitAttention(Napi::Env env, Napi::Object exports) { exports.Set("attend", Napi::Function::New(env, AttendJs)); }

}  // namespace kvr
