// RaKeyCodes (ra_key_codes.h): building the codes and the approximate logits.
#include "indexes/ra_key_codes.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <mutex>
#include <stdexcept>

#include <sys/mman.h>

#include "common/thread_pool.h"
#include "indexes/ra_graph.h"
#include "indexes/ra_graph_dot.h"

namespace kvr {
namespace {

// Rows per task: enough to amortise a task's per-channel sums, few enough
// that 2..16 cores share the work evenly.
constexpr int64_t kRowsPerTask = 8192;

}  // namespace

RaKeyCodes RaKeyCodes::Build(const uint16_t* keys, int64_t n, int d, Dtype dtype) {
  if (n < 0 || d <= 0) throw std::invalid_argument("RaKeyCodes: bad shape");
  RaKeyCodes kc;
  kc.n_ = n;
  kc.d_ = d;
  kc.half_ = size_t(d + 1) / 2;
  const size_t D = size_t(d);
  const size_t tasks = size_t((n + kRowsPerTask - 1) / kRowsPerTask);
  ThreadPool& pool = ThreadPool::Get();
  // Sums per task in double, added in task order afterwards: the result does
  // not depend on which thread ran what. The spread is summed about the mean
  // (a second pass): outlier channels have means many σ from zero, where
  // Σx² − n·μ² loses the σ to cancellation.
  std::vector<double> part(tasks * D, 0.0);
  auto sums = [&](const double* mu) {
    std::fill(part.begin(), part.end(), 0.0);
    pool.ParallelFor(tasks, [&](size_t t) {
      std::vector<float> row(D);
      double* s = part.data() + t * D;
      const int64_t end = std::min<int64_t>(n, int64_t(t + 1) * kRowsPerTask);
      for (int64_t i = int64_t(t) * kRowsPerTask; i < end; ++i) {
        WidenRow(keys + size_t(i) * D, dtype, D, row.data());
        if (mu) {
          for (size_t j = 0; j < D; ++j) s[j] += (double(row[j]) - mu[j]) * (double(row[j]) - mu[j]);
        } else {
          for (size_t j = 0; j < D; ++j) s[j] += double(row[j]);
        }
      }
    });
    std::vector<double> total(D, 0.0);
    for (size_t t = 0; t < tasks; ++t)
      for (size_t j = 0; j < D; ++j) total[j] += part[t * D + j];
    for (double& x : total) x /= double(std::max<int64_t>(n, 1));
    return total;
  };
  const std::vector<double> mu = sums(nullptr);
  const std::vector<double> var = sums(mu.data());
  kc.low_.resize(D);
  kc.step_.resize(D);
  std::vector<float> inv(D);
  for (size_t j = 0; j < D; ++j) {
    const double sd = std::sqrt(var[j]);
    kc.low_[j] = float(mu[j] - kSigmas * sd);
    kc.step_[j] = float(2 * kSigmas * sd / kLevels);
    inv[j] = kc.step_[j] > 0 ? 1.f / kc.step_[j] : 0.f;  // a constant channel: every key at level 0, its value
  }
  kc.bytes_ = size_t(n) * kc.half_;
  if (kc.bytes_ > 0) {
    // 2 MB pages (ra_key_codes.h) where the rounding wastes at most an eighth.
    constexpr size_t kLine = 64, kHuge = size_t(2) << 20;
    const bool huge = kc.bytes_ >= 8 * kHuge;
    const size_t align = huge ? kHuge : kLine, total = (kc.bytes_ + align - 1) / align * align;
    kc.codes_.reset(static_cast<uint8_t*>(std::aligned_alloc(align, total)));
    if (!kc.codes_) throw std::bad_alloc();
    if (huge) madvise(kc.codes_.get(), total, MADV_HUGEPAGE);
    std::memset(kc.codes_.get(), 0, kc.bytes_);
  }
  pool.ParallelFor(tasks, [&](size_t t) {
    std::vector<float> row(D);
    const int64_t end = std::min<int64_t>(n, int64_t(t + 1) * kRowsPerTask);
    for (int64_t i = int64_t(t) * kRowsPerTask; i < end; ++i) {
      WidenRow(keys + size_t(i) * D, dtype, D, row.data());
      uint8_t* out = kc.codes_.get() + size_t(i) * kc.half_;
      for (size_t j = 0; j < D; ++j) {
        const float f = std::floor((row[j] - kc.low_[j]) * inv[j]);
        // NaN and ±inf clamp too (the comparisons fail towards 0 or 15).
        const int c = f >= float(kLevels - 1) ? kLevels - 1 : (f >= 0.f ? int(f) : 0);
        if (j < kc.half_) out[j] |= uint8_t(c);
        else out[j - kc.half_] |= uint8_t(c << 4);
      }
    }
  });
  return kc;
}

void RaKeyCodes::Free::operator()(uint8_t* p) const { std::free(p); }

void RaKeyCodes::Prepare(const float* q, int G, float scale, RaCodeQuery& out) const {
  const size_t D = size_t(d_);
  out.G = G;
  out.width = 2 * half_;
  out.w.assign(size_t(G) * out.width, 0.f);
  out.bias.assign(size_t(G), 0.f);
  for (int h = 0; h < G; ++h) {
    const float* qh = q + size_t(h) * D;
    double b = 0;
    // Nibble order is channel order: low nibbles are channels 0..half-1, high ones half..2·half-1.
    for (size_t j = 0; j < D; ++j) {
      out.w[size_t(h) * out.width + j] = scale * qh[j] * step_[j];
      b += double(qh[j]) * (double(low_[j]) + 0.5 * double(step_[j]));
    }
    out.bias[size_t(h)] = float(double(scale) * b);
  }
  // The int8 form (RaCodeQuery): each head's weights over its largest.
  out.G4 = (G + 3) / 4 * 4;
  out.w8.assign(size_t(out.G4) * out.width, 0);
  out.qscale.assign(size_t(out.G4), 0.f);
  out.qbias.assign(size_t(out.G4), 0.f);
  for (int h = 0; h < G; ++h) {
    const float* w = out.w.data() + size_t(h) * out.width;
    float top = 0;
    for (size_t j = 0; j < D; ++j) top = std::max(top, std::fabs(w[j]));
    const float s = top / 127.f;
    double b = double(out.bias[size_t(h)]);
    if (s > 0) {
      for (size_t j = 0; j < D; ++j) {
        const float r = std::nearbyint(w[j] / s);
        const int v = int(std::max(-127.f, std::min(127.f, r)));
        out.w8[size_t(h) * out.width + j] = int8_t(v);
        b += (double(w[j]) - double(s) * v) * (0.5 * (kLevels - 1));
      }
    }
    out.qscale[size_t(h)] = s;
    out.qbias[size_t(h)] = float(b);
  }
}

namespace {
#ifdef KVR_X86_SIMD
// The C rows' sums over a row of codes, 8 bytes (16 channels) a step: the
// nibbles widened to floats once and fed to every row's accumulators.
template <int C>
inline void CodeDots(const float* w, size_t width, const uint8_t* row, size_t half, float* out) {
  __m256 a0[C], a1[C];
  for (int c = 0; c < C; ++c) a0[c] = a1[c] = _mm256_setzero_ps();
  const __m128i mask = _mm_set1_epi8(15);
  for (size_t i = 0; i < half; i += 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + i));
    const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(b, mask)));
    const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)));
    for (int c = 0; c < C; ++c) {
      a0[c] = _mm256_fmadd_ps(_mm256_loadu_ps(w + c * width + i), lo, a0[c]);
      a1[c] = _mm256_fmadd_ps(_mm256_loadu_ps(w + c * width + half + i), hi, a1[c]);
    }
  }
  for (int c = 0; c < C; ++c) out[c] = ragraph::HorizontalSum(a0[c], a1[c]);
}
#endif
}  // namespace

