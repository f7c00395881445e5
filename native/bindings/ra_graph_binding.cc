// The RetrievalAttention graph index (ra_graph.h) as a JS class:
//   class RaGraph
//     static build({keys, tokens, headDim, dtype, queries?, queryCount, degree?, kBuild?, maxQueries?, seed?, positional?,
//                   keyNeighbors?, keyEf?})
//       -> Promise<RaGraph>                                   (off the event loop)
//     static load(bytes: Uint8Array) -> RaGraph               (throws on corrupt bytes)
//     static searchBatch([{graph, keys, tokens, headDim, dtype, q, group, k, ef, outIds, outScores, seeds?, freeSeeds?, ...}, ...])
//       -> Promise<{count, scanned}[]>                        (the searches run in parallel on the native pool)
//     save() -> Uint8Array
//     search({keys, tokens, headDim, dtype, q, group, k, ef, outIds, outScores, seeds?, freeSeeds?, margin?, aggregate?, scale?}) -> Promise<{count, scanned}>
//       (seeds: Int32Array of extra start keys, e.g. the previous decode step's ids; freeSeeds: start keys
//        the caller attends in full anyway, not counted as scanned and left out of the result; margin: the
//        quality-bound stop in score units, absent = none; aggregate: 0 max over the group's rows,
//        1 the group's attention, with scale: the softmax scale, absent = 1/sqrt(headDim); maxScanned:
//        a cap on the keys scored, 0 or absent = none; expandWidth: candidates expanded a round of the
//        walk, 1..1024, absent = RaSearchOptions' default; profile: true adds {sampleMs, walkMs, scoreMs,
//        refineMs, finalMs, finalScored}, where an 'attention' search's time went)
//       codeWalk: true walks over the keys' 4-bit codes (ra_graph.h), with codeQuantile (0, 100], codeDelta >= 0, codeAdapt >= 0 (finite),
//       maxCodes >= 0, codeWidth 1..1024; the result then has codesRead)
//       codeScan: true scores every key's code, then the best maxScanned (> 0, required) exactly (ra_graph.h;
//       not with codeWalk; the result has codesRead; scanChunk >= 0: its pass in pool tasks of that many keys;
//       scanKeep in (0, 1]: a first pass on PQ codes keeps that share for the 4-bit codes, the result has codesKept)
//     keyCodes({keys, tokens, headDim, dtype}) -> {codes, low, step}; codeLogits({..., q, group, ids, scale?, quantized?})
//       -> Float32Array [ids, group]   (the codes the code walk reads and the dequantized keys' logits, or with
//       quantized: true the int8 form's the walk ranks by, RaKeyCodes::QuantLogits: tests, tools; pq: true,
//       in both, the PQ codes of scanKeep and their integer form, ra_pq_codes.h)
//     searchSync(same) -> {count, scanned, codesRead}   (on the calling thread: 0.5-3 ms at 64K keys, 12-24 ms at 1M)
//       (walkStats: true adds walk: {rounds, expanded, startKeys, peakCandidates}, the attention ranking's beam walk's shape;
//       poolCap: P > 0 cuts that walk's candidates to their best P after every round, an experiment)
//     dispose(); tokens, headDim, degree, kBuild, maxQueries, seed, queriesUsed, edges, maxDegree,
//     entryPoints, positional, keyNeighbors, memoryBytes, buildStats (getters; buildStats is null for a loaded graph)
//
// Why a class: a search must not re-parse the graph (a 64K-key graph is ~5 MB),
// and node-addon-api cannot key a native cache by a Uint8Array's identity; the
// object holds the parsed graph. The keys are not copied or owned: every
// search passes them again (same tokens and headDim as the build, checked).
#include <napi.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/binding_args.h"
#include "common/class_registry.h"
#include "common/thread_pool.h"
#include "bindings/ra_graph_handle.h"
#include "indexes/ra_graph.h"

