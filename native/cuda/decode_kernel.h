// Split-K (flash-decoding) decode attention over block tables, on the GPU.
// One query token; the G = qHeads / kvHeads query heads of a kv head share
// every K/V load. Each split writes a normalised partial output and its
// log-sum-exp in f32; a merge kernel combines the splits (and an optional part
// computed elsewhere) by log-sum-exp. Plain C++ declarations: the stream is
// passed as void* (a cudaStream_t).
#pragma once

#include <cstdint>

#include "common/half.h"

namespace kvr {
namespace cuda {

struct DecodeParams {
  const uint16_t* kPool = nullptr;  // [slots, blockSize, headDim]
  const uint16_t* vPool = nullptr;
  int blockShift = 6;               // log2(blockSize)
  int headDim = 128;                // 64 or 128
  Dtype dtype = Dtype::kF16;        // f16 or bf16
  const float* q = nullptr;         // [qHeads, headDim], device
  int qHeads = 0, kvHeads = 0;
  float scale = 1.f;
  const int32_t* tables = nullptr;       // concatenated slot ids, device
  const int64_t* tableOffset = nullptr;  // [kvHeads], device
  const int64_t* validTokens = nullptr;  // [kvHeads], device
  int64_t maxTokens = 0;                 // max of validTokens (host copy)
  int splits = 1;
  float* partOut = nullptr;  // [qHeads, splits, headDim], device scratch
  float* partLse = nullptr;  // [qHeads, splits]
  // Unused: where the pool's extra part was (a part attended elsewhere, merged
  // by MergeKernel; the engine merges it in JS since 09c5eab). Kept so that
  // SplitKernel's parameter block stays 144 bytes: at 128 nvcc loads its
  // members up front and SplitKernel took more registers (ptxas, sm_90: 102
  // -> 122 at d=128 G=1, 64 -> 84 at d=64 G=1), not timed on a device.
  const void* unused[2] = {nullptr, nullptr};
  float* out = nullptr;             // [qHeads, headDim], device
  float* lse = nullptr;             // [qHeads], device
};

// Splits that fill the device in one wave for this problem: as many CTAs as the
// multiprocessors hold at once (2 each; a second, partial wave would cost as
// long as the first), never fewer than ~256 tokens per split.
int ChooseSplits(int smCount, int qHeads, int kvHeads, int64_t maxTokens);

// Enqueues the split kernel and the merge kernel on `stream`. Returns a CUDA
// error code (0 on success).
int LaunchDecode(const DecodeParams& p, void* stream);

// Enqueues the copy of n blocks (each `blockWords` K words then `blockWords` V
// words, back to back in `staged`) into their slots `slots` (device).
int LaunchScatter(const uint16_t* staged, const int32_t* slots, int64_t n, int64_t blockWords, uint16_t* kPool,
                  uint16_t* vPool, void* stream);

}  // namespace cuda
}  // namespace kvr
