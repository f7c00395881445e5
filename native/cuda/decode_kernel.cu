// Split-K decode attention over block tables (see decode_kernel.h).
//
// Layout of the work: grid (splits, kvHeads, G / GC). A CTA of 128 threads
// takes one kv head, GC of its query heads and one contiguous range of tokens.
// A row of K (or V) is headDim 16-bit words = headDim / 8 lanes x 16 bytes, so
// a warp reads 32 / (headDim / 8) rows at once; each lane keeps an online
// softmax state (m, l, acc over its 8 columns) for every query head, U rows in
// flight per step. At the end the row groups are combined in shared memory and
// the CTA writes a normalised partial output and its log-sum-exp.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cuda/decode_kernel.h"

namespace kvr {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <Dtype DT>
__device__ __forceinline__ void Widen8(const uint4& w, float* f) {
  if constexpr (DT == Dtype::kF16) {
    const __half2* h = reinterpret_cast<const __half2*>(&w);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 t = __half22float2(h[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  } else {
    const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(u[i] << 16);
      f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
    }
  }
}

template <int D, int GC, Dtype DT>
__global__ void __launch_bounds__(kThreads) SplitKernel(DecodeParams p, int G) {
  constexpr int LPR = D / 8;                    // lanes per row
  constexpr int RPW = 32 / LPR;                 // rows per warp
  constexpr int R = (kThreads / 32) * RPW;      // row groups per CTA
  constexpr int U = GC >= 8 ? 2 : 4;            // rows in flight per row group
  const int split = blockIdx.x, h = blockIdx.y, chunk = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rg = warp * RPW + lane / LPR;
  const int sub = lane % LPR;
  const int qh0 = h * G + chunk * GC;

  float q[GC][8];
#pragma unroll
  for (int g = 0; g < GC; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e) q[g][e] = p.q[size_t(qh0 + g) * D + sub * 8 + e] * (p.scale * kLog2e);

  const int64_t valid = p.validTokens[h];
  const int64_t per = (p.maxTokens + p.splits - 1) / p.splits;
  const int64_t t0 = int64_t(split) * per;
  const int64_t t1 = valid < t0 + per ? valid : t0 + per;
  const int32_t* __restrict__ table = p.tables + p.tableOffset[h];
  const int shift = p.blockShift;
  const int64_t mask = (int64_t(1) << shift) - 1;
  const uint4* __restrict__ kPool = reinterpret_cast<const uint4*>(p.kPool);
  const uint4* __restrict__ vPool = reinterpret_cast<const uint4*>(p.vPool);

  float m[GC], l[GC], acc[GC][8];
#pragma unroll
  for (int g = 0; g < GC; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }

  for (int64_t base = t0; base < t1; base += int64_t(R) * U) {
    uint4 kw[U], vw[U];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = base + rg + int64_t(u) * R;
      ok[u] = t < t1;
      if (ok[u]) {
        const size_t row = (size_t(table[t >> shift]) << shift) + size_t(t & mask);
        kw[u] = __ldg(kPool + row * LPR + sub);
        vw[u] = __ldg(vPool + row * LPR + sub);
      } else {
        kw[u] = make_uint4(0, 0, 0, 0);
        vw[u] = make_uint4(0, 0, 0, 0);
      }
    }
    float s[U][GC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[8];
      Widen8<DT>(kw[u], kf);
#pragma unroll
      for (int g = 0; g < GC; ++g) {
        float a = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) a = fmaf(q[g][e], kf[e], a);
        s[u][g] = a;
      }
    }
#pragma unroll
    for (int off = LPR / 2; off > 0; off >>= 1)
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int g = 0; g < GC; ++g) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], off);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (!ok[u])
#pragma unroll
        for (int g = 0; g < GC; ++g) s[u][g] = -INFINITY;

    float vf[U][8];
#pragma unroll
    for (int u = 0; u < U; ++u) Widen8<DT>(vw[u], vf[u]);
#pragma unroll
    for (int g = 0; g < GC; ++g) {
      float mx = s[0][g];
#pragma unroll
      for (int u = 1; u < U; ++u) mx = fmaxf(mx, s[u][g]);
      const float mNew = fmaxf(m[g], mx);
      if (mNew != -INFINITY) {
        const float corr = exp2f(m[g] - mNew);  // 0 while m is -inf
        l[g] *= corr;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] *= corr;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const float pr = exp2f(s[u][g] - mNew);  // 0 for rows past the end
          l[g] += pr;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(pr, vf[u][e], acc[g][e]);
        }
        m[g] = mNew;
      }
    }
  }

  __shared__ float sAcc[R][GC][D];
  __shared__ float sM[R][GC], sL[R][GC], sW[R][GC];
  __shared__ float sTotM[GC], sTotL[GC];
