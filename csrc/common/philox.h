// The fused adapter's dropout mask on the CPU: element (m, c) of the [M, d] rows is kept when word c mod 4 of
// philox4x32-10(key = seed, counter = (c >> 2, m mod 2^32, m >> 32, 0)), shifted right by 8, is >= the threshold
// round(p * 2^24): one philox call gives the words of four columns. The same function as
// adapterfuse.reference.dropout_keep and the Triton kernels (triton_lang.dropout_tile), so every backend draws the
// same mask for a seed and the backward regenerates it instead of storing it (docs/design.md, LayerNorm and
// dropout inside the adapter).
#pragma once
#include <cstdint>

namespace adapterfuse {
namespace cpu {

// The dropout of one row's d values: dst[c] = keep(m, c) ? src[c] * keep_scale : 0 (src may be dst).
struct Dropout {
  uint64_t seed = 0;
  uint32_t threshold = 0;  // round(p * 2^24)
  float keep_scale = 1.f;  // 1 / (1 - p)
  bool on = false;

  void apply_row(const float* src, float* dst, int64_t m, int64_t d) const {
    // philox4x32-10 with key (seed lo, seed hi) and counter (k, m lo, m hi, 0) for 16 counters k (64 columns) per
    // batch, the rounds in structure-of-arrays form so that each round is one vectorised loop over the lanes
    // (32 x 32 -> 64-bit products: vpmuludq); per round: c0' = hi(B c2) ^ c1 ^ k0, c2' = hi(A c0) ^ c3 ^ k1,
    // c1' = lo(B c2), c3' = lo(A c0), then the key += (0x9E3779B9, 0xBB67AE85)
    constexpr int kLanes = 16;
    alignas(64) uint32_t w0[kLanes], w1[kLanes], w2[kLanes], w3[kLanes];
    const uint32_t row_lo = static_cast<uint32_t>(m), row_hi = static_cast<uint32_t>(static_cast<uint64_t>(m) >> 32);
    for (int64_t base = 0; base < d; base += 4 * kLanes) {
      const uint32_t k0 = static_cast<uint32_t>(base >> 2);
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        w0[l] = k0 + static_cast<uint32_t>(l);
        w1[l] = row_lo;
        w2[l] = row_hi;
        w3[l] = 0;
      }
      uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
      for (int round = 0; round < 10; ++round) {
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * w0[l];
          const uint64_t p2 = static_cast<uint64_t>(0xCD9E8D57u) * w2[l];
          const uint32_t n0 = static_cast<uint32_t>(p2 >> 32) ^ w1[l] ^ key0;
          const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ w3[l] ^ key1;
          w1[l] = static_cast<uint32_t>(p2);
          w3[l] = static_cast<uint32_t>(p0);
          w0[l] = n0;
          w2[l] = n2;
        }
        key0 += 0x9E3779B9u;
        key1 += 0xBB67AE85u;
      }
      alignas(64) uint32_t word[4 * kLanes];  // column order: word n of counter l at 4 l + n
      for (int l = 0; l < kLanes; ++l) {
        word[4 * l] = w0[l];
        word[4 * l + 1] = w1[l];
        word[4 * l + 2] = w2[l];
        word[4 * l + 3] = w3[l];
      }
      const int64_t n = d - base < 4 * kLanes ? d - base : 4 * kLanes;
      const float* sj = src + base;
      float* dj = dst + base;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dj[j] = (word[j] >> 8) >= threshold ? sj[j] * keep_scale : 0.f;
    }
  }
  void apply_row(float* v, int64_t m, int64_t d) const { apply_row(v, v, m, d); }
};

}  // namespace cpu
}  // namespace adapterfuse
