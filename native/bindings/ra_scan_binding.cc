// Retrieval-attention's device code scan for JS (native/cuda/ra_scan.{h,cu};
// compiled by the host compiler, the kernels by nvcc when binding.gyp finds
// it, with KVR_CUDA=1).
//
// raScanSupported(headDim, group) -> boolean (false in a build without CUDA)
// RaScanStore.open({graphs: RaGraph[], keys: Uint16Array[] ([tokens, headDim] each, the keys each graph was
//                    built over), values?: Uint16Array[] (the same shape: attend needs them), tokens, headDim,
//                    dtype, maxGroup, pq?: boolean}) -> Promise<RaScanStore>
//   one kv head per graph: its keys' 4-bit codes (the graph's own, made now where it has none:
//   RaGraph::KeyCodesFor), with pq its PQ codes and their outliers (PqCodesFor: searches with scanKeep need
//   them), its keys and its entry points uploaded, off the event loop; rejects without a device or memory.
//   .addPq({keys: Uint16Array[]}) -> Promise<undefined>: the PQ codes of a store opened without them, made
//     off the loop and uploaded (the same keys as open's); .hasPq() -> boolean
//   .search({q: Float32Array [heads*group*headDim], group, k, maxScanned, scale?,
//            seeds?: Int32Array[] [heads], free?: Int32Array[] [heads], scanKeep?: number in (0, 1],
//            outIds: Int32Array [heads*k], outScores?: Float32Array [heads*k], meta: Float64Array [3*heads + 4],
//            stageTimes?: boolean, sync?: boolean}) -> Promise<undefined>
//     head h's ids (a set) at outIds[h*k ..], meta[h] of them, meta[heads + h] keys scored exactly,
//     meta[2*heads] the call's device ms (LastTimes().totalMs), then the host's ms: the arguments read,
//     the query's int8 weights (and PQ tables) made, the store's Search (staging, the wait, the copy
//     out); then meta[2*heads + 4 + h] the keys whose 4-bit code was read (scanKeep: the PQ first pass,
//     ceil(scanKeep * tokens) kept at least, as the host's scanKeep; else 0);
//     ra_scan.h says what they are. Lists are one Int32Array a kv head, ids in [0, tokens); free ids
//     may repeat (each counts once). sync: the work runs on the calling thread and the promise comes
//     back settled (common/binding_args.h RunNowOrAsync; addon/device-calls.ts chooses).
//   .attend({q: Float32Array [heads*group*headDim], group, scale, ids: Int32Array[] [heads], ranges?: Int32Array
//            ([begin, end) pairs every head attends too), out: Float32Array [heads*group*headDim], lse: Float32Array
//            [heads*group], meta: Float64Array [1], sync?: boolean})
//     -> Promise<undefined>: each q row's attention over its kv head's ranges and listed rows (ra_scan.h
//     RaAttendArgs), meta[0] the call's device ms; a store opened with values only. Seeds and ids are read
//     where they lie until the promise settles: the caller leaves them unchanged meanwhile.
//   .hasValues() -> boolean
//   .bytes() -> device bytes held / .lastTimes() -> RaScanTimes / .close()
#include <napi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/binding_args.h"
#include "common/class_registry.h"
#include "common/thread_pool.h"

#ifdef KVR_CUDA
#include "bindings/ra_graph_handle.h"
#include "cuda/ra_scan.h"
#include "indexes/ra_key_codes.h"
#include "indexes/ra_pq_codes.h"
#endif