#pragma unroll
  for (int g = 0; g < GC; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e) sAcc[rg][g][sub * 8 + e] = acc[g][e];
  if (sub == 0)
#pragma unroll
    for (int g = 0; g < GC; ++g) {
      sM[rg][g] = m[g];
      sL[rg][g] = l[g];
    }
  __syncthreads();
  if (threadIdx.x < GC) {
    const int g = threadIdx.x;
    float M = -INFINITY;
    for (int r = 0; r < R; ++r) M = fmaxf(M, sM[r][g]);
    float L = 0.f;
    for (int r = 0; r < R; ++r) {
      const float w = sM[r][g] == -INFINITY ? 0.f : exp2f(sM[r][g] - M);
      sW[r][g] = w;
      L += w * sL[r][g];
    }
    sTotM[g] = M;
    sTotL[g] = L;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < GC * D; i += kThreads) {
    const int g = i / D, j = i % D;
    float a = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) a = fmaf(sW[r][g], sAcc[r][g][j], a);
    const float L = sTotL[g];
    p.partOut[(size_t(qh0 + g) * p.splits + split) * D + j] = L > 0.f ? a / L : 0.f;
  }
  if (threadIdx.x < GC) {
    const int g = threadIdx.x;
    const float L = sTotL[g];
    p.partLse[size_t(qh0 + g) * p.splits + split] = L > 0.f ? sTotM[g] * kLn2 + logf(L) : -INFINITY;
  }
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One CTA of kThreads per query head; dynamic shared memory: splits floats.
__global__ void __launch_bounds__(kThreads) MergeKernel(const float* __restrict__ partOut,
                                                        const float* __restrict__ partLse, int splits, int D,
                                                        const float* __restrict__ extraOut,
                                                        const float* __restrict__ extraLse, float* __restrict__ out,
                                                        float* __restrict__ lse) {
  extern __shared__ float w[];
  __shared__ float red[kThreads / 32];
  __shared__ float sMax, sSum, sExtraW;
  const int qh = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float* pl = partLse + size_t(qh) * splits;
  float mx = -INFINITY;
  for (int i = tid; i < splits; i += kThreads) mx = fmaxf(mx, pl[i]);
  if (extraLse && tid == 0) mx = fmaxf(mx, extraLse[qh]);
  mx = WarpMax(mx);
  if (lane == 0) red[warp] = mx;
  __syncthreads();
  if (tid == 0) {
    float v = red[0];
    for (int i = 1; i < kThreads / 32; ++i) v = fmaxf(v, red[i]);
    sMax = v;
  }
  __syncthreads();
  const float M = sMax;
  float sum = 0.f;
  for (int i = tid; i < splits; i += kThreads) {
    const float wi = pl[i] == -INFINITY ? 0.f : expf(pl[i] - M);
    w[i] = wi;
    sum += wi;
  }
  if (tid == 0) {
    const float we = (extraLse && extraLse[qh] != -INFINITY) ? expf(extraLse[qh] - M) : 0.f;
    sExtraW = we;
    sum += we;
  }
  sum = WarpSum(sum);
  __syncthreads();  // red[] reuse
  if (lane == 0) red[warp] = sum;
  __syncthreads();
  if (tid == 0) {
    float v = 0.f;
    for (int i = 0; i < kThreads / 32; ++i) v += red[i];
    sSum = v;
  }
  __syncthreads();
  const float L = sSum, we = sExtraW;
  for (int j = tid; j < D; j += kThreads) {
    float a = 0.f;
    for (int i = 0; i < splits; ++i) a = fmaf(w[i], partOut[(size_t(qh) * splits + i) * D + j], a);
    if (extraOut && we > 0.f) a = fmaf(we, extraOut[size_t(qh) * D + j], a);
    out[size_t(qh) * D + j] = L > 0.f ? a / L : 0.f;
  }
  if (tid == 0) lse[qh] = L > 0.f ? M + logf(L) : -INFINITY;
}

