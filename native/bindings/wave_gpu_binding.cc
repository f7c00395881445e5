// The wave decode step on the GPU for JS (native/cuda/wave_step). Compiled by
// the host compiler; without a CUDA build the class exists and its
// constructor throws.
//
// new WaveGpuStore({kvHeads, headDim, dtype, tokens,
//                   heads: [{centroids, valueMeans, keyAxes, axisScales, keyVars, varScales, varianceShare?, counts, tokenCluster,
//                            keys, values, clusters}] (kvHeads)})
//   .step({q, qHeads, scale, ranking?: 'spread' | 'radius', spread (with 'spread'),
//          normTerms: Float32Array[qHeads] (with 'radius': share·‖q‖),
//          plan: Float64Array[3·kvHeads or 4·kvHeads] (budget, target, maxClusters[, keep] per kv head),
//          exact?: Int32Array, skip?: number[] (flat [lo, hi) pairs, at most two),
//          estimate?, attend?, ids? (default true; false: the kept ids stay on the device, only their counts
//          come back), stages? (default true; false: no per-stage event times), graph? (default true; with
//          stages: false the launches are replayed from a captured CUDA graph; false: launched one by one),
//          rest?: 'rows' | 'moments' (with 'spread': partly attended clusters' remaining rows by their
//          own logits, the default, or by their moments),
//          own?: {k: Uint16Array[kvHeads], v: Uint16Array[kvHeads], tokens} (rows [0, tokens) of each, the
//          store's dtype: a session's own tokens, attended on the step's thread while the device works and
//          merged into out/lse by log-sum-exp, as engine/cache/merge.ts's mergeInto(ownOut, ownLse, out, lse)),
//          out: Float32Array[qHeads·headDim], lse: Float32Array[qHeads], meta: Float64Array[3·kvHeads + 15]
//          (the answer is written there: idCounts, candidates, estimated per kv head, then kStepMeta's slots:
//          width, ms, graphCaptures, misses, bytesIn, workMs and the host ms parse, queue, back, convert, prep,
//          launch, overlap, wait, copy)})
//     -> Promise<undefined | {ids?: Int32Array[kvHeads*width] (with ids), stages: {name: ms}}>
//   .rest({q, qHeads, scale, ranges: Int32Array[] (kvHeads; flat [lo, hi) pairs of rows attended exactly),
//          blocks?: Int32Array[] (kvHeads; block ids, rows [b·blockSize, (b+1)·blockSize) within the tokens),
//          blockSize? (with blocks), ids?: Int32Array[] (kvHeads; more rows attended exactly),
//          order?: 'rows' | 'moments' | 'first', stages?, graph?})
//     -> Promise<{out, lse, estimated: number[], scanned: number[], rows: number[], ms, stages, host, graphCaptures, workMs}>
//   step and rest take sync?: boolean (default false): the work runs on the calling thread and the
//   promise comes back settled, the same answer or the same rejection (common/binding_args.h's RunNowOrAsync)
//     the estimate of what another method's selection leaves out (wave_step.h's WaveRestArgs)
//   .bytes() -> {summaries, moments, maps, kv (0 when paged), scratch, cache, cacheRows}
// cacheRows (constructor, optional, > 0): the paged store (wave_cache.cuh);
// a step's answer then has misses and bytesIn (host to device, K and V).
// pageCapBytes (> 0, paged only), pageCapFrom (default 16): a cap on the
// bytes a step pages from that step on (wave_page_cap.cuh); a step's extra
// answer (with ids, stages or detail) then has rescored and exactMisses per
// kv head, and with detail: true momentClusters (Int32Array per kv head).
//   .close()
// defer: true (constructor): the arguments are checked and nothing is
// copied; .open() -> Promise<void> then makes the device store on libuv's
// pool (the copies: ~4.6 GiB for a 1M-token layer of 8 kv heads, d=128, or
// a 4 GiB pinned host copy when paged, seconds the event loop would wait),
// the arrays kept alive until it ends. .closeAsync() -> Promise<void> frees
// it there too (cudaFree/cudaFreeHost synchronise the device), or where the
// last step still reading it lets it go.
// ranking 'spread' (the default) is the host's default path: clusters ranked
// by spread standard deviations, second-order estimate; 'radius' the older
// one (wave_step.h). With 'spread' the binding computes ‖q‖ itself, as the
// host's estimate does (common/simd_math.h's Dot, compiled with the same
// flags), for the second-order logit's cap.
#include <napi.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "common/binding_args.h"
#include "common/class_registry.h"
#include "common/simd_math.h"
#include "kernels/attention.h"

