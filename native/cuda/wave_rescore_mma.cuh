// RescoreHeld on the tensor cores (on by default; KVRECALL_WAVE_MMA_RESCORE=0
// turns it off, wave_paths.cuh): every candidate row's dot with each q head
// of its group, as a [rows × d] · [d × heads] product, 16 rows a warp.
//
// Why: the rescoring stage is the step's largest after the tensor-core
// scoring and tiles (0.19 ms of 0.63 at the issue's shape on an H100,
// bench/results/wave-gpu-h100-cs16-s25.md; RescoreHeld at 34% of DRAM's
// peak and 56% of the SM's under ncu, wave-step-ncu-d64-h100-b2.md): a
// thread pair does d FMAs a q head on channels widened one by one, in the
// host's order.
//
// Layout: the rows are the mma's M (a warp's 16 candidates: rows g and g + 8
// of lane g·4 + t), the channels its K, the q heads' f16 parts its N (q
// rows 0-3 hi, then lo, as ScoreClustersMma's). Which channel each K index
// is, is free as long as A and B agree: lane t loads 16-byte chunks t, t + 4,
// ... of both its rows (four lanes read 64 contiguous bytes of a row), and
// k-step s takes words 2·(s % 2) and 2·(s % 2) + 1 of chunk t + 4·⌊s / 2⌋
// as its (2t, 2t+1) and (2t+8, 2t+9) columns: no shuffle, no shared memory.
//
// Precision: the keys go in exactly (f16 stores); q goes in as hi + lo f16
// parts after a power-of-two scaling per q row (PowerScale, undone
// exactly), ~22 bits of it; the tensor core sums in f32 in its own order. So
// a dot differs from RescoreHeld's by a few f32 ulps of its terms: the
// attention over the kept rows (their dots, AttendTile<kDots>) within
// float tolerance, but a candidate at the cut may fall the other side of it.
//
// Runs where ScoreClustersMma does (an f16 store, 4 q heads a kv head, d = 64
// or 128); else RescoreHeld.
#pragma once

#include "cuda/mma_fragments.cuh"
#include "cuda/wave_rescore.cuh"
#include "cuda/wave_score_mma.cuh"

#include <cstdint>

namespace kvr {
namespace cuda {
namespace {

inline bool MmaRescoreApplies(bool bf16, int group, int d) { return !bf16 && group == kMmaGroup && (d == 64 || d == 128); }

// RescoreHeld's grid and outputs (dots, rank orders, the candidates' order
// range; CTAs past the candidates' do the sinks/window rows' dots), 8 warps
// of 16 rows a CTA as its 128 thread pairs. kD: the head dimension.
template <int kD, bool kPaged = false>
__global__ void __launch_bounds__(kThreads, 3) RescoreHeldMma(StepParams p) {
  AfterPrior();
  constexpr int kSteps = kD / 16, kChunks = kD / 32;  // k-steps; 16-byte chunks a lane loads of each row
  const int h = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t candCtas = (p.tmax + kRowsPerCta - 1) / kRowsPerCta;
  const bool exact = blockIdx.x >= candCtas;  // uniform over the block
  const int64_t r0 = (blockIdx.x - (exact ? candCtas : 0)) * kRowsPerCta + warp * 16;
  const int64_t limit = exact ? ExactCount(p) : p.sel[h * 2 + 1];
  // This lane's two rows (g, g + 8), their tokens and chunks, loaded first.
  int64_t j[2];
  int32_t tok[2];  // kPaged: -1 for a candidate the page cap left unread (listed ~t), not rescored
  uint4 x[2][kChunks];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    j[r] = r0 + g + 8 * r;
    const bool listed = j[r] < limit;
    const int32_t t0 = !listed ? 0 : exact ? p.exact[j[r]] : p.cand[size_t(h) * p.tmax + j[r]];
    const bool live = listed && (!kPaged || t0 >= 0);  // as RescoreCandidates
    tok[r] = kPaged && !live ? -1 : t0;
    const uint16_t* row = p.keys + KvRow<kPaged>(p, h, live ? t0 : 0);
#pragma unroll
    for (int m = 0; m < kChunks; ++m) x[r][m] = live ? __ldg(reinterpret_cast<const uint4*>(row + 8 * (t + 4 * m))) : make_uint4(0, 0, 0, 0);
  }
  // The q fragments (column n = g: q row n % 4's part n / 4) at this lane's
  // channels of each k-step, scaled per q row by a power of two.
  const int qrow = g & 3;
  const float* qr = p.qAug + size_t(h * kMmaGroup + qrow) * p.stride;
  const auto qAt = [qr, t](int s) { return *reinterpret_cast<const float4*>(qr + 8 * (t + 4 * (s / 2)) + 4 * (s % 2)); };
  float mq = 0.f;
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const float4 v = qAt(s);
    mq = fmaxf(mq, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
  }
  // The row's largest |q|: its lanes t (and the hi / lo half) hold all of it between them.
  mq = fmaxf(mq, __shfl_xor_sync(0xffffffffu, mq, 1));
  mq = fmaxf(mq, __shfl_xor_sync(0xffffffffu, mq, 2));
  mq = fmaxf(mq, __shfl_xor_sync(0xffffffffu, mq, 16));
  const float sq = PowerScale(mq);
  const bool loPart = g >= 4;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const float4 v = qAt(s);  // again: 4·kSteps floats live across the loads cost registers
    uint32_t hi, lo, b0, b1;
    SplitPair(v.x * sq, v.y * sq, hi, lo);
    b0 = loPart ? lo : hi;
    SplitPair(v.z * sq, v.w * sq, hi, lo);
    b1 = loPart ? lo : hi;
    const uint32_t* w0 = reinterpret_cast<const uint32_t*>(&x[0][s / 2]);
    const uint32_t* w1 = reinterpret_cast<const uint32_t*>(&x[1][s / 2]);
    const int k = 2 * (s % 2);
    Mma16816(acc, w0[k], w1[k], w0[k + 1], w1[k + 1], b0, b1);
  }
  // Columns 2t, 2t+1: lanes t = 2, 3 hold the lo parts of t - 2's q rows.
#pragma unroll
  for (int i = 0; i < 4; ++i) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], 2);
  // Lanes t = 0, 1: q rows 2t and 2t + 1 (acc[0], acc[1] for row g; acc[2], acc[3] for row g + 8), unscaled.
  const float inv0 = 1.f / __shfl_sync(0xffffffffu, sq, 4 * (2 * (t & 1))), inv1 = 1.f / __shfl_sync(0xffffffffu, sq, 4 * (2 * (t & 1) + 1));
  const float d00 = acc[0] * inv0, d01 = acc[1] * inv1, d10 = acc[2] * inv0, d11 = acc[3] * inv1;
  float best[2] = {fmaxf(d00, d01), fmaxf(d10, d11)};
