// copyRanges(src: Uint8Array[], dst: Uint8Array[]) -> Promise<void>: dst[i].set(src[i]) for every i,
// off the event loop, the ranges spread over the native pool.
// copyChecked(src: Uint8Array[], dst: (Uint8Array | null)[], dtypes: number[]) -> Promise<number[]>:
// per range, the index of src's first NaN or infinite value of its dtype, or -1; src copied to dst
// as it is checked (a null dst: checked only). A range with such a value may be partly copied.
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

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/binding_args.h"
#include "common/thread_pool.h"
#include "kernels/convert.h"

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

// A document upload's K/V was scanned for NaN/Inf on the event loop, then
// copied into its layer here: on the 16-core H200 host the scan held the
// loop ~2 ms per 16 MiB upload (0.26 s of a 1.22 s preload), and the next
// upload's body was not read meanwhile (the read starts from the loop).
// Here the scan runs on the pool with the copy, one pass over the bytes:
// each 64 KiB is checked, then copied while it is still in cache.
constexpr size_t kCheckChunk = size_t(1) << 16;
// Ranges are split into pieces of this many bytes, so that one large range
// (an upload's q) still spreads over the pool.
constexpr size_t kCheckPiece = size_t(1) << 20;

struct CheckedRange {
  const uint8_t* src;
  uint8_t* dst;  // null: check only
  size_t bytes;
  Dtype dtype;
};

struct CheckPiece {
  size_t range, from, bytes;
};

Napi::Value CopyCheckedJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsArray() || !info[1].IsArray() || !info[2].IsArray())
    throw Napi::TypeError::New(env, "copyChecked: (src: Uint8Array[], dst: (Uint8Array | null)[], dtypes: number[])");
  auto srcs = info[0].As<Napi::Array>(), dsts = info[1].As<Napi::Array>(), dtypes = info[2].As<Napi::Array>();
  if (srcs.Length() != dsts.Length() || srcs.Length() != dtypes.Length())
    throw Napi::RangeError::New(env, "copyChecked: src, dst and dtypes differ in length");
  std::vector<CheckedRange> ranges;
  std::vector<CheckPiece> pieces;
  for (uint32_t i = 0; i < srcs.Length(); ++i) {
    const std::string at = "copyChecked: range " + std::to_string(i);
    const Dtype dtype = Dtype(int(IntValue(dtypes.Get(i), at + " dtype", 0, kDtypeCount - 1)));
    auto s = Typed<uint8_t>(srcs.Get(i), "src");
    if (s.ByteLength() % DtypeBytes(dtype) != 0) throw Napi::RangeError::New(env, at + ": src is not a whole number of values");
    uint8_t* dst = nullptr;
    if (!Absent(dsts.Get(i))) {
      auto d = Typed<uint8_t>(dsts.Get(i), "dst");
      if (d.ByteLength() != s.ByteLength()) throw Napi::RangeError::New(env, at + ": src and dst differ in size");
      dst = d.Data();
    }
    ranges.push_back({s.Data(), dst, s.ByteLength(), dtype});
    // Pieces are whole values: kCheckPiece is a multiple of every dtype's size.
    for (size_t from = 0; from < s.ByteLength(); from += kCheckPiece)
      pieces.push_back({i, from, std::min(kCheckPiece, s.ByteLength() - from)});
  }
  auto first = std::make_shared<std::vector<int64_t>>(pieces.size(), -1);
  auto nRanges = ranges.size();
  return RunAsync(
      env, {srcs, dsts},
      [ranges, pieces, first]() {
        ThreadPool::Get().ParallelFor(pieces.size(), [&](size_t i) {
          const CheckPiece& p = pieces[i];
          const CheckedRange& r = ranges[p.range];
          const size_t size = DtypeBytes(r.dtype);
          for (size_t at = p.from; at < p.from + p.bytes; at += kCheckChunk) {
            const size_t n = std::min(kCheckChunk, p.from + p.bytes - at);
            const int64_t bad = FirstNonFinite(r.src + at, r.dtype, n / size);
            if (bad >= 0) {
              (*first)[i] = int64_t(at / size) + bad;
              return;
            }
            if (r.dst) std::memcpy(r.dst + at, r.src + at, n);
          }
        });
      },
      [pieces, first, nRanges](Napi::Env e) {
        // A range's first value: that of its first piece with one (pieces are in order).
        std::vector<int64_t> out(nRanges, -1);
        for (size_t i = 0; i < pieces.size(); ++i)
          if (out[pieces[i].range] < 0) out[pieces[i].range] = (*first)[i];
        Napi::Array a = Napi::Array::New(e, out.size());
        for (size_t i = 0; i < out.size(); ++i) a.Set(uint32_t(i), Napi::Number::New(e, double(out[i])));
        return a;
      });
}

}  // namespace

void InitCopy(Napi::Env env, Napi::Object exports) {
  exports.Set("copyRanges", Napi::Function::New(env, CopyRangesJs));
  exports.Set("copyPlan", Napi::Function::New(env, CopyPlanJs));
  exports.Set("copyChecked", Napi::Function::New(env, CopyCheckedJs));
}

}  // namespace kvr
