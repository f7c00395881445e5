// Argument checks for the N-API boundary: every typed array is checked for
// its type and length before a pointer to its memory is taken. Failures
// throw a JS TypeError/RangeError; native code never sees a bad shape.
#pragma once

#include <napi.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/half.h"

namespace kvr {

inline std::string TypeName(napi_typedarray_type t) {
  switch (t) {
    case napi_int8_array: return "Int8Array";
    case napi_uint8_array: return "Uint8Array";
    case napi_uint16_array: return "Uint16Array";
    case napi_int32_array: return "Int32Array";
    case napi_float32_array: return "Float32Array";
    case napi_float64_array: return "Float64Array";
    default: return "another typed array";
  }
}

template <typename T>
napi_typedarray_type TypedArrayKind();
template <> inline napi_typedarray_type TypedArrayKind<int8_t>() { return napi_int8_array; }
template <> inline napi_typedarray_type TypedArrayKind<uint8_t>() { return napi_uint8_array; }
template <> inline napi_typedarray_type TypedArrayKind<uint16_t>() { return napi_uint16_array; }
template <> inline napi_typedarray_type TypedArrayKind<int32_t>() { return napi_int32_array; }
template <> inline napi_typedarray_type TypedArrayKind<float>() { return napi_float32_array; }
template <> inline napi_typedarray_type TypedArrayKind<double>() { return napi_float64_array; }

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

// The call's argument object: fn({...}).
inline Napi::Object ArgObject(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(info.Env(), "Expected an argument object");
  return info[0].As<Napi::Object>();
}

// An object inside the arguments (an array entry, say).
inline Napi::Object ObjectOf(const Napi::Value& v, const std::string& what) {
  if (!v.IsObject()) throw Napi::TypeError::New(v.Env(), "Expected an object for " + what);
  return v.As<Napi::Object>();
}

// An optional argument is absent when undefined or null.
inline bool Absent(const Napi::Value& v) { return v.IsUndefined() || v.IsNull(); }

// o[key]: a typed array of element type T with at least minLength elements.
template <typename T>
Napi::TypedArrayOf<T> TypedAt(const Napi::Object& o, const char* key, size_t minLength = 0) {
  return Typed<T>(o.Get(key), key, minLength);
}

// o[key] as TypedAt, or nothing when absent.
template <typename T>
std::optional<Napi::TypedArrayOf<T>> OptTypedAt(const Napi::Object& o, const char* key, size_t minLength = 0) {
  Napi::Value v = o.Get(key);
  if (Absent(v)) return std::nullopt;
  return Typed<T>(v, key, minLength);
}

// An integer in [lo, hi].
inline int64_t IntValue(const Napi::Value& v, const std::string& what, int64_t lo, int64_t hi) {
  if (!v.IsNumber()) throw Napi::TypeError::New(v.Env(), "Expected a number for " + what);
  double d = v.As<Napi::Number>().DoubleValue();
  // The range first: casting NaN, an infinity or a value past int64 is undefined behaviour.
  if (!(d >= double(lo) && d <= double(hi)) || d != double(int64_t(d)))
    throw Napi::RangeError::New(v.Env(), what + " must be an integer in [" + std::to_string(lo) + ", " +
                                             std::to_string(hi) + "]");
  return int64_t(d);
}

inline int64_t Int(const Napi::Object& o, const char* key, int64_t lo, int64_t hi) {
  return IntValue(o.Get(key), key, lo, hi);
}

// info[i], for the few calls that take positional numbers.
inline int64_t IntArg(const Napi::CallbackInfo& info, size_t i, const char* what, int64_t lo, int64_t hi) {
  return IntValue(info[i], what, lo, hi);
}

inline int64_t OptInt(const Napi::Object& o, const char* key, int64_t lo, int64_t hi, int64_t def) {
  return Absent(o.Get(key)) ? def : Int(o, key, lo, hi);
}

inline double Double(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) throw Napi::TypeError::New(o.Env(), std::string("Expected a number for ") + key);
  return v.As<Napi::Number>().DoubleValue();
}

inline float Float(const Napi::Object& o, const char* key) { return float(Double(o, key)); }

// o[key] by JS truthiness; def when undefined.
inline bool Flag(const Napi::Object& o, const char* key, bool def) {
  Napi::Value v = o.Get(key);
  return v.IsUndefined() ? def : v.ToBoolean().Value();
}

// The only place a JS dtype code (half.h's Dtype numbering, which
// addon/kernels.ts's DTYPE_CODE restates) becomes a Dtype.
inline Dtype ParseDtype(const Napi::Object& o, const char* key) { return Dtype(int(Int(o, key, 0, kDtypeCount - 1))); }

