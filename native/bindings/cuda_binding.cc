// CUDA decode path for JS (compiled by the host compiler; the kernels live in
// native/cuda/*.cu, built by nvcc when binding.gyp finds it, with KVR_CUDA=1).
//
// cudaAvailable() -> {ok, device, memory, freeMemory, smCount, computeCapability}, or {ok: false, error, memory: 0, ...}
//   never throws; ok is false (error: why) without a device, a driver, or a CUDA build.
// new GpuPool({budgetBytes, blockSize, headDim, dtype, stagingBytes?})
//   .upload({client, blocks: Int32Array, k: Uint16Array, v: Uint16Array, priority?, priorities?: Uint8Array,
//            indexed?, hold?}) -> Int32Array slots (hold: pin them too, for the step's attend)
//     k/v: the blocks back to back, or (indexed) a whole head's rows with block b at b*blockSize*headDim
//   .uploadMany({clients: number[], blocks: Int32Array[], k: Uint16Array[], v: Uint16Array[], priorities?: Uint8Array[],
//                priority?, hold?}) -> Int32Array (every client's slots back to back)
//     upload (indexed) of each client in one call: with hold, their misses copied by one flush, all held or none
//   .lookup({client, blocks}) -> Int32Array (slot or -1)
//   .pin({client, blocks, pinned}) / .prefer({client, blocks, priority}) / .release(client)
//   .pinMany({clients: number[], blocks: Int32Array[], pinned})
//   .releaseRange(first, last) -> blocks freed (every client in [first, last))
//   .holdRange({client, first, count, k, v, priority?}) -> hold id (k/v: a whole head's rows, as indexed)
//   .holdRanges({clients: number[], first, count, k: Uint16Array[], v: Uint16Array[], priority?}) -> Float64Array ids
//     (the same blocks of several clients, a part's kv heads, in one call: all held or none)
//   .unhold(hold | Float64Array of holds)
//   .attend({q, qHeads, kvHeads, scale, tables: (Int32Array | (Int32Array | {hold, blocks})[])[kvHeads],
//            validTokens: number[kvHeads], out, lse, splits?, sync?}) -> Promise<work ms>
//     (sync: run on the calling thread, the promise settled already, the same way)
//     a head's table: slot ids, or pieces back to back (slot ids, or a held range's device table)
//   .stats() / .resetCounters() / .sync() / .probeH2D(bytes, iters) -> bytes/s / .close()
// Without CUDA the same names exist: cudaAvailable() says ok: false and the
// GpuPool constructor throws.
#include <napi.h>

#include <algorithm>
#include <chrono>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "common/binding_args.h"
#include "common/class_registry.h"

#ifdef KVR_CUDA
#include "cuda/block_pool.h"
#endif

namespace kvr {
namespace {

#ifdef KVR_CUDA

Napi::Value CudaAvailable(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  cuda::DeviceInfo d;
  try {
    d = cuda::QueryDevice();
  } catch (...) {
    d.ok = false;
    d.device = "CUDA query failed";
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("ok", Napi::Boolean::New(env, d.ok));
  // QueryDevice's `device` is the name, or why there is none: the two go out under their own keys.
  o.Set(d.ok ? "device" : "error", Napi::String::New(env, d.device));
  o.Set("memory", Napi::Number::New(env, double(d.memory)));
  o.Set("freeMemory", Napi::Number::New(env, double(d.freeMemory)));
  o.Set("smCount", Napi::Number::New(env, d.smCount));
  o.Set("computeCapability", Napi::String::New(env, std::to_string(d.major) + "." + std::to_string(d.minor)));
  o.Set("built", Napi::Boolean::New(env, true));
  return o;
}

class GpuPool : public Napi::ObjectWrap<GpuPool> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "GpuPool",
                       {InstanceMethod("upload", &GpuPool::Upload), InstanceMethod("uploadMany", &GpuPool::UploadMany),
                        InstanceMethod("lookup", &GpuPool::Lookup), InstanceMethod("pin", &GpuPool::Pin),
                        InstanceMethod("pinMany", &GpuPool::PinMany), InstanceMethod("prefer", &GpuPool::Prefer),
                        InstanceMethod("release", &GpuPool::Release), InstanceMethod("releaseRange", &GpuPool::ReleaseRange),
                        InstanceMethod("holdRange", &GpuPool::HoldRange), InstanceMethod("holdRanges", &GpuPool::HoldRanges),
                        InstanceMethod("unhold", &GpuPool::Unhold),
                        InstanceMethod("attend", &GpuPool::Attend),
                        InstanceMethod("stats", &GpuPool::Stats), InstanceMethod("resetCounters", &GpuPool::Reset),
                        InstanceMethod("sync", &GpuPool::Sync), InstanceMethod("probeH2D", &GpuPool::ProbeH2D),
                        InstanceMethod("close", &GpuPool::Close)});
  }

