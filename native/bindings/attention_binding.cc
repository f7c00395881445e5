// attend({q, qHeads, kvHeads, headDim, dtype, scale, segments, out, lse}) -> Promise<void>
// attendSync(same) -> undefined or the kernel's Error, on the calling thread (addon/kernels.ts runs a
// short step so: a libuv-pool round trip cost 17 µs back to back, ~100 µs
// after the process idled 5-25 ms, on the 2-core VM)
// segments: [{k: Uint16Array[kvHeads], v: Uint16Array[kvHeads], tokens,
//             begin, end, ids?: Int32Array[kvHeads]}]
#include <napi.h>

#include <string>
#include <vector>

#include "common/binding_args.h"
#include "kernels/attention.h"

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
  if (Absent(s.Get("ids"))) {
    seg.begin = Int(s, "begin", 0, seg.tokens);
    seg.end = Int(s, "end", seg.begin, seg.tokens);
    return seg;
  }
  Napi::Array perHead = ArrayOf(s, "ids", p.kvHeads);
  for (int h = 0; h < p.kvHeads; ++h) {
    auto ih = Typed<int32_t>(perHead.Get(h), "segment ids");
    CheckIds(ih, seg.tokens, "segment ids (kv head " + std::to_string(h) + ")");
    seg.ids.push_back(ih.Data());
    seg.idCount.push_back(int64_t(ih.ElementLength()));
    keep.push_back(ih);
  }
  return seg;
}

// The problem read from the arguments; `keep` holds the arrays it points into.
AttnProblem ReadProblem(const Napi::CallbackInfo& info, std::vector<Napi::Value>& keep) {
  Napi::Object o = ArgObject(info);
  AttnProblem p;
  AttendCallAt(o, p, keep);
  Napi::Array segs = ArrayAt(o, "segments");
  for (uint32_t i = 0; i < segs.Length(); ++i)
    p.segments.push_back(ReadSegment(ObjectOf(segs.Get(i), "segments[" + std::to_string(i) + "]"), p, keep));
  return p;
}

Napi::Value AttendJs(const Napi::CallbackInfo& info) {
  std::vector<Napi::Value> keep;
  AttnProblem p = ReadProblem(info, keep);
  return RunAsync(info.Env(), std::move(keep), [p]() { Attend(p); }, [](Napi::Env e) { return e.Undefined(); });
}

// Arguments refused throw, as attend's do; a kernel's failure is returned (an Error), for the caller to reject with, as attend's promise does.
Napi::Value AttendSyncJs(const Napi::CallbackInfo& info) {
  std::vector<Napi::Value> keep;
  AttnProblem p = ReadProblem(info, keep);
  try {
    Attend(p);
  } catch (const std::exception& e) {
    return Napi::Error::New(info.Env(), e.what()).Value();
  }
  return info.Env().Undefined();
}

}  // namespace

void InitAttention(Napi::Env env, Napi::Object exports) {
  exports.Set("attend", Napi::Function::New(env, AttendJs));
  exports.Set("attendSync", Napi::Function::New(env, AttendSyncJs));
}

}  // namespace kvr
