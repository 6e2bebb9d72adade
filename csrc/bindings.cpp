// pybind11 glue of the adapterfuse extension: argument checks, device / dtype dispatch, CUDA streams,
// the second (deterministic) stage of the weight-gradient reduction, and build information.
// The Python side (adapterfuse/ops/_extension.py) wraps `fwd` / `bwd` in torch.library custom ops.
#include <torch/extension.h>

#include <algorithm>
#include <string>
#include <vector>

#include "adapter_cpu.h"

#if defined(ADAPTERFUSE_CUDA_EMULATION)
// The CUDA code path below, built for the CPU emulation of the kernels (csrc/emulation/, see
// adapterfuse/ops/_emulation.py): the same glue, with CPU tensors standing in for CUDA ones.
#include "adapter_kernels.cuh"
#elif defined(ADAPTERFUSE_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "adapter_kernels.cuh"
#endif

// The torch version the extension is compiled against, from torch's own headers.
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#elif __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

namespace adapterfuse {
namespace {

using OptTensor = c10::optional<at::Tensor>;

// The [M, d] layout every kernel takes: column stride 1 and rows that do not overlap (row stride >= d;
// any stride when there is at most one row). Stride 0 (expand) or overlapping rows (unfold) would hand
// BLAS an invalid leading dimension on the CPU path; the Python side (ops/_common.py as_rows) copies
// such operands first, and this check refuses whatever reaches the extension another way.
void check_row_layout(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "adapterfuse: ", name, " needs column stride 1, got strides ",
              t.strides());
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= std::max<int64_t>(t.size(1), 1), "adapterfuse: ", name,
              " needs non-overlapping rows (row stride >= d = ", t.size(1), "), got strides ", t.strides(),
              "; pass a contiguous tensor");
}

void check_2d_rows(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), "adapterfuse: ", name,
              " must be [M, d] = ", x.sizes(), ", got ", t.sizes());
  check_row_layout(t, name);
  TORCH_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type(), "adapterfuse: ", name,
              " must match x in device and dtype");
}

void check_common(const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_up, const OptTensor& b_down,
                  const OptTensor& b_up) {
  TORCH_CHECK(x.dim() == 2, "adapterfuse: x must be [M, d], got ", x.sizes());
  check_row_layout(x, "x");
  TORCH_CHECK(x.size(1) >= 1, "adapterfuse: d = x.size(1) must be >= 1 (fused_adapter routes d = 0 to the "
              "reference)");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "adapterfuse: the extension supports float32, float16 and bfloat16, got ", dt);
  const int64_t d = x.size(1);
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(1) == d, "adapterfuse: w_down must be [r, ", d, "], got ",
              w_down.sizes());
  const int64_t r = w_down.size(0);
  TORCH_CHECK(w_up.dim() == 2 && w_up.size(0) == d && w_up.size(1) == r, "adapterfuse: w_up must be [", d, ", ",
              r, "], got ", w_up.sizes());
  for (const auto* t : {&w_down, &w_up})
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == dt, "adapterfuse: weights must match x");
  TORCH_CHECK(!b_down || (b_down->numel() == r && b_down->scalar_type() == dt), "adapterfuse: bad b_down");
  TORCH_CHECK(!b_up || (b_up->numel() == d && b_up->scalar_type() == dt), "adapterfuse: bad b_up");
}

at::Tensor contig(const at::Tensor& t) { return t.contiguous(); }
OptTensor contig(const OptTensor& t) { return t ? OptTensor(t->contiguous()) : c10::nullopt; }
OptTensor fp32(const OptTensor& t) { return t ? OptTensor(t->to(at::kFloat).contiguous()) : c10::nullopt; }

Needs make_needs(const std::vector<bool>& needs, const OptTensor& b_down, const OptTensor& b_up,
                 const OptTensor& scale, const OptTensor& sample_scale) {
  TORCH_CHECK(needs.size() == 7, "adapterfuse: needs must have 7 flags, got ", needs.size());
  return Needs{needs[0], needs[1], needs[2] && b_down.has_value(), needs[3], needs[4] && b_up.has_value(),
               needs[5] && scale.has_value(), needs[6] && sample_scale.has_value()};
}