namespace kvr {
namespace {

#ifdef KVR_CUDA

Napi::Value Supported(const Napi::CallbackInfo& info) {
  const int64_t d = IntArg(info, 0, "headDim", 1, 1 << 20), g = IntArg(info, 1, "group", 1, 1 << 20);
  return Napi::Boolean::New(info.Env(), cuda::RaScanStore::Supports(int(d), int(g)));
}

// A search's inputs, owned: the JS arrays it reads are copied or held.
struct ScanJob {
  std::shared_ptr<cuda::RaScanStore> store;
  std::vector<std::shared_ptr<const RaKeyCodes>> codes;
  std::vector<std::shared_ptr<const RaPqCodes>> pq;
  cuda::RaScanArgs args;
  std::vector<float> q;
  std::vector<const int32_t*> seeds;  // the JS lists, held by the call
  std::vector<int32_t> seedCounts, freeIds, freeCounts;
  std::vector<int8_t> w8;
  std::vector<float> qscale, qbias, pqBase, pqDelta;
  std::vector<uint64_t> pqLut;
  std::vector<int64_t> counts, scanned, kept;
  double deviceMs = 0, parseMs = 0, prepareMs = 0, searchHostMs = 0;
  std::shared_ptr<std::mutex> lock;  // the store's: one search at a time on it

