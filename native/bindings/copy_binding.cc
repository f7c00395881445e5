// copyRanges(src: Uint8Array[], dst: Uint8Array[]) -> Promise<void>: dst[i].set(src[i]) for every i,
// off the event loop, the ranges spread over the native pool.
//
// A document upload's bytes are copied twice on their way to LMDB: into
// the layer's rows (append) and, per full block, K then V into one staging
// value. On the event loop the two cost ~0.3 s per GB (2-core VM) of a
// preload's ~0.5 s per GB budget for 2 GB/s; here they run while the event
// loop reads and checks the next upload.
#include <napi.h>

#include <cstring>
#include <string>
#include <vector>

#include "common/binding_args.h"
#include "common/thread_pool.h"

namespace kvr {
namespace {

struct Range {
  const uint8_t* src;
  uint8_t* dst;
  size_t bytes;
};

Napi::Value CopyRangesJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsArray() || !info[1].IsArray())
    throw Napi::TypeError::New(env, "copyRanges: two arrays of Uint8Arrays (src, dst)");
  auto srcs = info[0].As<Napi::Array>(), dsts = info[1].As<Napi::Array>();
  if (srcs.Length() != dsts.Length()) throw Napi::RangeError::New(env, "copyRanges: src and dst differ in length");
  std::vector<Range> ranges;
  ranges.reserve(srcs.Length());
  for (uint32_t i = 0; i < srcs.Length(); ++i) {
    auto s = Typed<uint8_t>(srcs.Get(i), "src"), d = Typed<uint8_t>(dsts.Get(i), "dst");
    if (s.ByteLength() != d.ByteLength())
      throw Napi::RangeError::New(env, "copyRanges: range " + std::to_string(i) + ": src and dst differ in size");
    ranges.push_back({s.Data(), d.Data(), s.ByteLength()});
  }
  return RunAsync(
      env, {srcs, dsts},
      [ranges]() { ThreadPool::Get().ParallelFor(ranges.size(), [&](size_t i) { std::memcpy(ranges[i].dst, ranges[i].src, ranges[i].bytes); }); },
      [](Napi::Env e) { return e.Undefined(); });
}

}  // namespace

void InitCopy(Napi::Env env, Napi::Object exports) {
  exports.Set("copyRanges", Napi::Function::New(env, CopyRangesJs));
}

}  // namespace kvr
