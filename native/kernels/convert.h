// Bulk dtype conversion and finiteness checks over raw little-endian bytes.
// Sources are byte pointers because tensors arrive inside request bodies at
// any alignment.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/half.h"

namespace kvr {

// Converts n values from src (dtype from) into dst (dtype to, 16- or 32-bit).
void Convert(const uint8_t* src, Dtype from, uint8_t* dst, Dtype to, size_t n);

// Index of the first NaN or infinite value, or -1.
int64_t FirstNonFinite(const uint8_t* src, Dtype dtype, size_t n);

}  // namespace kvr