// Stage two of the reduction: sum the partials in order, cast to each argument's dtype and shape.
std::vector<at::Tensor> finish_backward(const BackwardRaw& raw, const Needs& n, const at::Tensor& x,
                                        const at::Tensor& w_down, const OptTensor& b_down, const at::Tensor& w_up,
                                        const OptTensor& b_up, const OptTensor& scale, const OptTensor& sample_scale,
                                        int64_t tokens) {
  auto none = [&] { return x.new_empty({0}); };
  auto reduce = [](const at::Tensor& part, at::ScalarType dt) { return part.sum(0).to(dt); };
  std::vector<at::Tensor> out(7);
  out[0] = n.x ? raw.dx : none();
  out[1] = n.wd ? reduce(raw.p_wd, w_down.scalar_type()) : none();
  out[2] = n.bd ? reduce(raw.p_bd, b_down->scalar_type()) : none();
  out[3] = n.wu ? reduce(raw.p_wu, w_up.scalar_type()) : none();
  out[4] = n.bu ? reduce(raw.p_bu, b_up->scalar_type()) : none();
  if (n.s) {
    at::Tensor ds = raw.p_s.sum(0);
    out[5] = (scale->numel() == 1 ? ds.sum().reshape(scale->sizes()) : ds).to(scale->scalar_type());
  } else {
    out[5] = none();
  }
  if (n.g) {
    out[6] = x.size(0) == 0 ? at::zeros_like(*sample_scale)
                            : raw.dg_row.view({-1, std::max<int64_t>(tokens, 1)}).sum(1).to(sample_scale->scalar_type());
  } else {
    out[6] = none();
  }
  return out;
}

#ifndef ADAPTERFUSE_WITH_CUDA
bool on_cuda_path(const at::Tensor&) { return false; }  // CPU-only build: no tensor takes the CUDA path
#endif

#ifdef ADAPTERFUSE_WITH_CUDA
// What differs between the real CUDA build and the emulation: where the CUDA path's tensors live, the
// stream, the device guard and the SM count. Everything else below is the one glue both run.
#ifdef ADAPTERFUSE_CUDA_EMULATION
bool on_cuda_path(const at::Tensor& x) { return x.is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor&) {}
};
cudaStream_t current_stream() { return nullptr; }
int64_t sm_count() {
  int n = 0;
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, 0);
  return n;
}
#else
bool on_cuda_path(const at::Tensor& x) { return x.is_cuda(); }
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor& x) : guard(x.device()) {}
  c10::cuda::CUDAGuard guard;
};
cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
#endif

DType to_dtype(at::ScalarType t) {
  return t == at::kFloat ? DType::kFloat32 : (t == at::kHalf ? DType::kFloat16 : DType::kBFloat16);
}

void check_cuda(cudaError_t err, const char* what, int64_t r) {
  TORCH_CHECK(err != cudaErrorInvalidConfiguration, "adapterfuse: the CUDA ", what,
              " kernel for r = ", r, " needs more shared memory per block than this GPU offers; use backend='triton'");
  TORCH_CHECK(err == cudaSuccess, "adapterfuse: CUDA ", what, " failed: ", cudaGetErrorString(err));
}

