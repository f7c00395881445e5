// The attention mass a set of query rows pays each candidate key: for every
// row r, p_r = softmax over the candidates of (q_r · k · scale); the result
// for candidate i is Σ_r p_r[i]. InfiniRetri ranks tokens by it.
#pragma once

#include <cstdint>

#include "common/half.h"

namespace kvr {

struct MassProblem {
  const float* q = nullptr;  // [rows, headDim]
  int64_t rows = 0;
  int headDim = 0;
  const uint16_t* keys = nullptr;  // [tokens, headDim]
  int64_t tokens = 0;
  Dtype dtype = Dtype::kF16;
  float scale = 1.f;
  const int32_t* ids = nullptr;  // candidate rows of keys, each < tokens
  int64_t count = 0;
  float* out = nullptr;  // [count]
};

void AttentionMass(const MassProblem& p);

}  // namespace kvr
