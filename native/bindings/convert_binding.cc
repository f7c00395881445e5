// convert({src: Uint8Array, from, dst: Uint8Array, to, count})
// firstNonFinite(src: Uint8Array, dtype, count) -> index or -1
#include <napi.h>

#include "common/binding_args.h"
#include "kernels/convert.h"

namespace kvr {
namespace {

Napi::Value ConvertJs(const Napi::CallbackInfo& info) {
  Napi::Object o = ArgObject(info);
  const Dtype from = ParseDtype(o, "from"), to = ParseDtype(o, "to");
  const size_t n = size_t(Int(o, "count", 0, int64_t(1) << 40));
  auto src = TypedAt<uint8_t>(o, "src", n * DtypeBytes(from));
  auto dst = TypedAt<uint8_t>(o, "dst", n * DtypeBytes(to));
  Convert(src.Data(), from, dst.Data(), to, n);
  return info.Env().Undefined();
}

Napi::Value FirstNonFiniteJs(const Napi::CallbackInfo& info) {
  Napi::Object o = ArgObject(info);
  const Dtype dtype = ParseDtype(o, "dtype");
  const size_t n = size_t(Int(o, "count", 0, int64_t(1) << 40));
  auto src = TypedAt<uint8_t>(o, "src", n * DtypeBytes(dtype));
  return Napi::Number::New(info.Env(), double(FirstNonFinite(src.Data(), dtype, n)));
}

}  // namespace

void InitConvert(Napi::Env env, Napi::Object exports) {
  exports.Set("convert", Napi::Function::New(env, ConvertJs));
  exports.Set("firstNonFinite", Napi::Function::New(env, FirstNonFiniteJs));
}

}  // namespace kvr