  void Run() {
    std::lock_guard<std::mutex> hold(*lock);
    const auto t0 = std::chrono::steady_clock::now();
    // Each head's int8 weights (and PQ tables), as the host's code walk and scan make them: a head a task on the
    // native pool, ~0.17 ms of a call serially at 8 heads with scanKeep (H100 host, session 32).
    const cuda::RaScanConfig& cfg = store->Config();
    const int H = cfg.kvHeads, G = args.group, G4 = (G + 3) / 4 * 4, d = cfg.headDim;
    const bool withPq = args.keep > 0;
    const size_t lutN = withPq ? size_t(G4 / 4) * size_t(pq[0]->subspaces()) * RaPqCodes::kCentroids : 0;
    w8.assign(size_t(H) * G4 * d, 0);
    qscale.assign(size_t(H) * G4, 0.f);
    qbias.assign(size_t(H) * G4, 0.f);
    pqLut.assign(size_t(H) * lutN, 0);
    pqBase.assign(withPq ? size_t(H) * G4 : 0, 0.f);
    pqDelta.assign(withPq ? size_t(H) * G4 : 0, 0.f);
    ThreadPool::Get().ParallelFor(size_t(H), [&](size_t h) {
      const float* qh = q.data() + h * size_t(G) * d;
      RaCodeQuery cq;
      codes[h]->Prepare(qh, G, args.scale, cq);
      std::copy(cq.w8.begin(), cq.w8.end(), w8.begin() + h * size_t(G4) * d);
      std::copy(cq.qscale.begin(), cq.qscale.end(), qscale.begin() + h * size_t(G4));
      std::copy(cq.qbias.begin(), cq.qbias.end(), qbias.begin() + h * size_t(G4));
      if (!withPq) return;
      RaPqQuery pqq;  // the nibble tables: the device sums those
      pq[h]->Prepare(qh, G, args.scale, pqq, false);
      std::copy_n(pqq.lut.begin(), std::min(lutN, pqq.lut.size()), pqLut.begin() + h * lutN);
      std::copy(pqq.base.begin(), pqq.base.end(), pqBase.begin() + h * size_t(G4));
      std::copy(pqq.delta.begin(), pqq.delta.end(), pqDelta.begin() + h * size_t(G4));
    });
    if (withPq) {
      args.pqLut = pqLut.data();
      args.pqBase = pqBase.data();
      args.pqDelta = pqDelta.data();
    }
    args.q = q.data();
    args.w8 = w8.data();
    args.qscale = qscale.data();
    args.qbias = qbias.data();
    args.seeds = seeds.data();
    args.seedCounts = seedCounts.data();
    args.freeIds = freeIds.data();
    args.freeCounts = freeCounts.data();
    counts.assign(size_t(H), 0);
    scanned.assign(size_t(H), 0);
    kept.assign(size_t(H), 0);
    args.outCounts = counts.data();
    args.outScanned = scanned.data();
    args.outKept = kept.data();
    prepareMs = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    store->Search(args);
    const cuda::RaScanTimes t = store->LastTimes();  // under the lock: this search's
    deviceMs = t.totalMs;
    searchHostMs = t.hostMs;
  }
};

// Per-head sets of ids (an array of Int32Arrays, one a kv head: the free
// keys, a few hundred a head), ids checked in [0, tokens), copied back to
// back into `ids`, each head's sorted and made distinct in place, with each
// head's count.
void SetsAt(const Napi::Object& o, const char* key, int heads, int64_t tokens, std::vector<int32_t>& ids, std::vector<int32_t>& counts) {
  counts.assign(size_t(heads), 0);
  ids.clear();
  if (Absent(o.Get(key))) return;
  Napi::Array lists = ArrayOf(o, key, size_t(heads));
  size_t total = 0;
  std::vector<Napi::Int32Array> per;
  per.reserve(size_t(heads));
  for (int h = 0; h < heads; ++h) {
    per.push_back(Typed<int32_t>(lists.Get(uint32_t(h)), key));
    total += per.back().ElementLength();
  }
  if (total > size_t(INT32_MAX)) throw Napi::RangeError::New(o.Env(), std::string(key) + " hold too many ids");
  ids.resize(total);
  size_t at = 0;
  for (int h = 0; h < heads; ++h) {
    const Napi::Int32Array& l = per[size_t(h)];
    size_t c = l.ElementLength();
    // Checked while copied, one pass over raw memory.
    const int32_t* src = l.Data();
    int32_t* dst = ids.data() + at;
    bool bad = false;
    for (size_t i = 0; i < c; ++i) {
      const int32_t v = src[i];
      bad |= v < 0 || v >= tokens;
      dst[i] = v;
    }
    if (bad) CheckIds(l, tokens, key);  // names the first bad id
    std::sort(ids.begin() + at, ids.begin() + at + c);
    c = size_t(std::unique(ids.begin() + at, ids.begin() + at + c) - (ids.begin() + at));
    counts[size_t(h)] = int32_t(c);
    at += c;
  }
  ids.resize(at);
}

// Per-head id lists read where they lie (an array of Int32Arrays, one a kv
// head): each one's data pointer and count recorded, the array held by the
// call (`keep`) until it settles. The store gathers them straight into its
// pinned stage and checks each id in [0, tokens) as it copies it
// (ra_scan.cu GatherLists: a refusal rejects the call, nothing queued): a
// step's seeds or selected rows (~86K ids at 1M) were checked here, then
// copied twice, once into a zeroed vector here.
void ListViews(const Napi::Object& o, const char* key, int heads, std::vector<const int32_t*>& ptrs, std::vector<int32_t>& counts,
               std::vector<Napi::Value>& keep) {
  ptrs.assign(size_t(heads), nullptr);
  counts.assign(size_t(heads), 0);
  if (Absent(o.Get(key))) return;
  Napi::Array lists = ArrayOf(o, key, size_t(heads));
  size_t total = 0;
  for (int h = 0; h < heads; ++h) {
    Napi::Int32Array l = Typed<int32_t>(lists.Get(uint32_t(h)), key);
    const size_t c = l.ElementLength();
    total += c;
    if (total > size_t(INT32_MAX)) throw Napi::RangeError::New(o.Env(), std::string(key) + " hold too many ids");
    ptrs[size_t(h)] = l.Data();
    counts[size_t(h)] = int32_t(c);
    keep.push_back(l);
  }
}

// An attend's inputs: q copied, the id lists held (ListViews).
struct AttendJob {
  std::shared_ptr<cuda::RaScanStore> store;
  cuda::RaAttendArgs args;
  std::vector<float> q;
  std::vector<const int32_t*> ids;
  std::vector<int32_t> counts, ranges;
  std::shared_ptr<std::mutex> lock;
  double deviceMs = 0;