namespace kvr {
namespace {

constexpr int64_t kMaxTokens = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxSafeInt = (int64_t(1) << 53) - 1;

size_t GraphBytes(const RaGraph& g) {
  return g.offsets().size() * 8 + g.neighbors().size() * 4 + g.entries().size() * 4;
}

// One validated search: every pointer checked against the graph's shape.
struct SearchJob {
  std::shared_ptr<const RaGraph> graph;
  const uint16_t* keys = nullptr;
  Dtype dtype = Dtype::kF16;
  const float* q = nullptr;
  int group = 1, k = 0;
  int64_t ef = 0;
  int32_t* outIds = nullptr;
  float* outScores = nullptr;
  const int32_t* seeds = nullptr;
  size_t seedCount = 0;
  const int32_t* freeSeeds = nullptr;
  size_t freeSeedCount = 0;
  float margin = RaGraph::kNoMargin;
  RaAggregate aggregate = RaAggregate::kMax;
  float scale = 0.f;
  int64_t maxScanned = 0;
  int expandWidth = RaSearchOptions().expandWidth;
  bool codeWalk = false;
  float codeQuantile = RaSearchOptions().codeQuantile, codeDelta = RaSearchOptions().codeDelta,
        codeAdapt = RaSearchOptions().codeAdapt;
  int64_t maxCodes = 0;
  int codeWidth = RaSearchOptions().codeWidth;
  bool codeScan = false;
  int64_t scanChunk = 0;
  double scanKeep = 0;
  bool profiled = false;
  bool walkStats = false;
  int64_t poolCap = 0;
  RaSearchProfile profile;
  RaSearchResult result;

