// The fused adapter's dropout mask on the CPU: element (m, c) of the [M, d] rows is kept when word 0 of
// philox4x32-10(key = seed, counter = (c, m mod 2^32, m >> 32, 0)), shifted right by 8, is >= the threshold
// round(p * 2^24). The same function as adapterfuse.reference.dropout_keep and the Triton kernels
// (triton.language.philox with those counters), so every backend draws the same mask for a seed and the
// backward regenerates it instead of storing it (docs/design.md, Dropout).
#pragma once
#include <cstdint>

namespace adapterfuse {
namespace cpu {

inline uint32_t philox_word0(uint64_t seed, uint32_t c0, uint64_t row) {
  uint32_t c1 = static_cast<uint32_t>(row), c2 = static_cast<uint32_t>(row >> 32), c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int i = 0; i < 10; ++i) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p2 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p2 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p2);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// The dropout of one row's d values in place: v[c] = keep(m, c) ? v[c] * keep_scale : 0.
struct Dropout {
  uint64_t seed = 0;
  uint32_t threshold = 0;  // round(p * 2^24)
  float keep_scale = 1.f;  // 1 / (1 - p)
  bool on = false;

  void apply_row(float* v, int64_t m, int64_t d) const {
    for (int64_t c = 0; c < d; ++c)
      v[c] = (philox_word0(seed, static_cast<uint32_t>(c), static_cast<uint64_t>(m)) >> 8) >= threshold
                 ? v[c] * keep_scale
                 : 0.f;
  }
  // dst[c] = the same factor times src[c] (the backward's masked dy)
  void apply_row(const float* src, float* dst, int64_t m, int64_t d) const {
    for (int64_t c = 0; c < d; ++c)
      dst[c] = (philox_word0(seed, static_cast<uint32_t>(c), static_cast<uint64_t>(m)) >> 8) >= threshold
                   ? src[c] * keep_scale
                   : 0.f;
  }
};

}  // namespace cpu
}  // namespace adapterfuse
