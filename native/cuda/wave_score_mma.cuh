// ScoreClusters on the tensor cores (on by default; KVRECALL_WAVE_MMA=0 turns it off, wave_paths.cuh):
// every cluster's spread rank key and second-order estimate logits, as
// ScoreClusters<kFuse> computes them, from three small matrix products per
// tile of clusters: centroids · q, axis codes · q, variance codes · q².
//
// Why: ScoreClusters is bound by instruction issue, not HBM (ncu, visit B2:
// 64.6% of the SM's peak against 36% of DRAM's, bench/results/
// wave-step-ncu-d64-h100-b2.md): a pair of threads does ~1,500 FMAs a
// cluster at d = 128 with its codes decoded to f32 one by one. Here a warp
// takes 16 clusters per mma.m16n8k16 and the codes go in as f16 integers
// (exact), about a third of the instructions a cluster.
//
// Precision, and why it is not the host's bit for bit: the products are f16
// × f16, so q (f32) goes in as two f16 parts, hi + lo (q·2^e scaled by a
// power of two per q row so that neither overflows nor underflows: |q·2^e|
// in [64, 128), its square below 2^14; undone exactly after), which carry
// ~22 bits of it; the centroids (f16 stores) and codes (|c| <= 127, and c²
// split into its high and low byte) are exact. The tensor core sums in f32
// in its own order, and each code row's scale is applied once to the sum
// rather than to each channel. So a score differs from the host's by a few
// f32 ulps of its terms' magnitude: answers within float tolerance, but a
// cluster at the cut may fall the other side of it, so the ids are not the
// CPU path's bit for bit (the default path's are). The GPU tests check this
// path against float64 and the default path with tolerances.
//
// Runs where the launch is the common case: an f16 store, the spread
// ranking, 4 q heads a kv head (the two f16 parts of 4 rows fill the mma's
// 8 columns), d = 64 or 128; else ScoreClusters runs.
#pragma once

#include "cuda/cuda_common.cuh"
#include "cuda/mma_fragments.cuh"
#include "cuda/wave_step_kernels.cuh"

