// The faiss-backed exports:
//   class IvfIndex
//     static build({keys, tokens, headDim, dtype, nlist, seed}) -> Promise<IvfIndex>
//     static load(bytes: Uint8Array) -> IvfIndex            (throws on corrupt bytes)
//     save() -> Uint8Array
//     search({q, group, k, nprobe, outIds, outScores, scan?: 'native' | 'faiss', scale?}) -> {count, scanned}
//       (synchronous)
//     dispose(); tokens, headDim, nlist, memoryBytes (getters)
//   kmeans({keys, tokens, headDim, dtype, clusters, iterations, seed})
//     -> Promise<{centroids: Float32Array, assign: Int32Array, sizes: Int32Array}>
//   kmeansMany([{keys, tokens, headDim, dtype, clusters, iterations, seed}, ...])
//     -> Promise<[{centroids, assign, sizes}, ...]>   (independent problems side by side)
//   kmeansManyDevice([...]) -> the same, on the GPU (native/cuda/kmeans_device.h: every problem with the same
//     headDim, dtype and iterations); without a CUDA build it throws
#include <napi.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/binding_args.h"
#include "common/class_registry.h"
#include "indexes/ivf_index.h"
#include "indexes/kmeans.h"
#ifdef KVR_CUDA
#include "cuda/kmeans_device.h"
#endif

namespace kvr {
namespace {

constexpr int64_t kMaxTokens = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxSeed = (int64_t(1) << 31) - 1;

class IvfIndexJs : public Napi::ObjectWrap<IvfIndexJs> {
 public:
  static Napi::Function Define(Napi::Env env) {
    Napi::Function ctor =
        DefineClass(env, "IvfIndex",
                    {StaticMethod<&IvfIndexJs::Build>("build"), StaticMethod<&IvfIndexJs::Load>("load"),
                     InstanceMethod<&IvfIndexJs::Save>("save"), InstanceMethod<&IvfIndexJs::Search>("search"),
                     InstanceMethod<&IvfIndexJs::Dispose>("dispose"),
                     InstanceAccessor<&IvfIndexJs::TokensJs>("tokens"),
                     InstanceAccessor<&IvfIndexJs::HeadDimJs>("headDim"),
                     InstanceAccessor<&IvfIndexJs::NlistJs>("nlist"),
                     InstanceAccessor<&IvfIndexJs::MemoryBytesJs>("memoryBytes")});
    registry_.Add(env, ctor);
    return ctor;
  }

  // Only build() and load() construct: they pass the native index inside an
  // External, which script cannot forge.
  explicit IvfIndexJs(const Napi::CallbackInfo& info) : Napi::ObjectWrap<IvfIndexJs>(info) {
    index_ = std::move(*FactoryArg<std::unique_ptr<IvfIndex>>(info, "IvfIndex is made by IvfIndex.build() or IvfIndex.load()"));
    if (!index_) throw Napi::TypeError::New(info.Env(), "IvfIndex: no index");
    memory_.Hold(info.Env(), int64_t(index_->MemoryBytes()));
  }

  ~IvfIndexJs() override { Release(); }

 private:
  static Napi::Object Wrap(Napi::Env env, std::unique_ptr<IvfIndex> index) {
    return registry_.Get(env, "IvfIndex").New({Napi::External<std::unique_ptr<IvfIndex>>::New(env, &index)});
  }

  void Release() {
    if (!index_) return;
    index_.reset();
    memory_.Drop();
  }

  const IvfIndex& Live(Napi::Env env) const {
    if (!index_) throw Napi::Error::New(env, "IvfIndex was disposed");
    return *index_;
  }

