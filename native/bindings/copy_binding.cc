// copyRanges(src: Uint8Array[], dst: Uint8Array[]) -> Promise<void>: dst[i].set(src[i]) for every i,
// off the event loop, the ranges spread over the native pool.
// copyPlan(src: Uint8Array[], dst: Uint8Array, plan: Float64Array) -> Promise<void>: per entry
// [srcIndex, srcOffset, dstOffset, bytes], the same: many small ranges (a block's K or V, 16 KiB)
// from a few arrays, without a typed array per range (each cost ~0.3 us of the event loop).
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

Napi::Value CopyPlanJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsArray()) throw Napi::TypeError::New(env, "copyPlan: (src: Uint8Array[], dst: Uint8Array, plan: Float64Array)");
  auto srcs = info[0].As<Napi::Array>();
  auto dst = Typed<uint8_t>(info[1], "dst");
  if (!info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
    throw Napi::TypeError::New(env, "copyPlan: Expected Float64Array for plan");
  auto plan = info[2].As<Napi::Float64Array>();
  if (plan.ElementLength() % 4 != 0) throw Napi::RangeError::New(env, "copyPlan: plan holds [srcIndex, srcOffset, dstOffset, bytes] entries");
  std::vector<Napi::TypedArrayOf<uint8_t>> src;
  for (uint32_t i = 0; i < srcs.Length(); ++i) src.push_back(Typed<uint8_t>(srcs.Get(i), "src"));
  std::vector<Range> ranges;
  const double* e = plan.Data();
  for (size_t i = 0; i < plan.ElementLength(); i += 4) {
    const double s = e[i], so = e[i + 1], dof = e[i + 2], n = e[i + 3];
    auto whole = [](double x) { return x >= 0 && x < 9007199254740992.0 && x == double(uint64_t(x)); };
    if (!whole(s) || !whole(so) || !whole(dof) || !whole(n) || size_t(s) >= src.size() || so + n > double(src[size_t(s)].ByteLength()) ||
        dof + n > double(dst.ByteLength()))
      throw Napi::RangeError::New(env, "copyPlan: entry " + std::to_string(i / 4) + " is outside its arrays");
    ranges.push_back({src[size_t(s)].Data() + size_t(so), dst.Data() + size_t(dof), size_t(n)});
  }
  return RunAsync(
      env, {srcs, dst, plan},
      [ranges]() { ThreadPool::Get().ParallelFor(ranges.size(), [&](size_t i) { std::memcpy(ranges[i].dst, ranges[i].src, ranges[i].bytes); }); },
      [](Napi::Env e) { return e.Undefined(); });
}

}  // namespace

void InitCopy(Napi::Env env, Napi::Object exports) {
  exports.Set("copyRanges", Napi::Function::New(env, CopyRangesJs));
  exports.Set("copyPlan", Napi::Function::New(env, CopyPlanJs));
}

}  // namespace kvr