void RaKeyCodes::Logits(const RaCodeQuery& cq, const uint8_t* row, float* x) const {
  const int G = cq.G;
  const size_t W = cq.width;
#ifdef KVR_X86_SIMD
  if (half_ % 8 == 0) {
    int h = 0;
    for (; h + 4 <= G; h += 4) CodeDots<4>(cq.w.data() + size_t(h) * W, W, row, half_, x + h);
    switch (G - h) {
      case 3: CodeDots<3>(cq.w.data() + size_t(h) * W, W, row, half_, x + h); break;
      case 2: CodeDots<2>(cq.w.data() + size_t(h) * W, W, row, half_, x + h); break;
      case 1: CodeDots<1>(cq.w.data() + size_t(h) * W, W, row, half_, x + h); break;
      default: break;
    }
    for (int g = 0; g < G; ++g) x[g] += cq.bias[size_t(g)];
    return;
  }
#endif
  for (int h = 0; h < G; ++h) {
    const float* w = cq.w.data() + size_t(h) * W;
    float s = 0;
    for (size_t i = 0; i < half_; ++i) s += w[i] * float(row[i] & 15) + w[half_ + i] * float(row[i] >> 4);
    x[h] = cq.bias[size_t(h)] + s;
  }
}

namespace {
#ifdef KVR_X86_SIMD
// Four heads' int32 sums over a row of 32·chunks bytes: each chunk's low and
// high nibbles against their weights (u8 × s8, pairs added in s16: at most
// 2·15·127 = 3810 a lane), two chunks' worth added in s16 (15240 at most)
// before they widen to s32, so no sum saturates.
inline __m256i QuantHalves4(const int8_t* w, size_t width, const uint8_t* row, size_t half) {
  const __m256i mask = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  __m256i acc[4];
  for (int c = 0; c < 4; ++c) acc[c] = _mm256_setzero_si256();
  for (size_t i = 0; i < half; i += 64) {
    const bool two = i + 64 <= half;
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i));
    const __m256i lo0 = _mm256_and_si256(b0, mask), hi0 = _mm256_and_si256(_mm256_srli_epi16(b0, 4), mask);
    __m256i lo1 = _mm256_setzero_si256(), hi1 = lo1;
    if (two) {
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i + 32));
      lo1 = _mm256_and_si256(b1, mask);
      hi1 = _mm256_and_si256(_mm256_srli_epi16(b1, 4), mask);
    }
    for (int c = 0; c < 4; ++c) {
      const int8_t* wc = w + size_t(c) * width + i;
      auto ld = [](const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
      __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(lo0, ld(wc)), _mm256_maddubs_epi16(hi0, ld(wc + half)));
      if (two)
        s = _mm256_add_epi16(s, _mm256_add_epi16(_mm256_maddubs_epi16(lo1, ld(wc + 32)),
                                                  _mm256_maddubs_epi16(hi1, ld(wc + half + 32))));
      acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(s, ones));
    }
  }
  // [h0 h1 h2 h3] per 128-bit half: QuantDots4 adds the halves.
  return _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]), _mm256_hadd_epi32(acc[2], acc[3]));
}
inline __m128i QuantDots4(const int8_t* w, size_t width, const uint8_t* row, size_t half) {
  const __m256i t = QuantHalves4(w, width, row, half);
  return _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
}
#endif