  void Run() {
    RaSearchOptions opt;
    opt.seeds = seeds;
    opt.seedCount = seedCount;
    opt.freeSeeds = freeSeeds;
    opt.freeSeedCount = freeSeedCount;
    opt.margin = margin;
    opt.aggregate = aggregate;
    opt.scale = scale;
    opt.maxScanned = maxScanned;
    opt.expandWidth = expandWidth;
    opt.walkStats = walkStats;
    opt.poolCap = poolCap;
    opt.codeWalk = codeWalk;
    opt.codeQuantile = codeQuantile;
    opt.codeDelta = codeDelta;
    opt.codeAdapt = codeAdapt;
    opt.maxCodes = maxCodes;
    opt.codeWidth = codeWidth;
    opt.codeScan = codeScan;
    opt.scanChunk = scanChunk;
    opt.scanKeep = scanKeep;
    if (profiled) opt.profile = &profile;
    result = graph->Search(keys, dtype, q, group, k, ef, outIds, outScores, opt);
  }
};

SearchJob ParseSearch(Napi::Env env, const Napi::Object& o, std::shared_ptr<const RaGraph> graph,
                      std::vector<Napi::Value>& keep) {
  SearchJob job;
  const RaGraph& g = *graph;
  const int64_t tokens = Int(o, "tokens", 0, kMaxTokens);
  const int d = int(Int(o, "headDim", 1, 1 << 16));
  if (tokens != g.tokens())
    throw Napi::RangeError::New(env, "tokens is " + std::to_string(tokens) + " but the graph indexes " +
                                         std::to_string(g.tokens()) + " keys");
  if (d != g.headDim())
    throw Napi::RangeError::New(env, "headDim is " + std::to_string(d) + " but the graph was built with " +
                                         std::to_string(g.headDim()));
  job.dtype = KeyDtype(o);
  job.group = int(Int(o, "group", 1, 1024));
  job.k = int(Int(o, "k", 0, int64_t(1) << 30));
  job.ef = Int(o, "ef", 0, kMaxSafeInt);
  if (!Absent(o.Get("margin"))) {
    const float m = Float(o, "margin");
    if (!(m >= 0)) throw Napi::RangeError::New(env, "margin must be a number >= 0");
    job.margin = std::min(m, RaGraph::kNoMargin);
  }
  // aggregate: 0 = max over the group's rows of q·k, 1 = the group's attention (ra_graph.h, RaAggregate).
  job.aggregate = RaAggregate(int(OptInt(o, "aggregate", 0, 1, 0)));
  if (job.aggregate == RaAggregate::kAttention && job.group > 64)
    throw Napi::RangeError::New(env, "group must be <= 64 when ranking by the group's attention");
  if (!Absent(o.Get("scale"))) {
    const float sc = Float(o, "scale");
    if (!(sc > 0) || !std::isfinite(sc)) throw Napi::RangeError::New(env, "scale must be a finite number > 0");
    job.scale = sc;
  }
  job.maxScanned = OptInt(o, "maxScanned", 0, kMaxSafeInt, 0);
  job.expandWidth = int(OptInt(o, "expandWidth", 1, 1024, job.expandWidth));
  job.profiled = o.Get("profile").ToBoolean().Value();
  job.walkStats = o.Get("walkStats").ToBoolean().Value();
  job.poolCap = OptInt(o, "poolCap", 0, kMaxSafeInt, 0);
  // The code-gated walk (ra_graph.h, RaSearchOptions::codeWalk): its knobs
  // only with it, so that a knob given without it is not silently ignored.
  job.codeWalk = Flag(o, "codeWalk", false);
  if (job.codeWalk && job.aggregate != RaAggregate::kAttention)
    throw Napi::RangeError::New(env, "codeWalk needs aggregate 'attention'");
  for (const char* knob : {"codeQuantile", "codeDelta", "codeAdapt", "maxCodes", "codeWidth"})
    if (!job.codeWalk && !Absent(o.Get(knob)))
      throw Napi::RangeError::New(env, std::string(knob) + " is an option of the code walk: set codeWalk");
  if (!Absent(o.Get("codeQuantile"))) {
    const double v = Double(o, "codeQuantile");
    if (!(v > 0 && v <= 100)) throw Napi::RangeError::New(env, "codeQuantile must be a number in (0, 100]");
    job.codeQuantile = float(v);
  }
  if (!Absent(o.Get("codeDelta"))) {
    const double v = Double(o, "codeDelta");
    if (!(v >= 0)) throw Napi::RangeError::New(env, "codeDelta must be a number >= 0 (Infinity: score every key met)");
    job.codeDelta = float(v);
  }
  if (!Absent(o.Get("codeAdapt"))) {
    const double v = Double(o, "codeAdapt");
    if (!(v >= 0 && std::isfinite(v))) throw Napi::RangeError::New(env, "codeAdapt must be a finite number >= 0");
    job.codeAdapt = float(v);
  }
  job.maxCodes = OptInt(o, "maxCodes", 0, kMaxSafeInt, 0);
  job.codeWidth = int(OptInt(o, "codeWidth", 1, 1024, job.codeWidth));
  // The code scan (ra_graph.h, RaSearchOptions::codeScan): its only bound is maxScanned.
  job.codeScan = Flag(o, "codeScan", false);
  if (job.codeScan && job.aggregate != RaAggregate::kAttention)
    throw Napi::RangeError::New(env, "codeScan needs aggregate 'attention'");
  if (job.codeScan && job.codeWalk) throw Napi::RangeError::New(env, "codeScan and codeWalk are two searches: set one");
  if (job.codeScan && job.maxScanned <= 0)
    throw Napi::RangeError::New(env, "codeScan needs maxScanned > 0 (the keys it scores exactly)");
  if (!job.codeScan && !Absent(o.Get("scanChunk")))
    throw Napi::RangeError::New(env, "scanChunk is an option of the code scan: set codeScan");
  job.scanChunk = OptInt(o, "scanChunk", 0, kMaxTokens, 0);
  if (!Absent(o.Get("scanKeep"))) {
    if (!job.codeScan) throw Napi::RangeError::New(env, "scanKeep is an option of the code scan: set codeScan");
    const double v = Double(o, "scanKeep");
    if (!(v > 0 && v <= 1)) throw Napi::RangeError::New(env, "scanKeep must be a number in (0, 1]");
    job.scanKeep = v;
  }
  const size_t keep_n = size_t(std::min<int64_t>(job.k, tokens));
  auto keys = TypedAt<uint16_t>(o, "keys", size_t(tokens) * d);
  auto q = TypedAt<float>(o, "q", size_t(job.group) * d);
  TopkOutputs res = TopkOutputsAt(o, keep_n);
  job.keys = keys.Data();
  job.q = q.Data();
  job.outIds = res.ids.Data();
  job.outScores = res.scores.Data();
  if (auto seeds = OptTypedAt<int32_t>(o, "seeds")) {
    CheckIds(*seeds, tokens, "seeds");
    job.seeds = seeds->Data();
    job.seedCount = seeds->ElementLength();
    keep.push_back(*seeds);
  }
  if (auto free = OptTypedAt<int32_t>(o, "freeSeeds")) {
    CheckIds(*free, tokens, "freeSeeds");
    job.freeSeeds = free->Data();
    job.freeSeedCount = free->ElementLength();
    keep.push_back(*free);
  }
  job.graph = std::move(graph);
  keep.insert(keep.end(), {keys, q, res.ids, res.scores});
  return job;
}

Napi::Object ResultObject(Napi::Env env, const SearchJob& job) {
  const RaSearchResult& r = job.result;
  Napi::Object res = Napi::Object::New(env);
  res.Set("count", Napi::Number::New(env, double(r.count)));
  res.Set("scanned", Napi::Number::New(env, double(r.scanned)));
  if (job.codeWalk || job.codeScan) {
    res.Set("codesRead", Napi::Number::New(env, double(r.codesRead)));
    if (job.scanKeep > 0) res.Set("codesKept", Napi::Number::New(env, double(r.codesKept)));
  } else if (job.walkStats && job.aggregate == RaAggregate::kAttention) {
    Napi::Object w = Napi::Object::New(env);
    w.Set("rounds", Napi::Number::New(env, double(r.rounds)));
    w.Set("expanded", Napi::Number::New(env, double(r.expanded)));
    w.Set("startKeys", Napi::Number::New(env, double(r.startKeys)));
    w.Set("peakCandidates", Napi::Number::New(env, double(r.peakCandidates)));
    res.Set("walk", w);
  }
  if (job.profiled) {
    const RaSearchProfile& p = job.profile;
    Napi::Object o = Napi::Object::New(env);
    o.Set("sampleMs", p.sampleMs);
    o.Set("walkMs", p.walkMs);
    o.Set("scoreMs", p.scoreMs);
    o.Set("refineMs", p.refineMs);
    o.Set("finalMs", p.finalMs);
    o.Set("finalScored", double(p.finalScored));
    res.Set("profile", o);
  }
  return res;
}

class RaGraphJs : public Napi::ObjectWrap<RaGraphJs> {
  friend std::shared_ptr<const RaGraph> kvr::RaGraphOf(Napi::Env env, const Napi::Value& v, const std::string& what);