  static Napi::Value Build(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    const int64_t tokens = Int(o, "tokens", 1, kMaxTokens);
    const int d = int(Int(o, "headDim", 1, 1024));
    const Dtype dtype = KeyDtype(o);
    const int nlist = int(Int(o, "nlist", 1, std::min<int64_t>(tokens, int64_t(1) << 24)));
    const uint64_t seed = uint64_t(Int(o, "seed", 0, kMaxSeed));
    auto keys = TypedAt<uint16_t>(o, "keys", size_t(tokens) * d);
    const uint16_t* data = keys.Data();
    auto built = std::make_shared<std::unique_ptr<IvfIndex>>();
    return RunAsync(
        env, {keys}, [=]() { *built = IvfIndex::Build(data, tokens, d, dtype, nlist, seed); },
        [built](Napi::Env e) -> Napi::Value { return Wrap(e, std::move(*built)); });
  }

  static Napi::Value Load(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto bytes = BytesArg(info);
    std::unique_ptr<IvfIndex> index =
        Guard(env, [&] { return IvfIndex::Load(bytes.Data(), bytes.ElementLength()); });
    return Wrap(env, std::move(index));
  }

  Napi::Value Save(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const IvfIndex& index = Live(env);
    // Adopted: no second copy of a possibly large index.
    return Adopt(env, Guard(env, [&] { return index.Save(); }));
  }

  Napi::Value Search(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const IvfIndex& index = Live(env);
    Napi::Object o = ArgObject(info);
    const int group = int(Int(o, "group", 1, 1024));
    const int k = int(Int(o, "k", 0, int64_t(1) << 30));
    const int nprobe = int(Int(o, "nprobe", 1, index.Lists()));
    const size_t keep = size_t(std::min<int64_t>(k, index.Tokens()));
    auto q = TypedAt<float>(o, "q", size_t(group) * index.Dim());
    TopkOutputs res = TopkOutputsAt(o, keep);
    IvfIndex::Scan scan = IvfIndex::Scan::kNative;
    Napi::Value s = o.Get("scan");
    if (!Absent(s)) {
      const std::string name = s.IsString() ? s.As<Napi::String>().Utf8Value() : "";
      if (name == "faiss")
        scan = IvfIndex::Scan::kFaiss;
      else if (name != "native")
        throw Napi::TypeError::New(env, "scan must be 'native' or 'faiss'");
    }
    float scale = 0;  // 0: max over the rows; > 0: the group's attention (native scan only)
    Napi::Value sc = o.Get("scale");
    if (!Absent(sc)) {
      const double v = sc.IsNumber() ? sc.As<Napi::Number>().DoubleValue() : -1;
      // Checked as the float it becomes: a tiny double rounds to 0, which would mean the max ranking.
      if (!(float(v) > 0) || !std::isfinite(float(v)) || scan != IvfIndex::Scan::kNative)
        throw Napi::RangeError::New(env, "scale must be a finite float > 0, with scan 'native'");
      scale = float(v);
    }
    IvfSearchResult r = Guard(env, [&] {
      return index.Search(q.Data(), group, k, nprobe, res.ids.Data(), res.scores.Data(), scan, scale);
    });
    Napi::Object out = Napi::Object::New(env);
    out.Set("count", Napi::Number::New(env, double(r.count)));
    out.Set("scanned", Napi::Number::New(env, double(r.scanned)));
    return out;
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    Release();
    return info.Env().Undefined();
  }

  Napi::Value TokensJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(Live(info.Env()).Tokens()));
  }
  Napi::Value HeadDimJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(Live(info.Env()).Dim()));
  }
  Napi::Value NlistJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(Live(info.Env()).Lists()));
  }
  Napi::Value MemoryBytesJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), index_ ? double(index_->MemoryBytes()) : 0.0);
  }

  static ClassRegistry registry_;

  std::unique_ptr<IvfIndex> index_;
  ExternalMemory memory_;
};

ClassRegistry IvfIndexJs::registry_;