#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kvr {
namespace cuda {
namespace {

constexpr int kMmaWarps = 4;
constexpr int kMmaTilesPerWarp = 2;  // m-tiles of 16 clusters a warp: its q fragments serve both
constexpr int kMmaRows = kMmaWarps * kMmaTilesPerWarp * 16;
constexpr int kMmaGroup = 4;
// A code row's stride in shared memory: d + 16 bytes puts the 8 rows of a
// fragment's loads 4 banks apart (d = 128: 36 words; d = 64: 20), so they
// hit 16 different banks; the centroid rows' own stride (d + 8 words: 68 or
// 36 words) does the same for ldmatrix.
__host__ __device__ constexpr int MmaCodeStride(int d) { return d + 16; }
__host__ __device__ constexpr size_t MmaScoreSmem(int d, int stride) {
  return size_t(kMmaRows) * (size_t(stride) * 2 + 2 * size_t(MmaCodeStride(d)));
}
inline bool MmaScoreApplies(bool bf16, bool spread, int group, int d, int stride) {
  return !bf16 && spread && group == kMmaGroup && (d == 64 || d == 128) && stride == d + 8;
}

// Two int8 axis codes (the low byte first) as an f16 pair, exactly: each
// byte as c + 128 under f16's exponent of 1024 (0x64XX is 1024 + XX), less
// 1152. One PRMT and one HSUB2 where a conversion a code would take two.
__device__ __forceinline__ uint32_t AxisPair(uint32_t w) {
  const uint32_t u = __byte_perm(w ^ 0x8080u, 0x64646464u, 0x4140u);
  const __half2 h = __hsub2(*reinterpret_cast<const __half2*>(&u), __half2half2(__ushort_as_half(0x6480)));  // 1152
  return *reinterpret_cast<const uint32_t*>(&h);
}
// Two variance codes' squares (c² <= 65025, more than f16's 11 bits) as two
// f16 pairs, high bytes and low bytes (c² = 256·hi + lo), each exact.
__device__ __forceinline__ void VarPairs(uint32_t w, uint32_t& hi, uint32_t& lo) {
  const uint32_t c0 = w & 0xffu, c1 = (w >> 8) & 0xffu;
  const uint32_t s0 = c0 * c0, s1 = c1 * c1;
  const uint32_t uh = __byte_perm(s0, s1, 0x7571u) | 0x64006400u;  // [hi0, 0x64, hi1, 0x64]
  const uint32_t ul = __byte_perm(s0, s1, 0x7470u) | 0x64006400u;  // [lo0, 0x64, lo1, 0x64]
  const __half2 k = __half2half2(__ushort_as_half(0x6400));        // 1024
  const __half2 h = __hsub2(*reinterpret_cast<const __half2*>(&uh), k), l = __hsub2(*reinterpret_cast<const __half2*>(&ul), k);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}
__device__ __forceinline__ uint32_t PackHalves(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}
// x's f16 parts hi + lo, each as one half of two f16 pairs.
__device__ __forceinline__ void SplitPair(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  const __half2 h = __floats2half2_rn(x0, x1);
  const float2 hf = __half22float2(h);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = PackHalves(x0 - hf.x, x1 - hf.y);  // exact differences (Sterbenz), rounded to f16 once
}
// 2^(6 - e) for the largest |x| = m (m in [2^e, 2^(e+1))): m·s in [64, 128). 1 for m = 0.
// Within 2^±63, so that s² and 1/s² are normal floats.
__device__ __forceinline__ float PowerScale(float m) {
  if (!(m > 0.f)) return 1.f;
  const int e = int((__float_as_uint(m) >> 23) & 0xff) - 127;
  const int x = min(max(127 + 6 - e, 127 - 63), 127 + 63);
  return __uint_as_float(uint32_t(x) << 23);
}

// Grid: (clusters of the largest head / kMmaRows up, kvHeads); kMmaWarps
// warps; MmaScoreSmem(d, stride) bytes. kD: the head dimension.
template <int kD>
__global__ void __launch_bounds__(kMmaWarps * 32) ScoreClustersMma(StepParams p) {
  AfterPrior();
  constexpr int kSteps = kD / 16, kCS = MmaCodeStride(kD);
  extern __shared__ __align__(16) uint8_t smem[];
  const int h = blockIdx.y, S = p.stride;
  const int64_t b = p.base[h], C = p.base[h + 1] - b, r0 = int64_t(blockIdx.x) * kMmaRows;
  if (r0 >= C) return;
  const int rows = int(min(int64_t(kMmaRows), C - r0));
  uint16_t* const tc = reinterpret_cast<uint16_t*>(smem);  // [rows, S]: the centroid rows as stored, radius chunk included
  uint8_t* const ta = smem + size_t(kMmaRows) * S * 2;     // [rows, kCS]: axis codes
  uint8_t* const tv = ta + size_t(kMmaRows) * kCS;         // [rows, kCS]: variance codes
  {
    const uint4* src = reinterpret_cast<const uint4*>(p.cent + size_t(b + r0) * S);
    uint4* dst = reinterpret_cast<uint4*>(tc);
    for (int i = threadIdx.x; i < rows * S / 8; i += blockDim.x) __pipeline_memcpy_async(dst + i, src + i, 16);
    constexpr int np = kD / 16;  // 16-byte pieces a code row
    const uint8_t* sa = reinterpret_cast<const uint8_t*>(p.axes) + size_t(b + r0) * kD;
    const uint8_t* sv = p.vars + size_t(b + r0) * kD;
    for (int i = threadIdx.x; i < rows * np; i += blockDim.x) {
      const int r = i / np, c = i - r * np;
      __pipeline_memcpy_async(ta + r * kCS + c * 16, sa + size_t(i) * 16, 16);
      __pipeline_memcpy_async(tv + r * kCS + c * 16, sv + size_t(i) * 16, 16);
    }
    __pipeline_commit();
  }
  // The q fragments (B, col-major 16 × 8: column n = lane / 4 is q row n % 4's
  // f16 part n / 4, hi then lo; this lane's k rows 2t, 2t + 1, 2t + 8, 2t + 9
  // of each 16), for q and for q² (rounded to f32 as the host's q2), while
  // the tile is on its way.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int qrow = g & 3;
  const bool loPart = g >= 4;
  const float* qr = p.qAug + size_t(h * kMmaGroup + qrow) * S;
  float qv[kSteps][4];
  float m = 0.f;
#pragma unroll
  for (int k = 0; k < kSteps; ++k) {
    const float2 x = *reinterpret_cast<const float2*>(qr + 16 * k + 2 * t);
    const float2 y = *reinterpret_cast<const float2*>(qr + 16 * k + 2 * t + 8);
    qv[k][0] = x.x, qv[k][1] = x.y, qv[k][2] = y.x, qv[k][3] = y.y;
#pragma unroll
    for (int j = 0; j < 4; ++j) m = fmaxf(m, fabsf(qv[k][j]));
  }
  // The row's largest |q|: its 8 lanes (t, and the hi / lo half) hold all of it between them.
  m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
  m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
  m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
  const float sq = PowerScale(m), sq2 = sq * sq;
  uint32_t bq[kSteps][2], bq2[kSteps][2];
#pragma unroll
  for (int k = 0; k < kSteps; ++k) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float x0 = qv[k][2 * j], x1 = qv[k][2 * j + 1];
      uint32_t hi, lo;
      SplitPair(x0 * sq, x1 * sq, hi, lo);
      bq[k][j] = loPart ? lo : hi;
      SplitPair(__fmul_rn(x0, x0) * sq2, __fmul_rn(x1, x1) * sq2, hi, lo);
      bq2[k][j] = loPart ? lo : hi;
    }
  }
  // For the epilogue: lanes t = 0, 1 finish q rows 2t and 2t + 1; their scales sit in lanes 4·row.
  float inv[2], inv2[2], qnorm[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int row = 2 * (t & 1) + j;
    const float s = __shfl_sync(0xffffffffu, sq, 4 * row);
    inv[j] = 1.f / s;  // powers of two: exact
    inv2[j] = inv[j] * inv[j];
    qnorm[j] = p.qAug[size_t(h * kMmaGroup + row) * S + kD];
  }
  const float share = p.shares[h];
  __pipeline_wait_prior(0);
  __syncthreads();
  for (int mt = 0; mt < kMmaTilesPerWarp; ++mt) {
    const int base = (warp * kMmaTilesPerWarp + mt) * 16;  // the m-tile's first row in the CTA's tile
    float acc[4][4] = {};                                   // centroids · q, axes · q, var hi · q², var lo · q²
    if (base < rows) {  // uniform over the warp
      const uint16_t* arow = tc + size_t(base + (lane & 15)) * S + (lane >> 4) * 8;
      const uint8_t* ca = ta + (base + g) * kCS + 2 * t;
      const uint8_t* cv = tv + (base + g) * kCS + 2 * t;
#pragma unroll
      for (int k = 0; k < kSteps; ++k) {
        uint32_t a[4];
        LdMatrixX4(a, arow + 16 * k);
        Mma16816(acc[0], a[0], a[1], a[2], a[3], bq[k][0], bq[k][1]);
        // A fragment: rows g, g + 8 (8 rows = 8·kCS bytes on), k columns 2t, 2t + 1 and 8 on.
        const int o = 16 * k;
        const uint32_t x0 = *reinterpret_cast<const uint16_t*>(ca + o), x1 = *reinterpret_cast<const uint16_t*>(ca + 8 * kCS + o),
                       x2 = *reinterpret_cast<const uint16_t*>(ca + o + 8), x3 = *reinterpret_cast<const uint16_t*>(ca + 8 * kCS + o + 8);
        Mma16816(acc[1], AxisPair(x0), AxisPair(x1), AxisPair(x2), AxisPair(x3), bq[k][0], bq[k][1]);
        const uint32_t v0 = *reinterpret_cast<const uint16_t*>(cv + o), v1 = *reinterpret_cast<const uint16_t*>(cv + 8 * kCS + o),
                       v2 = *reinterpret_cast<const uint16_t*>(cv + o + 8), v3 = *reinterpret_cast<const uint16_t*>(cv + 8 * kCS + o + 8);
        uint32_t h0, l0, h1, l1, h2, l2, h3, l3;
        VarPairs(v0, h0, l0), VarPairs(v1, h1, l1), VarPairs(v2, h2, l2), VarPairs(v3, h3, l3);
        Mma16816(acc[2], h0, h1, h2, h3, bq2[k][0], bq2[k][1]);
        Mma16816(acc[3], l0, l1, l2, l3, bq2[k][0], bq2[k][1]);
      }
    }
    // acc[.][i]: row g + 8·(i / 2), column 2t + i % 2, i.e. q row 2(t & 1) + i % 2's
    // part t / 2. The lo parts (t = 2, 3) join the hi parts (t = 0, 1).
#pragma unroll
    for (int x = 0; x < 4; ++x)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[x][i] += __shfl_xor_sync(0xffffffffu, acc[x][i], 2);
    uint32_t order[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int tr = base + g + 8 * half;  // the row in the CTA's tile
      const int64_t r = r0 + tr;
      const bool live = tr < rows;
      const size_t c = size_t(b + (live ? r : 0));
      const float axisScale = p.axisScales[c], varScale = p.varScales[c];
      const float radius = __half2float(__ushort_as_half(tc[size_t(live ? tr : 0) * S + kD]));
      float best = -INFINITY;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int i = 2 * half + j;
        const float dot = acc[0][i] * inv[j];
        const float along = axisScale * (acc[1][i] * inv[j]);
        const float channels = varScale * (fmaf(256.f, acc[2][i], acc[3][i]) * inv2[j]);
        const float v = fmaf(along, along, channels);
        const float s = fmaf(p.spread, sqrtf(fmaxf(v, 0.f)), dot);
        best = fmaxf(best, s);
        if (t < 2 && live)
          p.logits[size_t(h * kMmaGroup + 2 * t + j) * p.cmax + r] = SecondOrderLogit(p.scale, share, dot, channels, dot, qnorm[j], radius);
      }
      best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, 1));  // q rows 0, 1 with 2, 3
      order[half] = RankOrder(best);
      if (t == 0 && live) p.ord1[b + r] = order[half];
    }
    if (p.range) {  // uniform; every thread of the CTA takes part
      TakeRange(p.range, h, t == 0 && base + g < rows ? order[0] : 0xffffffffu);
      TakeRange(p.range, h, t == 0 && base + g + 8 < rows ? order[1] : 0xffffffffu);
    }
  }
}

// Its shared memory (70 KiB at d = 128) is above the default 48 KiB: set
// once, with the store's other kernels' (wave_setup.cuh).
inline void SetMmaScoreAttributes() {
  Check(cudaFuncSetAttribute(ScoreClustersMma<64>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(MmaScoreSmem(64, 72))), "cudaFuncSetAttribute");
  Check(cudaFuncSetAttribute(ScoreClustersMma<128>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(MmaScoreSmem(128, 136))), "cudaFuncSetAttribute");
}

// Launches ScoreClustersMma where it applies (MmaScoreApplies); false where not.
inline bool LaunchScoreClustersMma(const StepParams& p, bool bf16, int64_t cmax, int H, cudaStream_t s) {
  if (!MmaScoreApplies(bf16, p.spreadMode, p.group, p.d, p.stride)) return false;
  const dim3 grid(unsigned((cmax + kMmaRows - 1) / kMmaRows), unsigned(H));
  const size_t smem = MmaScoreSmem(p.d, p.stride);
  if (p.d == 128) ScoreClustersMma<128><<<grid, kMmaWarps * 32, smem, s>>>(p);
  else ScoreClustersMma<64><<<grid, kMmaWarps * 32, smem, s>>>(p);
  return true;
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
