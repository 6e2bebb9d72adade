// The fused CPU path (adapter_cpu.cpp), called by bindings.cpp.
#pragma once
#include <ATen/ATen.h>

#include "common/host.h"

namespace adapterfuse {

// The adapter_ln_dropout variant (docs/design.md, LayerNorm and dropout inside the adapter); nullptr = the plain
// adapter. ln_eps < 0: no input LayerNorm; else stats ([M, 3] fp32 per row: shift = the row's first element,
// mean - shift, rstd) is written by the forward and read by the backward. dropout_p = 0: no dropout; else the mask of common/philox.h from seed.
struct LnDropout {
  double ln_eps = -1;
  at::Tensor stats;
  double dropout_p = 0;
  int64_t seed = 0;
};

// Fused CPU forward: fills y ([M, d], x dtype) and h ([M, r], fp32), both preallocated.
void adapter_fwd_cpu(const at::Tensor& x, const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down,
                     const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up,
                     const c10::optional<at::Tensor>& scale, double scale_value, const c10::optional<at::Tensor>& skip,
                     bool skip_is_x, const c10::optional<at::Tensor>& sample_scale, int64_t tokens, int64_t act,
                     at::Tensor& y, at::Tensor& h, const LnDropout* extra = nullptr);

BackwardRaw adapter_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_down,
                            const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                            const c10::optional<at::Tensor>& b_up, const c10::optional<at::Tensor>& scale,
                            double scale_value, const c10::optional<at::Tensor>& sample_scale, int64_t tokens,
                            int64_t act, bool skip_is_x, const Needs& n, const LnDropout* extra = nullptr);

}  // namespace adapterfuse
