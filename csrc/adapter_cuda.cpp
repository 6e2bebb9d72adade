// The host side of the CUDA path (see adapter_cuda.h); the kernels are in adapter_kernels.cu, the derivation in
// docs/design.md (Backward).
#include "adapter_cuda.h"

#include <algorithm>
#include <initializer_list>

#ifndef ADAPTERFUSE_CUDA_EMULATION  // c10 only (not ATen/cuda, which pulls in the cuBLAS / cuSPARSE headers)
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "adapter_kernels.cuh"

namespace adapterfuse {

#ifdef ADAPTERFUSE_CUDA_EMULATION
bool on_cuda_path(const at::Tensor& x) { return x.is_cpu(); }
#else
bool on_cuda_path(const at::Tensor& x) { return x.is_cuda(); }
#endif

namespace {

// What differs between the real CUDA build and the emulation: where the CUDA path's tensors live, the
// stream, the device guard and the SM count. Everything else below is the one glue both run.
#ifdef ADAPTERFUSE_CUDA_EMULATION
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor&) {}
};
cudaStream_t current_stream() { return nullptr; }
int current_device() { return 0; }
#else
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor& x) : guard(x.device()) {}
  c10::cuda::CUDAGuard guard;
};
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
int current_device() { return c10::cuda::current_device(); }
#endif

int64_t sm_count() {
  int n = 0;
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, current_device());
  return n;
}

DType to_dtype(at::ScalarType t) {
  return t == at::kFloat ? DType::kFloat32 : (t == at::kHalf ? DType::kFloat16 : DType::kBFloat16);
}

void check_launch(const LaunchStatus& st, const char* what, const AdapterParams& p) {
  TORCH_CHECK(!(st.err == cudaErrorInvalidConfiguration && st.smem_needed > st.smem_limit), "adapterfuse: the CUDA ",
              what, " kernel for r = ", p.r, " needs ", st.smem_needed, " bytes of shared memory per block even with "
              "its smallest tiles, and this GPU allows ", st.smem_limit, "; use backend='triton' or 'torch'");
  TORCH_CHECK(st.err != cudaErrorInvalidConfiguration, "adapterfuse: invalid launch configuration for the CUDA ", what,
              " kernel (M = ", p.M, ", d = ", p.d, ", r = ", p.r, ", splits = ", p.splits, "): ",
              cudaGetErrorString(st.err));
  TORCH_CHECK(st.err == cudaSuccess, "adapterfuse: CUDA ", what, " failed: ", cudaGetErrorString(st.err));
}

AdapterParams base_params(const at::Tensor& x, const at::Tensor& w_down, const OptTensor& b_down,
                          const at::Tensor& w_up, const OptTensor& b_up, const OptTensor& scale32, double scale_value,
                          const OptTensor& g32, int64_t tokens, int64_t act) {
  TORCH_CHECK(w_down.size(0) <= kCudaMaxRank, "adapterfuse: the CUDA backend supports r <= ", kCudaMaxRank,
              ", got r = ", w_down.size(0), "; use backend='torch' for larger r");
  TORCH_CHECK(x.size(0) < (int64_t{1} << 32), "adapterfuse: the CUDA backend supports fewer than 2^32 rows, got ",
              x.size(0), "; split the batch");
  AdapterParams p{};
  p.dtype = to_dtype(x.scalar_type());
  p.M = x.size(0);
  p.d = x.size(1);
  p.r = w_down.size(0);
  p.act = static_cast<int>(act);
  p.x = x.data_ptr();
  p.stride_x = x.stride(0);
  p.w_down = w_down.data_ptr();
  p.w_up = w_up.data_ptr();
  p.b_down = b_down ? b_down->data_ptr() : nullptr;
  p.b_up = b_up ? b_up->data_ptr() : nullptr;
  p.scale = scale32 ? scale32->data_ptr<float>() : nullptr;
  p.scale_n = scale32 ? scale32->numel() : 0;
  p.scale_value = static_cast<float>(scale_value);
  p.sample_scale = g32 ? g32->data_ptr<float>() : nullptr;
  p.tokens = std::max<int64_t>(tokens, 1);
  return p;
}

OptTensor fp32(const OptTensor& t) { return t ? OptTensor(t->to(at::kFloat).contiguous()) : c10::nullopt; }

}  // namespace

