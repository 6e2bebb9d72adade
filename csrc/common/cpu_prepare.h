// The per-call preparation of one adapter's weights for the fused CPU paths (adapter_cpu.cpp,
// linear_adapter_cpu.cpp): fp32 copies and the scale folded into the up-projection.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace adapterfuse {
namespace cpu {

// Whether v[0, n) are all finite (no inf / NaN) and all exactly 1, read from the bit patterns: exponent bits all set
// means inf or NaN, and +1.0f is the one pattern equal to 1.f. Integer ORs over the whole range vectorise; the float
// tests they replace did not (an early-exit isfinite loop, or a probe sum of v * 0 kept in order without
// -ffast-math): over a bank's used [d] scale rows that serial chain cost ~50 us per call at A = 64, d = 768.
struct ScaleFlags {
  bool finite = true, unit = true;
  void scan(const float* v, int64_t n) {
    uint32_t nonfinite = 0, not_one = 0;
    for (int64_t c = 0; c < n; ++c) {
      uint32_t b;
      std::memcpy(&b, v + c, sizeof b);
      nonfinite |= static_cast<uint32_t>((b & 0x7f800000u) == 0x7f800000u);
      not_one |= b ^ 0x3f800000u;
    }
    finite = finite && nonfinite == 0;
    unit = unit && not_one == 0;
  }
};

// Per-call fp32 operands, the scale folded into the up-projection.
struct Prepared {
  at::Tensor wd;   // [r, d]
  at::Tensor wu;   // [d, r] unscaled
  at::Tensor ws;   // [d, r] = s (.) w_up
  at::Tensor bd;   // [r] or undefined
  at::Tensor bu;   // [d] or undefined (unscaled)
  at::Tensor bs;   // [d] = s (.) b_up, or undefined
  at::Tensor s;    // [d] the scale per channel
  at::Tensor g;    // [B] or undefined
  // false when the scale has inf / NaN entries: then ws = w_up, bs = b_up and the forward applies the
  // scale after u, as the reference does (folded, inf * 0 inside a GEMM sum would turn inf into NaN)
  bool folded = true;
};

// Plain loops rather than ATen ops: at the small shapes where serving runs, each ATen call here (a
// multiply, an isfinite().all().item()) costs microseconds of dispatch, more than the whole fold.
inline Prepared prepare(const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                 const c10::optional<at::Tensor>& b_up, const c10::optional<at::Tensor>& scale, double scale_value,
                 const c10::optional<at::Tensor>& sample_scale, bool for_forward) {
  Prepared p;
  const int64_t d = w_up.size(0), r = w_up.size(1);
  auto f32 = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous(); };
  p.wd = f32(w_down);
  p.wu = f32(w_up);
  p.s = at::empty({d}, w_up.options().dtype(at::kFloat));
  float* s = p.s.data_ptr<float>();
  if (scale) {
    const at::Tensor sc = f32(*scale);
    const float* src = sc.data_ptr<float>();
    const bool one = sc.numel() == 1;
    for (int64_t c = 0; c < d; ++c) s[c] = src[one ? 0 : c];
  } else {
    std::fill(s, s + d, static_cast<float>(scale_value));
  }
  ScaleFlags flags;
  flags.scan(s, d);
  // (the backward always folds: with a non-finite scale its gradients are inf / NaN either way)
  p.folded = !for_forward || flags.finite;
  const bool fold = p.folded && !flags.unit;  // s = 1: the folded weights are the weights themselves
  if (b_down) p.bd = f32(*b_down);
  if (b_up) p.bu = f32(*b_up);
  p.ws = p.wu;
  p.bs = p.bu;
  if (fold) {
    p.ws = at::empty({d, r}, p.wu.options());
    const float* wu = p.wu.data_ptr<float>();
    float* ws = p.ws.data_ptr<float>();
    for (int64_t c = 0; c < d; ++c)
      for (int64_t k = 0; k < r; ++k) ws[c * r + k] = wu[c * r + k] * s[c];
    if (b_up) {
      p.bs = at::empty({d}, p.bu.options());
      const float* bu = p.bu.data_ptr<float>();
      float* bs = p.bs.data_ptr<float>();
      for (int64_t c = 0; c < d; ++c) bs[c] = bu[c] * s[c];
    }
  }
  if (sample_scale) p.g = f32(*sample_scale);
  return p;
}

}  // namespace cpu
}  // namespace adapterfuse