 public:
  static Napi::Function Define(Napi::Env env) {
    Napi::Function ctor = DefineClass(
        env, "RaGraph",
        {StaticMethod<&RaGraphJs::Build>("build"), StaticMethod<&RaGraphJs::Load>("load"),
         StaticMethod<&RaGraphJs::SearchBatch>("searchBatch"), InstanceMethod<&RaGraphJs::Save>("save"),
         InstanceMethod<&RaGraphJs::Search>("search"), InstanceMethod<&RaGraphJs::SearchSync>("searchSync"),
         InstanceMethod<&RaGraphJs::Dispose>("dispose"), InstanceMethod<&RaGraphJs::KeyCodes>("keyCodes"),
         InstanceMethod<&RaGraphJs::CodeLogits>("codeLogits"), InstanceAccessor<&RaGraphJs::TokensJs>("tokens"),
         InstanceAccessor<&RaGraphJs::HeadDimJs>("headDim"), InstanceAccessor<&RaGraphJs::DegreeJs>("degree"),
         InstanceAccessor<&RaGraphJs::KBuildJs>("kBuild"), InstanceAccessor<&RaGraphJs::MaxQueriesJs>("maxQueries"),
         InstanceAccessor<&RaGraphJs::SeedJs>("seed"), InstanceAccessor<&RaGraphJs::QueriesUsedJs>("queriesUsed"),
         InstanceAccessor<&RaGraphJs::EdgesJs>("edges"), InstanceAccessor<&RaGraphJs::MaxDegreeJs>("maxDegree"),
         InstanceAccessor<&RaGraphJs::EntryPointsJs>("entryPoints"),
         InstanceAccessor<&RaGraphJs::PositionalJs>("positional"),
         InstanceAccessor<&RaGraphJs::KeyNeighborsJs>("keyNeighbors"),
         InstanceAccessor<&RaGraphJs::MemoryBytesJs>("memoryBytes"),
         InstanceAccessor<&RaGraphJs::BuildStatsJs>("buildStats")});
    registry_.Add(env, ctor);
    return ctor;
  }