  explicit GpuPool(const Napi::CallbackInfo& info) : Napi::ObjectWrap<GpuPool>(info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    cuda::PoolConfig c;
    c.budgetBytes = Int(o, "budgetBytes", 1, int64_t(1) << 50);
    c.blockSize = int(Int(o, "blockSize", 1, 4096));
    c.headDim = int(Int(o, "headDim", 64, 128));
    c.dtype = KeyDtype(o);
    c.stagingBytes = OptInt(o, "stagingBytes", 1 << 20, int64_t(1) << 34, c.stagingBytes);
    pool_ = Guard(env, [&] { return std::make_shared<cuda::BlockPool>(c); });
  }

 private:
  std::shared_ptr<cuda::BlockPool> pool_;

  cuda::BlockPool& Pool(Napi::Env env) {
    if (!pool_) throw Napi::Error::New(env, "GpuPool is closed");
    return *pool_;
  }
  size_t BlockWords(Napi::Env env) {
    auto& c = Pool(env).Config();
    return size_t(c.blockSize) * c.headDim;
  }
  static constexpr int64_t kMaxClient = int64_t(1) << 53;
  static int64_t Client(const Napi::Object& o) { return Int(o, "client", 0, kMaxClient); }

  Napi::Value Upload(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    const int64_t client = Client(o);
    auto blocks = TypedAt<int32_t>(o, "blocks");
    const size_t n = blocks.ElementLength();
    const bool indexed = Flag(o, "indexed", false);
    size_t words = n * BlockWords(env);
    if (indexed) {
      // Every block read must lie inside the arrays: the largest id bounds them.
      int64_t top = -1;
      for (size_t i = 0; i < n; ++i) {
        if (blocks.Data()[i] < 0) throw Napi::RangeError::New(env, "blocks: negative block id");
        top = std::max<int64_t>(top, blocks.Data()[i]);
      }
      words = size_t(top + 1) * BlockWords(env);
    }
    auto k = TypedAt<uint16_t>(o, "k", words);
    auto v = TypedAt<uint16_t>(o, "v", words);
    cuda::BlockPool::EnsureOptions opt;
    opt.source = indexed ? cuda::BlockPool::Source::kIndexed : cuda::BlockPool::Source::kPacked;
    opt.priority = int(OptInt(o, "priority", -1000000, 1000000, opt.priority));
    if (auto pr = OptTypedAt<uint8_t>(o, "priorities", n)) opt.priorities = pr->Data();
    opt.hold = Flag(o, "hold", false);
    auto slots = Napi::Int32Array::New(env, n);
    Guard(env, [&] { Pool(env).Ensure(client, blocks.Data(), int64_t(n), k.Data(), v.Data(), slots.Data(), opt); });
    return slots;
  }

