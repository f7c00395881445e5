// convert({src: Uint8Array, from, dst: Uint8Array, to, count})
// firstNonFinite(src: Uint8Array, dtype, count) -> index or -1
#include <napi.h>

#include "binding_args.h"
#include "convert.h"

namespace kvr {
namespace {

Napi::Value ConvertJs(const Napi::CallbackInfo& info) {
  Napi::Object o = info[0].As<Napi::Object>();
  Dtype from = StorageDtype(o, "from"), to = StorageDtype(o, "to");
  size_t n = size_t(Int(o, "count", 0, int64_t(1) << 40));
  auto src = Typed<uint8_t>(o.Get("src"), "src", n * DtypeBytes(from));
  auto dst = Typed<uint8_t>(o.Get("dst"), "dst", n * DtypeBytes(to));
  Convert(src.Data(), from, dst.Data(), to, n);
  return info.Env().Undefined();
}

Napi::Value FirstNonFiniteJs(const Napi::CallbackInfo& info) {
  Napi::Object o = info[0].As<Napi::Object>();
  Dtype dtype = StorageDtype(o, "dtype");
  size_t n = size_t(Int(o, "count", 0, int64_t(1) << 40));
  auto src = Typed<uint8_t>(o.Get("src"), "src", n * DtypeBytes(dtype));
  return Napi::Number::New(info.Env(), double(FirstNonFinite(src.Data(), dtype, n)));
}

}  // namespace

void InitConvert(Napi::Env env, Napi::Object exports) {
  exports.Set("convert", Napi::Function::New(env, ConvertJs));
  exports.Set("firstNonFinite", Napi::Function::New(env, FirstNonFiniteJs));
}

}  // namespace kvr
