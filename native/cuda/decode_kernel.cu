// Split-K decode attention over block tables (see decode_kernel.h).
//
// Layout of the work: grid (splits, kvHeads, G / GC). A CTA of 4 warps (8 for
// d = 64) takes one kv head, GC of its query heads and one contiguous range of
// tokens, cut into warp tiles of kW = 16 rows; warp w takes tiles w, w + warps,
// ... Each warp streams its own tiles through a private ring of kStages
// shared-memory stages with cp.async (16-byte copies, two tiles in flight while
// it computes the third), so the main loop has no CTA-wide barrier and every
// multiprocessor keeps ~128 KB of K/V reads outstanding: the kernel runs at the
// copy rate of the HBM. A tile never straddles a block when blockSize >= kW: its
// slot is read once, one tile ahead; smaller blocks look the slot up per row.
// Rows past the end are zero-filled and masked.
//
// Per tile, QK: 8 lanes per row (each 8 or 16 columns; the 16-byte shared loads
// of a quarter-warp cover 128 consecutive bytes, so no bank conflicts), 4 rows
// per lane; the 8 partial sums of a (row, head) are folded by a transposing
// butterfly (7 shuffles for 16 values instead of 24), so each lane ends with
// whole scores of its own (row, head) pairs and each score is computed once.
// Softmax: the tile's max per head by shuffles; every lane then holds the same
// running max, so the rescale is warp-uniform and skipped when no max grew, and
// there is one exp2f per (row, head) (the old kernel did one per row, head and
// lane of the 16 that shared a row). PV: a lane owns 8 columns of every second
// (d = 128) or fourth (d = 64) row, reads p from a warp-private buffer, and
// accumulates GC x 8 outputs in f32. At the end the warps are combined in
// shared memory and the CTA writes a normalised partial output and its
// log-sum-exp; the merge kernel combines the splits.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <vector>

#include "cuda/decode_kernel.h"

