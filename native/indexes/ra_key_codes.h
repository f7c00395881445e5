// 4-bit codes of one kv head's keys, for the retrieval-attention graph's
// code-gated walk (ra_graph_code_walk.h, RaSearchOptions::codeWalk).
//
// A walk that scores every neighbour it meets exactly finds ~1 key of the
// group's top 1% per 11 scored at 1M keys (bench/results/retrieval-misses-vm.md):
// to reach the top at <= 3% scored, it must look at many more keys than it
// scores. A code is a quarter of the key's f16 bytes and, read first, says
// which keys are worth the exact score (bench/retrieval-code-walk.ts: the
// walk's score of a key's code correlates ~0.99 with the key's).
//
// Each channel j is quantized to 16 levels spread uniformly over its mean
// ± 3σ over the head's keys: level c stands for low_j + (c + ½)·step_j with
// low_j = μ_j − 3σ_j, step_j = 6σ_j / 16. A key value inside [low_j, low_j +
// 16·step_j] is then within step_j / 2 of its level; one outside is clamped
// to the end level. Memory: ceil(d/2) bytes a key (64 MB a head at 1M keys,
// d = 128: 1/4 of the f16 keys), plus 2·d floats.
//
// Layout: a key's row is ceil(d/2) bytes; byte i holds channel i in its low
// nibble and channel i + ceil(d/2) in its high one, so a SIMD load of 8 bytes
// gives two runs of 8 consecutive channels with one mask and one shift.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/half.h"

namespace kvr {

// A query group's weights for the approximate logits (RaKeyCodes::Prepare):
// x̂_h = bias_h + Σ_j w_hj · c_j, the scaled q_h · (dequantized key).
//
// The walk scores codes with the weights rounded to int8 (QuantLogits):
// x̃_h = qbias_h + qscale_h · Σ_j w8_hj · c_j, the sum exact in int32, so
// that a row is 16 u8 × s8 multiply-adds a head (AVX2) where the float form
// widened every nibble to a float; at 1M keys the float form was ~30% of the
// code walk's CPU (2-core VM). qscale_h = max_j |w_hj| / 127, and qbias_h
// adds Σ_j (w_hj − qscale_h · w8_hj) · 7.5 (the rounding's error at the
// middle level), so what is left, Σ_j (w_hj − qscale_h · w8_hj)(c_j − 7.5),
// is at most qscale_h / 2 · Σ_j |c_j − 7.5| (real arithmetic; float
// rounding adds a few ulps), and 4–7% of the codes' own error (rms) on the
// tests' keys, which hold it to that bound against float64.
struct RaCodeQuery {
  int G = 0;
  size_t width = 0;       // 2·ceil(d/2): channels as the row's nibbles lay them out (zero-padded)
  std::vector<float> w;   // [G, width]: scale · q_hj · step_j, in nibble order
  std::vector<float> bias;  // [G]: scale · Σ_j q_hj · (low_j + step_j / 2), summed in double
  int G4 = 0;             // G rounded up to 4: the int8 form's heads (the extra ones zero)
  std::vector<int8_t> w8;   // [G4, width]: round(w_hj / qscale_h), in nibble order
  std::vector<float> qscale, qbias;  // [G4]
};

class RaKeyCodes {
 public:
  static constexpr int kLevels = 16;
  static constexpr double kSigmas = 3.0;

  // Three passes over the keys (the channels' mean, their spread, the codes)
  // on the native pool: the first code walk at 1M keys, d = 128 took 0.34 s
  // with them on the 2-core VM (bench/results/ra-search-1048576-vm-codes.json).
  static RaKeyCodes Build(const uint16_t* keys, int64_t n, int d, Dtype dtype);

  int64_t tokens() const { return n_; }
  int headDim() const { return d_; }
  size_t rowBytes() const { return half_; }
  const uint8_t* Row(int64_t id) const { return codes_.get() + size_t(id) * half_; }
  const std::vector<float>& low() const { return low_; }
  const std::vector<float>& step() const { return step_; }
  size_t Bytes() const { return bytes_ + (low_.size() + step_.size()) * sizeof(float); }

  // The level of channel j in a row (for tests and tools).
  int Level(const uint8_t* row, int j) const {
    const size_t i = size_t(j) < half_ ? size_t(j) : size_t(j) - half_;
    return size_t(j) < half_ ? (row[i] & 15) : (row[i] >> 4);
  }

  // The weights of G query rows q [G, d] at softmax scale `scale`.
  void Prepare(const float* q, int G, float scale, RaCodeQuery& out) const;
  // x[h] = the approximate scaled logit of query row h against the key whose
  // code row is `row`: within float rounding of scale · q_h · (dequantized key).
  void Logits(const RaCodeQuery& cq, const uint8_t* row, float* x) const;
  // x[h·ld + i] = the int8 form's approximate logit of query row h against
  // key ids[i], for i < count, h < G (the code walk's scores). The same
  // integers with or without AVX2, then one fma each: the same floats.
  void QuantLogits(const RaCodeQuery& cq, const int32_t* ids, size_t count, float* x, size_t ld) const;
  // out[i] = max_h (x̃_h − c0_h) over the G heads for the keys first + i,
  // i < count (the code scan's ρ, ra_graph_code_scan.h: every row read in
  // order), x̃ as QuantLogits gives it: the same integers, the same floats.
  // x is working memory.
  void MaxShiftedRows(const RaCodeQuery& cq, const float* c0, int64_t first, size_t count, float* out,
                      std::vector<float>& x) const;

 private:
  int64_t n_ = 0;
  int d_ = 0;
  size_t half_ = 0;  // ceil(d/2): bytes a row
  std::vector<float> low_, step_;  // [d]
  // [n, half_], 64-byte aligned: a 64-byte row (d = 128) is then one cache
  // line. In a std::vector (16-byte aligned) most rows straddled two and the
  // code walk took ~1.4x the time at 1M keys (2-core VM, 3 pairs
  // alternated). From 16 MB up in 2 MB pages (MADV_HUGEPAGE: advice, small
  // pages where the kernel gives none): since a round's code rows are
  // requested at once (ra_graph_code_walk.h), 0.95 of the walk's time at 1M,
  // 3 pairs alternated; with 16 rows in flight they had changed nothing.
  struct Free {
    void operator()(uint8_t* p) const;
  };
  std::unique_ptr<uint8_t[], Free> codes_;
  size_t bytes_ = 0;
};

}  // namespace kvr