  // Only build() and load() construct: they pass the native graph inside an
  // External, which script cannot forge.
  explicit RaGraphJs(const Napi::CallbackInfo& info) : Napi::ObjectWrap<RaGraphJs>(info) {
    Made* made = FactoryArg<Made>(info, "RaGraph is made by RaGraph.build() or RaGraph.load()");
    if (made == nullptr || !made->graph) throw Napi::TypeError::New(info.Env(), "RaGraph: no graph");
    graph_ = std::move(made->graph);
    stats_ = made->stats;
    memory_.Hold(info.Env(), int64_t(GraphBytes(*graph_)));
  }

  ~RaGraphJs() override { Release(); }

 private:
  struct Made {
    std::shared_ptr<const RaGraph> graph;
    std::optional<RaBuildStats> stats;
  };

  static Napi::Object Wrap(Napi::Env env, Made made) {
    return registry_.Get(env, "RaGraph").New({Napi::External<Made>::New(env, &made)});
  }

  void Release() {
    if (!graph_) return;
    graph_.reset();  // searches in flight hold their own reference
    memory_.Drop();
  }

  const std::shared_ptr<const RaGraph>& Live(Napi::Env env) const {
    if (!graph_) throw Napi::Error::New(env, "RaGraph was disposed");
    return graph_;
  }

  static Napi::Value Build(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    RaBuildInput in;
    RaGraphParams params;
    in.tokens = Int(o, "tokens", 0, kMaxTokens);
    in.headDim = int(Int(o, "headDim", 1, 1 << 16));
    in.dtype = KeyDtype(o);
    in.queryCount = Int(o, "queryCount", 0, kMaxSafeInt);
    params.degree = int(OptInt(o, "degree", 1, 1024, params.degree));
    params.kBuild = int(OptInt(o, "kBuild", 1, 4096, params.kBuild));
    params.maxQueries = OptInt(o, "maxQueries", 1, kMaxSafeInt, params.maxQueries);
    params.seed = uint64_t(OptInt(o, "seed", 0, kMaxSafeInt, int64_t(params.seed)));
    params.positional = int(OptInt(o, "positional", 0, 64, params.positional));
    params.keyNeighbors = int(OptInt(o, "keyNeighbors", 0, 1024, params.keyNeighbors));
    params.keyEf = int(OptInt(o, "keyEf", 1, 4096, params.keyEf));
    auto keys = TypedAt<uint16_t>(o, "keys", size_t(in.tokens) * in.headDim);
    std::vector<Napi::Value> keep{keys};
    in.keys = keys.Data();
    if (in.queryCount > 0) {
      auto queries = TypedAt<float>(o, "queries", size_t(in.queryCount) * in.headDim);
      in.queries = queries.Data();
      keep.push_back(queries);
    }
    auto made = std::make_shared<Made>();
    return RunAsync(
        env, keep,
        [=]() {
          RaBuildStats stats;
          made->graph = std::make_shared<const RaGraph>(RaGraph::Build(in, params, &stats));
          made->stats = stats;
        },
        [made](Napi::Env e) -> Napi::Value { return Wrap(e, std::move(*made)); });
  }

