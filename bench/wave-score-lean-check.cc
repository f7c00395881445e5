// Host check of bench/wave-score-lean.patch's code decode (wave_moments.cuh
// Decode8Codes): the PRMT-and-subtract decode written on the host, the same
// expressions as the device's, against common/moment_code.h's DecodeAxis /
// DecodeVar (the host ranking's decode). Every byte at every position of a
// chunk's word, among random neighbour bytes, must give float(code) (axis)
// and float(code²) (variance) bit for bit, and the products with the scale
// (2^20 scales: random bit patterns over every exponent, denormal-making,
// huge, negative, ±0, ±inf) must equal DecodeAxis / DecodeVar's.
// Build and run: g++ -std=c++17 -O2 -Inative bench/wave-score-lean-check.cc -o /tmp/wave-score-lean-check && /tmp/wave-score-lean-check
#include "common/moment_code.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace {

float AsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
// CUDA's __byte_perm(x, y, s) for selectors with nibbles 0-7: result byte n
// is byte (s >> 4n) & 7 of the pair y:x (x's bytes 0-3, y's 4-7).
uint32_t BytePerm(uint32_t x, uint32_t y, uint32_t s) {
  const uint64_t pair = (uint64_t(y) << 32) | x;
  uint32_t r = 0;
  for (int n = 0; n < 4; ++n) r |= uint32_t((pair >> (8 * ((s >> (4 * n)) & 7))) & 0xff) << (8 * n);
  return r;
}
// Decode8Codes' code value before the scale, as the patch writes it.
float AxisValue(uint32_t word, int i) { return AsFloat(BytePerm(word ^ 0x80808080u, 0x4b000000u, 0x7440u | i)) - 8388736.0f; }
float VarRoot(uint32_t word, int i) { return AsFloat(BytePerm(word, 0x4b000000u, 0x7440u | i)) - 8388608.0f; }
float VarValue(uint32_t word, int i) {
  const float c = VarRoot(word, i);
  return c * c;
}
bool Same(float a, float b) { return Bits(a) == Bits(b) || (std::isnan(a) && std::isnan(b)); }

}  // namespace

int main() {
  std::mt19937 rng(20261206);
  long values = 0, products = 0, bad = 0, denormal = 0;
  std::vector<float> scales = {0.f, -0.f, 1.f, -1.f, 1e-45f, -1e-45f, 1.17549435e-38f, 3.4028235e38f, -3.4028235e38f, INFINITY, -INFINITY,
                               1e-40f, 2.5e-39f, 1.3e36f, 7.1e-3f, -2.2e-5f};
  while (scales.size() < (1u << 20)) {
    const uint32_t u = rng();
    const float s = AsFloat(u);
    if (!std::isnan(s)) scales.push_back(s);
  }
  for (int fill = 0; fill < 64; ++fill) {
    const uint32_t other = fill == 0 ? 0u : fill == 1 ? 0xffffffffu : rng();
    for (int i = 0; i < 4; ++i)
      for (uint32_t b = 0; b < 256; ++b) {
        const uint32_t word = (other & ~(0xffu << (8 * i))) | (b << (8 * i));
        const int8_t ax = int8_t(uint8_t(b));
        const int c = int(b);
        ++values;
        if (!Same(AxisValue(word, i), float(ax)) || !Same(VarValue(word, i), float(c * c))) {  // bits: code 0 is +0, as float(0)
          if (++bad < 10) std::printf("value mismatch: byte %u at %d\n", b, i);
        }
        if (fill > 1) continue;  // the products: every byte once per position, against every scale
        for (const float s : scales) {
          products += 2;
          denormal += std::fpclassify(kvr::DecodeAxis(ax, s)) == FP_SUBNORMAL;
          denormal += std::fpclassify(kvr::DecodeVar(uint8_t(b), s)) == FP_SUBNORMAL;
          if (!Same(AxisValue(word, i) * s, kvr::DecodeAxis(ax, s)) || !Same(VarValue(word, i) * s, kvr::DecodeVar(uint8_t(b), s))) {
            if (++bad < 10) std::printf("product mismatch: byte %u scale %a\n", b, double(s));
          }
        }
      }
  }
  std::printf("%ld code values (256 bytes x 4 positions x 64 neighbour fills), %ld products over %zu scales (%ld of them subnormal): %ld mismatches\n",
              values, products, scales.size(), denormal, bad);
  return bad == 0 ? 0 : 1;
}