// One problem's arguments checked and its outputs allocated; `hold` keeps
// the keys and outputs alive until the work is done.
KmeansProblem KmeansArgs(Napi::Env env, Napi::Object o, Napi::Object out, std::vector<Napi::Value>& hold) {
  KmeansProblem p;
  p.tokens = Int(o, "tokens", 1, kMaxTokens);
  p.headDim = int(Int(o, "headDim", 1, 1024));
  p.dtype = KeyDtype(o);
  p.clusters = int(Int(o, "clusters", 1, std::min<int64_t>(p.tokens, int64_t(1) << 24)));
  p.iterations = int(Int(o, "iterations", 1, 1000));
  p.seed = uint64_t(Int(o, "seed", 0, kMaxSeed));
  auto keys = TypedAt<uint16_t>(o, "keys", size_t(p.tokens) * p.headDim);
  auto centroids = Napi::Float32Array::New(env, size_t(p.clusters) * p.headDim);
  auto assign = Napi::Int32Array::New(env, size_t(p.tokens));
  auto sizes = Napi::Int32Array::New(env, size_t(p.clusters));
  p.keys = keys.Data();
  p.centroids = centroids.Data();
  p.assign = assign.Data();
  p.sizes = sizes.Data();
  out.Set("centroids", centroids);
  out.Set("assign", assign);
  out.Set("sizes", sizes);
  hold.push_back(keys);
  return p;
}

Napi::Value KmeansJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto out = Napi::Object::New(env);
  std::vector<Napi::Value> hold;
  const KmeansProblem p = KmeansArgs(env, ArgObject(info), out, hold);
  hold.push_back(out);
  return RunAsync(
      env, hold, [p]() { Kmeans(p); },
      [ref = std::make_shared<Napi::ObjectReference>(Napi::Persistent(out))](Napi::Env) -> Napi::Value {
        return ref->Value();
      });
}

// kmeansMany's problems on the host (faiss) or the device.
Napi::Value KmeansManyOn(const Napi::CallbackInfo& info, bool device) {
  Napi::Env env = info.Env();
#ifndef KVR_CUDA
  if (device) throw Napi::Error::New(env, "kmeansManyDevice: this build has no CUDA");
#endif
  if (info.Length() < 1 || !info[0].IsArray()) throw Napi::TypeError::New(env, "kmeansMany: expected an array of problems");
  Napi::Array list = info[0].As<Napi::Array>();
  if (list.Length() > (1u << 20)) throw Napi::RangeError::New(env, "kmeansMany: at most 2^20 problems");
  auto outs = Napi::Array::New(env, list.Length());
  std::vector<Napi::Value> hold;
  std::vector<KmeansProblem> problems;
  for (uint32_t i = 0; i < list.Length(); ++i) {
    Napi::Value item = list.Get(i);
    if (!item.IsObject()) throw Napi::TypeError::New(env, "kmeansMany: problem " + std::to_string(i) + " is not an object");
    auto out = Napi::Object::New(env);
    problems.push_back(KmeansArgs(env, item.As<Napi::Object>(), out, hold));
    outs.Set(i, out);
  }
  hold.push_back(outs);
  return RunAsync(
      env, hold,
      [problems, device]() mutable {
#ifdef KVR_CUDA
        if (device) return cuda::KmeansManyDevice(problems);
#endif
        (void)device;
        KmeansMany(problems);
      },
      [ref = std::make_shared<Napi::ObjectReference>(Napi::Persistent(static_cast<Napi::Object>(outs)))](Napi::Env) -> Napi::Value {
        return ref->Value();
      });
}

}  // namespace

void InitFaiss(Napi::Env env, Napi::Object exports) {
  exports.Set("IvfIndex", IvfIndexJs::Define(env));
  exports.Set("kmeans", Napi::Function::New(env, KmeansJs));
  exports.Set("kmeansMany", Napi::Function::New(env, [](const Napi::CallbackInfo& info) { return KmeansManyOn(info, false); }));
  exports.Set("kmeansManyDevice", Napi::Function::New(env, [](const Napi::CallbackInfo& info) { return KmeansManyOn(info, true); }));
}

}  // namespace kvr
