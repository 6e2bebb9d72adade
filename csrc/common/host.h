// Host-side types shared by the CPU path (adapter_cpu.cpp), the CUDA host code (adapter_cuda.cpp) and the
// bindings (bindings.cpp, which finishes every backward with them: finish_backward).
#pragma once
#include <ATen/ATen.h>

namespace adapterfuse {

using OptTensor = c10::optional<at::Tensor>;

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

}  // namespace adapterfuse
