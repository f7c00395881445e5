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

// rowDots' and weightedRowSums' shape: `rows` query rows of headDim, over `n` rows of `stride` in x.
struct RowsShape {
  int rows, d;
  int64_t n, stride;
  // Elements x must hold (its last row needs only d).
  size_t Span() const { return n == 0 ? 0 : size_t(n - 1) * size_t(stride) + size_t(d); }
};

RowsShape RowsShapeAt(const Napi::Object& o) {
  RowsShape s;
  s.rows = int(Int(o, "rows", 0, 4096));
  s.d = int(Int(o, "headDim", 1, 4096));
  s.n = Int(o, "n", 0, kMaxRows);
  s.stride = Int(o, "stride", s.d, 1 << 16);
  return s;
}

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
  const RowsShape s = RowsShapeAt(o);
  auto q = TypedAt<double>(o, "q", size_t(s.rows) * size_t(s.d));
  auto x = TypedAt<float>(o, "x", s.Span());
  auto out = TypedAt<double>(o, "out", size_t(s.rows) * size_t(s.n));
  RowDots(q.Data(), s.rows, s.d, x.Data(), s.n, s.stride, Double(o, "scale"), out.Data());
  return info.Env().Undefined();
}

Napi::Value WeightedRowSumsJs(const Napi::CallbackInfo& info) {
  Napi::Object o = ArgObject(info);
  const RowsShape s = RowsShapeAt(o);
  auto w = TypedAt<double>(o, "w", size_t(s.rows) * size_t(s.n));
  auto mask = OptTypedAt<uint8_t>(o, "mask", size_t(s.rows) * size_t(s.n));
  auto x = TypedAt<float>(o, "x", s.Span());
  auto out = TypedAt<double>(o, "out", size_t(s.rows) * size_t(s.d));
  WeightedRowSums(w.Data(), mask ? mask->Data() : nullptr, s.rows, s.n, x.Data(), s.stride, s.d, out.Data());
  return info.Env().Undefined();
}

}  // namespace

void InitWaveBuild(Napi::Env env, Napi::Object exports) {
  exports.Set("encodeMoments", Napi::Function::New(env, EncodeMomentsJs));
  exports.Set("rowDots", Napi::Function::New(env, RowDotsJs));
  exports.Set("weightedRowSums", Napi::Function::New(env, WeightedRowSumsJs));
}

}  // namespace kvr