  void Run() {
    std::lock_guard<std::mutex> hold(*lock);
    args.q = q.data();
    args.ids = ids.data();
    args.counts = counts.data();
    args.ranges = ranges.data();
    args.rangePairs = int64_t(ranges.size() / 2);
    store->Attend(args);
    deviceMs = store->LastTimes().attendMs;
  }
};

// A call's scale checked and its query rows copied (`qn` floats, each finite); returns qn.
size_t QueryAt(const Napi::Object& o, float scale, size_t qn, std::vector<float>& q) {
  Napi::Env env = o.Env();
  if (!(scale > 0) || !std::isfinite(scale)) throw Napi::RangeError::New(env, "scale must be a finite number > 0");
  Napi::Float32Array from = TypedAt<float>(o, "q");
  if (from.ElementLength() != qn) throw Napi::RangeError::New(env, "q must hold heads * group * headDim floats (" + std::to_string(qn) + ")");
  q.assign(from.Data(), from.Data() + qn);
  for (const float v : q)
    if (!std::isfinite(v)) throw Napi::RangeError::New(env, "q must be finite");
  return qn;
}

// Each graph's PQ codes of its keys (made where it has none: ~1.3 s a head
// at 1M keys on the 2-core VM), set into heads' pq and outliers.
std::vector<std::shared_ptr<const RaPqCodes>> PqHeads(const std::vector<std::shared_ptr<const RaGraph>>& graphs,
                                                      const std::vector<const uint16_t*>& keys, Dtype dtype,
                                                      std::vector<cuda::RaScanHead>& heads) {
  std::vector<std::shared_ptr<const RaPqCodes>> pq;
  for (size_t h = 0; h < graphs.size(); ++h) {
    pq.push_back(graphs[h]->PqCodesFor(keys[h], dtype));
    heads[h].pq = pq.back()->Row(0);
    heads[h].outliers = pq.back()->outliers().data();
    heads[h].outlierCount = int64_t(pq.back()->outliers().size());
  }
  return pq;
}

// What open() makes on a libuv thread, handed to the constructor in an External.
struct Made {
  std::shared_ptr<cuda::RaScanStore> store;
  std::vector<std::shared_ptr<const RaGraph>> graphs;
  std::vector<std::shared_ptr<const RaKeyCodes>> codes;
  std::vector<std::shared_ptr<const RaPqCodes>> pq;
};

class RaScanJs : public Napi::ObjectWrap<RaScanJs> {
 public:
  static Napi::Function Define(Napi::Env env) {
    Napi::Function ctor = DefineClass(env, "RaScanStore",
                                      {StaticMethod<&RaScanJs::Open>("open"), InstanceMethod("search", &RaScanJs::Search),
                                       InstanceMethod("attend", &RaScanJs::Attend), InstanceMethod("hasValues", &RaScanJs::HasValues),
                                       InstanceMethod("hasPq", &RaScanJs::HasPq), InstanceMethod("addPq", &RaScanJs::AddPq),
                                       InstanceMethod("bytes", &RaScanJs::Bytes), InstanceMethod("lastTimes", &RaScanJs::LastTimes),
                                       InstanceMethod("close", &RaScanJs::Close)});
    registry_.Add(env, ctor);
    return ctor;
  }

  // Only open() constructs.
  explicit RaScanJs(const Napi::CallbackInfo& info) : Napi::ObjectWrap<RaScanJs>(info) {
    Made* made = FactoryArg<Made>(info, "RaScanStore is made by RaScanStore.open()");
    store_ = std::move(made->store);
    graphs_ = std::move(made->graphs);
    codes_ = std::move(made->codes);
    pq_ = std::move(made->pq);
  }

 private:
  static ClassRegistry registry_;
  std::shared_ptr<cuda::RaScanStore> store_;
  std::vector<std::shared_ptr<const RaGraph>> graphs_;
  std::vector<std::shared_ptr<const RaKeyCodes>> codes_;
  std::vector<std::shared_ptr<const RaPqCodes>> pq_;
  std::shared_ptr<std::mutex> lock_ = std::make_shared<std::mutex>();

