// pybind11 glue of the adapterfuse extension: argument checks, device / dtype dispatch, CUDA streams,
// the second (deterministic) stage of the weight-gradient reduction, and build information.
// The Python side (adapterfuse/ops/_extension.py) wraps `fwd` / `bwd` in torch.library custom ops.
#include <torch/extension.h>

#include <algorithm>
#include <initializer_list>
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

// A bias / scale vector: one of the given lengths, on x's device, and (biases) in x's dtype.
void check_vector(const OptTensor& t, const char* name, const at::Tensor& x, std::initializer_list<int64_t> lengths,
                  bool same_dtype) {
  if (!t) return;
  TORCH_CHECK(t->device() == x.device(), "adapterfuse: ", name, " is on ", t->device(), " but x is on ", x.device());
  TORCH_CHECK(!same_dtype || t->scalar_type() == x.scalar_type(), "adapterfuse: ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK(same_dtype || at::isFloatingType(t->scalar_type()), "adapterfuse: ", name,
              " must be a floating-point tensor, got ", t->scalar_type());
  TORCH_CHECK(t->dim() <= 1 && std::find(lengths.begin(), lengths.end(), t->numel()) != lengths.end(),
              "adapterfuse: ", name, " has shape ", t->sizes(), ", expected one of the lengths ",
              c10::IntArrayRef(lengths.begin(), lengths.size()));
}

void check_common(const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_up, const OptTensor& b_down,
                  const OptTensor& b_up, const OptTensor& scale, const OptTensor& sample_scale, int64_t tokens) {
  TORCH_CHECK(x.dim() == 2, "adapterfuse: x must be [M, d], got ", x.sizes());
  check_row_layout(x, "x");
  TORCH_CHECK(x.size(1) >= 1, "adapterfuse: d = x.size(1) must be >= 1 (fused_adapter routes d = 0 to the "
              "reference)");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "adapterfuse: the extension supports float32, float16 and bfloat16, got ", dt);
  const int64_t M = x.size(0), d = x.size(1);
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(1) == d, "adapterfuse: w_down must be [r, ", d, "], got ",
              w_down.sizes());
  const int64_t r = w_down.size(0);
  TORCH_CHECK(r >= 1, "adapterfuse: the bottleneck r must be >= 1");
  TORCH_CHECK(w_up.dim() == 2 && w_up.size(0) == d && w_up.size(1) == r, "adapterfuse: w_up must be [", d, ", ",
              r, "], got ", w_up.sizes());
  for (const auto* t : {&w_down, &w_up})
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == dt, "adapterfuse: weights must match x in device "
                "and dtype (x: ", x.device(), " ", dt, ", weight: ", t->device(), " ", t->scalar_type(), ")");
  check_vector(b_down, "b_down", x, {r}, true);
  check_vector(b_up, "b_up", x, {d}, true);
  check_vector(scale, "scale", x, {1, d}, false);
  TORCH_CHECK(tokens >= 0, "adapterfuse: tokens per sample must be >= 0, got ", tokens);
  if (sample_scale) {
    check_vector(sample_scale, "sample_scale", x, {sample_scale->numel()}, false);
    TORCH_CHECK(M == 0 || sample_scale->numel() * tokens == M, "adapterfuse: sample_scale has ",
                sample_scale->numel(), " entries of ", tokens, " rows each, but x has ", M, " rows");
  }
}

// h: the contiguous fp32 [M, r] pre-activation, on x's device.
void check_saved_h(const at::Tensor& h, const at::Tensor& x, int64_t r, const char* what) {
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.dim() == 2 && h.size(0) == x.size(0) &&
                  h.size(1) == r && h.device() == x.device(),
              "adapterfuse: ", what, " must be a contiguous float32 [M, r] = [", x.size(0), ", ", r, "] tensor on ",
              x.device(), ", got ", h.scalar_type(), " ", h.sizes(), " on ", h.device());
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

// Stage two of the reduction, shared by the CPU and CUDA paths: sum the partials in order, apply the
// scale to R and q (d_w_up = s R, d_b_up = s q, d_s[c] = w_up[c] . R[c] + b_up[c] q[c]; see
// adapter_kernels.cu), cast to each argument's dtype and shape.
std::vector<at::Tensor> finish_backward(const BackwardRaw& raw, const Needs& n, const at::Tensor& x,
                                        const at::Tensor& w_down, const OptTensor& b_down, const at::Tensor& w_up,
                                        const OptTensor& b_up, const OptTensor& scale, double scale_value,
                                        const OptTensor& sample_scale, int64_t tokens) {
  const int64_t d = x.size(1);
  auto none = [&] { return x.new_empty({0}); };
  auto reduce = [](const at::Tensor& part, at::ScalarType dt) { return part.sum(0).to(dt); };
  std::vector<at::Tensor> out(7);
  out[0] = n.x ? raw.dx : none();
  out[1] = n.wd ? reduce(raw.p_wd, w_down.scalar_type()) : none();
  out[2] = n.bd ? reduce(raw.p_bd, b_down->scalar_type()) : none();
  const at::Tensor s = scale ? scale->to(at::kFloat).reshape({-1}).expand({d})
                             : at::full({d}, scale_value, x.options().dtype(at::kFloat));
  const at::Tensor R = raw.p_R.defined() ? raw.p_R.sum(0) : at::Tensor();
  const at::Tensor q = raw.p_q.defined() ? raw.p_q.sum(0) : at::Tensor();
  out[3] = n.wu ? (R * s.unsqueeze(1)).to(w_up.scalar_type()) : none();
  out[4] = n.bu ? (q * s).to(b_up->scalar_type()) : none();
  if (n.s) {
    at::Tensor ds = (w_up.to(at::kFloat) * R).sum(1);
    if (b_up) ds = ds + b_up->to(at::kFloat) * q;
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
#endif

void fwd(const at::Tensor& x, const at::Tensor& w_down_in, const OptTensor& b_down_in, const at::Tensor& w_up_in,
         const OptTensor& b_up_in, const OptTensor& scale, double scale_value, const OptTensor& skip, bool skip_is_x,
         const OptTensor& sample_scale, int64_t tokens, int64_t act, at::Tensor y, at::Tensor h) {
  check_common(x, w_down_in, w_up_in, b_down_in, b_up_in, scale, sample_scale, tokens);
  if (skip) check_2d_rows(*skip, "skip", x);
  check_2d_rows(y, "y", x);
  check_saved_h(h, x, w_down_in.size(0), "h (the forward's output buffer)");
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
#else
  TORCH_CHECK(false, "adapterfuse: this build of the extension has no CUDA support (x is on ", x.device(), ")");
#endif
}

std::vector<at::Tensor> bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& h,
                            const at::Tensor& w_down_in, const OptTensor& b_down_in, const at::Tensor& w_up_in,
                            const OptTensor& b_up_in, const OptTensor& scale, double scale_value,
                            const OptTensor& sample_scale, int64_t tokens, int64_t act, bool skip_is_x,
                            const std::vector<bool>& needs) {
  check_common(x, w_down_in, w_up_in, b_down_in, b_up_in, scale, sample_scale, tokens);
  check_2d_rows(dy, "dy", x);
  check_saved_h(h, x, w_down_in.size(0), "h (saved by the forward)");
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
#else
    TORCH_CHECK(false, "adapterfuse: this build of the extension has no CUDA support (x is on ", x.device(), ")");
#endif
  }
  return finish_backward(raw, n, x, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale, tokens);
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