  static Napi::Value Load(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto bytes = BytesArg(info);
    Made made;
    made.graph = Guard(env, [&] {
      return std::make_shared<const RaGraph>(RaGraph::Deserialize(bytes.Data(), bytes.ElementLength()));
    });
    return Wrap(env, std::move(made));
  }

  static Napi::Value SearchBatch(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsArray()) throw Napi::TypeError::New(env, "Expected an array of searches");
    Napi::Array items = info[0].As<Napi::Array>();
    auto jobs = std::make_shared<std::vector<SearchJob>>();
    std::vector<Napi::Value> keep;
    for (uint32_t i = 0; i < items.Length(); ++i) {
      Napi::Object o = ObjectOf(items.Get(i), "search " + std::to_string(i));
      Napi::Value gv = o.Get("graph");
      if (!gv.IsObject() || !gv.As<Napi::Object>().InstanceOf(Constructor(env)))
        throw Napi::TypeError::New(env, "Expected a RaGraph for graph (search " + std::to_string(i) + ")");
      RaGraphJs* self = RaGraphJs::Unwrap(gv.As<Napi::Object>());
      jobs->push_back(ParseSearch(env, o, self->Live(env), keep));
    }
    return RunAsync(
        env, keep,
        [jobs]() { ThreadPool::Get().ParallelFor(jobs->size(), [&](size_t i) { (*jobs)[i].Run(); }); },
        [jobs](Napi::Env e) -> Napi::Value {
          Napi::Array out = Napi::Array::New(e, jobs->size());
          for (size_t i = 0; i < jobs->size(); ++i) out.Set(uint32_t(i), ResultObject(e, (*jobs)[i]));
          return out;
        });
  }

  static Napi::Function Constructor(Napi::Env env) {
    return registry_.Get(env, "RaGraph");
  }

  Napi::Value Save(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const RaGraph& g = *Live(env);
    return Adopt(env, Guard(env, [&] { return g.Serialize(); }));
  }

  Napi::Value Search(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    std::vector<Napi::Value> keep{info.This()};
    auto job = std::make_shared<SearchJob>(ParseSearch(env, ArgObject(info), Live(env), keep));
    return RunAsync(
        env, keep, [job]() { job->Run(); }, [job](Napi::Env e) -> Napi::Value { return ResultObject(e, *job); });
  }

  Napi::Value SearchSync(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    std::vector<Napi::Value> keep;
    SearchJob job = ParseSearch(env, ArgObject(info), Live(env), keep);
    Guard(env, [&] { job.Run(); });
    return ResultObject(env, job);
  }

