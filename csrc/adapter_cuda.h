// The host side of the CUDA path: fills the kernels' AdapterParams from tensors, picks the weight-gradient
// split, launches on the current stream and turns a failed launch into an error that says why. Built with the
// real CUDA kernels (ADAPTERFUSE_WITH_CUDA) and, unchanged, for the CPU emulation of them
// (ADAPTERFUSE_CUDA_EMULATION; adapterfuse/ops/_emulation.py). bindings.cpp checks the arguments first.
#pragma once
#include <ATen/ATen.h>

#include "common/host.h"

namespace adapterfuse {

// Whether x takes the CUDA path (CUDA tensors; CPU tensors under the emulation).
bool on_cuda_path(const at::Tensor& x);

// Forward: fills y ([M, d], x dtype) and h ([M, r], fp32). Weights and biases contiguous (bindings.cpp).
void adapter_fwd_cuda(const at::Tensor& x, const at::Tensor& w_down, const OptTensor& b_down, const at::Tensor& w_up,
                      const OptTensor& b_up, const OptTensor& scale, double scale_value, const OptTensor& skip,
                      bool skip_is_x, const OptTensor& sample_scale, int64_t tokens, int64_t act, at::Tensor& y,
                      at::Tensor& h);

// Backward: dx, d_h, the per-row sample-scale sums and the per-split partials of R, q and d_w_down (stage one;
// bindings.cpp finish_backward is stage two, shared with the CPU path).
BackwardRaw adapter_bwd_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_down,
                             const OptTensor& b_down, const at::Tensor& w_up, const OptTensor& b_up,
                             const OptTensor& scale, double scale_value, const OptTensor& sample_scale, int64_t tokens,
                             int64_t act, bool skip_is_x, const Needs& n);

}  // namespace adapterfuse