__global__ void ScatterKernel(const uint4* __restrict__ staged, const int32_t* __restrict__ slots, int64_t blockVecs,
                              uint4* __restrict__ kPool, uint4* __restrict__ vPool) {
  const int64_t b = blockIdx.x;
  const int64_t slot = slots[b];
  const uint4* src = staged + b * 2 * blockVecs;
  for (int64_t i = threadIdx.x; i < blockVecs; i += blockDim.x) {
    kPool[slot * blockVecs + i] = src[i];
    vPool[slot * blockVecs + i] = src[blockVecs + i];
  }
}

template <int D, int GC, Dtype DT>
int LaunchSplit(const DecodeParams& p, cudaStream_t s) {
  const int G = p.qHeads / p.kvHeads;
  dim3 grid(p.splits, p.kvHeads, G / GC);
  SplitKernel<D, GC, DT><<<grid, kThreads, 0, s>>>(p, G);
  return int(cudaGetLastError());
}

template <int D, Dtype DT>
int LaunchSplitG(const DecodeParams& p, cudaStream_t s) {
  const int G = p.qHeads / p.kvHeads;
  if (G % 8 == 0) return LaunchSplit<D, 8, DT>(p, s);
  if (G % 4 == 0) return LaunchSplit<D, 4, DT>(p, s);
  if (G % 2 == 0) return LaunchSplit<D, 2, DT>(p, s);
  return LaunchSplit<D, 1, DT>(p, s);
}

int HeadsPerCta(int G) { return G % 8 == 0 ? 8 : G % 4 == 0 ? 4 : G % 2 == 0 ? 2 : 1; }

}  // namespace

int ChooseSplits(int smCount, int qHeads, int kvHeads, int64_t maxTokens) {
  const int G = qHeads / kvHeads;
  const int64_t ctasPerSplit = int64_t(kvHeads) * (G / HeadsPerCta(G));
  int64_t splits = (int64_t(3) * (smCount > 0 ? smCount : 132) + ctasPerSplit - 1) / ctasPerSplit;
  const int64_t byTokens = (maxTokens + 255) / 256;
  if (splits > byTokens) splits = byTokens;
  if (splits > 4096) splits = 4096;
  return int(splits < 1 ? 1 : splits);
}

int LaunchDecode(const DecodeParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.qHeads <= 0 || p.kvHeads <= 0 || p.qHeads % p.kvHeads != 0 || p.splits < 1) return int(cudaErrorInvalidValue);
  int rc;
  if (p.headDim == 128)
    rc = p.dtype == Dtype::kF16 ? LaunchSplitG<128, Dtype::kF16>(p, s) : LaunchSplitG<128, Dtype::kBf16>(p, s);
  else if (p.headDim == 64)
    rc = p.dtype == Dtype::kF16 ? LaunchSplitG<64, Dtype::kF16>(p, s) : LaunchSplitG<64, Dtype::kBf16>(p, s);
  else
    return int(cudaErrorInvalidValue);
  if (rc) return rc;
  MergeKernel<<<p.qHeads, kThreads, size_t(p.splits) * sizeof(float), s>>>(p.partOut, p.partLse, p.splits, p.headDim,
                                                                           p.extraOut, p.extraLse, p.out, p.lse);
  return int(cudaGetLastError());
}

int LaunchScatter(const uint16_t* staged, const int32_t* slots, int64_t n, int64_t blockWords, uint16_t* kPool,
                  uint16_t* vPool, void* stream) {
  if (n <= 0) return 0;
  ScatterKernel<<<unsigned(n), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const uint4*>(staged), slots, blockWords / 8, reinterpret_cast<uint4*>(kPool),
      reinterpret_cast<uint4*>(vPool));
  return int(cudaGetLastError());
}

void MergeLseHost(float* out, float* lse, const float* otherOut, const float* otherLse, int qHeads, int headDim) {
  for (int h = 0; h < qHeads; ++h) {
    const double a = lse[h], b = otherLse[h];
    const double M = std::max(a, b);
    if (M == -std::numeric_limits<double>::infinity()) continue;
    const double wa = a == -INFINITY ? 0.0 : std::exp(a - M), wb = b == -INFINITY ? 0.0 : std::exp(b - M);
    const double L = wa + wb;
    for (int j = 0; j < headDim; ++j) {
      float& o = out[size_t(h) * headDim + j];
      o = float((wa * o + wb * otherOut[size_t(h) * headDim + j]) / L);
    }
    lse[h] = float(M + std::log(L));
  }
}

}  // namespace cuda
}  // namespace kvr