  // The arguments checked here; the codes made (where a graph has none of
  // these keys yet: ~0.3 s a head at 1M keys) and everything uploaded on a
  // libuv thread, so the server answers meanwhile.
  static Napi::Value Open(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    cuda::RaScanConfig c;
    c.tokens = Int(o, "tokens", 1, (int64_t(1) << 31) - 1);
    c.headDim = int(Int(o, "headDim", 1, 1 << 16));
    c.dtype = KeyDtype(o);
    c.maxGroup = int(Int(o, "maxGroup", 1, cuda::RaScanConfig::kMaxGroup));
    if (!cuda::RaScanStore::Supports(c.headDim, c.maxGroup))
      throw Napi::RangeError::New(env, "headDim must be a multiple of 8 in [8, 256]");
    Napi::Array graphs = ArrayAt(o, "graphs");
    c.kvHeads = int(graphs.Length());
    if (c.kvHeads < 1 || c.kvHeads > 1024) throw Napi::RangeError::New(env, "graphs must hold 1 to 1024 graphs");
    Napi::Array keys = ArrayOf(o, "keys", graphs.Length());
    const bool withValues = !Absent(o.Get("values")), withPq = Flag(o, "pq", false);
    Napi::Array values = withValues ? ArrayOf(o, "values", graphs.Length()) : Napi::Array();
    auto made = std::make_shared<Made>();
    auto keyRows = std::make_shared<std::vector<const uint16_t*>>();
    auto valueRows = std::make_shared<std::vector<const uint16_t*>>();
    std::vector<Napi::Value> keep;
    for (int h = 0; h < c.kvHeads; ++h) {
      const std::string what = "graphs entry " + std::to_string(h);
      std::shared_ptr<const RaGraph> g = RaGraphOf(env, graphs.Get(uint32_t(h)), what);
      if (g->tokens() != c.tokens || g->headDim() != c.headDim)
        throw Napi::RangeError::New(env, what + " was built over another shape than tokens x headDim");
      Napi::Uint16Array k = Typed<uint16_t>(keys.Get(uint32_t(h)), "keys entry", size_t(c.tokens) * c.headDim);
      keep.push_back(k);
      keyRows->push_back(k.Data());
      if (withValues) {
        Napi::Uint16Array v = Typed<uint16_t>(values.Get(uint32_t(h)), "values entry", size_t(c.tokens) * c.headDim);
        keep.push_back(v);
        valueRows->push_back(v.Data());
      }
      made->graphs.push_back(std::move(g));
    }
    return RunAsync(
        env, keep,
        [made, keyRows, valueRows, c, withPq]() {
          std::vector<cuda::RaScanHead> heads(size_t(c.kvHeads));
          if (withPq) made->pq = PqHeads(made->graphs, *keyRows, c.dtype, heads);
          for (int h = 0; h < c.kvHeads; ++h) {
            const RaGraph& g = *made->graphs[size_t(h)];
            made->codes.push_back(g.KeyCodesFor((*keyRows)[size_t(h)], c.dtype));
            heads[size_t(h)].codes = made->codes.back()->Row(0);
            heads[size_t(h)].keys = (*keyRows)[size_t(h)];
            if (!valueRows->empty()) heads[size_t(h)].values = (*valueRows)[size_t(h)];
            heads[size_t(h)].entries = g.entries().data();
            heads[size_t(h)].entryCount = int64_t(g.entries().size());
          }
          made->store = std::make_shared<cuda::RaScanStore>(c, heads.data());
        },
        [made](Napi::Env e) -> Napi::Value { return registry_.Get(e, "RaScanStore").New({Napi::External<Made>::New(e, made.get())}); });
  }

  std::shared_ptr<cuda::RaScanStore> Live(Napi::Env env) {
    if (!store_) throw Napi::Error::New(env, "RaScanStore is closed");
    return store_;
  }