  // clients[i] and blocks[i] of the "clients" and "blocks" arrays: a step's lists, kv heads x block parts (a
  // session's documents), so not bounded by the heads.
  static std::vector<cuda::BlockPool::ClientBlocks> Items(Napi::Env env, const Napi::Object& o) {
    Napi::Array cl = ArrayAt(o, "clients");
    const size_t n = cl.Length();
    if (n < 1 || n > (size_t(1) << 24)) throw Napi::RangeError::New(env, "clients: 1 to 2^24 of them");
    Napi::Array bl = ArrayOf(o, "blocks", n);
    std::vector<cuda::BlockPool::ClientBlocks> items(n);
    for (uint32_t i = 0; i < n; ++i) {
      items[i].client = IntValue(cl.Get(i), "clients[" + std::to_string(i) + "]", 0, kMaxClient);
      auto b = Typed<int32_t>(bl.Get(i), "blocks entry");
      items[i].blocks = b.Data();
      items[i].n = int64_t(b.ElementLength());
    }
    return items;
  }

  Napi::Value UploadMany(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    std::vector<cuda::BlockPool::ClientBlocks> items = Items(env, o);
    const size_t n = items.size();
    Napi::Array ks = ArrayOf(o, "k", n), vs = ArrayOf(o, "v", n);
    Napi::Value prs = o.Get("priorities");
    const bool perBlock = !Absent(prs);
    Napi::Array pr = perBlock ? ArrayOf(o, "priorities", n) : Napi::Array();
    size_t total = 0;
    for (uint32_t i = 0; i < n; ++i) {
      cuda::BlockPool::ClientBlocks& it = items[i];
      // Every block read must lie inside the arrays: the largest id bounds them.
      int64_t top = -1;
      for (int64_t j = 0; j < it.n; ++j) {
        if (it.blocks[j] < 0) throw Napi::RangeError::New(env, "blocks[" + std::to_string(i) + "]: negative block id");
        top = std::max<int64_t>(top, it.blocks[j]);
      }
      const size_t words = size_t(top + 1) * BlockWords(env);
      it.k = Typed<uint16_t>(ks.Get(i), "k entry", words).Data();
      it.v = Typed<uint16_t>(vs.Get(i), "v entry", words).Data();
      if (perBlock) it.priorities = Typed<uint8_t>(pr.Get(i), "priorities entry", size_t(it.n)).Data();
      total += size_t(it.n);
    }
    cuda::BlockPool::EnsureOptions opt;
    opt.priority = int(OptInt(o, "priority", -1000000, 1000000, opt.priority));
    opt.hold = Flag(o, "hold", false);
    auto slots = Napi::Int32Array::New(env, total);
    Guard(env, [&] { Pool(env).EnsureMany(items.data(), int(n), opt, slots.Data()); });
    return slots;
  }

  Napi::Value PinMany(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    std::vector<cuda::BlockPool::ClientBlocks> items = Items(env, o);
    const bool pinned = Flag(o, "pinned", true);
    Pool(env).PinMany(items.data(), int(items.size()), pinned);
    return env.Undefined();
  }

  Napi::Value Lookup(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    const int64_t client = Client(o);
    auto blocks = TypedAt<int32_t>(o, "blocks");
    auto slots = Napi::Int32Array::New(env, blocks.ElementLength());
    Pool(env).Lookup(client, blocks.Data(), int64_t(blocks.ElementLength()), slots.Data());
    return slots;
  }

  Napi::Value Pin(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    auto blocks = TypedAt<int32_t>(o, "blocks");
    const bool pinned = Flag(o, "pinned", true);
    Pool(env).Pin(Client(o), blocks.Data(), int64_t(blocks.ElementLength()), pinned);
    return env.Undefined();
  }

  Napi::Value Prefer(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    auto blocks = TypedAt<int32_t>(o, "blocks");
    const int priority = int(Int(o, "priority", -1000000, 1000000));
    Pool(env).Prefer(Client(o), blocks.Data(), int64_t(blocks.ElementLength()), priority);
    return env.Undefined();
  }

  Napi::Value Release(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Pool(env).Release(IntArg(info, 0, "client", 0, kMaxClient));
    return env.Undefined();
  }

