// What a wave store's constructor (wave_step.cu) does once: the kernels'
// shared-memory limits raised, each head's members grouped per cluster, and
// the maps narrowed to 16 bits where they fit.
// Included by wave_step.cu after every kernel.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "cuda/cuda_common.cuh"
#include "cuda/wave_select.cuh"
#include "cuda/wave_step_attend.cuh"
#include "cuda/wave_step_estimate.cuh"
#include "cuda/wave_step_kernels.cuh"
#include "cuda/wave_score_mma.cuh"
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
  for (auto fn : {AttendAndClusters<false>, AttendAndClusters<true>, AttendAndClusters<false, true>, AttendAndClusters<true, true>,
                  AttendAndClusters<false, false, true>, AttendAndClusters<true, false, true>, AttendAndClusters<false, true, true>,
                  AttendAndClusters<true, true, true>})
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
  SetMmaScoreAttributes();
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

// The maps in 16 bits (ClusterMaps, wave_step_kernels.cuh): members16[h·N
// + pos] = members[h·N + pos] - pos, tokCl16[h·N + t] = tokenCluster[t] -
// tileBase[h·tiles + t / 4096]. False, and nothing meaningful written, where
// a value does not fit (clusters not numbered segment by segment).
inline bool NarrowMaps(const WaveHeadHost* heads, int H, int64_t N, const std::vector<int32_t>& members, std::vector<int16_t>& members16,
                       std::vector<uint16_t>& tokCl16, std::vector<int32_t>& tileBase) {
  const int64_t tile = int64_t(1) << kMapTileShift, tiles = (N + tile - 1) / tile;
  members16.resize(size_t(H) * N), tokCl16.resize(size_t(H) * N), tileBase.resize(size_t(H) * tiles);
  for (size_t i = 0; i < members.size(); ++i) {
    const int64_t off = int64_t(members[i]) - int64_t(i % size_t(N));
    if (off < INT16_MIN || off > INT16_MAX) return false;
    members16[i] = int16_t(off);
  }
  for (int h = 0; h < H; ++h)
    for (int64_t t0 = 0; t0 < N; t0 += tile) {
      const int32_t* cl = heads[h].tokenCluster;
      const int64_t t1 = std::min(N, t0 + tile);
      const int32_t lo = *std::min_element(cl + t0, cl + t1);
      tileBase[size_t(h) * tiles + size_t(t0 / tile)] = lo;
      for (int64_t t = t0; t < t1; ++t) {
        if (int64_t(cl[t]) - lo > UINT16_MAX) return false;
        tokCl16[size_t(h) * N + t] = uint16_t(cl[t] - lo);
      }
    }
  return true;
}

// A store's member lists and token->cluster map as made on the host, then
// placed in the store's layout and copied (wave_step.cu's constructor).
struct HostMaps {
  std::vector<int32_t> memberStart, members;
  std::vector<int16_t> members16;
  std::vector<uint16_t> tokCl16;
  std::vector<int32_t> tileBase;
  int H;
  int64_t N;
  bool wide;
  HostMaps(const WaveHeadHost* heads, int kvHeads, int64_t tokens, const std::vector<int64_t>& base)
      : memberStart(size_t(base.back())), members(size_t(kvHeads) * tokens), H(kvHeads), N(tokens) {
    GroupMembers(heads, H, N, base, memberStart, members);
    wide = !NarrowMaps(heads, H, N, members, members16, tokCl16, tileBase);
  }
  size_t Word() const { return wide ? 4 : 2; }
  size_t TileBytes() const { return wide ? 0 : tileBase.size() * 4; }
  // The kernels' view of the maps at these device addresses.
  ClusterMaps Place(void* memberRows, void* tokenRows, int32_t* tiles) const {
    ClusterMaps m{};
    m.wide = wide;
    m.tiles = int64_t(tileBase.size()) / H;
    if (wide) m.members32 = static_cast<int32_t*>(memberRows), m.tokCl32 = static_cast<int32_t*>(tokenRows);
    else m.members16 = static_cast<int16_t*>(memberRows), m.tokCl16 = static_cast<uint16_t*>(tokenRows), m.tileBase = tiles;
    return m;
  }
  // Copies them there; put(dst, src, bytes) copies host to device.
  template <typename Put>
  void Copy(const ClusterMaps& m, const WaveHeadHost* heads, Put put) const {
    if (wide) {
      put(m.members32, members.data(), members.size() * 4);
      for (int h = 0; h < H; ++h) put(m.tokCl32 + size_t(h) * N, heads[h].tokenCluster, size_t(N) * 4);
      return;
    }
    put(m.members16, members16.data(), members16.size() * 2), put(m.tokCl16, tokCl16.data(), tokCl16.size() * 2);
    put(m.tileBase, tileBase.data(), tileBase.size() * 4);
  }
};

}  // namespace
}  // namespace cuda
}  // namespace kvr
