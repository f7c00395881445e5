// The constructor of an ObjectWrap class, one per N-API environment (the
// main thread and each worker thread load the addon separately), released
// when its environment shuts down.
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

}  // namespace kvr