  Napi::Value ReleaseRange(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int64_t first = IntArg(info, 0, "first", 0, kMaxClient), last = IntArg(info, 1, "last", 0, kMaxClient);
    return Napi::Number::New(env, double(Pool(env).ReleaseRange(first, last)));
  }

  Napi::Value HoldRange(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    const int64_t client = Client(o);
    const int64_t first = Int(o, "first", 0, std::numeric_limits<int32_t>::max());
    const int64_t count = Int(o, "count", 1, std::numeric_limits<int32_t>::max() - first);
    // Every block read must lie inside the arrays.
    const size_t words = size_t(first + count) * BlockWords(env);
    auto k = TypedAt<uint16_t>(o, "k", words);
    auto v = TypedAt<uint16_t>(o, "v", words);
    const int priority = int(OptInt(o, "priority", -1000000, 1000000, 0));
    const int64_t id = Guard(env, [&] { return Pool(env).HoldRange(client, int32_t(first), int32_t(count), k.Data(), v.Data(), priority); });
    return Napi::Number::New(env, double(id));
  }

  Napi::Value HoldRanges(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    Napi::Array cl = ArrayAt(o, "clients");
    const size_t n = cl.Length();
    if (n < 1 || n > 1024) throw Napi::RangeError::New(env, "clients: 1 to 1024 of them");
    const int64_t first = Int(o, "first", 0, std::numeric_limits<int32_t>::max());
    const int64_t count = Int(o, "count", 1, std::numeric_limits<int32_t>::max() - first);
    const size_t words = size_t(first + count) * BlockWords(env);
    Napi::Array ks = ArrayOf(o, "k", n), vs = ArrayOf(o, "v", n);
    std::vector<int64_t> clients(n), ids(n);
    std::vector<const uint16_t*> k(n), v(n);
    for (uint32_t i = 0; i < n; ++i) {
      clients[i] = IntValue(cl.Get(i), "clients[" + std::to_string(i) + "]", 0, kMaxClient);
      // Every block read must lie inside the arrays.
      k[i] = Typed<uint16_t>(ks.Get(i), "k entry", words).Data();
      v[i] = Typed<uint16_t>(vs.Get(i), "v entry", words).Data();
    }
    const int priority = int(OptInt(o, "priority", -1000000, 1000000, 0));
    Guard(env, [&] {
      Pool(env).HoldRanges(clients.data(), int(n), int32_t(first), int32_t(count), k.data(), v.data(), priority, ids.data());
    });
    auto out = Napi::Float64Array::New(env, n);
    for (size_t i = 0; i < n; ++i) out[i] = double(ids[i]);
    return out;
  }

  Napi::Value Unhold(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    std::vector<int64_t> ids;
    if (info.Length() > 0 && info[0].IsTypedArray()) {
      auto list = Typed<double>(info[0], "holds");
      for (size_t i = 0; i < list.ElementLength(); ++i) {
        const double x = list[i];
        if (!(x >= 1 && x <= double(kMaxClient) && x == double(int64_t(x))))
          throw Napi::RangeError::New(env, "holds[" + std::to_string(i) + "] is not a hold id");
        ids.push_back(int64_t(x));
      }
    } else {
      ids.push_back(IntArg(info, 0, "hold", 1, kMaxClient));
    }
    Guard(env, [&] { Pool(env).Unhold(ids.data(), int(ids.size())); });
    return env.Undefined();
  }