// QuantLogits' loop for keys whose code rows rowOf(i) gives, i < count.
template <typename RowOf>
void QuantLogitsOf(const RaCodeQuery& cq, size_t half, RowOf rowOf, size_t count, float* x, size_t ld) {
  const size_t W = cq.width;
  const int G = cq.G;
#ifdef KVR_X86_SIMD
  if (half % 32 == 0) {
    alignas(16) float v[4];
    for (int h0 = 0; h0 < G; h0 += 4) {
      const __m128 s = _mm_loadu_ps(cq.qscale.data() + h0), b = _mm_loadu_ps(cq.qbias.data() + h0);
      const int8_t* w = cq.w8.data() + size_t(h0) * W;
      const int heads = std::min(4, G - h0);
      for (size_t i = 0; i < count; ++i) {
        const __m128i dots = QuantDots4(w, W, rowOf(i), half);
        _mm_store_ps(v, _mm_fmadd_ps(_mm_cvtepi32_ps(dots), s, b));
        for (int c = 0; c < heads; ++c) x[size_t(h0 + c) * ld + i] = v[c];
      }
    }
    return;
  }
#endif
  for (size_t i = 0; i < count; ++i) {
    const uint8_t* row = rowOf(i);
    for (int h = 0; h < G; ++h) {
      const int8_t* w = cq.w8.data() + size_t(h) * W;
      int32_t dot = 0;
      for (size_t k = 0; k < half; ++k) dot += int32_t(row[k] & 15) * w[k] + int32_t(row[k] >> 4) * w[half + k];
      x[size_t(h) * ld + i] = std::fma(float(dot), cq.qscale[size_t(h)], cq.qbias[size_t(h)]);
    }
  }
}

}  // namespace

void RaKeyCodes::QuantLogits(const RaCodeQuery& cq, const int32_t* ids, size_t count, float* x, size_t ld) const {
  QuantLogitsOf(cq, half_, [&](size_t i) { return Row(ids[i]); }, count, x, ld);
}

