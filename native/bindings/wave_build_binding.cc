// The wave build's loops (native/kernels/wave_build.h), synchronous (the
// caller's thread works with the pool's): each is a few milliseconds of a
// seal's main thread.
//   encodeMoments({axes, vars: Float32Array [clusters·headDim], clusters, headDim,
//                  keyAxes: Int8Array, axisScales: Float32Array [clusters], keyVars: Uint8Array, varScales: Float32Array})
//     -> a cluster with a non-finite axis or variance (the codes then incomplete), or -1
//   rowDots({q: Float64Array [rows·headDim], rows, headDim, x: Float32Array [n rows of stride], n, stride, scale, out: Float64Array [rows·n]})
//   weightedRowSums({w: Float64Array [rows·n], mask?: Uint8Array [rows·n], rows, n, x: Float32Array [n rows of stride], stride, headDim,
//                    out: Float64Array [rows·headDim] (added to)})
#include <napi.h>

#include "common/binding_args.h"
#include "kernels/wave_build.h"

namespace kvr {
namespace {

constexpr int64_t kMaxRows = int64_t(1) << 31;

double Double(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) throw Napi::TypeError::New(o.Env(), std::string("Expected a number for ") + key);
  return v.As<Napi::Number>().DoubleValue();
}

// Elements a [n rows of stride] array must hold (its last row needs only d).
size_t RowsSpan(int64_t n, int64_t stride, int d) { return n == 0 ? 0 : size_t(n - 1) * size_t(stride) + size_t(d); }

Napi::Value EncodeMomentsJs(const Napi::CallbackInfo& info) {
  Napi::Object o = ArgObject(info);
  const int64_t clusters = Int(o, "clusters", 0, kMaxRows);
  const int d = int(Int(o, "headDim", 1, 4096));
  const size_t cells = size_t(clusters) * size_t(d);
  auto axes = TypedAt<float>(o, "axes", cells), vars = TypedAt<float>(o, "vars", cells);
  auto keyAxes = TypedAt<int8_t>(o, "keyAxes", cells);
  auto keyVars = TypedAt<uint8_t>(o, "keyVars", cells);
  auto axisScales = TypedAt<float>(o, "axisScales", size_t(clusters)), varScales = TypedAt<float>(o, "varScales", size_t(clusters));
  const int64_t bad = EncodeMoments(axes.Data(), vars.Data(), clusters, d, keyAxes.Data(), axisScales.Data(), keyVars.Data(), varScales.Data());
  return Napi::Number::New(info.Env(), double(bad));
}

Napi::Value RowDotsJs(const Napi::CallbackInfo& info) {
  Napi::Object o = ArgObject(info);
  const int rows = int(Int(o, "rows", 0, 4096));
  const int d = int(Int(o, "headDim", 1, 4096));
  const int64_t n = Int(o, "n", 0, kMaxRows);
  const int64_t stride = Int(o, "stride", d, 1 << 16);
  auto q = TypedAt<double>(o, "q", size_t(rows) * size_t(d));
  auto x = TypedAt<float>(o, "x", RowsSpan(n, stride, d));
  auto out = TypedAt<double>(o, "out", size_t(rows) * size_t(n));
  RowDots(q.Data(), rows, d, x.Data(), n, stride, Double(o, "scale"), out.Data());
  return info.Env().Undefined();
}

Napi::Value WeightedRowSumsJs(const Napi::CallbackInfo& info) {
  Napi::Object o = ArgObject(info);
  const int rows = int(Int(o, "rows", 0, 4096));
  const int d = int(Int(o, "headDim", 1, 4096));
  const int64_t n = Int(o, "n", 0, kMaxRows);
  const int64_t stride = Int(o, "stride", d, 1 << 16);
  auto w = TypedAt<double>(o, "w", size_t(rows) * size_t(n));
  auto mask = OptTypedAt<uint8_t>(o, "mask", size_t(rows) * size_t(n));
  auto x = TypedAt<float>(o, "x", RowsSpan(n, stride, d));
  auto out = TypedAt<double>(o, "out", size_t(rows) * size_t(d));
  WeightedRowSums(w.Data(), mask ? mask->Data() : nullptr, rows, n, x.Data(), stride, d, out.Data());
  return info.Env().Undefined();
}

}  // namespace

void InitWaveBuild(Napi::Env env, Napi::Object exports) {
  exports.Set("encodeMoments", Napi::Function::New(env, EncodeMomentsJs));
  exports.Set("rowDots", Napi::Function::New(env, RowDotsJs));
  exports.Set("weightedRowSums", Napi::Function::New(env, WeightedRowSumsJs));
}

}  // namespace kvr
