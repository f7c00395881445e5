// The constructor of an ObjectWrap class, one per N-API environment (the
// main thread and each worker thread load the addon separately), released
// when its environment shuts down; and the two other pieces every class
// wrapping a built native object has (IvfIndex, RaGraph): the object handed
// to its constructor by its static factories, and its bytes counted as
// external memory while held.
#pragma once

#include <napi.h>

#include <mutex>
#include <string>
#include <unordered_map>

namespace kvr {

class ClassRegistry {
 public:
  void Add(Napi::Env env, Napi::Function ctor) {
    auto* ref = new Napi::FunctionReference(Napi::Persistent(ctor));
    {
      std::lock_guard<std::mutex> lock(mu_);
      ctors_[napi_env(env)] = ref;
    }
    napi_env raw = env;
    env.AddCleanupHook([this, raw]() {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = ctors_.find(raw);
      if (it != ctors_.end()) {
        delete it->second;
        ctors_.erase(it);
      }
    });
  }

  Napi::Function Get(Napi::Env env, const char* cls) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = ctors_.find(napi_env(env));
    if (it == ctors_.end()) throw Napi::Error::New(env, std::string(cls) + ": class not initialised in this environment");
    return it->second->Value();
  }

 private:
  std::mutex mu_;
  std::unordered_map<napi_env, Napi::FunctionReference*> ctors_;
};

// A class this build cannot make (no CUDA, say): exported under its name so
// callers find it, its constructor throws `why`.
class Unavailable : public Napi::ObjectWrap<Unavailable> {
 public:
  static Napi::Function Define(Napi::Env env, const char* name, const char* why) {
    return DefineClass(env, name, {}, const_cast<char*>(why));
  }
  explicit Unavailable(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Unavailable>(info) {
    throw Napi::Error::New(info.Env(), static_cast<const char*>(info.Data()));
  }
};

// The object a class's build() or load() passes its constructor inside an
// External, which script cannot forge: anything else is refused with `refusal`.
template <typename T>
T* FactoryArg(const Napi::CallbackInfo& info, const char* refusal) {
  if (info.Length() != 1 || !info[0].IsExternal()) throw Napi::TypeError::New(info.Env(), refusal);
  return info[0].As<Napi::External<T>>().Data();
}

// A native object's bytes as the JS heap's external memory, so the collector
// weighs a small wrapper by what it keeps alive; given back on Drop.
class ExternalMemory {
 public:
  void Hold(Napi::Env env, int64_t bytes) {
    env_ = env;
    bytes_ = bytes;
    Napi::MemoryManagement::AdjustExternalMemory(env, bytes);
  }
  void Drop() {
    Napi::MemoryManagement::AdjustExternalMemory(env_, -bytes_);
    bytes_ = 0;
  }

 private:
  napi_env env_ = nullptr;
  int64_t bytes_ = 0;
};

}  // namespace kvr
