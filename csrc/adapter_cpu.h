// Host-side pieces of the extension shared by the CPU path and the CUDA glue.
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace adapterfuse {

// What a backward pass produces before its second reduction stage. Every partial is fp32 with a
// leading "part" dimension that bindings.cpp sums away (deterministically, in order); undefined
// tensors mean "not requested".
struct BackwardRaw {
  at::Tensor dx;      // [M, d], x dtype
  at::Tensor p_bd;    // [parts, r]
  at::Tensor p_wd;    // [parts, r, d]
  at::Tensor p_R;     // [parts, d, r] R = dy^T (g a): d_w_up = s R, and d_scale from it
  at::Tensor p_q;     // [parts, d]    q = sum_m g dy: d_b_up = s q, and d_scale from it
  at::Tensor dg_row;  // [M]           sum_c dy * s * u per row
};

// What was asked for (the `needs` list, already and-ed with "the argument exists").
struct Needs {
  bool x, wd, bd, wu, bu, s, g;
};

// Fused CPU forward: fills y ([M, d], x dtype) and h ([M, r], fp32), both preallocated.
void adapter_fwd_cpu(const at::Tensor& x, const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down,
                     const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up,
                     const c10::optional<at::Tensor>& scale, double scale_value, const c10::optional<at::Tensor>& skip,
                     bool skip_is_x, const c10::optional<at::Tensor>& sample_scale, int64_t tokens, int64_t act,
                     at::Tensor& y, at::Tensor& h);

BackwardRaw adapter_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_down,
                            const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                            const c10::optional<at::Tensor>& b_up, const c10::optional<at::Tensor>& scale,
                            double scale_value, const c10::optional<at::Tensor>& sample_scale, int64_t tokens,
                            int64_t act, bool skip_is_x, const Needs& n);

}  // namespace adapterfuse