#pragma unroll
  for (int r = 0; r < 2; ++r) best[r] = fmaxf(best[r], __shfl_xor_sync(0xffffffffu, best[r], 1));
  if (t < 2 && p.dotsOn) {
    const size_t q0 = size_t(h) * p.group + 2 * t;
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (j[r] < limit) {
        const int64_t col = exact ? p.tmax + j[r] : j[r];
        p.dots[q0 * p.dotStride + col] = r ? d10 : d00;
        p.dots[(q0 + 1) * p.dotStride + col] = r ? d11 : d01;
      }
  }
  // Lane t = r orders row g + 8r.
  uint32_t order = 0xffffffffu;
  if (t < 2) {
    const int64_t jr = t ? j[1] : j[0];  // selects, not an index: the arrays stay in registers
    const int32_t u = t ? tok[1] : tok[0];
    const bool skipped = (u >= p.skip[0] && u < p.skip[1]) || (u >= p.skip[2] && u < p.skip[3]);  // as RescoreCandidates
    order = jr < limit && (!kPaged || u >= 0) && !skipped ? RankOrder(t ? best[1] : best[0]) : 0xffffffffu;
    if (!exact && jr < p.tmax) p.ord2[size_t(h) * p.tmax + jr] = order;
  }
  if (p.range && !exact) TakeRange(p.range + 2 * gridDim.y, h, order);  // uniform over the block
}

// The rescoring's launch: RescoreHeldMma where it applies and P.mmaRescore,
// else RescoreHeld (P.held) or RescoreCandidates, on RescoreHeld's grid.
template <bool kBf16, bool kPaged, class Launcher, class Paths>
void LaunchRescore(Launcher& L, const Paths& P, const StepParams& p, int d, dim3 grid, size_t qSmem) {
  if (P.held && P.mmaRescore && MmaRescoreApplies(kBf16, p.group, d)) {
    if (d == 64) L(RescoreHeldMma<64, kPaged>, grid, kThreads, 0, p);
    else L(RescoreHeldMma<128, kPaged>, grid, kThreads, 0, p);
  } else if (P.held) {
    L(RescoreHeld<kBf16, kPaged>, grid, kThreads, qSmem, p);
  } else {
    L(RescoreCandidates<kBf16, kPaged>, grid, kThreads, qSmem, p);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
