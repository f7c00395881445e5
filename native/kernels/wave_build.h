// The wave index build's loops that used to run in TypeScript on the main
// thread at seal (index/wave/moment-code.ts, variance-share.ts): the moments'
// 8-bit codes and the variance-share calibration's float64 sums. Each gives
// the bytes and the float64 values the TypeScript gave, bit for bit: the
// same operations in the same order per result (every sum adds its terms in
// the loop's order; no fused multiply-adds, wave_build.cc), only several
// independent sums side by side (test/native/wave-build.test.ts checks them
// against the TypeScript loops).
#pragma once

#include <cstdint>

namespace kvr {

// The codes of `clusters` rows of d axes and variances (moment_code.h
// decodes them): scale = f32(max|axis| / 127), code = clamp(round-half-up
// (axis / scale), ±127); vscale = f32(max var / 255²), code = the nearer of
// floor(sqrt(var / vscale)) and the next (by the f32 variance each decodes
// to, the lower on a tie), at most 255. Returns a cluster with a non-finite
// axis or variance (the codes are then incomplete), or -1. On the pool, as
// the sums below: each result is written by one thread, in its own order.
int64_t EncodeMoments(const float* axes, const float* vars, int64_t clusters, int d, int8_t* keyAxes, float* axisScales, uint8_t* keyVars,
                      float* varScales);

// out[r·n + t] = s · Σ_j q[r·d + j] · x[t·stride + j], the sum over j in
// order from 0 (r < rows, t < n).
void RowDots(const double* q, int rows, int d, const float* x, int64_t n, int64_t stride, double s, double* out);

// out[r·d + j] += Σ_t w[r·n + t] · x[t·stride + j] over t in order, only the
// t with mask[r·n + t] != 0 where a mask is given (r < rows, j < d).
void WeightedRowSums(const double* w, const uint8_t* mask, int rows, int64_t n, const float* x, int64_t stride, int d, double* out);

}  // namespace kvr