namespace kvr {
namespace cuda {
namespace {

constexpr int kThreads = 128;  // merge kernel
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFull = 0xffffffffu;

constexpr int kW = 16;  // rows per warp tile (a power of two)
constexpr int kWShift = 4;
constexpr int kStages = 3;     // shared-memory stages per warp: 2 tiles in flight while one is computed
constexpr int kCtasPerSm = 2;  // what the registers and the ring are sized for

// Warps per CTA. d = 64 does half the bytes per row for the same per-row work
// (fold, softmax), so it takes twice the warps: 2 CTAs per multiprocessor then
// hold 16 warps (d = 128: 8) and the same ring bytes (96 KB a CTA). GC = 8
// needs more registers than 16 warps per multiprocessor leave.
__host__ __device__ constexpr int WarpsFor(int D, int GC) { return D == 64 && GC <= 4 ? 8 : 4; }

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

__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, uint32_t srcBytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(srcBytes) : "memory");
}
__device__ __forceinline__ void CpCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void CpWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// One level of the transposing butterfly over N values: the lane keeps the
// half its MASK bit selects, adds the partner's copy of that half, and sends
// the other half. With N == 1 it is a plain xor-reduction (both lanes agree).
template <int N, int MASK>
__device__ __forceinline__ void Fold(float* v, int lane) {
  if constexpr (N == 1) {
    v[0] += __shfl_xor_sync(kFull, v[0], MASK);
  } else {
    const bool hi = (lane & MASK) != 0;
#pragma unroll
    for (int k = 0; k < N / 2; ++k) {
      const float send = hi ? v[k] : v[k + N / 2];
      const float keep = hi ? v[k + N / 2] : v[k];
      v[k] = keep + __shfl_xor_sync(kFull, send, MASK);
    }
  }
}

template <int D, int WARPS>
struct Layout {
  static constexpr int kRowBytes = D * 2;
  static constexpr int kTileBytes = kW * kRowBytes;  // K (or V) of one warp tile
  static constexpr int kCpr = D / 8;                 // 16-byte chunks per row
  static constexpr int kRpp = 32 / kCpr;             // rows per warp pass (copies, PV)
  static constexpr int kNch = D / 64;                // chunks per lane in QK (8 lanes per row)
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kRingBytes = WARPS * kStages * kStageBytes;
};

template <int D, int GC>
constexpr int SplitSmemBytes() {
  constexpr int kWarps = WarpsFor(D, GC);
  using L = Layout<D, kWarps>;
  constexpr int pipe = L::kRingBytes + kWarps * kW * GC * 4;
  constexpr int combine = (kWarps * GC * D + 3 * kWarps * GC + 2 * GC) * 4;
  return pipe > combine ? pipe : combine;
}

template <int D, int GC, Dtype DT>
__global__ void __launch_bounds__(WarpsFor(D, GC) * 32, kCtasPerSm) SplitKernel(DecodeParams p, int G) {
  constexpr int kWarps = WarpsFor(D, GC), S = kStages;
  using L = Layout<D, kWarps>;
  constexpr int NH = GC >= 2 ? GC / 2 : 1;  // scores a lane holds after the fold
  constexpr int QC = L::kNch * 8;           // q columns per lane
  extern __shared__ __align__(16) unsigned char smem[];
  const int split = blockIdx.x, h = blockIdx.y, chunk = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int qh0 = h * G + chunk * GC;

  unsigned char* ring = smem + warp * (S * L::kStageBytes);
  float* pbuf = reinterpret_cast<float*>(smem + L::kRingBytes) + warp * kW * GC;
  const uint32_t ringS = static_cast<uint32_t>(__cvta_generic_to_shared(ring));

  // QK lanes: row slot rs (rows rs + 4i), sub = which 8 (or 16) columns.
  const int rs = lane >> 3, sub = lane & 7;
  const int b0 = sub & 1, b1 = (sub >> 1) & 1, b2 = (sub >> 2) & 1;
  const int myRow = rs + 4 * (2 * b2 + b1);  // the row of the scores this lane holds after the fold
  // Copy / PV lanes: chunk cc of rows cr + kRpp k.
  const int cc = lane % L::kCpr, cr = lane / L::kCpr;

  float q[GC][QC];
#pragma unroll
  for (int g = 0; g < GC; ++g)
#pragma unroll
    for (int c = 0; c < L::kNch; ++c)
#pragma unroll
      for (int e = 0; e < 8; ++e)
        q[g][c * 8 + e] = p.q[size_t(qh0 + g) * D + (sub + 8 * c) * 8 + e] * (p.scale * kLog2e);

  const int64_t valid = p.validTokens[h];
  int64_t per = (p.maxTokens + p.splits - 1) / p.splits;
  per = (per + kW - 1) & ~int64_t(kW - 1);
  const int64_t t0 = int64_t(split) * per;
  const int64_t t1 = valid < t0 + per ? valid : t0 + per;
  const int nTiles = t1 > t0 ? int((t1 - t0 + kW - 1) >> kWShift) : 0;
  const int myTiles = nTiles > warp ? (nTiles - warp + kWarps - 1) / kWarps : 0;

  const int32_t* __restrict__ table = p.tables + p.tableOffset[h];
  const int shift = p.blockShift;
  const int64_t mask = (int64_t(1) << shift) - 1;
  const bool wholeTile = shift >= kWShift;  // a tile lies inside one block
  const uint16_t* __restrict__ kPool = p.kPool;
  const uint16_t* __restrict__ vPool = p.vPool;
  auto tileStart = [&](int i) { return t0 + (int64_t(warp) + int64_t(i) * kWarps) * kW; };

  int32_t nextSlot = (wholeTile && myTiles > 0) ? __ldg(table + (tileStart(0) >> shift)) : 0;
  // Tile i of this warp into stage i % S; always one commit group (maybe empty).
  auto issue = [&](int i) {
    if (i < myTiles) {
      const int64_t ts = tileStart(i);
      const uint32_t dstK = ringS + uint32_t((i % S) * L::kStageBytes), dstV = dstK + L::kTileBytes;
      size_t rowBase = 0;
      if (wholeTile) {
        rowBase = (size_t(uint32_t(nextSlot)) << shift) + size_t(ts & mask);
        if (i + 1 < myTiles) nextSlot = __ldg(table + (tileStart(i + 1) >> shift));
      }
#pragma unroll
      for (int k = 0; k < kW / L::kRpp; ++k) {
        const int r = cr + L::kRpp * k;
        const int64_t t = ts + r;
        const bool ok = t < t1;
        size_t row = 0;
        if (ok) row = wholeTile ? rowBase + r : (size_t(uint32_t(__ldg(table + (t >> shift)))) << shift) + size_t(t & mask);
        const size_t off = row * D + cc * 8;
        const uint32_t so = uint32_t((r * D + cc * 8) * 2);
        CpAsync16(dstK + so, kPool + off, ok ? 16u : 0u);
        CpAsync16(dstV + so, vPool + off, ok ? 16u : 0u);
      }
    }
    CpCommit();
  };

  float m[GC], lOwn[NH], acc[GC][8];
#pragma unroll
  for (int g = 0; g < GC; ++g) {
    m[g] = -INFINITY;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }
#pragma unroll
  for (int k = 0; k < NH; ++k) lOwn[k] = 0.f;

#pragma unroll
  for (int i = 0; i < S - 1; ++i) issue(i);

  for (int i = 0; i < myTiles; ++i) {
    issue(i + S - 1);
    CpWait<S - 1>();
    __syncwarp();
    const unsigned char* Ks = ring + (i % S) * L::kStageBytes;
    const unsigned char* Vs = Ks + L::kTileBytes;
    const int64_t ts = tileStart(i);

    // QK: partial dots of 4 rows x GC heads over this lane's columns.
    float v[4 * GC];
#pragma unroll
    for (int ii = 0; ii < 4; ++ii) {
      float kf[L::kNch][8];
#pragma unroll
      for (int c = 0; c < L::kNch; ++c) {
        const uint4 w = *reinterpret_cast<const uint4*>(Ks + (rs + 4 * ii) * L::kRowBytes + (sub + 8 * c) * 16);
        Widen8<DT>(w, kf[c]);
      }
#pragma unroll
      for (int g = 0; g < GC; ++g) {
        float a = 0.f;
#pragma unroll
        for (int c = 0; c < L::kNch; ++c)
#pragma unroll
          for (int e = 0; e < 8; ++e) a = fmaf(q[g][c * 8 + e], kf[c][e], a);
        v[ii * GC + g] = a;
      }
    }
    constexpr int N0 = 4 * GC, N1 = N0 / 2, N2 = N1 / 2 > 0 ? N1 / 2 : 1;
    Fold<N0, 4>(v, lane);
    Fold<N1, 2>(v, lane);
    Fold<N2, 1>(v, lane);
    // v[k]: the whole score of row myRow, head NH * b0 + k (GC >= 2) or head 0.
    const bool rowOk = ts + myRow < t1;
    float s[NH], tm[NH];
#pragma unroll
    for (int k = 0; k < NH; ++k) tm[k] = s[k] = rowOk ? v[k] : -INFINITY;
#pragma unroll
    for (int o = 2; o < 32; o <<= 1)
#pragma unroll
      for (int k = 0; k < NH; ++k) tm[k] = fmaxf(tm[k], __shfl_xor_sync(kFull, tm[k], o));
    float tmax[GC];
    if constexpr (GC == 1) {
      tmax[0] = tm[0];
    } else {
      float other[NH];
#pragma unroll
      for (int k = 0; k < NH; ++k) other[k] = __shfl_xor_sync(kFull, tm[k], 1);
#pragma unroll
      for (int g = 0; g < GC; ++g) tmax[g] = (g / NH) == b0 ? tm[g % NH] : other[g % NH];
    }
    // Every lane holds the same m and tmax: the branch is warp-uniform.
    bool grow = false;
#pragma unroll
    for (int g = 0; g < GC; ++g) grow |= tmax[g] > m[g];
    if (grow) {
      float corr[GC];
#pragma unroll
      for (int g = 0; g < GC; ++g) {
        const float mNew = fmaxf(m[g], tmax[g]);
        corr[g] = exp2f(m[g] - mNew);  // 0 while m is -inf
        m[g] = mNew;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] *= corr[g];
      }
#pragma unroll
      for (int k = 0; k < NH; ++k) lOwn[k] *= GC == 1 ? corr[0] : (b0 ? corr[(NH + k) % GC] : corr[k]);
    }
#pragma unroll
    for (int k = 0; k < NH; ++k) {
      const float mo = GC == 1 ? m[0] : (b0 ? m[(NH + k) % GC] : m[k]);
      const float pr = exp2f(s[k] - mo);  // 0 for rows past the end
      lOwn[k] += pr;
      if (GC > 1 || b0 == 0) pbuf[myRow * GC + (GC == 1 ? 0 : NH * b0 + k)] = pr;
    }
    __syncwarp();

    // PV: this lane's 8 columns of rows cr + kRpp k.
#pragma unroll
    for (int k = 0; k < kW / L::kRpp; ++k) {
      const int r = cr + L::kRpp * k;
      const uint4 w = *reinterpret_cast<const uint4*>(Vs + r * L::kRowBytes + cc * 16);
      float vf[8];
      Widen8<DT>(w, vf);
      float pr[GC];
      if constexpr (GC % 4 == 0) {
#pragma unroll
        for (int g = 0; g < GC; g += 4) {
          const float4 t = *reinterpret_cast<const float4*>(pbuf + r * GC + g);
          pr[g] = t.x, pr[g + 1] = t.y, pr[g + 2] = t.z, pr[g + 3] = t.w;
        }
      } else if constexpr (GC == 2) {
        const float2 t = *reinterpret_cast<const float2*>(pbuf + r * GC);
        pr[0] = t.x, pr[1] = t.y;
      } else {
        pr[0] = pbuf[r];
      }
#pragma unroll
      for (int g = 0; g < GC; ++g)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(pr[g], vf[e], acc[g][e]);
    }
    __syncwarp();  // the stage and pbuf are refilled next
  }
  CpWait<0>();  // only empty groups can be left