AdapterParams base_params(const at::Tensor& x, const at::Tensor& w_down, const OptTensor& b_down,
                          const at::Tensor& w_up, const OptTensor& b_up, const OptTensor& scale32, double scale_value,
                          const OptTensor& g32, int64_t tokens, int64_t act) {
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
#endif

void fwd(const at::Tensor& x, const at::Tensor& w_down_in, const OptTensor& b_down_in, const at::Tensor& w_up_in,
         const OptTensor& b_up_in, const OptTensor& scale, double scale_value, const OptTensor& skip, bool skip_is_x,
         const OptTensor& sample_scale, int64_t tokens, int64_t act, at::Tensor y, at::Tensor h) {
  check_common(x, w_down_in, w_up_in, b_down_in, b_up_in);
  if (skip) check_2d_rows(*skip, "skip", x);
  TORCH_CHECK(act >= 0 && act <= 4, "adapterfuse: unknown activation id ", act);
  const at::Tensor w_down = contig(w_down_in), w_up = contig(w_up_in);
  const OptTensor b_down = contig(b_down_in), b_up = contig(b_up_in);
  const bool cuda_path = on_cuda_path(x);
  if (!cuda_path && x.is_cpu()) {
    adapter_fwd_cpu(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale, tokens, act, y, h);
    return;
  }
#ifdef ADAPTERFUSE_WITH_CUDA
  TORCH_CHECK(cuda_path, "adapterfuse: x must be a CPU or CUDA tensor");
  TORCH_CHECK(w_down.size(0) <= kCudaMaxRank, "adapterfuse: the CUDA backend supports r <= ", kCudaMaxRank,
              ", got r = ", w_down.size(0), "; use backend='triton'");
  const DeviceGuard guard(x);
  const OptTensor s32 = fp32(scale), g32 = fp32(sample_scale);
  AdapterParams p = base_params(x, w_down, b_down, w_up, b_up, s32, scale_value, g32, tokens, act);
  p.skip_mode = skip_is_x ? 1 : (skip ? 2 : 0);
  p.skip = skip && !skip_is_x ? skip->data_ptr() : nullptr;
  p.stride_skip = skip && !skip_is_x ? skip->stride(0) : 0;
  p.y = y.data_ptr();
  p.stride_y = y.stride(0);
  p.h = h.data_ptr<float>();
  check_cuda(adapter_forward_cuda(p, current_stream()), "forward", p.r);
#else
  TORCH_CHECK(false, "adapterfuse: this build of the extension has no CUDA support (x is on ", x.device(), ")");
#endif
}

std::vector<at::Tensor> bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& h,
                            const at::Tensor& w_down_in, const OptTensor& b_down_in, const at::Tensor& w_up_in,
                            const OptTensor& b_up_in, const OptTensor& scale, double scale_value,
                            const OptTensor& sample_scale, int64_t tokens, int64_t act, bool skip_is_x,
                            const std::vector<bool>& needs) {
  check_common(x, w_down_in, w_up_in, b_down_in, b_up_in);
  check_2d_rows(dy, "dy", x);
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.size(0) == x.size(0) &&
                  h.size(1) == w_down_in.size(0),
              "adapterfuse: h must be the contiguous fp32 [M, r] saved by the forward");
  const Needs n = make_needs(needs, b_down_in, b_up_in, scale, sample_scale);
  const at::Tensor w_down = contig(w_down_in), w_up = contig(w_up_in);
  const OptTensor b_down = contig(b_down_in), b_up = contig(b_up_in);
  BackwardRaw raw;
  const bool cuda_path = on_cuda_path(x);
  if (!cuda_path && x.is_cpu()) {
    raw = adapter_bwd_cpu(dy, x, h, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale, tokens, act,
                          skip_is_x, n);
  } else {
#ifdef ADAPTERFUSE_WITH_CUDA
    TORCH_CHECK(cuda_path, "adapterfuse: x must be a CPU or CUDA tensor");
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
      check_cuda(adapter_backward_rows_cuda(p, stream), "backward (rows)", r);
    }
    if (n.bd) raw.p_bd = dh;  // d_b_down = sum over rows of d_h: the [M, r] tensor is its own partial
    if (n.wd || n.wu || n.bu || n.s) {
      const int64_t bm = adapter_cuda_bwd_cols_block_rows(r), bn = adapter_cuda_bwd_cols_block_cols(r);
      const int64_t row_blocks = (M + bm - 1) / bm, col_blocks = (d + bn - 1) / bn;
      const int64_t sms = sm_count();
      int64_t splits = std::max<int64_t>(1, std::min(row_blocks, (4 * sms + col_blocks - 1) / col_blocks));
      p.rows_per_split = (row_blocks + splits - 1) / splits * bm;
      splits = M == 0 ? 1 : (M + p.rows_per_split - 1) / p.rows_per_split;
      p.splits = splits;
      p.need_wu = n.wu;
      p.need_bu = n.bu;
      p.need_wd = n.wd;
      p.need_s = n.s;
      p.dh = p.need_dh ? dh.data_ptr<float>() : nullptr;
      if (n.wu) raw.p_wu = at::empty({splits, d, r}, fopt);
      if (n.wd) raw.p_wd = at::empty({splits, r, d}, fopt);
      if (n.bu) raw.p_bu = at::empty({splits, d}, fopt);
      if (n.s) raw.p_s = at::empty({splits, d}, fopt);
      p.p_wu = n.wu ? raw.p_wu.data_ptr<float>() : nullptr;
      p.p_wd = n.wd ? raw.p_wd.data_ptr<float>() : nullptr;
      p.p_bu = n.bu ? raw.p_bu.data_ptr<float>() : nullptr;
      p.p_s = n.s ? raw.p_s.data_ptr<float>() : nullptr;
      if (M == 0) {  // nothing to reduce: the partials are zeros
        for (auto* t : {&raw.p_wu, &raw.p_wd, &raw.p_bu, &raw.p_s})
          if (t->defined()) t->zero_();
      } else {
        check_cuda(adapter_backward_cols_cuda(p, stream), "backward (weights)", r);
      }
    }
#else
    TORCH_CHECK(false, "adapterfuse: this build of the extension has no CUDA support (x is on ", x.device(), ")");
#endif
  }
  return finish_backward(raw, n, x, w_down, b_down, w_up, b_up, scale, sample_scale, tokens);
}

py::dict build_info() {
  py::dict info;
#ifdef TORCH_VERSION_MAJOR
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
#else
  info["torch_version"] = "unknown";
#endif
#ifdef ADAPTERFUSE_CUDA_EMULATION
  info["with_cuda"] = true;
  info["cuda_emulation"] = true;
  info["cuda_version"] = "emulation";
#elif defined(ADAPTERFUSE_WITH_CUDA)
  info["with_cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
#else
  info["with_cuda"] = false;
  info["cuda_version"] = "";
#endif
  return info;
}

}  // namespace
}  // namespace adapterfuse

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adapterfuse C++/CUDA extension: fused adapter forward/backward";
  m.def("fwd", &adapterfuse::fwd, "fused adapter forward (fills y and h)");
  m.def("bwd", &adapterfuse::bwd, "fused adapter backward: [dx, dw_down, db_down, dw_up, db_up, dscale, dsample]");
  m.def("build_info", &adapterfuse::build_info, "versions this extension was built against");
}
