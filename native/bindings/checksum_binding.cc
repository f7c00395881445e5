// checksum64(bytes: Uint8Array) -> bigint
// common/checksum.h's Checksum64, so that artifacts written by TypeScript can
// carry the same checksum as the native ones.
#include <napi.h>

#include "common/binding_args.h"
#include "common/checksum.h"

namespace kvr {
namespace {

Napi::Value Checksum64Js(const Napi::CallbackInfo& info) {
  auto bytes = Typed<uint8_t>(info[0], "bytes");
  return Napi::BigInt::New(info.Env(), Checksum64(bytes.Data(), bytes.ElementLength()));
}

}  // namespace

void InitChecksum(Napi::Env env, Napi::Object exports) {
  exports.Set("checksum64", Napi::Function::New(env, Checksum64Js));
}

}  // namespace kvr