void adapter_fwd_cuda(const at::Tensor& x, const at::Tensor& w_down, const OptTensor& b_down, const at::Tensor& w_up,
                      const OptTensor& b_up, const OptTensor& scale, double scale_value, const OptTensor& skip,
                      bool skip_is_x, const OptTensor& sample_scale, int64_t tokens, int64_t act, at::Tensor& y,
                      at::Tensor& h) {
  const DeviceGuard guard(x);
  const OptTensor s32 = fp32(scale), g32 = fp32(sample_scale);
  AdapterParams p = base_params(x, w_down, b_down, w_up, b_up, s32, scale_value, g32, tokens, act);
  p.skip_mode = skip_is_x ? 1 : (skip ? 2 : 0);
  p.skip = skip && !skip_is_x ? skip->data_ptr() : nullptr;
  p.stride_skip = skip && !skip_is_x ? skip->stride(0) : 0;
  p.y = y.data_ptr();
  p.stride_y = y.stride(0);
  p.h = h.data_ptr<float>();
  check_launch(adapter_forward_cuda(p, current_stream()), "forward", p);
}

BackwardRaw adapter_bwd_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_down,
                             const OptTensor& b_down, const at::Tensor& w_up, const OptTensor& b_up,
                             const OptTensor& scale, double scale_value, const OptTensor& sample_scale, int64_t tokens,
                             int64_t act, bool skip_is_x, const Needs& n) {
  BackwardRaw raw;
  const DeviceGuard guard(x);
  const OptTensor s32 = fp32(scale), g32 = fp32(sample_scale);
  AdapterParams p = base_params(x, w_down, b_down, w_up, b_up, s32, scale_value, g32, tokens, act);
  const int64_t M = p.M, d = p.d, r = p.r;
  const auto fopt = x.options().dtype(at::kFloat);
  auto stream = current_stream();
  p.h = h.data_ptr<float>();  // the saved pre-activation: every backward kernel reads it
  p.skip_mode = skip_is_x ? 1 : 0;
  p.dy = dy.data_ptr();
  p.stride_dy = dy.stride(0);
  p.need_dx = n.x;
  p.need_dh = n.wd || n.bd;
  p.need_dg = n.g;
  at::Tensor dh;
  if (n.x) raw.dx = at::empty({M, d}, x.options());
  if (p.need_dh) dh = at::empty({M, r}, fopt);
  if (n.g) raw.dg_row = at::empty({M}, fopt);
  if (n.x || p.need_dh || n.g) {
    p.dx = n.x ? raw.dx.data_ptr() : nullptr;
    p.stride_dx = n.x ? raw.dx.stride(0) : 0;
    p.dh = p.need_dh ? dh.data_ptr<float>() : nullptr;
    p.dg_row = n.g ? raw.dg_row.data_ptr<float>() : nullptr;
    check_launch(adapter_backward_rows_cuda(p, stream), "backward (rows)", p);
  }
  if (n.bd) raw.p_bd = dh;  // d_b_down = sum over rows of d_h: the [M, r] tensor is its own partial
  const bool need_R = n.wu || n.s, need_q = n.bu || (n.s && b_up.has_value());
  if (n.wd || need_R || need_q) {
    const int64_t bm = adapter_cuda_bwd_cols_block_rows(r), bn = adapter_cuda_bwd_cols_block_cols(r);
    const int64_t row_blocks = (M + bm - 1) / bm, col_blocks = (d + bn - 1) / bn;
    const int64_t sms = sm_count();
    int64_t splits = std::max<int64_t>(1, std::min(row_blocks, (4 * sms + col_blocks - 1) / col_blocks));
    p.rows_per_split = (row_blocks + splits - 1) / splits * bm;
    splits = M == 0 ? 1 : (M + p.rows_per_split - 1) / p.rows_per_split;
    p.splits = splits;
    p.need_R = need_R;
    p.need_q = need_q;
    p.need_wd = n.wd;
    p.dh = p.need_dh ? dh.data_ptr<float>() : nullptr;
    if (need_R) raw.p_R = at::empty({splits, d, r}, fopt);
    if (n.wd) raw.p_wd = at::empty({splits, r, d}, fopt);
    if (need_q) raw.p_q = at::empty({splits, d}, fopt);
    p.p_R = need_R ? raw.p_R.data_ptr<float>() : nullptr;
    p.p_wd = n.wd ? raw.p_wd.data_ptr<float>() : nullptr;
    p.p_q = need_q ? raw.p_q.data_ptr<float>() : nullptr;
    if (M == 0) {  // nothing to reduce: the partials are zeros
      for (auto* t : {&raw.p_R, &raw.p_wd, &raw.p_q})
        if (t->defined()) t->zero_();
    } else {
      check_launch(adapter_backward_cols_cuda(p, stream), "backward (weights)", p);
    }
  }
  return raw;
}

}  // namespace adapterfuse