  Napi::Value Search(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const auto t0 = std::chrono::steady_clock::now();
    Napi::Object o = ArgObject(info);
    auto job = std::make_shared<ScanJob>();
    job->store = Live(env);
    job->codes = codes_;
    job->pq = pq_;
    job->lock = lock_;
    const cuda::RaScanConfig& c = job->store->Config();
    const int H = c.kvHeads, d = c.headDim;
    cuda::RaScanArgs& a = job->args;
    a.group = int(Int(o, "group", 1, c.maxGroup));
    a.k = Int(o, "k", 1, c.tokens);
    a.maxScanned = Int(o, "maxScanned", 1, (int64_t(1) << 40));
    a.scale = Absent(o.Get("scale")) ? 1.f / std::sqrt(float(d)) : Float(o, "scale");
    QueryAt(o, a.scale, size_t(H) * a.group * d, job->q);
    std::vector<Napi::Value> keep;
    ListViews(o, "seeds", H, job->seeds, job->seedCounts, keep);
    SetsAt(o, "free", H, c.tokens, job->freeIds, job->freeCounts);
    if (!Absent(o.Get("scanKeep"))) {
      const double share = Double(o, "scanKeep");
      if (!(share > 0 && share <= 1)) throw Napi::RangeError::New(env, "scanKeep must be a number in (0, 1]");
      if (job->pq.empty()) throw Napi::Error::New(env, "RaScanStore: this store holds no PQ codes (open it with pq, or addPq) for scanKeep");
      a.keep = int64_t(std::ceil(share * double(c.tokens)));  // the host's ceil(min(1, scanKeep) * n)
    }
    Napi::Int32Array outIds = TypedAt<int32_t>(o, "outIds", size_t(H) * a.k);
    // The scores only where asked: a session takes the ids alone, and a second 344 KB array a call at 1M (k ~10.7K,
    // 8 heads), zeroed and first touched, cost ~0.1-0.25 ms of JS on the 2-core VM against ~0.04 for the ids.
    const bool withScores = !Absent(o.Get("outScores"));
    Napi::Float32Array outScores = withScores ? TypedAt<float>(o, "outScores", size_t(H) * a.k) : Napi::Float32Array();
    a.outIds = outIds.Data();
    a.outScores = withScores ? outScores.Data() : nullptr;
    Napi::Float64Array meta = TypedAt<double>(o, "meta", size_t(3) * H + 4);
    a.stageTimes = Flag(o, "stageTimes", false);
    const bool now = Flag(o, "sync", false);
    double* m = meta.Data();
    job->parseMs = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    // meta is written by the result callback, on the loop's thread, either way.
    keep.push_back(outIds);
    keep.push_back(meta);
    if (withScores) keep.push_back(outScores);
    return RunNowOrAsync(env, now, keep, [job]() { job->Run(); }, [job, m, H](Napi::Env e) -> Napi::Value {
      for (int h = 0; h < H; ++h) {
        m[h] = double(job->counts[size_t(h)]);
        m[H + h] = double(job->scanned[size_t(h)]);
      }
      m[2 * H] = job->deviceMs;
      m[2 * H + 1] = job->parseMs;
      m[2 * H + 2] = job->prepareMs;
      m[2 * H + 3] = job->searchHostMs;
      for (int h = 0; h < H; ++h) m[2 * H + 4 + h] = double(job->kept[size_t(h)]);
      return e.Undefined();
    });
  }

  // Attention over listed rows: the inputs copied here, the work where `sync` says (as Search).
  Napi::Value Attend(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    auto job = std::make_shared<AttendJob>();
    job->store = Live(env);
    job->lock = lock_;
    const cuda::RaScanConfig& c = job->store->Config();
    if (!job->store->HasValues()) throw Napi::Error::New(env, "RaScanStore: this store was opened without values");
    const int H = c.kvHeads, d = c.headDim;
    cuda::RaAttendArgs& a = job->args;
    a.group = int(Int(o, "group", 1, c.maxGroup));
    a.scale = Float(o, "scale");
    const size_t qn = QueryAt(o, a.scale, size_t(H) * a.group * d, job->q);
    if (Absent(o.Get("ids"))) throw Napi::TypeError::New(env, "ids: one Int32Array a kv head");
    std::vector<Napi::Value> keep;
    ListViews(o, "ids", H, job->ids, job->counts, keep);
    if (!Absent(o.Get("ranges"))) {
      Napi::Int32Array r = TypedAt<int32_t>(o, "ranges");
      const size_t len = r.ElementLength();
      if (len % 2 != 0) throw Napi::RangeError::New(env, "ranges must hold [begin, end) pairs");
      job->ranges.assign(r.Data(), r.Data() + len);
      // Ascending and disjoint (the residency's sinks and window are): their rows at most the tokens.
      int32_t last = 0;
      for (size_t i = 0; i < len; i += 2) {
        const int32_t b = job->ranges[i], e = job->ranges[i + 1];
        if (b < last || e < b || e > c.tokens)
          throw Napi::RangeError::New(env, "ranges must be ascending, disjoint [begin, end) pairs within [0, tokens)");
        last = e;
      }
    }
    Napi::Float32Array out = TypedAt<float>(o, "out", qn);
    Napi::Float32Array lse = TypedAt<float>(o, "lse", size_t(H) * a.group);
    Napi::Float64Array meta = TypedAt<double>(o, "meta", 1);
    a.out = out.Data();
    a.lse = lse.Data();
    double* m = meta.Data();
    keep.push_back(out);
    keep.push_back(lse);
    keep.push_back(meta);
    return RunNowOrAsync(env, Flag(o, "sync", false), keep, [job]() { job->Run(); }, [job, m](Napi::Env e) -> Napi::Value {
      m[0] = job->deviceMs;
      return e.Undefined();
    });
  }

