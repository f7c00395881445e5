// The wave step's kernels' shared-memory limits, raised once per store
// (wave_step.cu's constructor). Included by wave_step.cu after every kernel.
#pragma once

#include <cuda_runtime.h>

#include "cuda/cuda_common.cuh"
#include "cuda/wave_select.cuh"
#include "cuda/wave_step_attend.cuh"
#include "cuda/wave_step_estimate.cuh"
#include "cuda/wave_step_kernels.cuh"

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

}  // namespace
}  // namespace cuda
}  // namespace kvr