// Keys and values are stored as 16-bit words: f16 or bf16, never f32.
inline Dtype KeyDtype(const Napi::Object& o) {
  Dtype d = ParseDtype(o, "dtype");
  if (!IsWordDtype(d)) throw Napi::RangeError::New(o.Env(), "dtype must be f16 or bf16 (keys and values are 16-bit words)");
  return d;
}

// Every id in [0, limit), or a RangeError naming the first that is not.
inline void CheckIds(const Napi::Int32Array& ids, int64_t limit, const std::string& what) {
  for (size_t i = 0; i < ids.ElementLength(); ++i)
    if (ids[i] < 0 || ids[i] >= limit)
      throw Napi::RangeError::New(ids.Env(), what + "[" + std::to_string(i) + "] = " + std::to_string(ids[i]) +
                                                 " is outside [0, " + std::to_string(limit) + ")");
}

// The head shape of an attention call: qHeads a multiple of kvHeads.
struct HeadShape {
  int qHeads, kvHeads, headDim;
};
inline HeadShape HeadShapeAt(const Napi::Object& o) {
  HeadShape s{int(Int(o, "qHeads", 1, 1024)), int(Int(o, "kvHeads", 1, 1024)), int(Int(o, "headDim", 1, 1024))};
  if (s.qHeads % s.kvHeads != 0) throw Napi::RangeError::New(o.Env(), "qHeads must be a multiple of kvHeads");
  return s;
}

// The arrays of an attention call: q and out [heads, headDim], lse [heads].
struct AttendArrays {
  Napi::Float32Array q, out, lse;
};
inline AttendArrays AttendArraysAt(const Napi::Object& o, size_t heads, size_t headDim) {
  return {TypedAt<float>(o, "q", heads * headDim), TypedAt<float>(o, "out", heads * headDim),
          TypedAt<float>(o, "lse", heads)};
}

// An attention call's common part into p (AttnProblem, EstimateProblem):
// its head shape, dtype and scale, and q, out and lse, held in `keep`.
template <typename Problem>
void AttendCallAt(const Napi::Object& o, Problem& p, std::vector<Napi::Value>& keep) {
  const HeadShape shape = HeadShapeAt(o);
  p.qHeads = shape.qHeads;
  p.kvHeads = shape.kvHeads;
  p.headDim = shape.headDim;
  p.dtype = KeyDtype(o);
  p.scale = Float(o, "scale");
  AttendArrays io = AttendArraysAt(o, size_t(p.qHeads), size_t(p.headDim));
  p.q = io.q.Data();
  p.out = io.out.Data();
  p.lse = io.lse.Data();
  keep.insert(keep.end(), {io.q, io.out, io.lse});
}

// The outputs of a top-k call: outIds and outScores, `keep` entries each.
struct TopkOutputs {
  Napi::Int32Array ids;
  Napi::Float32Array scores;
};
inline TopkOutputs TopkOutputsAt(const Napi::Object& o, size_t keep) {
  return {TypedAt<int32_t>(o, "outIds", keep), TypedAt<float>(o, "outScores", keep)};
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

// o[key]: an array of any length.
inline Napi::Array ArrayAt(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsArray()) throw Napi::TypeError::New(o.Env(), std::string("Expected an array for ") + key);
  return v.As<Napi::Array>();
}

// o[key]: an array of exactly `length` entries.
inline Napi::Array ArrayOf(const Napi::Object& o, const char* key, size_t length) {
  Napi::Array a = ArrayAt(o, key);
  if (a.Length() != length)
    throw Napi::RangeError::New(o.Env(), std::string(key) + " must have " + std::to_string(length) + " entries");
  return a;
}

// o[key]: an array of n integers in [lo, hi]. The entry's name is built only
// for an error: a decode step reads these every call.
inline std::vector<int64_t> Ints(const Napi::Object& o, const char* key, size_t n, int64_t lo, int64_t hi) {
  Napi::Array a = ArrayOf(o, key, n);
  std::vector<int64_t> v;
  v.reserve(n);
  for (uint32_t i = 0; i < a.Length(); ++i) {
    const Napi::Value x = a.Get(i);
    // The range first: the cast is defined only for a finite value in range (NaN fails both compares).
    const double d = x.IsNumber() ? x.As<Napi::Number>().DoubleValue() : NAN;
    if (d >= double(lo) && d <= double(hi) && d == double(int64_t(d))) v.push_back(int64_t(d));
    else v.push_back(IntValue(x, std::string(key) + "[" + std::to_string(i) + "]", lo, hi));  // throws
  }
  return v;
}