  Napi::Value HasValues(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), Live(info.Env())->HasValues()); }

  // Whether searches may take scanKeep: the PQ codes made and uploaded (open's pq, or addPq settled).
  Napi::Value HasPq(const Napi::CallbackInfo& info) {
    Live(info.Env());
    return Napi::Boolean::New(info.Env(), !pq_.empty());
  }

  // The PQ codes of a store opened without them: made off the loop (each graph's own, of the keys it was opened
  // with), then uploaded under the store's lock (no search meanwhile); scanKeep is taken once the promise settles.
  Napi::Value AddPq(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    std::shared_ptr<cuda::RaScanStore> store = Live(env);
    const cuda::RaScanConfig& c = store->Config();
    Napi::Array keys = ArrayOf(o, "keys", graphs_.size());
    auto keyRows = std::make_shared<std::vector<const uint16_t*>>();
    std::vector<Napi::Value> keep{info.This()};
    for (int h = 0; h < c.kvHeads; ++h) {
      Napi::Uint16Array k = Typed<uint16_t>(keys.Get(uint32_t(h)), "keys entry", size_t(c.tokens) * c.headDim);
      keep.push_back(k);
      keyRows->push_back(k.Data());
    }
    auto made = std::make_shared<std::vector<std::shared_ptr<const RaPqCodes>>>();
    return RunAsync(
        env, keep,
        [store, graphs = graphs_, keyRows, made, lock = lock_, dtype = c.dtype]() {
          std::vector<cuda::RaScanHead> heads(graphs.size());
          *made = PqHeads(graphs, *keyRows, dtype, heads);
          std::lock_guard<std::mutex> hold(*lock);
          store->AddPq(heads.data());
        },
        [this, made](Napi::Env e) -> Napi::Value {
          pq_ = *made;
          return e.Undefined();
        });
  }

  Napi::Value Bytes(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), double(Live(info.Env())->Bytes())); }

  Napi::Value LastTimes(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const cuda::RaScanTimes t = Live(env)->LastTimes();
    Napi::Object o = Napi::Object::New(env);
    o.Set("totalMs", t.totalMs);
    o.Set("sampleMs", t.sampleMs);
    o.Set("scanMs", t.scanMs);
    o.Set("cutMs", t.cutMs);
    o.Set("exactMs", t.exactMs);
    o.Set("finalMs", t.finalMs);
    o.Set("hostMs", t.hostMs);
    o.Set("attendMs", t.attendMs);
    return o;
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    store_.reset();  // a search in flight keeps its own reference
    return info.Env().Undefined();
  }
};

#else

Napi::Value Supported(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), false); }

struct RaScanJs {
  static Napi::Function Define(Napi::Env env) { return Unavailable::Define(env, "RaScanStore", "kvrecall was built without CUDA"); }
};

#endif

}  // namespace

#ifdef KVR_CUDA
ClassRegistry RaScanJs::registry_;
#endif

void InitRaScan(Napi::Env env, Napi::Object exports) {
  exports.Set("raScanSupported", Napi::Function::New(env, Supported));
  exports.Set("RaScanStore", RaScanJs::Define(env));
}

}  // namespace kvr