  // A head's table given as pieces: slot ids (checked here) or {hold, blocks} (checked by the pool, under its lock).
  static std::vector<cuda::TablePiece> Pieces(Napi::Env env, const Napi::Array& list, int head, int64_t slots, int64_t* blocks) {
    std::vector<cuda::TablePiece> out(list.Length());
    *blocks = 0;
    for (uint32_t i = 0; i < list.Length(); ++i) {
      Napi::Value x = list.Get(i);
      const std::string what = "tables[" + std::to_string(head) + "][" + std::to_string(i) + "]";
      if (x.IsTypedArray()) {
        auto t = Typed<int32_t>(x, what.c_str());
        for (size_t j = 0; j < t.ElementLength(); ++j)
          if (t[j] < 0 || t[j] >= slots) throw Napi::RangeError::New(env, what + " holds " + std::to_string(t[j]) + ", not a slot of the pool");
        out[i].slots.assign(t.Data(), t.Data() + t.ElementLength());
      } else {
        Napi::Object p = ObjectOf(x, what);
        out[i].hold = Int(p, "hold", 1, kMaxClient);
        out[i].blocks = Int(p, "blocks", 0, std::numeric_limits<int32_t>::max());
      }
      *blocks += out[i].hold > 0 ? out[i].blocks : int64_t(out[i].slots.size());
    }
    return out;
  }

  Napi::Value Attend(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    std::shared_ptr<cuda::BlockPool> pool = pool_;
    if (!pool) throw Napi::Error::New(env, "GpuPool is closed");
    const int d = pool->Config().headDim;
    cuda::AttendArgs a;
    a.qHeads = int(Int(o, "qHeads", 1, 1024));
    a.kvHeads = int(Int(o, "kvHeads", 1, 1024));
    if (a.qHeads % a.kvHeads != 0) throw Napi::RangeError::New(env, "qHeads must be a multiple of kvHeads");
    a.scale = Float(o, "scale");
    a.splits = int(OptInt(o, "splits", 1, 4096, a.splits));
    AttendArrays io = AttendArraysAt(o, size_t(a.qHeads), size_t(d));
    a.q = io.q.Data();
    a.out = io.out.Data();
    a.lse = io.lse.Data();
    std::vector<Napi::Value> keep{io.q, io.out, io.lse};
    Napi::Array tables = ArrayOf(o, "tables", size_t(a.kvHeads));
    Napi::Array valid = ArrayOf(o, "validTokens", size_t(a.kvHeads));
    const int64_t bs = pool->Config().blockSize, slots = pool->Slots();
    // Pieces for every head once one head has them (a held range); plain tables otherwise, as before.
    bool pieces = false;
    for (int h = 0; h < a.kvHeads; ++h) pieces |= tables.Get(h).IsArray();
    for (int h = 0; pieces && h < a.kvHeads; ++h) {
      Napi::Value th = tables.Get(h);
      int64_t blocks = 0;
      if (th.IsArray()) {
        a.pieces.push_back(Pieces(env, th.As<Napi::Array>(), h, slots, &blocks));
      } else {
        auto t = Typed<int32_t>(th, "tables entry");
        Napi::Array one = Napi::Array::New(env, 1);
        one.Set(uint32_t(0), t);
        a.pieces.push_back(Pieces(env, one, h, slots, &blocks));
      }
      Napi::Value vv = valid.Get(h);
      if (!vv.IsNumber()) throw Napi::TypeError::New(env, "Expected numbers in validTokens");
      const double vt = vv.As<Napi::Number>().DoubleValue();
      if (!(vt >= 0 && vt <= double(blocks * bs)) || vt != double(int64_t(vt)))  // the range before the cast (NaN fails it)
        throw Napi::RangeError::New(env, "validTokens[" + std::to_string(h) + "] must be an integer in [0, blocks * blockSize]");
      a.validTokens.push_back(int64_t(vt));
    }
    for (int h = 0; !pieces && h < a.kvHeads; ++h) {
      auto t = Typed<int32_t>(tables.Get(h), "tables entry");
      Napi::Value vv = valid.Get(h);
      if (!vv.IsNumber()) throw Napi::TypeError::New(env, "Expected numbers in validTokens");
      const double vt = vv.As<Napi::Number>().DoubleValue();
      if (!(vt >= 0 && vt <= double(int64_t(t.ElementLength()) * bs)) || vt != double(int64_t(vt)))  // the range before the cast
        throw Napi::RangeError::New(env, "validTokens[" + std::to_string(h) + "] must be an integer in [0, blocks * blockSize]");
      const int64_t need = (int64_t(vt) + bs - 1) / bs;
      for (int64_t i = 0; i < need; ++i)
        if (t[size_t(i)] < 0 || t[size_t(i)] >= slots)
          throw Napi::RangeError::New(env, "tables[" + std::to_string(h) + "][" + std::to_string(i) + "] = " +
                                               std::to_string(t[size_t(i)]) + " is not a slot of the pool");
      a.tables.emplace_back(t.Data(), t.Data() + need);
      a.validTokens.push_back(int64_t(vt));
    }
    // sync: run now on this thread (addon/device-calls.ts: a short attend skips libuv's two wake-ups). Either
    // way the promise resolves with the work's own ms (the next call's expectation).
    const bool now = Flag(o, "sync", false);
    auto workMs = std::make_shared<double>(0);
    return RunNowOrAsync(
        env, now, std::move(keep),
        [pool, a, workMs]() {
          const auto t0 = std::chrono::steady_clock::now();
          pool->Attend(a);
          *workMs = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        },
        [workMs](Napi::Env e) { return Napi::Number::New(e, *workMs); });
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    cuda::PoolStats s = Pool(env).Stats();
    Napi::Object o = Napi::Object::New(env);
    o.Set("slots", Napi::Number::New(env, double(s.slots)));
    o.Set("used", Napi::Number::New(env, double(s.used)));
    o.Set("pinned", Napi::Number::New(env, double(s.pinned)));
    o.Set("hits", Napi::Number::New(env, double(s.hits)));
    o.Set("misses", Napi::Number::New(env, double(s.misses)));
    o.Set("evictions", Napi::Number::New(env, double(s.evictions)));
    o.Set("bytesCopied", Napi::Number::New(env, double(s.bytesCopied)));
    o.Set("copies", Napi::Number::New(env, double(s.copies)));
    o.Set("rangeHeld", Napi::Number::New(env, double(s.rangeHeld)));
    o.Set("rangeReuses", Napi::Number::New(env, double(s.rangeReuses)));
    o.Set("rangePatched", Napi::Number::New(env, double(s.rangePatched)));
    o.Set("lastKernelMs", Napi::Number::New(env, double(pool_->LastKernelMs())));
    return o;
  }

