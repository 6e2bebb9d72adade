// The fused CPU path of the adapter bank (adapter_bank_cpu.cpp), called by bindings.cpp.
#pragma once
#include <ATen/ATen.h>

#include "common/host.h"

namespace adapterfuse {

// What the bank's backward produces, fp32, reduced over rows (deterministically, in row order per adapter) and
// finished per adapter (the scale's folding undone); bindings.cpp casts them (and sums d_s over d for an [A]
// scale). Undefined = not requested. packed: R, q, ds, wd and bd are views of one allocation (adapter_bank_cpu.cpp
// says why); otherwise each is its own tensor (what a custom op must return: its outputs may not alias).
struct BankRaw {
  at::Tensor dx;      // [M, d], x dtype
  at::Tensor dg_row;  // [M]        sum_c dy * s * u per row
  at::Tensor R;       // [A, d, r]  d_w_up = s (.) dy^T (g a) over each adapter's rows (scratch when only d_s is asked);
                      //            rt: [A, r, d] (R^T per adapter), for a w_up stored that way (bank_up_major)
  at::Tensor q;       // [A, d]     d_b_up = s (.) sum g dy over each adapter's rows (likewise)
  at::Tensor ds;      // [A, d]     d_s per adapter and channel
  at::Tensor wd;      // [A, r, d]  d_w_down
  at::Tensor bd;      // [A, r]     d_b_down
  bool rt = false;
};

// Whether a bank's w_up [A, d, r] stores each adapter's block as its transpose: [A, r, d] memory seen as [A, d, r]
// (strides (r d, 1, d)), the layout AdapterBank keeps its up-projection in. The CPU bank reads it as it is (the
// skinny loops want w_up^T rows: no per-adapter transpose per call) and returns d_w_up in it; other layouts are made
// contiguous.
inline bool bank_up_major(const at::Tensor& w) {
  return w.dim() == 3 && w.size(2) > 1 && w.stride(1) == 1 && w.stride(2) == w.size(1) &&
         (w.size(0) == 1 || w.stride(0) == w.size(1) * w.size(2));
}

// x [M, d]; w_down [A, r, d]; b_down [A, r]?; w_up [A, d, r]; b_up [A, d]?; scale [A] or [A, d]? (else
// scale_value); index int64, contiguous, [M] or [B] (one id per sample of `tokens` rows), ids in [-1, A) (checked:
// ValueError). Fills y ([M, d]) and h
// ([M, r] fp32, 0 on rows without an adapter).
void adapter_bank_fwd_cpu(const at::Tensor& x, const at::Tensor& w_down, const OptTensor& b_down,
                          const at::Tensor& w_up, const OptTensor& b_up, const OptTensor& scale, double scale_value,
                          const OptTensor& skip, bool skip_is_x, const OptTensor& sample_scale, int64_t tokens,
                          int64_t act, const at::Tensor& index, at::Tensor& y, at::Tensor& h);

BankRaw adapter_bank_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_down,
                             const OptTensor& b_down, const at::Tensor& w_up, const OptTensor& b_up,
                             const OptTensor& scale, double scale_value, const OptTensor& sample_scale, int64_t tokens,
                             int64_t act, bool skip_is_x, const Needs& n, const at::Tensor& index, bool packed);

}  // namespace adapterfuse