  // The graph's codes of {keys, tokens, headDim, dtype} (made now if it has
  // none of these keys): {codes: [tokens, ceil(headDim/2)] bytes, low, step:
  // [headDim] f32}. For tests and tools: it copies the codes.
  // With pq: true the PQ codes (ra_pq_codes.h): {codes: [tokens, ceil(ceil(headDim/4)/2)]
  // bytes, centroids: [ceil(headDim/4), 16, 4] f32, outliers: ascending ids}.
  Napi::Value KeyCodes(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    if (Flag(o, "pq", false)) {
      const std::shared_ptr<const RaPqCodes> pq = PqCodesOf(env, o);
      Napi::Object res = Napi::Object::New(env);
      auto bytes = Napi::Uint8Array::New(env, size_t(pq->tokens()) * pq->rowBytes());
      if (pq->tokens() > 0) std::copy_n(pq->Row(0), bytes.ElementLength(), bytes.Data());
      res.Set("codes", bytes);
      res.Set("centroids", Adopt(env, std::vector<float>(pq->centroids())));
      auto outliers = Napi::Int32Array::New(env, pq->outliers().size());
      std::copy(pq->outliers().begin(), pq->outliers().end(), outliers.Data());
      res.Set("outliers", outliers);
      return res;
    }
    const std::shared_ptr<const RaKeyCodes> codes = CodesOf(env, o);
    Napi::Object res = Napi::Object::New(env);
    auto bytes = Napi::Uint8Array::New(env, size_t(codes->tokens()) * codes->rowBytes());
    if (codes->tokens() > 0) std::copy_n(codes->Row(0), bytes.ElementLength(), bytes.Data());
    res.Set("codes", bytes);
    res.Set("low", Adopt(env, std::vector<float>(codes->low())));
    res.Set("step", Adopt(env, std::vector<float>(codes->step())));
    return res;
  }

  // The approximate scaled logits the code walk computes, for {keys, tokens,
  // headDim, dtype, q [group, headDim], group, ids, scale?}: [ids, group] f32.
  // With pq: true the PQ codes' integer form (RaPqQuery's x̃).
  Napi::Value CodeLogits(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = ArgObject(info);
    const bool pqForm = Flag(o, "pq", false);
    if (pqForm && Flag(o, "quantized", false)) throw Napi::RangeError::New(env, "pq and quantized are two forms: set one");
    const std::shared_ptr<const RaPqCodes> pq = pqForm ? PqCodesOf(env, o) : nullptr;
    const std::shared_ptr<const RaKeyCodes> codes = pqForm ? nullptr : CodesOf(env, o);
    const int group = int(Int(o, "group", 1, 1024));
    const int d = Live(env)->headDim();
    const int64_t tokens = Live(env)->tokens();
    auto q = TypedAt<float>(o, "q", size_t(group) * d);
    auto ids = TypedAt<int32_t>(o, "ids");
    CheckIds(ids, tokens, "ids");
    float scale = 1.f / std::sqrt(float(d));
    if (!Absent(o.Get("scale"))) {
      scale = Float(o, "scale");
      if (!(scale > 0) || !std::isfinite(scale)) throw Napi::RangeError::New(env, "scale must be a finite number > 0");
    }
    const size_t count = ids.ElementLength();
    if (pq) {
      RaPqQuery pqq;
      pq->Prepare(q.Data(), group, scale, pqq);
      std::vector<float> byHead(size_t(group) * count), out(count * size_t(group));
      pq->Logits(pqq, ids.Data(), count, byHead.data(), count);
      for (size_t i = 0; i < count; ++i)
        for (int h = 0; h < group; ++h) out[i * group + h] = byHead[size_t(h) * count + i];
      return Adopt(env, std::move(out));
    }
    const bool quantized = Flag(o, "quantized", false);
    RaCodeQuery cq;
    codes->Prepare(q.Data(), group, scale, cq);
    std::vector<float> out(count * size_t(group));
    if (quantized) {
      // QuantLogits writes row-major by head: transposed to [ids, group].
      std::vector<float> byHead(size_t(group) * count);
      codes->QuantLogits(cq, ids.Data(), count, byHead.data(), count);
      for (size_t i = 0; i < count; ++i)
        for (int h = 0; h < group; ++h) out[i * group + h] = byHead[size_t(h) * count + i];
    } else {
      for (size_t i = 0; i < count; ++i) codes->Logits(cq, codes->Row(ids[i]), out.data() + i * group);
    }
    return Adopt(env, std::move(out));
  }