  Napi::Value Reset(const Napi::CallbackInfo& info) {
    Pool(info.Env()).ResetCounters();
    return info.Env().Undefined();
  }

  Napi::Value Sync(const Napi::CallbackInfo& info) {
    Guard(info.Env(), [&] { Pool(info.Env()).Sync(); });
    return info.Env().Undefined();
  }

  Napi::Value ProbeH2D(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int64_t bytes = IntArg(info, 0, "bytes", 1, int64_t(1) << 34);
    const int iters = int(IntArg(info, 1, "iters", 1, std::numeric_limits<int32_t>::max()));
    return Napi::Number::New(env, Guard(env, [&] { return Pool(env).ProbeH2D(bytes, iters); }));
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    pool_.reset();  // an attend in flight keeps its own reference
    return info.Env().Undefined();
  }
};

#else  // no CUDA build

Napi::Value CudaAvailable(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("ok", Napi::Boolean::New(env, false));
  o.Set("error", Napi::String::New(env, "kvrecall was built without CUDA (nvcc not found)"));
  o.Set("memory", Napi::Number::New(env, 0));
  o.Set("built", Napi::Boolean::New(env, false));
  return o;
}

struct GpuPool {
  static Napi::Function Define(Napi::Env env) { return Unavailable::Define(env, "GpuPool", "kvrecall was built without CUDA"); }
};

#endif

}  // namespace

void InitCuda(Napi::Env env, Napi::Object exports) {
  exports.Set("cudaAvailable", Napi::Function::New(env, CudaAvailable));
  Napi::Function ctor = GpuPool::Define(env);
  exports.Set("GpuPool", ctor);
}

}  // namespace kvr
