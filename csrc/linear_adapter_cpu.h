// The fused CPU Linear + adapter forward (linear_adapter_cpu.cpp), called by bindings.cpp.
#pragma once
#include <ATen/ATen.h>

namespace adapterfuse {

// Fills y ([M, d], inp dtype) and, when they are defined (a backward will follow), t ([M, d], inp dtype) and
// h ([M, r], fp32). Every operand 2-D, column stride 1; the weights contiguous. ln_eps >= 0: t = LN(z + residual)
// with ln_weight / ln_bias ([d] or absent) before the adapter (inference only: t and h must be empty).
void linear_adapter_fwd_cpu(const at::Tensor& inp, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                            const c10::optional<at::Tensor>& b_up, const c10::optional<at::Tensor>& scale,
                            double scale_value, const c10::optional<at::Tensor>& residual, bool residual_before,
                            int64_t act, const c10::optional<at::Tensor>& ln_weight,
                            const c10::optional<at::Tensor>& ln_bias, double ln_eps, at::Tensor& y, at::Tensor& t,
                            at::Tensor& h);

}  // namespace adapterfuse
