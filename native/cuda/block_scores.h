// Device block scoring for the block-selecting methods (nosa, topk-blocks).
// Plain C++ interface: this header names no CUDA type, so the binding
// compiles with the host compiler.
//
// One BlockScores holds the block means of one (document, layer): every kv
// head's [blocks, headDim] 16-bit words (f16 or bf16), in one device buffer,
// uploaded once. TopK scores every block of every kv head for one decode
// step (score = max over the head's GQA group of q·mean) and returns each
// head's best k blocks, best first, ties towards the lower id, plus the
// scores of any extra blocks asked for: two kernels and two copies on one
// stream, one synchronisation.
//
// Exactness: a score is computed in the order of the host kernel's Dot
// (native/common/simd_math.h, AVX2: two 8-lane FMA accumulators over 16-word
// strides, then its horizontal sum), so the device scores are bit for bit the
// host's and the selection is the one topkHeads makes. That order needs
// headDim % 8 == 0 (Supports()); the host must be built with KVR_X86_SIMD
// (the binding checks).
#pragma once

#include <cstdint>
#include <memory>

#include "common/half.h"

namespace kvr {
namespace cuda {

struct BlockScoresConfig {
  int heads = 0;        // kv heads
  int64_t blocks = 0;   // blocks per head (the same for every head of a layer)
  int headDim = 0;      // a multiple of 8, at most 1024
  Dtype dtype = Dtype::kF16;  // f16 or bf16
};

struct BlockTopKArgs {
  const float* q = nullptr;  // [heads * group, headDim]: head h scores with rows h*group ..
  int group = 1;
  int64_t k = 0;  // blocks (or groups, with reps) wanted per head; min(k, blocks / reps) are written
  // Rows per ranked group (a power of two in [1, 16] dividing blocks): the top k are groups of reps
  // consecutive rows, a group ranked where its best row ranks among the rows (score, then the lower row), so
  // the groups come in the order of their first rows in the rows' ranking; answered as the group's first row
  // (group · reps) with its best row's score. Extra ids stay rows. 1: the rows themselves.
  int reps = 1;
  // Optional: per head h, extraCounts[h] block ids (back to back in extraIds,
  // each < blocks) whose scores are written to extraScores in the same order.
  const int32_t* extraIds = nullptr;
  const int32_t* extraCounts = nullptr;  // [heads]
  int64_t extraTotal = 0;
  int32_t* outIds = nullptr;     // [heads, min(k, blocks)], best first
  float* outScores = nullptr;    // [heads, min(k, blocks)]
  float* extraScores = nullptr;  // [extraTotal]
  // Per-kernel CUDA event times in LastTimes (a bench's question): the
  // step's copies and kernels launched one by one. Otherwise (the engine)
  // they are replayed from a CUDA graph captured once per shape
  // (cuda/step_graph.cuh), one launch instead of five, and the kernel
  // times read 0.
  bool times = false;
  // The whole call's device time in LastTimes().deviceMs: two CUDA events
  // around the step's copies and kernels (nodes of its graph when replayed:
  // a graph of their own), recorded when the device reaches them, so the
  // gaps between them are in it and the host's issue before them is not: a
  // bench tells the device's share of a select from the host's without
  // launching one by one. Off (the engine): 0.
  bool deviceTime = false;
};

// Where the last TopK's time went, milliseconds: its two kernels (CUDA
// events; 0 unless args.times), the whole call on the device (0 unless
// args.deviceTime) and, on the host, staging the inputs, issuing the copies and
// launches, waiting for the stream, and copying the outputs out.
struct BlockTopKTimes {
  float scoreMs = 0, selectMs = 0;
  float deviceMs = 0;
  float prepMs = 0, issueMs = 0, waitMs = 0, copyOutMs = 0;
};

class BlockScores {
 public:
  // Copies means[h] ([blocks, headDim] words) for every head to the device.
  // Throws std::runtime_error (no device, out of memory, bad shape).
  BlockScores(const BlockScoresConfig& cfg, const uint16_t* const* means);
  ~BlockScores();
  BlockScores(const BlockScores&) = delete;
  BlockScores& operator=(const BlockScores&) = delete;

  // Whether a head dim and group size can be scored on the device.
  static bool Supports(int headDim, int group);
  // Whether a step may rank groups of `reps` rows of a head of `blocks` rows (BlockTopKArgs::reps).
  static bool SupportsReps(int64_t blocks, int reps);

  const BlockScoresConfig& Config() const;
  // Device bytes held (means and scratch).
  int64_t DeviceBytes() const;

  // One decode step for every kv head; returns min(k, blocks). Blocks until
  // the outputs are written. Calls from several threads take turns.
  int64_t TopK(const BlockTopKArgs& a);
  BlockTopKTimes LastTimes() const;
  // Graphs captured so far (a steady shape: one; args.times steps none).
  int64_t GraphCaptures() const;
  // Whether the staged shapes' scores run ScoreBlocksPiped (unless KVRECALL_BLOCK_SCORES_PIPED=0 at construction).
  bool PipedScores() const;
  // Whether the select runs in two launches where it fits (unless KVRECALL_BLOCK_SELECT_SLICED=0 at construction).
  bool SlicedSelect() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace cuda
}  // namespace kvr
