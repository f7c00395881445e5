// Argument checks for the N-API boundary: every typed array is checked for
// its type and length before a pointer to its memory is taken. Failures
// throw a JS TypeError/RangeError; native code never sees a bad shape.
#pragma once

#include <napi.h>

#include <string>
#include <vector>

#include "half.h"

namespace kvr {

inline std::string TypeName(napi_typedarray_type t) {
  switch (t) {
    case napi_uint8_array: return "Uint8Array";
    case napi_uint16_array: return "Uint16Array";
    case napi_int32_array: return "Int32Array";
    case napi_float32_array: return "Float32Array";
    default: return "another typed array";
  }
}

template <typename T>
napi_typedarray_type TypedArrayKind();
template <> inline napi_typedarray_type TypedArrayKind<uint8_t>() { return napi_uint8_array; }
template <> inline napi_typedarray_type TypedArrayKind<uint16_t>() { return napi_uint16_array; }
template <> inline napi_typedarray_type TypedArrayKind<int32_t>() { return napi_int32_array; }
template <> inline napi_typedarray_type TypedArrayKind<float>() { return napi_float32_array; }

// A typed array of element type T with at least minLength elements.
template <typename T>
Napi::TypedArrayOf<T> Typed(const Napi::Value& v, const char* what, size_t minLength = 0) {
  if (!v.IsTypedArray())
    throw Napi::TypeError::New(v.Env(), std::string("Expected ") + TypeName(TypedArrayKind<T>()) + " for " + what);
  auto ta = v.As<Napi::TypedArray>();
  if (ta.TypedArrayType() != TypedArrayKind<T>())
    throw Napi::TypeError::New(v.Env(), std::string("Expected ") + TypeName(TypedArrayKind<T>()) + " for " + what +
                                            " but received " + TypeName(ta.TypedArrayType()));
  if (ta.ElementLength() < minLength)
    throw Napi::RangeError::New(v.Env(), std::string(what) + " holds " + std::to_string(ta.ElementLength()) +
                                             " elements, needs " + std::to_string(minLength));
  return v.As<Napi::TypedArrayOf<T>>();
}

inline int64_t Int(const Napi::Object& o, const char* key, int64_t lo, int64_t hi) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) throw Napi::TypeError::New(o.Env(), std::string("Expected a number for ") + key);
  double d = v.As<Napi::Number>().DoubleValue();
  if (d != double(int64_t(d)) || d < double(lo) || d > double(hi))
    throw Napi::RangeError::New(o.Env(), std::string(key) + " must be an integer in [" + std::to_string(lo) + ", " +
                                             std::to_string(hi) + "]");
  return int64_t(d);
}

inline Dtype StorageDtype(const Napi::Object& o, const char* key) {
  int64_t d = Int(o, key, 0, 2);
  return Dtype(int(d));
}

// Keys are stored as 16-bit words: f16 or bf16, never f32.
inline Dtype KeyDtype(const Napi::Object& o) {
  Dtype d = StorageDtype(o, "dtype");
  if (d == Dtype::kF32) throw Napi::RangeError::New(o.Env(), "keys must be f16 or bf16");
  return d;
}

// node-addon-api turns only Napi::Error into a JS exception; anything else
// thrown by native code in a synchronous call must be converted here.
template <typename F>
auto Guard(Napi::Env env, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Napi::Error::New(env, e.what());
  }
}

inline Napi::Array ArrayOf(const Napi::Object& o, const char* key, size_t length) {
  Napi::Value v = o.Get(key);
  if (!v.IsArray()) throw Napi::TypeError::New(o.Env(), std::string("Expected an array for ") + key);
  auto a = v.As<Napi::Array>();
  if (a.Length() != length)
    throw Napi::RangeError::New(o.Env(), std::string(key) + " must have " + std::to_string(length) + " entries");
  return a;
}

// Runs work() on a libuv thread and settles a promise with result(env).
// `keep` holds the JS objects whose memory work() reads or writes, so the
// garbage collector cannot free them while it runs.
template <typename Work, typename Result>
class PromiseWorker : public Napi::AsyncWorker {
 public:
  PromiseWorker(Napi::Env env, std::vector<Napi::Value> keep, Work work, Result result)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), work_(std::move(work)),
        result_(std::move(result)) {
    for (auto& v : keep) keep_.push_back(Napi::Persistent(v));
  }
  Napi::Promise Promise() const { return deferred_.Promise(); }
  void Execute() override {
    try {
      work_();
    } catch (const std::exception& e) {
      SetError(e.what());
    }
  }
  void OnOK() override { deferred_.Resolve(result_(Env())); }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  Work work_;
  Result result_;
  std::vector<Napi::Reference<Napi::Value>> keep_;
};

template <typename Work, typename Result>
Napi::Promise RunAsync(Napi::Env env, std::vector<Napi::Value> keep, Work work, Result result) {
  auto* w = new PromiseWorker<Work, Result>(env, std::move(keep), std::move(work), std::move(result));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

}  // namespace kvr