  std::shared_ptr<const RaKeyCodes> CodesOf(Napi::Env env, const Napi::Object& o) const {
    const RaGraph& g = *Live(env);
    if (Int(o, "tokens", 0, kMaxTokens) != g.tokens() || Int(o, "headDim", 1, 1 << 16) != g.headDim())
      throw Napi::RangeError::New(env, "tokens and headDim must be the graph's");
    auto keys = TypedAt<uint16_t>(o, "keys", size_t(g.tokens()) * g.headDim());
    const Dtype dtype = KeyDtype(o);
    return Guard(env, [&] { return g.KeyCodesFor(keys.Data(), dtype); });
  }

  std::shared_ptr<const RaPqCodes> PqCodesOf(Napi::Env env, const Napi::Object& o) const {
    const RaGraph& g = *Live(env);
    if (Int(o, "tokens", 0, kMaxTokens) != g.tokens() || Int(o, "headDim", 1, 1 << 16) != g.headDim())
      throw Napi::RangeError::New(env, "tokens and headDim must be the graph's");
    auto keys = TypedAt<uint16_t>(o, "keys", size_t(g.tokens()) * g.headDim());
    const Dtype dtype = KeyDtype(o);
    return Guard(env, [&] { return g.PqCodesFor(keys.Data(), dtype); });
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    Release();
    return info.Env().Undefined();
  }

  Napi::Value TokensJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(Live(info.Env())->tokens()));
  }
  Napi::Value HeadDimJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(Live(info.Env())->headDim()));
  }
  Napi::Value DegreeJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(Live(info.Env())->params().degree));
  }
  Napi::Value KBuildJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(Live(info.Env())->params().kBuild));
  }
  Napi::Value MaxQueriesJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(Live(info.Env())->params().maxQueries));
  }
  Napi::Value SeedJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(Live(info.Env())->params().seed));
  }
  Napi::Value QueriesUsedJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(Live(info.Env())->queriesUsed()));
  }
  Napi::Value EdgesJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(Live(info.Env())->edges()));
  }
  Napi::Value MaxDegreeJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(Live(info.Env())->maxDegree()));
  }
  Napi::Value PositionalJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(Live(info.Env())->params().positional));
  }
  Napi::Value KeyNeighborsJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(Live(info.Env())->params().keyNeighbors));
  }
  Napi::Value EntryPointsJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(Live(info.Env())->entries().size()));
  }
  Napi::Value MemoryBytesJs(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), graph_ ? double(GraphBytes(*graph_) + graph_->KeyCodeBytes() + graph_->WalkListBytes()) : 0.0);
  }
  Napi::Value BuildStatsJs(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!stats_) return env.Null();
    Napi::Object s = Napi::Object::New(env);
    s.Set("queriesUsed", Napi::Number::New(env, double(stats_->queriesUsed)));
    s.Set("unretrieved", Napi::Number::New(env, double(stats_->unretrieved)));
    s.Set("bridged", Napi::Number::New(env, double(stats_->bridged)));
    s.Set("knnSeconds", Napi::Number::New(env, stats_->knnSeconds));
    s.Set("projectSeconds", Napi::Number::New(env, stats_->projectSeconds));
    s.Set("keySeconds", Napi::Number::New(env, stats_->keySeconds));
    s.Set("connectSeconds", Napi::Number::New(env, stats_->connectSeconds));
    return s;
  }

  static ClassRegistry registry_;

  std::shared_ptr<const RaGraph> graph_;
  std::optional<RaBuildStats> stats_;
  ExternalMemory memory_;
};

ClassRegistry RaGraphJs::registry_;

}  // namespace

void InitRaGraph(Napi::Env env, Napi::Object exports) { exports.Set("RaGraph", RaGraphJs::Define(env)); }

std::shared_ptr<const RaGraph> RaGraphOf(Napi::Env env, const Napi::Value& v, const std::string& what) {
  if (!v.IsObject() || !v.As<Napi::Object>().InstanceOf(RaGraphJs::Constructor(env)))
    throw Napi::TypeError::New(env, "Expected a RaGraph for " + what);
  return RaGraphJs::Unwrap(v.As<Napi::Object>())->Live(env);
}

}  // namespace kvr