void RaKeyCodes::MaxShiftedRows(const RaCodeQuery& cq, const float* c0, int64_t first, size_t count, float* out,
                                std::vector<float>& x) const {
  const int G = cq.G;
  const uint8_t* rows = Row(first);
#ifdef KVR_X86_SIMD
  // G <= 4: two keys a step, their four heads' sums folded together and each
  // x̃ − c0 formed in one register (the padded heads at −∞), the max over a
  // key's lanes: the same floats as below, without the round trip through x
  // and with half the folds (0.92 of the scan's CPU at 1M keys, 2-core VM,
  // bench/results/ra-code-scan-ab-1048576-vm-two-keys.md).
  if (half_ % 32 == 0 && G <= 4) {
    alignas(16) float c[4], pad[4];
    for (int h = 0; h < 4; ++h) c[h] = h < G ? c0[h] : 0.f, pad[h] = h < G ? 0.f : -std::numeric_limits<float>::infinity();
    const __m128 s1 = _mm_loadu_ps(cq.qscale.data()), b1 = _mm_loadu_ps(cq.qbias.data());
    const __m256 s = _mm256_set_m128(s1, s1), b = _mm256_set_m128(b1, b1),
                 cv = _mm256_set_m128(_mm_load_ps(c), _mm_load_ps(c)), pv = _mm256_set_m128(_mm_load_ps(pad), _mm_load_ps(pad));
    const int8_t* w = cq.w8.data();
    const size_t W = cq.width;
    auto rho2 = [&](__m256i ta, __m256i tb, float* o) {
      const __m256i dots = _mm256_add_epi32(_mm256_permute2x128_si256(ta, tb, 0x20), _mm256_permute2x128_si256(ta, tb, 0x31));
      __m256 v = _mm256_add_ps(_mm256_sub_ps(_mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), s, b), cv), pv);
      v = _mm256_max_ps(v, _mm256_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
      v = _mm256_max_ps(v, _mm256_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
      o[0] = _mm256_cvtss_f32(v);
      o[1] = _mm_cvtss_f32(_mm256_extractf128_ps(v, 1));
    };
    size_t i = 0;
    for (; i + 2 <= count; i += 2)
      rho2(QuantHalves4(w, W, rows + i * half_, half_), QuantHalves4(w, W, rows + (i + 1) * half_, half_), out + i);
    if (i < count) {
      float o[2];
      const __m256i t = QuantHalves4(w, W, rows + i * half_, half_);
      rho2(t, t, o);
      out[i] = o[0];
    }
    return;
  }
#endif
  x.resize(size_t(G) * count);
  QuantLogitsOf(cq, half_, [&](size_t i) { return rows + i * half_; }, count, x.data(), count);
  for (size_t i = 0; i < count; ++i) out[i] = x[i] - c0[0];
  for (int h = 1; h < G; ++h)
    for (size_t i = 0; i < count; ++i) out[i] = std::max(out[i], x[size_t(h) * count + i] - c0[h]);
}

}  // namespace kvr

// RaGraph's cache of its keys' codes (ra_graph.h, CodeCache): here, beside
// what it holds, not in the graph's search files.
namespace kvr {

std::shared_ptr<const RaKeyCodes> RaGraph::KeyCodesFor(const uint16_t* keys, Dtype dtype) const {
  std::lock_guard<std::mutex> hold(codes_->lock);
  if (codes_->keys != keys || codes_->dtype != dtype || !codes_->codes) {
    codes_->codes.reset();  // the old codes freed before the new ones are made
    codes_->codes = std::make_shared<const RaKeyCodes>(RaKeyCodes::Build(keys, n_, d_, dtype));
    codes_->keys = keys;
    codes_->dtype = dtype;
  }
  return codes_->codes;
}

size_t RaGraph::KeyCodeBytes() const {
  std::lock_guard<std::mutex> hold(codes_->lock);
  return (codes_->codes ? codes_->codes->Bytes() : 0) + (codes_->pq ? codes_->pq->Bytes() : 0);
}

std::shared_ptr<const RaPqCodes> RaGraph::PqCodesFor(const uint16_t* keys, Dtype dtype) const {
  std::lock_guard<std::mutex> hold(codes_->lock);
  if (codes_->pqKeys != keys || codes_->pqDtype != dtype || !codes_->pq) {
    codes_->pq.reset();
    codes_->pq = std::make_shared<const RaPqCodes>(RaPqCodes::Build(keys, n_, d_, dtype));
    codes_->pqKeys = keys;
    codes_->pqDtype = dtype;
  }
  return codes_->pq;
}

}  // namespace kvr
