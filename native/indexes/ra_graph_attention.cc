// RaGraph::Search ranked by the group's attention (RaAggregate::kAttention,
// see ra_graph.h): the key's softmax probability summed over the group's
// query rows, with each row's log-partition estimated from a strided sample
// of the keys and refined after the walk.
#include <algorithm>
#include <chrono>
#include <ctime>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "common/ranked_hits.h"
#include "common/simd_math.h"
#include "indexes/ra_graph.h"
#include "indexes/ra_graph_beam.h"
#include "indexes/ra_graph_code_scan.h"
#include "indexes/ra_graph_code_walk.h"
#include "indexes/ra_graph_dot.h"
#include "indexes/ra_graph_exp.h"

namespace kvr {
namespace {

// Sample size: n / kSampleShare keys, within [kSampleMin, kSampleMax] (all
// keys when n is smaller). At 1M keys 2048 (0.2% scanned): the bulk's mean
// exp-score, log-normal with a logit std near 1, is then known to a few
// percent, a few hundredths of a logit in lse.
constexpr int64_t kSampleShare = 512, kSampleMin = 64, kSampleMax = 4096;
// The best sample keys start the walk besides the entry points: a coarse
// layer scored anyway, whose best keys sit near the query's region. At most
// one in kSampleSeedShare of the sample: a seeded key counts as reached, so
// the unreached sample that stands for the unreached keys loses its best
// (at 40K keys, 16 seeds of a 78-key sample put the partitions 0.5 logits
// low).
constexpr int64_t kSampleSeeds = 16, kSampleSeedShare = 64;
constexpr int kMaxGroup = 64;
static_assert(kMaxGroup <= ragraph::kCodeRankRows, "the code walk ranks up to kCodeRankRows rows");

// log Σ exp(x_i) of a running sum kept relative to a fixed reference.
struct LogSum {
  double ref = -std::numeric_limits<double>::infinity(), sum = 0;
  void Add(double x) {
    if (x > ref) {
      sum = sum * std::exp(ref - x) + 1.0;
      ref = x;
    } else {
      sum += std::exp(x - ref);
    }
  }
  void AddScaled(double x, double times) {  // times · exp(x)
    if (times <= 0) return;
    Add(x + std::log(times));
  }
  double Value() const { return sum > 0 ? ref + std::log(sum) : -std::numeric_limits<double>::infinity(); }
};

// Step 4's bound is exact in real arithmetic; the floats of rank and of the
// final score each carry a few ulps. This slack (relative to the logits'
// size) is far above those and far below any real gap.
constexpr float kPruneSlack = 1e-4f;

// The profile's phases are in the thread's CPU time (a loaded machine's
// waits for a core would otherwise swamp them); a batch of keys' scoring is
// timed by the wall clock, too short to be preempted but for rare outliers
// (over kPreemptedMs a key), which are dropped.
double CpuMs() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return double(t.tv_sec) * 1e3 + double(t.tv_nsec) * 1e-6;
}
using Clock = std::chrono::steady_clock;
constexpr double kPreemptedMs = 0.05;

// The walk rank of `count` keys (at most kRankBatch) whose G logits are
// x + i·G: best + ln Σ_h e^(x_h − c0_h − best) for best = max_h (x_h − c0_h),
// the logs four keys at a time.
constexpr size_t kRankBatch = 8;
// The walk's batches (ra_graph_beam.h) go to Ranks whole: at 16 they overran
// its arrays (the ids changed from run to run).
static_assert(ragraph::kScoreBatch <= kRankBatch && ragraph::kPrefetchAhead <= kRankBatch, "a walk batch must fit Ranks' arrays");
#ifdef KVR_X86_SIMD
// max over the four lanes, as std::max folded from -inf gives it (no NaN
// here: with one it could differ).
inline float MaxLane4(__m128 v) {
  __m128 mx = _mm_max_ps(v, _mm_shuffle_ps(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  mx = _mm_max_ps(mx, _mm_shuffle_ps(mx, mx, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(mx);
}
#endif
void Ranks(const float* x, size_t count, int G, const float* c0, float* out) {
  double sums[kRankBatch], logs[kRankBatch];
  float bests[kRankBatch];
#ifdef KVR_X86_SIMD
  if (G == 4) {
    // The loop below for four rows, in registers: the same operations in the same order.
    const __m128 c = _mm_loadu_ps(c0);
    for (size_t i = 0; i < count; ++i, x += 4) {
      const __m128 v = _mm_sub_ps(_mm_loadu_ps(x), c);
      const float best = MaxLane4(v);
      alignas(32) double e[4];
      _mm256_store_pd(e, ragraph::Exp4d(_mm256_cvtps_pd(_mm_sub_ps(v, _mm_set1_ps(best)))));
      sums[i] = ((e[0] + e[1]) + e[2]) + e[3];
      bests[i] = best;
    }
    ragraph::LogN(sums, int(count), logs);
    for (size_t i = 0; i < count; ++i) out[i] = bests[i] + float(logs[i]);
    return;
  }
#endif
  for (size_t i = 0; i < count; ++i, x += G) {
    float best = -std::numeric_limits<float>::infinity();
    for (int h = 0; h < G; ++h) best = std::max(best, x[h] - c0[h]);
    double a[kMaxGroup], e[kMaxGroup];
    for (int h = 0; h < G; ++h) a[h] = double(x[h] - c0[h] - best);
    ragraph::ExpN(a, G, e);
    double sum = 0;
    for (int h = 0; h < G; ++h) sum += e[h];
    sums[i] = sum;
    bests[i] = best;
  }
  ragraph::LogN(sums, int(count), logs);
  for (size_t i = 0; i < count; ++i) out[i] = bests[i] + float(logs[i]);
}

// Sorts the keys ascending: LSD radix over their bytes, a pass skipped
// where every key has the same byte (the ids' high bytes, mostly). The
// final step's ~10K-30K keys sorted so cost a few times less than
// nth_element then std::sort of the kept (~4% of a search at 1M keys); the
// keys are distinct, so the order is the one any sort gives.
void RadixSort(std::vector<uint64_t>& a, std::vector<uint64_t>& tmp) {
  const size_t n = a.size();
  if (n < 2) return;
  tmp.resize(n);
  uint32_t hist[8][256] = {};
  for (const uint64_t x : a)
    for (int b = 0; b < 8; ++b) ++hist[b][(x >> (8 * b)) & 255];
  uint64_t *src = a.data(), *dst = tmp.data();
  for (int b = 0; b < 8; ++b) {
    uint32_t* h = hist[b];
    if (h[(src[0] >> (8 * b)) & 255] == n) continue;
    uint32_t sum = 0;
    for (int i = 0; i < 256; ++i) {
      const uint32_t c = h[i];
      h[i] = sum;
      sum += c;
    }
    for (size_t i = 0; i < n; ++i) {
      const uint64_t x = src[i];
      dst[h[(x >> (8 * b)) & 255]++] = x;
    }
    std::swap(src, dst);
  }
  if (src != a.data()) std::copy(src, src + n, a.data());
}

// The k-th largest of v (k >= 1, k <= v.size()), the value
// std::nth_element with std::greater leaves at v[k - 1]: the values binned
// by a linear map of [min, max] (monotone in float arithmetic, so a higher
// bin holds no smaller value), the bin holding the k-th found from the top,
// and only that bin's values selected among. At 1M keys ~30K values: a few
// times cheaper than nth_element over all of them. Where a value is NaN or
// the range is not finite, nth_element as before. v is left reordered.
float KthLargest(std::vector<float>& v, size_t k, std::vector<float>& bin) {
  float lo = v[0], hi = v[0];
  bool nan = false;
  size_t i = 0;
#ifdef KVR_X86_SIMD
  // Eight lanes a step: the scalar loop's min and max chain one compare a
  // value (which of two equal zeros is kept does not matter below).
  if (v.size() >= 8) {
    __m256 mn = _mm256_loadu_ps(v.data()), mx = mn, un = _mm256_cmp_ps(mn, mn, _CMP_UNORD_Q);
    for (i = 8; i + 8 <= v.size(); i += 8) {
      const __m256 x = _mm256_loadu_ps(v.data() + i);
      mn = _mm256_min_ps(mn, x), mx = _mm256_max_ps(mx, x);
      un = _mm256_or_ps(un, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    }
    alignas(32) float a[8], b[8];
    _mm256_store_ps(a, mn);
    _mm256_store_ps(b, mx);
    for (int l = 0; l < 8; ++l) lo = std::min(lo, a[l]), hi = std::max(hi, b[l]);
    nan = _mm256_movemask_ps(un) != 0;
  }
#endif
  for (; i < v.size(); ++i) lo = std::min(lo, v[i]), hi = std::max(hi, v[i]), nan |= v[i] != v[i];
  if (nan || !std::isfinite(hi - lo) || !(hi > lo)) {
    std::nth_element(v.begin(), v.begin() + (k - 1), v.end(), std::greater<float>());
    return v[k - 1];
  }
  constexpr int kBins = 2048;
  const float scale = float(kBins - 1) / (hi - lo);
  uint32_t count[kBins] = {};
  for (const float x : v) ++count[int((x - lo) * scale)];
  int b = kBins - 1;
  size_t above = 0;
  while (above + count[b] < k) above += count[b--];
  bin.clear();
  for (const float x : v)
    if (int((x - lo) * scale) == b) bin.push_back(x);
  const size_t r = k - above;  // 1-based rank within the bin
  std::nth_element(bin.begin(), bin.begin() + (r - 1), bin.end(), std::greater<float>());
  return bin[r - 1];
}

// A search's working memory, kept per thread across searches (at 1M keys a
// search fills ~72K entries of each walk array) and looked up once: every
// thread_local access in this shared library is a call (__tls_get_addr).
struct AttentionScratch {
  std::vector<float> row, sampleX, sampleRank, walkX, walkRank, ranks, uppers, bin, codeX, codeRank;
  RaCodeQuery cq;
  RaPqQuery pqq;
  ragraph::CodeWalkScratch codeWalk;
  ragraph::CodeScanScratch codeScan;
  std::vector<const float*> finalX;
  std::vector<uint8_t> sampleReached;
  std::vector<int32_t> walkIds, seeds, codeIds;
  std::vector<Hit> top, all, best;
  std::vector<uint64_t> order, sortTmp;
};

}  // namespace

std::shared_ptr<const std::vector<uint16_t>> RaGraph::FixedRowsFor(const uint16_t* keys, int64_t m, int64_t off,
                                                                   int64_t stride) const {
  std::lock_guard<std::mutex> hold(fixed_->lock);
  if (fixed_->keys != keys || !fixed_->rows) {
    const size_t d = size_t(d_);
    auto rows = std::make_shared<std::vector<uint16_t>>((size_t(m) + entries_.size()) * d);
    for (int64_t j = 0; j < m; ++j) std::copy_n(keys + size_t(off + j * stride) * d, d, rows->data() + size_t(j) * d);
    for (size_t e = 0; e < entries_.size(); ++e)
      std::copy_n(keys + size_t(entries_[e]) * d, d, rows->data() + (size_t(m) + e) * d);
    fixed_->rows = std::move(rows);
    fixed_->keys = keys;
  }
  return fixed_->rows;
}

RaSearchResult RaGraph::SearchAttention(const uint16_t* keys, Dtype dtype, const float* q, int group, int k,
                                        int64_t ef, int32_t* outIds, float* outScores,
                                        const RaSearchOptions& opt) const {
  RaSearchResult res;
  const int64_t keep = std::min<int64_t>(k, n_);
  if (keep <= 0 || group <= 0) return res;
  const int G = std::min(group, kMaxGroup);
  const int d = d_;
  const int64_t n = n_;
  const float scale = opt.scale > 0 ? opt.scale : 1.f / std::sqrt(float(d));
  RaSearchProfile* prof = opt.profile;
  double t0 = prof ? CpuMs() : 0;
  // On the heap (Visited::Local says why).
  thread_local std::unique_ptr<AttentionScratch> scratch(new AttentionScratch);
  AttentionScratch& S = *scratch;
  S.row.resize(size_t(d));
  // x_h = scale·q_h·k for the G rows, exactly the kernels' dot products.
  auto logitsAt = [&](const uint16_t* row, float* x) { ragraph::ScaledDots(q, G, row, dtype, d, scale, x, S.row.data()); };
  auto logits = [&](int32_t id, float* x) { logitsAt(keys + size_t(id) * d, x); };

  // 0. The free start keys' logits are exact and known before the walk (the
  //    caller attends them anyway): they enter the partitions' estimate as
  //    they are, and the sample stands only for the other keys. A sink can
  //    hold much of a row's mass that a strided sample misses; without it
  //    the walk's ranking overweights that row's keys.
  LogSum freeSum[kMaxGroup];
  int64_t freeCount = 0;
  ragraph::Visited* isFree = nullptr;
  if (opt.freeSeedCount > 0) {
    isFree = &ragraph::Visited::Local(n);  // cleared again by the walk, which marks them itself
    float x[kMaxGroup];
    for (size_t i = 0; i < opt.freeSeedCount; ++i) {
      const int32_t id = opt.freeSeeds[i];
      if (id < 0 || id >= n || isFree->TestAndSet(id)) continue;
      logits(id, x);
      ++freeCount;
      for (int h = 0; h < G; ++h) freeSum[h].Add(x[h]);
    }
  }

  // 1. The strided sample: keys off + j·stride, j < m.
  const int64_t want = std::min<int64_t>(n, std::min(kSampleMax, std::max(kSampleMin, n / kSampleShare)));
  const int64_t stride = std::max<int64_t>(1, n / want), off = stride / 2;
  const int64_t m = (n - off + stride - 1) / stride;
  S.sampleX.resize(size_t(m) * G);
  S.sampleReached.assign(size_t(m), 0);
  LogSum sampleSum[kMaxGroup];
  int64_t sampleOthers = 0;  // sample keys that are not free start keys
  // The sample's rows and the entry points', the same in every search,
  // copied side by side (FixedRows): read in order, they no longer wait one
  // page each (~1 ms of a ~7 ms search at 1M keys capped at 3%, 2-core VM).
  const std::shared_ptr<const std::vector<uint16_t>> fixed = FixedRowsFor(keys, m, off, stride);
  for (int64_t j = 0; j < m; ++j) {
    float* x = S.sampleX.data() + size_t(j) * G;
    const int32_t id = int32_t(off + j * stride);
    logitsAt(fixed->data() + size_t(j) * d, x);
    if (isFree && isFree->Test(id)) continue;
    ++sampleOthers;
    for (int h = 0; h < G; ++h) sampleSum[h].Add(x[h]);
  }
  // lse_h before the walk: the sample's mean exp-score times the keys it
  // stands for, plus the free keys' exact sum.
  float c0[kMaxGroup];
  for (int h = 0; h < G; ++h) {
    LogSum all = freeSum[h];
    if (sampleOthers > 0) all.AddScaled(sampleSum[h].Value(), double(n - freeCount) / double(sampleOthers));
    c0[h] = float(all.Value());
  }
  // The sample's walk ranks: its best keys seed the walk, its unreached keys
  // are bounded in step 4.
  S.sampleRank.resize(size_t(m));
  for (int64_t j = 0; j < m; j += int64_t(kRankBatch))
    Ranks(S.sampleX.data() + size_t(j) * G, size_t(std::min<int64_t>(int64_t(kRankBatch), m - j)), G, c0,
          S.sampleRank.data() + j);
  // ids < 2^31: divisibility and quotient by one 64-bit multiply each
  // (Lemire, Kaser & Kurz, "Faster remainder by direct computation", exact
  // for 32-bit numerators): the code walk asks this of every key it meets,
  // and a division took ~5% of its time at 1M keys. Stride 1 wraps the
  // magic to 0, where every key divides and the quotient is the key itself.
  const uint64_t strideMagic = ~uint64_t(0) / uint64_t(stride) + 1;
  auto sampleIndex = [&](int32_t id) -> int64_t {
    const int64_t r = int64_t(id) - off;
    if (r < 0) return -1;
    const uint64_t r32 = uint64_t(uint32_t(r));
    if (strideMagic * r32 > strideMagic - 1) return -1;
    const int64_t j = stride == 1 ? int64_t(r32) : int64_t((__uint128_t(strideMagic) * r32) >> 64);
    return j < m ? j : -1;
  };

  // 2. The walk, ranked by the estimated log of the group's summed
  //    probability; every key it scores is kept with its G logits and its
  //    rank, and each row's exact sum over the keys reached is kept as it goes
  //    (step 3's sums, in the same order).
  S.walkIds.clear();
  S.walkX.clear();
  S.walkRank.clear();
  ragraph::LogSums reachedSum(G);
  int64_t reusedSample = 0;
  S.seeds.assign(opt.seeds, opt.seeds + opt.seedCount);
  {
    S.best.clear();
    const size_t take = size_t(std::min(kSampleSeeds, m / kSampleSeedShare));
    for (int64_t j = 0; j < m && take > 0; ++j)
      ragraph::OfferHit(S.best, take, Hit{S.sampleRank[size_t(j)], int32_t(off + j * stride)});
    for (const Hit& h : S.best) S.seeds.push_back(h.id);
  }
  const size_t beam = size_t(std::min<int64_t>(std::max<int64_t>(ef, keep), n));
  if (prof) prof->sampleMs += CpuMs() - t0, t0 = CpuMs();
  // A batch's logits first (their rows load side by side), then in the
  // walk's order the partition sums, then the ranks.
  struct WalkScorer {
    AttentionScratch& S;
    const decltype(logits)& logitsOf;
    const decltype(logitsAt)& logitsOfRow;
    const decltype(sampleIndex)& sampleOf;
    const float* c0;
    ragraph::LogSums& reachedSum;
    int64_t& reusedSample;
    int G;
    RaSearchProfile* prof;
    void Batch(const int32_t* ids, size_t count, float* out, const uint16_t* const* rows) {
      const Clock::time_point ts = prof ? Clock::now() : Clock::time_point();
      const size_t at = S.walkIds.size();
      S.walkX.resize((at + count) * size_t(G));
      float* x0 = S.walkX.data() + at * size_t(G);
      for (size_t i = 0; i < count; ++i) {
        float* x = x0 + i * size_t(G);
        const int64_t j = sampleOf(ids[i]);
        if (j >= 0) {
          std::copy_n(S.sampleX.data() + size_t(j) * G, G, x);
          S.sampleReached[size_t(j)] = 1;
          ++reusedSample;
        } else if (rows) {
          logitsOfRow(rows[i], x);
        } else {
          logitsOf(ids[i], x);
        }
      }
      for (size_t i = 0; i < count; ++i) {
        reachedSum.Add(x0 + i * size_t(G), G);
        S.walkIds.push_back(ids[i]);
      }
      Ranks(x0, count, G, c0, out);
      S.walkRank.insert(S.walkRank.end(), out, out + count);
      if (prof) {
        const double ms = std::chrono::duration<double, std::milli>(Clock::now() - ts).count();
        if (ms < kPreemptedMs * double(count)) prof->scoreMs += ms;
      }
    }
  } scorer{S, logits, logitsAt, sampleIndex, c0, reachedSum, reusedSample, G, prof};
  // The code-gated walk instead (ra_graph_code_walk.h): the keys read as codes
  // only enter step 3's partitions at their approximate logits (codeSum).
  int64_t walked = 0, codesRead = 0, codedOnly = 0, codesKept = 0;  // codedOnly: read as codes, never scored exactly
  ragraph::LogSums codeSum(G);
  const ragraph::CsrView csr{offsets_.data(), neighbors_.data()};
  const int64_t maxWalk = opt.maxScanned > 0 ? std::max<int64_t>(1, opt.maxScanned - m) : 0;
  if (opt.codeWalk) {
    const std::shared_ptr<const RaKeyCodes> codes = KeyCodesFor(keys, dtype);
    codes->Prepare(q, G, scale, S.cq);
    ragraph::CodeScorer approx{*codes, S.cq, c0, codeSum, S.codeX};
    const float cut = ragraph::CodeCut(approx, off, stride, m, opt.codeQuantile, opt.codeDelta, S.codeIds, S.codeRank);
    // The queue's fine range: the sample's walk scores, widened below and
    // above (the top keys lie beyond a 1-in-512 sample's best).
    float lo = std::numeric_limits<float>::infinity(), hi = -lo;
    for (const float r : S.sampleRank) lo = std::min(lo, r), hi = std::max(hi, r);
    auto walk = [&](const auto& graph) {
      return ragraph::CodeGatedWalk(
          graph, n, entries_.data(), entries_.size(), fixed->data() + size_t(m) * d, S.seeds.data(), S.seeds.size(),
          opt.freeSeeds, opt.freeSeedCount, keys, d, scorer, approx, [&](int32_t id) { return sampleIndex(id) >= 0; },
          [&](int32_t id) { return codes->Row(id); }, cut, lo - 8.f, hi + 24.f, maxWalk, opt.maxCodes,
          size_t(std::max(1, opt.codeWidth)), opt.codeAdapt, S.codeWalk);
    };
    // The lists in slots (ra_walk_lists.h) where they hold the graph.
    const std::shared_ptr<const RaWalkLists> lists = WalkListsFor();
    const ragraph::CodeWalkCounts counts =
        lists ? walk(ragraph::SlotWalkView{lists->slots.get(), lists->overflow.data()}) : walk(ragraph::CsrWalkView{csr});
    walked = counts.exact;
    codesRead = counts.codes;
    codedOnly = counts.codedOnly;
  } else if (opt.codeScan) {
    // Every key's code, then the best maxScanned − m exactly (ra_graph_code_scan.h): no key is left coded only.
    const std::shared_ptr<const RaKeyCodes> codes = KeyCodesFor(keys, dtype);
    codes->Prepare(q, G, scale, S.cq);
    const std::shared_ptr<const RaPqCodes> pq = opt.scanKeep > 0 ? PqCodesFor(keys, dtype) : nullptr;  // scanKeep
    if (pq) pq->Prepare(q, G, scale, S.pqq);
    const ragraph::CodeScanCounts counts = ragraph::CodeScan(
        *codes, S.cq, c0, n, entries_.data(), entries_.size(), S.seeds.data(), S.seeds.size(), opt.freeSeeds,
        opt.freeSeedCount, opt.maxScanned - m, off, stride, m, opt.scanChunk, keys, d, scorer, S.codeScan,
        pq.get(), &S.pqq, opt.scanKeep);
    walked = counts.exact;
    codesRead = counts.codes;
    codesKept = counts.kept;
  } else {
    // The walk's shape only where asked: the engine's searches count nothing.
    ragraph::WalkStats stats;
    stats.poolCap = size_t(std::max<int64_t>(0, opt.poolCap));
    const bool counted = opt.walkStats || opt.poolCap > 0;
    walked = ragraph::BeamSearchBatched(
        csr, n, entries_.data(), entries_.size(), S.seeds.data(), S.seeds.size(), beam, keys, d, scorer, S.top,
        size_t(keep), opt.margin, maxWalk, opt.freeSeeds, opt.freeSeedCount, fixed->data() + size_t(m) * d,
        size_t(std::max(1, opt.expandWidth)), counted ? &stats : nullptr);
    res.rounds = stats.rounds;
    res.expanded = stats.expanded;
    res.startKeys = stats.startKeys;
    res.peakCandidates = stats.peakCandidates;
  }
  // The free start keys were scored first: the walk's first `freeKeys`
  // entries. Their logits stay in the partitions (step 3); the result and
  // the scanned count leave them out.
  const int64_t freeKeys = int64_t(S.walkIds.size()) - walked;
  int64_t reusedFree = 0;
  for (int64_t i = 0; i < freeKeys; ++i) reusedFree += sampleIndex(S.walkIds[size_t(i)]) >= 0 ? 1 : 0;
  res.scanned = m + walked - (reusedSample - reusedFree);
  res.codesRead = codesRead;
  res.codesKept = codesKept;
  if (prof) prof->walkMs += CpuMs() - t0, t0 = CpuMs();

  // 3. lse_h refined: the walk's keys exactly, the sample's unreached keys
  //    exactly, the keys read only as codes at their approximate logits, and
  //    the rest of the unreached keys at the unreached sample's mean (they
  //    are, like it, a uniform draw from what the walk missed).
  const int64_t reached = int64_t(S.walkIds.size());
  int64_t unreachedSample = 0;
  for (int64_t j = 0; j < m; ++j) unreachedSample += S.sampleReached[size_t(j)] ? 0 : 1;
  const int64_t rest = n - reached - codedOnly - unreachedSample;
  LogSum miss[kMaxGroup];
  if (unreachedSample > 0)
    for (int64_t j = 0; j < m; ++j)
      if (!S.sampleReached[size_t(j)])
        for (int h = 0; h < G; ++h) miss[h].Add(S.sampleX[size_t(j) * G + h]);
  float c[kMaxGroup];
  for (int h = 0; h < G; ++h) {
    LogSum all;
    all.ref = reachedSum.ref[h];
    all.sum = reachedSum.sum[h];
    if (codedOnly > 0) {
      LogSum coded;
      coded.ref = codeSum.ref[h];
      coded.sum = codeSum.sum[h];
      all.Add(coded.Value());
    }
    if (unreachedSample > 0) {
      all.Add(miss[h].Value());
      if (rest > 0) all.AddScaled(miss[h].Value(), double(rest) / double(unreachedSample));
    }
    c[h] = float(all.Value());
  }

  if (prof) prof->refineMs += CpuMs() - t0, t0 = CpuMs();

  // 4. The best keep of every key scored, by log of the mean probability.
  //    Its exponentials are spent only where they can matter. A key's final
  //    score + log G, log Σ_h exp(x_h − c_h), lies within [m, m + log G] for
  //    m = max_h (x_h − c_h), and within [r + min_h δ_h, r + max_h δ_h] of its
  //    walk rank r for δ_h = c0_h − c_h. So a key whose upper bound is below
  //    the keep-th largest lower bound (less a rounding slack) cannot enter
  //    the best keep, and the set and order written are those of scoring
  //    every key. At 1M keys this leaves ~1/3 of the keys scored.
  const float logG = std::log(float(group));
  // out[i] = ln((1/G) Σ_h e^(x_h − c_h)) for the count keys xs[i], the logs four at a time.
  auto finalScores = [&](const float* const* xs, size_t count, float* out) {
    double sums[kRankBatch], logs[kRankBatch];
    size_t i = 0;
#ifdef KVR_X86_SIMD
    if (G == 4) {
      // The loop below for four rows, in registers: the same operations in the same order.
      const __m256d cd = _mm256_cvtps_pd(_mm_loadu_ps(c));
      for (; i < count; ++i) {
        alignas(32) double e[4];
        _mm256_store_pd(e, ragraph::Exp4d(_mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(xs[i])), cd)));
        sums[i] = ((e[0] + e[1]) + e[2]) + e[3];
      }
    }
#endif
    for (; i < count; ++i) {
      double a[kMaxGroup], e[kMaxGroup];
      for (int h = 0; h < G; ++h) a[h] = double(xs[i][h]) - double(c[h]);
      ragraph::ExpN(a, G, e);
      double sum = 0;
      for (int h = 0; h < G; ++h) sum += e[h];
      sums[i] = sum;
    }
    ragraph::LogN(sums, int(count), logs);
    for (size_t t = 0; t < count; ++t) out[t] = sums[t] > 0 ? float(logs[t]) - logG : -std::numeric_limits<float>::infinity();
  };
  const float logRows = std::log(float(G));
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  for (int h = 0; h < G; ++h) lo = std::min(lo, c0[h] - c[h]), hi = std::max(hi, c0[h] - c[h]);
#ifdef KVR_X86_SIMD
  const __m128 c4 = _mm_loadu_ps(c);  // c has kMaxGroup entries
#endif
  auto maxShifted = [&](const float* x) {
#ifdef KVR_X86_SIMD
    if (G == 4) return MaxLane4(_mm_sub_ps(_mm_loadu_ps(x), c4));
#endif
    float m = -std::numeric_limits<float>::infinity();
    for (int h = 0; h < G; ++h) m = std::max(m, x[h] - c[h]);
    return m;
  };
  const int64_t scored = reached - freeKeys + unreachedSample;
  const bool prune = scored > keep && std::isfinite(lo) && std::isfinite(hi);
  // Each scored key's bounds in one pass (its max over the rows once), then
  // the cut, then the keys whose upper bound reaches it compacted without a
  // branch: about half of them do, in no order a branch could predict.
  S.all.resize(size_t(scored));
  S.finalX.resize(size_t(scored));
  S.uppers.resize(size_t(scored));
  S.ranks.resize(prune ? size_t(scored) : 0);
  size_t at = 0;
  auto bound = [&](const float* x, float r, int32_t id) {
    const float top = maxShifted(x);
    if (prune) S.ranks[at] = std::max(top, r + lo);
    S.uppers[at] = std::min(top + logRows, r + hi);
    S.all[at] = Hit{0.f, id};
    S.finalX[at] = x;
    ++at;
  };
  for (int64_t i = freeKeys; i < reached; ++i) bound(S.walkX.data() + size_t(i) * G, S.walkRank[size_t(i)], S.walkIds[size_t(i)]);
  for (int64_t j = 0; j < m; ++j)
    if (!S.sampleReached[size_t(j)]) bound(S.sampleX.data() + size_t(j) * G, S.sampleRank[size_t(j)], int32_t(off + j * stride));
  float cut = -std::numeric_limits<float>::infinity();
  if (prune) {
    const float kth = KthLargest(S.ranks, size_t(keep), S.bin);
    // r carries float error of the order of |x - c0|, i.e. of |lo| and |hi| (large when every row's sample estimate is far off).
    if (std::isfinite(kth)) cut = kth - kPruneSlack * (1.f + std::abs(kth) + logRows + std::abs(hi) + std::abs(lo));
  }
  size_t kept = 0;
  for (size_t i = 0; i < at; ++i) {
    S.all[kept] = S.all[i];
    S.finalX[kept] = S.finalX[i];
    kept += S.uppers[i] >= cut ? 1 : 0;
  }
  S.all.resize(kept);
  S.finalX.resize(kept);
  for (size_t i = 0; i < S.all.size(); i += kRankBatch) {
    float sc[kRankBatch];
    const size_t cnt = std::min(kRankBatch, S.all.size() - i);
    finalScores(S.finalX.data() + i, cnt, sc);
    for (size_t t = 0; t < cnt; ++t) S.all[i + t].score = sc[t];
  }
  const int64_t count = std::min<int64_t>(keep, int64_t(S.all.size()));
  // Sorted as 64-bit keys that order as Better does (score descending, then
  // id ascending; the order is total: ids are unique).
  S.order.resize(S.all.size());
  for (size_t i = 0; i < S.all.size(); ++i) S.order[i] = ragraph::BetterKey(S.all[i].score, S.all[i].id);
  RadixSort(S.order, S.sortTmp);
  for (int64_t i = 0; i < count; ++i) {
    const uint64_t key = S.order[size_t(i)];
    outIds[i] = int32_t(uint32_t(key));
    outScores[i] = ragraph::ScoreOfKey(key);
  }
  res.count = count;
  if (prof) prof->finalMs += CpuMs() - t0, prof->finalScored += int64_t(S.all.size());
  return res;
}

}  // namespace kvr