#ifdef KVR_CUDA
#include "cuda/wave_step.h"
#endif

namespace kvr {
namespace {

#ifdef KVR_CUDA

// A step's per-kv-head counts from one Float64Array, `plan`: [budget, target,
// maxClusters] per kv head, then keep per head when it holds 4 · kvHeads
// entries. One typed array in place of three or four arrays of numbers, each
// entry a property read (bench/results/decode-prof-h200.md).
std::vector<int64_t> PlanPart(Napi::Env env, const double* plan, size_t part, size_t H, int64_t hi) {
  static const char* const names[] = {"budget", "target", "maxClusters", "keep"};
  std::vector<int64_t> v(H);
  for (size_t h = 0; h < H; ++h) {
    const double d = plan[part * H + h];
    if (!(d >= 0 && d <= double(hi) && d == double(int64_t(d))))  // NaN fails the range before the cast
      throw Napi::RangeError::New(env, std::string("plan: ") + names[part] + "[" + std::to_string(h) + "] must be an integer in [0, " +
                                           std::to_string(hi) + "]");
    v[h] = int64_t(d);
  }
  return v;
}

// Where a step's answer goes when the caller passes its arrays (out, lse,
// meta): meta's slots, after idCounts, candidates and estimated (kvHeads each).
// addon/wave-gpu.ts's STEP_META restates this order.
constexpr const char* kStepMeta[] = {"width", "ms", "graphCaptures", "misses", "bytesIn", "workMs", "parse", "queue", "back", "convert",
                                     "prep", "launch", "overlap", "wait", "copy"};
constexpr size_t kStepMetaCount = sizeof(kStepMeta) / sizeof(kStepMeta[0]);
size_t MetaSlot(const std::string& name) {
  for (size_t i = 0; i < kStepMetaCount; ++i)
    if (name == kStepMeta[i]) return i;
  return kStepMetaCount;
}

using Clock = std::chrono::steady_clock;

// A call's times on its answer, the step's and the rest's alike: the stream
// (ms, per stage) and the host around it: queue (the call to the work's start
// on a worker thread), the store's own phases, back (the work's end to the
// answer's conversion) and convert (this conversion).
void SetTimes(Napi::Env e, Napi::Object out, float streamMs, int64_t graphCaptures, const std::vector<std::pair<std::string, float>>& stages,
              const std::vector<std::pair<std::string, float>>& hostPhases, const std::array<Clock::time_point, 3>& times, Clock::time_point c0) {
  out.Set("ms", Napi::Number::New(e, double(streamMs)));
  out.Set("graphCaptures", Napi::Number::New(e, double(graphCaptures)));
  Napi::Object st = Napi::Object::New(e);
  for (const auto& x : stages) st.Set(x.first, Napi::Number::New(e, double(x.second)));
  out.Set("stages", st);
  const auto ms = [](Clock::time_point x, Clock::time_point y) { return double(std::chrono::duration<float, std::milli>(y - x).count()); };
  Napi::Object host = Napi::Object::New(e);
  host.Set("queue", Napi::Number::New(e, ms(times[0], times[1])));
  for (const auto& x : hostPhases) host.Set(x.first, Napi::Number::New(e, double(x.second)));
  host.Set("back", Napi::Number::New(e, ms(times[2], c0)));
  // The work's own time (what a call run on the event loop's thread holds it for): the next call's expectation.
  out.Set("workMs", Napi::Number::New(e, ms(times[1], times[2])));
  host.Set("convert", Napi::Number::New(e, ms(c0, Clock::now())));
  out.Set("host", host);
}

// The device's answer (r.out, r.lse) merged into the own tokens' (out, lse)
// and left in r, with mergeInto's arithmetic (engine/cache/merge.ts:
// doubles, the own part first), so answers stay those of the JS merge.
void MergeOwn(cuda::WaveStepResult& r, const std::vector<float>& out, const std::vector<float>& lse, size_t d) {
  for (size_t h = 0; h < lse.size(); ++h) {
    const double a = lse[h], b = r.lse[h];
    float* o = r.out.data() + h * d;
    if (b == -INFINITY) {
      std::copy(out.begin() + long(h * d), out.begin() + long((h + 1) * d), o);
      r.lse[h] = lse[h];
      continue;
    }
    const double m = std::max(a, b), wa = std::exp(a - m), wb = std::exp(b - m), l = m + std::log(wa + wb);
    const double ca = wa / (wa + wb), cb = wb / (wa + wb);
    for (size_t i = 0; i < d; ++i) o[i] = float(ca * out[h * d + i] + cb * o[i]);
    r.lse[h] = float(l);
  }
}

Napi::Array NumberArray(Napi::Env env, const std::vector<int64_t>& v) {
  Napi::Array a = Napi::Array::New(env, v.size());
  for (size_t i = 0; i < v.size(); ++i) a.Set(uint32_t(i), Napi::Number::New(env, double(v[i])));
  return a;
}

class WaveGpuStore : public Napi::ObjectWrap<WaveGpuStore> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "WaveGpuStore", {InstanceMethod("step", &WaveGpuStore::Step), InstanceMethod("rest", &WaveGpuStore::Rest),
                                             InstanceMethod("bytes", &WaveGpuStore::Bytes),
                                             InstanceMethod("close", &WaveGpuStore::Close), InstanceMethod("open", &WaveGpuStore::Open),
                                             InstanceMethod("closeAsync", &WaveGpuStore::CloseAsync)});
  }

  explicit WaveGpuStore(const Napi::CallbackInfo& info) : Napi::ObjectWrap<WaveGpuStore>(info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    cuda::WaveStoreConfig c;
    c.kvHeads = int(Int(o, "kvHeads", 1, 1024));
    c.headDim = int(Int(o, "headDim", 8, 1024));
    if (!cuda::WaveStore::Supports(c.headDim)) throw Napi::RangeError::New(env, "headDim must be a multiple of 8 in [8, 1024]");
    c.dtype = KeyDtype(o);
    c.tokens = Int(o, "tokens", 1, (int64_t(1) << 31) - 1);
    // > 0: the paged store (K/V in mapped host memory, this many rows cached on the device).
    if (!Absent(o.Get("cacheRows"))) c.cacheRows = Int(o, "cacheRows", 0, int64_t(c.kvHeads) * c.tokens);
    // > 0 (paged only): the bytes a step may page from step pageCapFrom on (wave_page_cap.cuh).
    if (!Absent(o.Get("pageCapBytes"))) c.pageCapBytes = Int(o, "pageCapBytes", 0, int64_t(1) << 50);
    if (!Absent(o.Get("pageCapFrom"))) c.pageCapFrom = int(Int(o, "pageCapFrom", 0, (int64_t(1) << 31) - 1));
    if (c.pageCapBytes > 0 && c.cacheRows <= 0) throw Napi::RangeError::New(env, "pageCapBytes needs cacheRows > 0 (the paged store)");
    if (c.pageCapBytes > 0 && c.pageCapBytes < int64_t(c.kvHeads) * c.headDim * 4)
      throw Napi::RangeError::New(env, "pageCapBytes must allow every kv head one row of K and V");
    const size_t N = size_t(c.tokens), d = size_t(c.headDim), stride = d + 8;
    Napi::Array heads = ArrayOf(o, "heads", size_t(c.kvHeads));
    std::vector<cuda::WaveHeadHost> host(size_t(c.kvHeads));
    const bool defer = Flag(o, "defer", false);
    std::vector<Napi::Value> arrays;
    for (int h = 0; h < c.kvHeads; ++h) {
      Napi::Object x = ObjectOf(heads.Get(h), "heads[" + std::to_string(h) + "]");
      // open() reads these on a worker thread: they stay referenced until it ends.
      if (defer)
        for (const char* k : {"centroids", "valueMeans", "keyAxes", "axisScales", "keyVars", "varScales", "counts", "tokenCluster", "keys", "values"})
          arrays.push_back(x.Get(k));
      cuda::WaveHeadHost& w = host[size_t(h)];
      w.clusters = Int(x, "clusters", 1, (int64_t(1) << 31) - 1);
      const size_t C = size_t(w.clusters);
      w.centroids = TypedAt<uint16_t>(x, "centroids", C * stride).Data();
      w.valueMeans = TypedAt<uint16_t>(x, "valueMeans", C * d).Data();
      w.keyAxes = TypedAt<int8_t>(x, "keyAxes", C * d).Data();
      w.axisScales = TypedAt<float>(x, "axisScales", C).Data();
      w.keyVars = TypedAt<uint8_t>(x, "keyVars", C * d).Data();
      w.varScales = TypedAt<float>(x, "varScales", C).Data();
      if (!Absent(x.Get("varianceShare"))) {
        w.varianceShare = Float(x, "varianceShare");
        if (!(w.varianceShare >= 0.f && w.varianceShare <= 4.f))
          throw Napi::RangeError::New(env, "heads[" + std::to_string(h) + "].varianceShare must be in [0, 4]");
      }
      auto counts = TypedAt<int32_t>(x, "counts", C);
      auto tokenCluster = TypedAt<int32_t>(x, "tokenCluster", N);
      w.keys = TypedAt<uint16_t>(x, "keys", N * d).Data();
      w.values = TypedAt<uint16_t>(x, "values", N * d).Data();
      // The store groups members by tokenCluster and trusts counts: they must agree.
      std::vector<int64_t> hist(C, 0);
      for (size_t t = 0; t < N; ++t) {
        const int32_t cl = tokenCluster[t];
        if (cl < 0 || size_t(cl) >= C)
          throw Napi::RangeError::New(env, "heads[" + std::to_string(h) + "].tokenCluster[" + std::to_string(t) + "] is outside [0, clusters)");
        ++hist[size_t(cl)];
      }
      for (size_t cl = 0; cl < C; ++cl)
        if (hist[cl] != counts[cl])
          throw Napi::RangeError::New(env, "heads[" + std::to_string(h) + "].counts[" + std::to_string(cl) + "] is not the number of its tokens");
      w.counts = counts.Data();
      w.tokenCluster = tokenCluster.Data();
    }
    if (defer) {
      pending_ = std::make_shared<Pending>();
      pending_->config = c;
      pending_->host = std::move(host);
      for (auto& v : arrays) pending_->arrays.push_back(Napi::Persistent(v));
      return;
    }
    // The arrays are copied to the device here, synchronously.
    store_ = Guard(env, [&] { return std::make_shared<cuda::WaveStore>(c, host.data()); });
  }

 private:
  struct Pending {
    cuda::WaveStoreConfig config;
    std::vector<cuda::WaveHeadHost> host;
    std::vector<Napi::Reference<Napi::Value>> arrays;
  };
  std::shared_ptr<cuda::WaveStore> store_;
  /** A deferred store's arguments, until open() takes them. */
  std::shared_ptr<Pending> pending_;
  bool closed_ = false;

  Napi::Value Open(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!pending_) throw Napi::Error::New(env, "open() is for a store made with defer: true, once");
    std::shared_ptr<Pending> p = std::move(pending_);
    std::vector<Napi::Value> keep;
    for (auto& r : p->arrays) keep.push_back(r.Value());
    p->arrays.clear();
    keep.push_back(info.This());  // `this` outlives the work (the result sets store_)
    auto made = std::make_shared<std::shared_ptr<cuda::WaveStore>>();
    return RunAsync(
        env, std::move(keep), [p, made]() { *made = std::make_shared<cuda::WaveStore>(p->config, p->host.data()); },
        [this, made](Napi::Env e) -> Napi::Value {
          // Closed while it was made (the backend shut down): it is freed as the worker lets it go.
          if (!closed_) store_ = std::move(*made);
          return e.Undefined();
        });
  }

  Napi::Value CloseAsync(const Napi::CallbackInfo& info) {
    closed_ = true;
    pending_.reset();
    // The last reference goes on the worker (unless a step still holds one: then where that step lets it go).
    auto last = std::make_shared<std::shared_ptr<cuda::WaveStore>>(std::move(store_));
    return RunAsync(info.Env(), {}, [last]() { last->reset(); }, [](Napi::Env e) -> Napi::Value { return e.Undefined(); });
  }

  std::shared_ptr<cuda::WaveStore> Store(Napi::Env env) {
    if (!store_) throw Napi::Error::New(env, "WaveGpuStore is closed");
    return store_;
  }

  Napi::Value Step(const Napi::CallbackInfo& info) {
    const auto entry = std::chrono::steady_clock::now();
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    std::shared_ptr<cuda::WaveStore> store = Store(env);
    const cuda::WaveStoreConfig& c = store->Config();
    auto a = std::make_shared<cuda::WaveStepArgs>();
    a->qHeads = int(Int(o, "qHeads", 1, 1024));
    if (a->qHeads % c.kvHeads != 0) throw Napi::RangeError::New(env, "qHeads must be a multiple of kvHeads");
    if (int64_t(a->qHeads / c.kvHeads) * (c.headDim + 8) > 12288)
      throw Napi::RangeError::New(env, "group * (headDim + 8) must be at most 12288");
    a->scale = Float(o, "scale");
    auto q = TypedAt<float>(o, "q", size_t(a->qHeads) * c.headDim);
    std::string ranking = "spread";
    if (!Absent(o.Get("ranking"))) {
      if (!o.Get("ranking").IsString()) throw Napi::TypeError::New(env, "ranking must be 'spread' or 'radius'");
      ranking = o.Get("ranking").As<Napi::String>().Utf8Value();
    }
    auto normCopy = std::make_shared<std::vector<float>>(size_t(a->qHeads));
    const size_t d = size_t(c.headDim);
    if (ranking == "spread") {
      a->ranking = cuda::WaveRanking::kSpread;
      a->spread = Float(o, "spread");
      for (int r = 0; r < a->qHeads; ++r) (*normCopy)[size_t(r)] = std::sqrt(Dot(q.Data() + size_t(r) * d, q.Data() + size_t(r) * d, d));
    } else if (ranking == "radius") {
      a->ranking = cuda::WaveRanking::kRadius;
      auto norms = TypedAt<float>(o, "normTerms", size_t(a->qHeads));
      std::copy(norms.Data(), norms.Data() + a->qHeads, normCopy->data());
    } else {
      throw Napi::RangeError::New(env, "ranking must be 'spread' or 'radius'");
    }
    const int64_t big = (int64_t(1) << 40);
    const size_t H0 = size_t(c.kvHeads);
    auto plan = TypedAt<double>(o, "plan", 3 * H0);
    if (plan.ElementLength() != 3 * H0 && plan.ElementLength() != 4 * H0)
      throw Napi::RangeError::New(env, "plan must hold 3 or 4 entries per kv head (budget, target, maxClusters[, keep])");
    a->budget = PlanPart(env, plan.Data(), 0, H0, big);
    a->target = PlanPart(env, plan.Data(), 1, H0, big);
    a->maxClusters = PlanPart(env, plan.Data(), 2, H0, big);
    if (plan.ElementLength() == 4 * H0) a->keep = PlanPart(env, plan.Data(), 3, H0, big);
    if (!Absent(o.Get("skip"))) {
      // Flat [lo0, hi0, lo1, hi1, ...]: at most two ranges of segment rows.
      if (!o.Get("skip").IsArray()) throw Napi::TypeError::New(env, "skip must be an array of [lo, hi) pairs, flat");
      const size_t n = o.Get("skip").As<Napi::Array>().Length();
      if (n % 2 != 0 || n > 4) throw Napi::RangeError::New(env, "skip must hold at most two [lo, hi) pairs, flat");
      const std::vector<int64_t> flat = Ints(o, "skip", n, 0, big);
      for (size_t i = 0; i < n; i += 2) {
        if (flat[i] > flat[i + 1]) throw Napi::RangeError::New(env, "skip: each range needs lo <= hi");
        a->skip.emplace_back(flat[i], flat[i + 1]);
      }
    }
    a->estimate = Flag(o, "estimate", true);
    a->attend = Flag(o, "attend", false);
    a->ids = Flag(o, "ids", true);
    a->stageTimes = Flag(o, "stages", true);
    a->graph = Flag(o, "graph", true);
    a->detail = Flag(o, "detail", false);
    if (!Absent(o.Get("rest"))) {
      const Napi::Value r = o.Get("rest");
      const std::string rest = r.IsString() ? r.As<Napi::String>().Utf8Value() : "";
      if (rest != "rows" && rest != "moments") throw Napi::RangeError::New(env, "rest must be 'rows' or 'moments'");
      a->restRows = rest == "rows";
    }
    // The inputs are copied: the step runs off the event loop.
    auto qCopy = std::make_shared<std::vector<float>>(q.Data(), q.Data() + size_t(a->qHeads) * d);
    auto exact = std::make_shared<std::vector<int32_t>>();
    if (auto e = OptTypedAt<int32_t>(o, "exact")) {
      CheckIds(*e, c.tokens, "exact");
      exact->assign(e->Data(), e->Data() + e->ElementLength());
    }
    const int H = c.kvHeads;
    // The own tokens: their arrays kept alive (not copied) until the step ends.
    std::vector<Napi::Value> keep;
    auto own = std::make_shared<AttnProblem>();
    if (!Absent(o.Get("own"))) {
      Napi::Object w = ObjectOf(o.Get("own"), "own");
      AttnSegment seg;
      seg.tokens = Int(w, "tokens", 1, int64_t(1) << 31);
      seg.end = seg.tokens;
      Napi::Array k = ArrayOf(w, "k", size_t(H)), v = ArrayOf(w, "v", size_t(H));
      for (int h = 0; h < H; ++h) {
        auto kh = Typed<uint16_t>(k.Get(uint32_t(h)), "own.k", size_t(seg.tokens) * d);
        auto vh = Typed<uint16_t>(v.Get(uint32_t(h)), "own.v", size_t(seg.tokens) * d);
        seg.k.push_back(kh.Data());
        seg.v.push_back(vh.Data());
        keep.push_back(kh);
        keep.push_back(vh);
      }
      own->qHeads = a->qHeads, own->kvHeads = H, own->headDim = c.headDim, own->dtype = c.dtype, own->scale = a->scale;
      own->segments.push_back(std::move(seg));
    }
    // sync: the work runs now on this thread (addon/device-calls.ts: a short step skips libuv's two wake-ups).
    const bool now = Flag(o, "sync", false);
    // The answer goes into the caller's arrays (out, lse and meta: counts and
    // times, kStepMeta), not into new objects: building ~40 properties and
    // two external buffers through N-API was 0.021 ms of every call, held on
    // the loop (bench/results/decode-prof-h200.md). Their memory is
    // kept alive by `keep` until the answer is written on the loop's thread.
    auto outArr = TypedAt<float>(o, "out", size_t(a->qHeads) * d);
    auto lseArr = TypedAt<float>(o, "lse", size_t(a->qHeads));
    auto metaArr = TypedAt<double>(o, "meta", 3 * size_t(H) + kStepMetaCount);
    float* outTo = outArr.Data();
    float* lseTo = lseArr.Data();
    double* metaTo = metaArr.Data();
    keep.push_back(outArr);
    keep.push_back(lseArr);
    keep.push_back(metaArr);
    auto result = std::make_shared<cuda::WaveStepResult>();
    // The hop onto the worker thread and back (queue: this call to the
    // work's start; convert: the answer written) beside the step's own host
    // stages, and parse (the arguments read, before the hop), so a bench sees
    // where the wall time outside the stream goes.
    using Clock = std::chrono::steady_clock;
    auto times = std::make_shared<std::array<Clock::time_point, 3>>();
    (*times)[0] = Clock::now();
    const double parseMs = double(std::chrono::duration<float, std::milli>((*times)[0] - entry).count());
    return RunNowOrAsync(
        env, now, std::move(keep),
        [store, a, qCopy, normCopy, exact, result, times, own]() {
          (*times)[1] = Clock::now();
          a->q = qCopy->data();
          a->normTerms = normCopy->data();
          a->exact = exact->data();
          a->exactCount = int64_t(exact->size());
          std::vector<float> ownOut, ownLse;
          if (!own->segments.empty()) {
            ownOut.resize(qCopy->size());
            ownLse.resize(size_t(own->qHeads));
            own->q = qCopy->data(), own->out = ownOut.data(), own->lse = ownLse.data();
            a->overlap = [own]() { Attend(*own); };
          }
          *result = store->Step(*a);
          if (!own->segments.empty()) MergeOwn(*result, ownOut, ownLse, size_t(own->headDim));
          (*times)[2] = Clock::now();
        },
        [result, H, times, parseMs, outTo, lseTo, metaTo, wantIds = a->ids, detail = a->detail](Napi::Env e) -> Napi::Value {
          const Clock::time_point c0 = Clock::now();
          cuda::WaveStepResult& r = *result;
          std::copy(r.out.begin(), r.out.end(), outTo);
          std::copy(r.lse.begin(), r.lse.end(), lseTo);
          const size_t Hs = size_t(H);
          for (size_t h = 0; h < Hs; ++h) {
            metaTo[h] = double(r.idCounts[h]);
            metaTo[Hs + h] = double(r.candidates[h]);
            metaTo[2 * Hs + h] = double(r.estimated[h]);
          }
          double* m = metaTo + 3 * Hs;
          const auto ms = [](Clock::time_point x, Clock::time_point y) { return double(std::chrono::duration<float, std::milli>(y - x).count()); };
          m[MetaSlot("width")] = double(r.width);
          m[MetaSlot("ms")] = double(r.ms);
          m[MetaSlot("graphCaptures")] = double(r.graphCaptures);
          m[MetaSlot("misses")] = double(r.misses);
          m[MetaSlot("bytesIn")] = double(r.bytesIn);
          m[MetaSlot("workMs")] = ms((*times)[1], (*times)[2]);
          m[MetaSlot("parse")] = parseMs;
          m[MetaSlot("queue")] = ms((*times)[0], (*times)[1]);
          m[MetaSlot("back")] = ms((*times)[2], c0);
          for (const auto& x : r.host)
            if (MetaSlot(x.first) < kStepMetaCount) m[MetaSlot(x.first)] = double(x.second);
          // Only what has no fixed size comes back as objects: the kept ids, asked for, and the stages' times.
          Napi::Value extra = e.Undefined();
          if (wantIds || !r.stages.empty() || detail) {
            Napi::Object x = Napi::Object::New(e);
            if (wantIds) x.Set("ids", Adopt(e, std::move(r.ids)));
            // A capped paged store's (wave_step.h): per kv head.
            if (!r.rescored.empty()) {
              x.Set("rescored", NumberArray(e, r.rescored));
              x.Set("exactMisses", NumberArray(e, r.exactMisses));
            }
            if (!r.momentClusters.empty()) {
              Napi::Array mc = Napi::Array::New(e, r.momentClusters.size());
              for (size_t h = 0; h < r.momentClusters.size(); ++h) mc.Set(uint32_t(h), Adopt(e, std::move(r.momentClusters[h])));
              x.Set("momentClusters", mc);
            }
            Napi::Object st = Napi::Object::New(e);
            for (const auto& y : r.stages) st.Set(y.first, Napi::Number::New(e, double(y.second)));
            x.Set("stages", st);
            extra = x;
          }
          m[MetaSlot("convert")] = ms(c0, Clock::now());
          return extra;
        });
  }

  Napi::Value Rest(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    std::shared_ptr<cuda::WaveStore> store = Store(env);
    const cuda::WaveStoreConfig& c = store->Config();
    if (c.cacheRows > 0) throw Napi::Error::New(env, "rest is not run on a paged store (cacheRows > 0): the rows it reads may exceed the cache");
    const int H = c.kvHeads;
    const size_t d = size_t(c.headDim);
    auto a = std::make_shared<cuda::WaveRestArgs>();
    a->qHeads = int(Int(o, "qHeads", 1, 1024));
    if (a->qHeads % H != 0) throw Napi::RangeError::New(env, "qHeads must be a multiple of kvHeads");
    if (int64_t(a->qHeads / H) * (c.headDim + 8) > 12288) throw Napi::RangeError::New(env, "group * (headDim + 8) must be at most 12288");
    a->scale = Float(o, "scale");
    auto q = TypedAt<float>(o, "q", size_t(a->qHeads) * d);
    if (!Absent(o.Get("order"))) {
      const Napi::Value v = o.Get("order");
      const std::string order = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
      if (order == "rows") a->order = cuda::WaveRestOrder::kRows;
      else if (order == "moments") a->order = cuda::WaveRestOrder::kMoments;
      else if (order == "first") a->order = cuda::WaveRestOrder::kFirst;
      else throw Napi::RangeError::New(env, "order must be 'rows', 'moments' or 'first'");
    }
    a->stageTimes = Flag(o, "stages", false);
    a->graph = Flag(o, "graph", true);
    // Per head, copied (the call runs off the event loop): ranges within [0, tokens], ids in [0, tokens).
    Napi::Array ranges = ArrayOf(o, "ranges", size_t(H));
    const bool hasBlocks = !Absent(o.Get("blocks"));
    Napi::Array blocks = hasBlocks ? ArrayOf(o, "blocks", size_t(H)) : Napi::Array::New(env);
    const int64_t blockSize = hasBlocks ? Int(o, "blockSize", 1, int64_t(1) << 20) : 1;
    const bool hasIds = !Absent(o.Get("ids"));
    Napi::Array ids = hasIds ? ArrayOf(o, "ids", size_t(H)) : Napi::Array::New(env);
    a->rangeStart.push_back(0);
    a->idStart.push_back(0);
    for (int h = 0; h < H; ++h) {
      const std::string at = "[" + std::to_string(h) + "]";
      auto r = Typed<int32_t>(ranges.Get(uint32_t(h)), ("ranges" + at).c_str());
      if (r.ElementLength() % 2 != 0) throw Napi::RangeError::New(env, "ranges" + at + " must hold [lo, hi) pairs");
      for (size_t i = 0; i < r.ElementLength(); i += 2)
        if (r[i] < 0 || r[i] > r[i + 1] || int64_t(r[i + 1]) > c.tokens)
          throw Napi::RangeError::New(env, "ranges" + at + ": [" + std::to_string(r[i]) + ", " + std::to_string(r[i + 1]) + ") is not a range of [0, " + std::to_string(c.tokens) + ")");
      a->ranges.insert(a->ranges.end(), r.Data(), r.Data() + r.ElementLength());
      if (hasBlocks) {
        // Blocks as ranges, a run of consecutive ones as one.
        auto b = Typed<int32_t>(blocks.Get(uint32_t(h)), ("blocks" + at).c_str());
        int64_t runLo = 0, runHi = 0;
        for (size_t i = 0; i < b.ElementLength(); ++i) {
          if (b[i] < 0) throw Napi::RangeError::New(env, "blocks" + at + "[" + std::to_string(i) + "] is negative");
          const int64_t lo = std::min(int64_t(b[i]) * blockSize, c.tokens), hi = std::min(lo + blockSize, c.tokens);
          if (lo == hi) continue;
          if (lo != runHi || runHi == runLo) {
            if (runHi > runLo) a->ranges.insert(a->ranges.end(), {int32_t(runLo), int32_t(runHi)});
            runLo = lo;
          }
          runHi = hi;
        }
        if (runHi > runLo) a->ranges.insert(a->ranges.end(), {int32_t(runLo), int32_t(runHi)});
      }
      a->rangeStart.push_back(int64_t(a->ranges.size() / 2));
      if (hasIds) {
        auto x = Typed<int32_t>(ids.Get(uint32_t(h)), ("ids" + at).c_str());
        CheckIds(x, c.tokens, "ids" + at);
        a->ids.insert(a->ids.end(), x.Data(), x.Data() + x.ElementLength());
      }
      a->idStart.push_back(int64_t(a->ids.size()));
    }
    auto qCopy = std::make_shared<std::vector<float>>(q.Data(), q.Data() + size_t(a->qHeads) * d);
    // ‖q‖ as the host's estimate computes it (its Dot, compiled with the same flags), for the second-order cap.
    auto norms = std::make_shared<std::vector<float>>(size_t(a->qHeads));
    for (int r = 0; r < a->qHeads; ++r) (*norms)[size_t(r)] = std::sqrt(Dot(q.Data() + size_t(r) * d, q.Data() + size_t(r) * d, d));
    const bool now = Flag(o, "sync", false);
    auto result = std::make_shared<cuda::WaveRestResult>();
    using Clock = std::chrono::steady_clock;
    auto times = std::make_shared<std::array<Clock::time_point, 3>>();
    (*times)[0] = Clock::now();
    return RunNowOrAsync(
        env, now, {},
        [store, a, qCopy, norms, result, times]() {
          (*times)[1] = Clock::now();
          a->q = qCopy->data();
          a->normTerms = norms->data();
          *result = store->Rest(*a);
          (*times)[2] = Clock::now();
        },
        [result, H, times](Napi::Env e) -> Napi::Value {
          const Clock::time_point c0 = Clock::now();
          cuda::WaveRestResult& r = *result;
          Napi::Object out = Napi::Object::New(e);
          out.Set("out", Adopt(e, std::move(r.out)));
          out.Set("lse", Adopt(e, std::move(r.lse)));
          Napi::Array est = Napi::Array::New(e, size_t(H)), scanned = Napi::Array::New(e, size_t(H));
          for (int h = 0; h < H; ++h) {
            est.Set(uint32_t(h), Napi::Number::New(e, r.estimated[size_t(h)]));
            scanned.Set(uint32_t(h), Napi::Number::New(e, r.scanned[size_t(h)]));
          }
          out.Set("estimated", est);
          out.Set("scanned", scanned);
          out.Set("rows", NumberArray(e, r.rows));
          SetTimes(e, out, r.ms, r.graphCaptures, r.stages, r.host, *times, c0);
          return out;
        });
  }

  Napi::Value Bytes(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    cuda::WaveStoreBytes b = Store(env)->Bytes();
    Napi::Object o = Napi::Object::New(env);
    o.Set("summaries", Napi::Number::New(env, double(b.summaries)));
    o.Set("moments", Napi::Number::New(env, double(b.moments)));
    o.Set("maps", Napi::Number::New(env, double(b.maps)));
    o.Set("kv", Napi::Number::New(env, double(b.kv)));
    o.Set("scratch", Napi::Number::New(env, double(b.scratch)));
    o.Set("cache", Napi::Number::New(env, double(b.cache)));
    o.Set("cacheRows", Napi::Number::New(env, double(b.cacheRows)));
    return o;
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    closed_ = true;
    pending_.reset();
    store_.reset();  // a step in flight keeps its own reference
    return info.Env().Undefined();
  }
};

#else  // no CUDA build

struct WaveGpuStore {
  static Napi::Function Define(Napi::Env env) { return Unavailable::Define(env, "WaveGpuStore", "kvrecall was built without CUDA"); }
};

#endif

}  // namespace

void InitWaveGpu(Napi::Env env, Napi::Object exports) { exports.Set("WaveGpuStore", WaveGpuStore::Define(env)); }

}  // namespace kvr
