// What a wave store's constructor (wave_step.cu) does once: the kernels'
// shared-memory limits raised, and each head's members grouped per cluster.
// Included by wave_step.cu after every kernel.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "cuda/cuda_common.cuh"
#include "cuda/wave_select.cuh"
#include "cuda/wave_step_attend.cuh"
#include "cuda/wave_step_estimate.cuh"
#include "cuda/wave_step_kernels.cuh"
#include "cuda/wave_step.h"

namespace kvr {
namespace cuda {
namespace {

inline void SetWaveKernelAttributes() {
  // The kernels that read K/V rows, for the dense store and the paged one (KvRow's kPaged).
  for (auto fn : {EstimatePart<false, false>, EstimatePart<false, true>, EstimatePart<true, false>, EstimatePart<true, true>,
                  EstimatePart<false, true, true>, EstimatePart<true, true, true>})
    Check(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kEstimateSmem)), "cudaFuncSetAttribute");
  for (auto fn : {AttendPart<false, false>, AttendPart<true, false>, AttendPart<false, true>, AttendPart<true, true>,
                  AttendPart<false, false, true>, AttendPart<true, false, true>, AttendPart<false, true, true>, AttendPart<true, true, true>})
    Check(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kEstimateSmem)), "cudaFuncSetAttribute");
  for (auto fn : {AttendAndClusters<false>, AttendAndClusters<true>, AttendAndClusters<false, true>, AttendAndClusters<true, true>})
    Check(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kEstimateSmem)), "cudaFuncSetAttribute");
  for (auto fn : {ScoreClusters<false, false>, ScoreClusters<true, false>})
    Check(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(2 * kMaxQueryFloats * 4)), "cudaFuncSetAttribute");
  Check(cudaFuncSetAttribute(ResolveCut<ClusterCut>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(ResolveSmem<ClusterCut>())),
        "cudaFuncSetAttribute");
  Check(cudaFuncSetAttribute(ResolveCut<CandidateCut>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(ResolveSmem<CandidateCut>())),
        "cudaFuncSetAttribute");
  for (auto fn : {ScoreClusters<false, true>, ScoreClusters<true, true>, ScoreClusters<false, true, kScoreRows>, ScoreClusters<true, true, kScoreRows>,
                  ScoreClusters<false, true, kScoreRows, true>, ScoreClusters<true, true, kScoreRows, true>,
                  ScoreClusters<false, true, kScoreRows, true, true>, ScoreClusters<true, true, kScoreRows, true, true>})
    Check(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kStagedSmem)), "cudaFuncSetAttribute");
}

// Every head's members grouped per cluster, ascending (a counting sort of
// tokenCluster): head h's cluster c starts at memberStart[base[h] + c] of
// members[h·N ..]. Throws where tokenCluster or counts are not consistent.
inline void GroupMembers(const WaveHeadHost* heads, int H, int64_t N, const std::vector<int64_t>& base, std::vector<int32_t>& memberStart,
                         std::vector<int32_t>& members) {
  for (int h = 0; h < H; ++h) {
    const int64_t C = heads[h].clusters;
    std::vector<int64_t> at(size_t(C) + 1, 0);
    for (int64_t t = 0; t < N; ++t) {
      const int32_t c = heads[h].tokenCluster[t];
      if (c < 0 || c >= C) throw std::runtime_error("wave store: tokenCluster outside [0, clusters)");
      ++at[size_t(c) + 1];
    }
    for (int64_t c = 0; c < C; ++c) {
      if (at[size_t(c) + 1] != heads[h].counts[c]) throw std::runtime_error("wave store: counts are not tokenCluster's histogram");
      at[size_t(c) + 1] += at[size_t(c)];
      memberStart[size_t(base[h] + c)] = int32_t(at[size_t(c)]);
    }
    for (int64_t t = 0; t < N; ++t) members[size_t(h) * N + size_t(at[size_t(heads[h].tokenCluster[t])]++)] = int32_t(t);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