// A typed array over the vector's own memory: the vector moves into the
// array buffer, which frees it when collected. Results of tens to hundreds
// of KiB per call (a layer-step's ids) are then not copied a second time.
template <typename T>
Napi::TypedArrayOf<T> Adopt(Napi::Env env, std::vector<T>&& v) {
  const size_t n = v.size();
  if (n == 0) return Napi::TypedArrayOf<T>::New(env, 0);
  auto* held = new std::vector<T>(std::move(v));
  napi_value buffer = nullptr;
  const napi_status st = napi_create_external_arraybuffer(
      env, held->data(), n * sizeof(T), [](napi_env, void*, void* h) { delete static_cast<std::vector<T>*>(h); }, held, &buffer);
  if (st != napi_ok) {
    // Runtimes with V8's sandbox (Electron) refuse external buffers: copy instead.
    Napi::TypedArrayOf<T> copy = Napi::TypedArrayOf<T>::New(env, n);
    std::copy(held->begin(), held->end(), copy.Data());
    delete held;
    return copy;
  }
  return Napi::TypedArrayOf<T>::New(env, n, Napi::ArrayBuffer(env, buffer), 0);
}

// info[0]: the bytes a class's load() parses.
inline Napi::Uint8Array BytesArg(const Napi::CallbackInfo& info) {
  if (info.Length() < 1) throw Napi::TypeError::New(info.Env(), "Expected a Uint8Array for bytes");
  return Typed<uint8_t>(info[0], "bytes");
}

// Runs work() on a libuv thread and settles a promise with result(env).
// `keep` holds the JS objects whose memory work() reads or writes, so the
// garbage collector cannot free them while it runs: gathered in one JS
// array held by one reference. (A reference each was a small native
// allocation each, 35 for a decode step's attend, freed as it settles:
// after a stacked batch of 32 on the CPU backend glibc sorted those ~1100
// chunks out at its next large allocation, the next request's socket read,
// which then reached the server 55-70 us later on the 2-core VM.)
template <typename Work, typename Result>
class PromiseWorker : public Napi::AsyncWorker {
 public:
  PromiseWorker(Napi::Env env, std::vector<Napi::Value> keep, Work work, Result result)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), work_(std::move(work)),
        result_(std::move(result)) {
    if (keep.empty()) return;
    Napi::Array held = Napi::Array::New(env, keep.size());
    for (uint32_t i = 0; i < keep.size(); ++i) held.Set(i, keep[i]);
    keep_ = Napi::Persistent(held);
  }
  Napi::Promise Promise() const { return deferred_.Promise(); }
  // std::invalid_argument (arguments or data the native code refuses: keys
  // beyond what k-means can cluster, a bad seed) rejects as a RangeError,
  // as a synchronous check's would (HTTP 422 at the edge); anything else
  // as an Error.
  void Execute() override {
    try {
      work_();
    } catch (const std::invalid_argument& e) {
      refused_ = true;
      SetError(e.what());
    } catch (const std::exception& e) {
      SetError(e.what());
    }
  }
  void OnOK() override { deferred_.Resolve(result_(Env())); }
  void OnError(const Napi::Error& e) override {
    if (refused_) {
      deferred_.Reject(Napi::RangeError::New(Env(), e.Message()).Value());
    } else {
      deferred_.Reject(e.Value());
    }
  }

 private:
  Napi::Promise::Deferred deferred_;
  Work work_;
  Result result_;
  Napi::Reference<Napi::Array> keep_;
  bool refused_ = false;
};

template <typename Work, typename Result>
Napi::Promise RunAsync(Napi::Env env, std::vector<Napi::Value> keep, Work work, Result result) {
  auto* w = new PromiseWorker<Work, Result>(env, std::move(keep), std::move(work), std::move(result));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

// RunAsync's work run now, on the calling thread (the event loop's), when
// `now`: the same work and result, and a promise settled the same way
// (resolved with result(env), or rejected with an Error of the exception's
// message, as PromiseWorker's OnError), only already settled. A short
// device call waits on its stream here instead of paying libuv's two
// cross-thread wake-ups (addon/device-calls.ts chooses).
template <typename Work, typename Result>
Napi::Promise RunNowOrAsync(Napi::Env env, bool now, std::vector<Napi::Value> keep, Work work, Result result) {
  if (!now) return RunAsync(env, std::move(keep), std::move(work), std::move(result));
  Napi::Promise::Deferred deferred = Napi::Promise::Deferred::New(env);
  std::string error;
  try {
    work();
  } catch (const std::exception& e) {
    error = e.what();
  }
  // An empty message counts as success there too (AsyncWorker tells an error by its message).
  if (!error.empty()) deferred.Reject(Napi::Error::New(env, error).Value());
  else deferred.Resolve(result(env));
  return deferred.Promise();
}

}  // namespace kvr