  // Within the warp: sum the row groups of acc, and l over the lanes of each head.
#pragma unroll
  for (int o = L::kCpr; o < 32; o <<= 1)
#pragma unroll
    for (int g = 0; g < GC; ++g)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] += __shfl_xor_sync(kFull, acc[g][e], o);
#pragma unroll
  for (int o = 2; o < 32; o <<= 1)
#pragma unroll
    for (int k = 0; k < NH; ++k) lOwn[k] += __shfl_xor_sync(kFull, lOwn[k], o);
  __syncthreads();  // every warp is done with its ring: reuse shared memory

  float* sAcc = reinterpret_cast<float*>(smem);  // [kWarps][GC][D]
  float* sM = sAcc + kWarps * GC * D;            // [kWarps][GC]
  float* sL = sM + kWarps * GC;
  float* sW = sL + kWarps * GC;
  float* sTotM = sW + kWarps * GC;  // [GC]
  float* sTotL = sTotM + GC;
  if (lane < L::kCpr)
#pragma unroll
    for (int g = 0; g < GC; ++g) {
      float4* dst = reinterpret_cast<float4*>(sAcc + (warp * GC + g) * D + lane * 8);
      dst[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
      dst[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
    }
  if (lane < 2 && (GC > 1 || lane == 0))
#pragma unroll
    for (int k = 0; k < NH; ++k) sL[warp * GC + (GC == 1 ? 0 : NH * lane + k)] = lOwn[k];
  if (lane == 0)
#pragma unroll
    for (int g = 0; g < GC; ++g) sM[warp * GC + g] = m[g];
  __syncthreads();
  if (threadIdx.x < GC) {
    const int g = threadIdx.x;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sM[w * GC + g]);
    float Lsum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float mw = sM[w * GC + g];
      const float wt = mw == -INFINITY ? 0.f : exp2f(mw - M);
      sW[w * GC + g] = wt;
      Lsum += wt * sL[w * GC + g];
    }
    sTotM[g] = M;
    sTotL[g] = Lsum;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < GC * D; i += kWarps * 32) {
    const int g = i / D, j = i % D;
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) a = fmaf(sW[w * GC + g], sAcc[(w * GC + g) * D + j], a);
    const float Lg = sTotL[g];
    p.partOut[(size_t(qh0 + g) * p.splits + split) * D + j] = Lg > 0.f ? a / Lg : 0.f;
  }
  if (threadIdx.x < GC) {
    const int g = threadIdx.x;
    const float Lg = sTotL[g];
    // NaN (a score of +Inf in this split) stays NaN: the combine must not answer from the other splits alone.
    p.partLse[size_t(qh0 + g) * p.splits + split] = Lg > 0.f ? sTotM[g] * kLn2 + logf(Lg) : (Lg == Lg ? -INFINITY : NAN);
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
                                                        float* __restrict__ out, float* __restrict__ lse) {
  extern __shared__ float w[];
  __shared__ float red[kThreads / 32];
  __shared__ float sMax, sSum;
  const int qh = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float* pl = partLse + size_t(qh) * splits;
  float mx = -INFINITY;
  for (int i = tid; i < splits; i += kThreads) mx = fmaxf(mx, pl[i]);
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
  const float L = sSum;
  for (int j = tid; j < D; j += kThreads) {
    float a = 0.f;
    for (int i = 0; i < splits; ++i) a = fmaf(w[i], partOut[(size_t(qh) * splits + i) * D + j], a);
    out[size_t(qh) * D + j] = L > 0.f ? a / L : (L == L ? 0.f : NAN);
  }
  // A NaN split makes L NaN: the head is answered NaN, as the host kernel answers it.
  if (tid == 0) lse[qh] = L > 0.f ? M + logf(L) : (L == L ? -INFINITY : NAN);
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
int PrepareSplit() {  // once per instantiation: the dynamic shared memory it needs
  static const int rc = [] {
    const void* f = reinterpret_cast<const void*>(&SplitKernel<D, GC, DT>);
    int e = int(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, SplitSmemBytes<D, GC>()));
    if (!e) e = int(cudaFuncSetAttribute(f, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
    return e;
  }();
  return rc;
}

template <int D, int GC, Dtype DT>
int LaunchSplit(const DecodeParams& p, cudaStream_t s) {
  if (int rc = PrepareSplit<D, GC, DT>()) return rc;
  const int G = p.qHeads / p.kvHeads;
  dim3 grid(p.splits, p.kvHeads, G / GC);
  SplitKernel<D, GC, DT><<<grid, WarpsFor(D, GC) * 32, SplitSmemBytes<D, GC>(), s>>>(p, G);
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

// CTAs of the split kernel (d = 128, f16, this GQA group) one multiprocessor
// holds: kCtasPerSm unless the device says otherwise. d = 64 is built for the
// same count.
template <int GC>
int ResidentCtas() {
  static const int n = [] {
    int r = 0;
    if (PrepareSplit<128, GC, Dtype::kF16>() ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&r, SplitKernel<128, GC, Dtype::kF16>, WarpsFor(128, GC) * 32,
                                                      SplitSmemBytes<128, GC>()))
      r = 0;
    cudaGetLastError();
    return r > 0 ? r : kCtasPerSm;
  }();
  return n;
}

}  // namespace

int ChooseSplits(int smCount, int qHeads, int kvHeads, int64_t maxTokens) {
  const int G = qHeads / kvHeads, gc = HeadsPerCta(G);
  const int64_t ctasPerSplit = int64_t(kvHeads) * (G / gc);
  const int perSm = gc == 8 ? ResidentCtas<8>() : gc == 4 ? ResidentCtas<4>() : gc == 2 ? ResidentCtas<2>() : ResidentCtas<1>();
  // One full wave: as many splits as leave no CTA to a second wave (a second,
  // partial wave would cost as long as the first).
  const int64_t slots = int64_t(perSm) * (smCount > 0 ? smCount : 132);
  int64_t splits = slots / ctasPerSplit;
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
  MergeKernel<<<p.qHeads, kThreads, size_t(p.splits) * sizeof(float), s>>>(p.partOut, p.partLse, p.splits, p.headDim, p.out,
                                                                           p.lse);
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

}  // namespace cuda
}  // namespace kvr
