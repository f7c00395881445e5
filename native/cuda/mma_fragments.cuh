// The tensor-core instructions the wave step's mma paths share
// (wave_score_mma.cuh, wave_tile_mma.cuh): mma.m16n8k16 with f32
// accumulators, and ldmatrix. Fragment layouts are PTX's (ISA, "Matrix
// Fragments for mma.m16n8k16"): with g = lane / 4 and t = lane % 4, A's
// registers hold (row g, cols 2t, 2t+1), (row g + 8, same cols), then the
// same rows at cols 2t + 8, 2t + 9; B's hold (rows 2t, 2t+1, col g), then
// rows 2t + 8, 2t + 9; C's (row g, cols 2t, 2t+1), then row g + 8. In each
// register the lower-numbered element is the low half.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace kvr {
namespace cuda {
namespace {

__device__ __forceinline__ void Mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void Mma16816Bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&a)[4], const void* smem) {
  const uint32_t at = uint32_t(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(at));
}

}  // namespace
}  // namespace cuda
}  // namespace kvr
