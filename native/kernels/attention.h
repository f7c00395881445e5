// Exact attention of GQA query groups over KV stored as 16-bit words, with
// the context given as segments (documents, then the session's own tokens)
// and, per segment, either a token range or a list of selected token ids.
// Partial results are combined by log-sum-exp, so any split of the tokens
// gives the same answer up to f32 rounding.
#pragma once

#include <cstdint>
#include <vector>

#include "common/half.h"

namespace kvr {

struct AttnSegment {
  std::vector<const uint16_t*> k;  // per kv head: [tokens, headDim]
  std::vector<const uint16_t*> v;  // per kv head: [tokens, headDim]
  int64_t tokens = 0;              // rows valid in k and v
  int64_t begin = 0, end = 0;      // range attended when ids is empty
  std::vector<const int32_t*> ids; // per kv head: selected rows, each < tokens
  std::vector<int64_t> idCount;    // per kv head
};

struct AttnProblem {
  const float* q = nullptr;  // [qHeads, headDim]
  int qHeads = 0, kvHeads = 0, headDim = 0;
  Dtype dtype = Dtype::kF16;
  float scale = 1.f;
  std::vector<AttnSegment> segments;
  float* out = nullptr;  // [qHeads, headDim]
  float* lse = nullptr;  // [qHeads]; -inf where no token was attended
};

void Attend(const AttnProblem& p);

}  // namespace kvr
