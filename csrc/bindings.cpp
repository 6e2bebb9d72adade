// pybind11 glue of the adapterfuse extension: argument checks, the choice between the CPU path (adapter_cpu.cpp)
// and the CUDA path (adapter_cuda.cpp, host side; adapter_kernels.cu), the second (deterministic) stage of the
// weight-gradient reduction shared by both, and build information.
// The Python side (adapterfuse/ops/_extension.py) wraps `fwd` / `bwd` in torch.library custom ops.
#include <torch/extension.h>

#include <algorithm>
#include <initializer_list>
#include <string>
#include <vector>

#include "adapter_bank_cpu.h"
#include "adapter_cpu.h"
#include "linear_adapter_cpu.h"
#if defined(ADAPTERFUSE_WITH_CUDA)  // the real CUDA build, or its CPU emulation (ADAPTERFUSE_CUDA_EMULATION)
#include "adapter_cuda.h"
#endif
#if defined(ADAPTERFUSE_WITH_CUDA) && !defined(ADAPTERFUSE_CUDA_EMULATION)
#include <cuda_runtime.h>  // CUDART_VERSION (build_info)
#endif

// The torch version the extension is compiled against, from torch's own headers.
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#elif __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

namespace adapterfuse {
namespace {

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

Needs make_needs(const std::vector<bool>& needs, const OptTensor& b_down, const OptTensor& b_up,
                 const OptTensor& scale, const OptTensor& sample_scale) {
  TORCH_CHECK(needs.size() == 7, "adapterfuse: needs must have 7 flags, got ", needs.size());
  return Needs{needs[0], needs[1], needs[2] && b_down.has_value(), needs[3], needs[4] && b_up.has_value(),
               needs[5] && scale.has_value(), needs[6] && sample_scale.has_value()};
}

// The [d]-sized products that undo the folding of the scale, for one adapter (R [d, r], q [d], s [d]):
// d_w_up = s R, d_b_up = s q, d_s[c] = w_up[c] . R[c] + b_up[c] q[c], the last summed over channels where the scale
// is one value; see docs/design.md, Backward. (The CPU bank does the same per adapter in its kernel:
// adapter_bank_cpu.cpp finish_adapter_grads.)
// (Slots not computed keep what the caller put there: a distinct empty tensor each, since the outputs of a custom
// op may not alias one another.)
void finish_scale(const at::Tensor& R, const at::Tensor& q, const at::Tensor& s, const Needs& n, const at::Tensor& w_up,
                  const OptTensor& b_up, const OptTensor& scale, std::vector<at::Tensor>& out) {
  if (n.wu) out[3] = (R * s.unsqueeze(-1)).to(w_up.scalar_type());
  if (n.bu) out[4] = (q * s).to(b_up->scalar_type());
  if (n.s) {
    at::Tensor ds = (w_up.to(at::kFloat) * R).sum(-1);
    if (b_up) ds = ds + b_up->to(at::kFloat) * q;
    if (scale->numel() != ds.numel()) ds = ds.sum(-1);
    out[5] = ds.reshape(scale->sizes()).to(scale->scalar_type());
  }
}

at::Tensor finish_sample_scale(const at::Tensor& dg_row, const at::Tensor& x, const OptTensor& sample_scale,
                               int64_t tokens) {
  return x.size(0) == 0 ? at::zeros_like(*sample_scale)
                        : dg_row.view({-1, std::max<int64_t>(tokens, 1)}).sum(1).to(sample_scale->scalar_type());
}

// Seven distinct empty tensors (the "not needed" gradients; custom-op outputs may not alias each other).
std::vector<at::Tensor> empty_grads(const at::Tensor& x) {
  std::vector<at::Tensor> out;
  for (int i = 0; i < 7; ++i) out.push_back(x.new_empty({0}));
  return out;
}

// Stage two of the reduction, shared by the CPU and CUDA paths: sum the partials in order, then finish_scale,
// cast to each argument's dtype and shape.
std::vector<at::Tensor> finish_backward(const BackwardRaw& raw, const Needs& n, const at::Tensor& x,
                                        const at::Tensor& w_down, const OptTensor& b_down, const at::Tensor& w_up,
                                        const OptTensor& b_up, const OptTensor& scale, double scale_value,
                                        const OptTensor& sample_scale, int64_t tokens) {
  const int64_t d = x.size(1);
  auto reduce = [](const at::Tensor& part, at::ScalarType dt) { return part.sum(0).to(dt); };
  std::vector<at::Tensor> out = empty_grads(x);
  if (n.x) out[0] = raw.dx;
  if (n.wd) out[1] = reduce(raw.p_wd, w_down.scalar_type());
  if (n.bd) out[2] = reduce(raw.p_bd, b_down->scalar_type());
  if (n.wu || n.bu || n.s) {
    const at::Tensor s = scale ? scale->to(at::kFloat).reshape({-1}).expand({d})
                               : at::full({d}, scale_value, x.options().dtype(at::kFloat));
    const at::Tensor R = raw.p_R.defined() ? raw.p_R.sum(0) : at::Tensor();
    const at::Tensor q = raw.p_q.defined() ? raw.p_q.sum(0) : at::Tensor();
    finish_scale(R, q, s, n, w_up, b_up, scale, out);
  }
  if (n.g) out[6] = finish_sample_scale(raw.dg_row, x, sample_scale, tokens);
  return out;
}

#ifndef ADAPTERFUSE_WITH_CUDA
bool on_cuda_path(const at::Tensor&) { return false; }  // CPU-only build: no tensor takes the CUDA path
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
  adapter_fwd_cuda(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale, tokens, act, y, h);
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
    raw = adapter_bwd_cuda(dy, x, h, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale, tokens, act,
                           skip_is_x, n);
#else
    TORCH_CHECK(false, "adapterfuse: this build of the extension has no CUDA support (x is on ", x.device(), ")");
#endif
  }
  return finish_backward(raw, n, x, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale, tokens);
}

// ------------------------------------------------- the adapter with its input LayerNorm and / or dropout

// adapter_ln_dropout (adapter_cpu.cpp LnDropout), CPU tensors: the plain adapter's checks plus the variant's.
LnDropout make_ln_dropout(const at::Tensor& x, double ln_eps, const at::Tensor& stats, double dropout_p,
                          const OptTensor& seed) {
  TORCH_CHECK(x.is_cpu(), "adapterfuse: the extension's LayerNorm / dropout adapter runs on CPU tensors (x is on ",
              x.device(), "); use backend='triton' or 'torch' (or 'auto')");
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "adapterfuse: dropout_p must be in [0, 1), got ", dropout_p);
  LnDropout e;
  e.ln_eps = ln_eps;
  if (ln_eps >= 0) {
    TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.dim() == 2 &&
                    stats.size(0) == x.size(0) && stats.size(1) == 3 && stats.is_cpu(),
                "adapterfuse: stats must be a contiguous float32 [M, 3] = [", x.size(0), ", 3] CPU tensor, got ",
                stats.scalar_type(), " ", stats.sizes());
    e.stats = stats;
  }
  e.dropout_p = dropout_p;
  if (dropout_p > 0) {
    TORCH_CHECK(seed && seed->scalar_type() == at::kLong && seed->numel() == 1 && seed->is_cpu(),
                "adapterfuse: dropout needs seed, a one-element int64 CPU tensor");
    e.seed = seed->item<int64_t>();
  }
  return e;
}

void ln_dropout_fwd(const at::Tensor& x, const at::Tensor& w_down_in, const OptTensor& b_down_in,
                    const at::Tensor& w_up_in, const OptTensor& b_up_in, const OptTensor& scale, double scale_value,
                    const OptTensor& skip, bool skip_is_x, const OptTensor& sample_scale, int64_t tokens, int64_t act,
                    double ln_eps, double dropout_p, const OptTensor& seed, at::Tensor y, at::Tensor h,
                    at::Tensor stats) {
  check_common(x, w_down_in, w_up_in, b_down_in, b_up_in, scale, sample_scale, tokens);
  if (skip) check_2d_rows(*skip, "skip", x);
  check_2d_rows(y, "y", x);
  check_saved_h(h, x, w_down_in.size(0), "h (the forward's output buffer)");
  TORCH_CHECK(act >= 0 && act <= 4, "adapterfuse: unknown activation id ", act);
  const LnDropout e = make_ln_dropout(x, ln_eps, stats, dropout_p, seed);
  adapter_fwd_cpu(x, contig(w_down_in), contig(b_down_in), contig(w_up_in), contig(b_up_in), scale, scale_value, skip,
                  skip_is_x, sample_scale, tokens, act, y, h, &e);
}

std::vector<at::Tensor> ln_dropout_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& h,
                                       const at::Tensor& w_down_in, const OptTensor& b_down_in,
                                       const at::Tensor& w_up_in, const OptTensor& b_up_in, const OptTensor& scale,
                                       double scale_value, const OptTensor& sample_scale, int64_t tokens, int64_t act,
                                       bool skip_is_x, const std::vector<bool>& needs, const at::Tensor& stats,
                                       const OptTensor& seed, double dropout_p) {
  check_common(x, w_down_in, w_up_in, b_down_in, b_up_in, scale, sample_scale, tokens);
  check_2d_rows(dy, "dy", x);
  check_saved_h(h, x, w_down_in.size(0), "h (saved by the forward)");
  TORCH_CHECK(act >= 0 && act <= 4, "adapterfuse: unknown activation id ", act);
  const Needs n = make_needs(needs, b_down_in, b_up_in, scale, sample_scale);
  // the LayerNorm is on exactly when the forward saved stats ([M, 3]; [0] without it). eps is only needed
  // to compute them, so any value >= 0 marks "on" here.
  const LnDropout e = make_ln_dropout(x, stats.dim() == 2 ? 0.0 : -1.0, stats, dropout_p, seed);
  const at::Tensor w_down = contig(w_down_in), w_up = contig(w_up_in);
  const OptTensor b_down = contig(b_down_in), b_up = contig(b_up_in);
  const BackwardRaw raw = adapter_bwd_cpu(dy, x, h, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale,
                                          tokens, act, skip_is_x, n, &e);
  return finish_backward(raw, n, x, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale, tokens);
}

// ---------------------------------------------------------------------------------------- the adapter bank

// An optional per-adapter tensor: exactly `sizes`, on x's device, in x's dtype (biases) or floating (scale).
void check_bank_tensor(const OptTensor& t, const char* name, const at::Tensor& x, std::vector<int64_t> sizes,
                       bool same_dtype) {
  if (!t) return;
  TORCH_CHECK(t->device() == x.device(), "adapterfuse: ", name, " is on ", t->device(), " but x is on ", x.device());
  TORCH_CHECK(same_dtype ? t->scalar_type() == x.scalar_type() : at::isFloatingType(t->scalar_type()),
              "adapterfuse: ", name, same_dtype ? " must have x's dtype " : " must be floating-point, not ",
              same_dtype ? x.scalar_type() : t->scalar_type());
  TORCH_CHECK(t->sizes() == c10::IntArrayRef(sizes), "adapterfuse: ", name, " must be ", c10::IntArrayRef(sizes),
              ", got ", t->sizes());
}

void check_bank(const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_up, const OptTensor& b_down,
                const OptTensor& b_up, const OptTensor& scale, const OptTensor& sample_scale, int64_t tokens,
                const at::Tensor& index) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) >= 1, "adapterfuse: x must be [M, d] with d >= 1, got ", x.sizes());
  check_row_layout(x, "x");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "adapterfuse: the extension supports float32, float16 and bfloat16, got ", dt);
  TORCH_CHECK(x.is_cpu(), "adapterfuse: the extension's adapter bank runs on CPU tensors (x is on ", x.device(),
              "); use backend='torch' (or 'auto') for CUDA tensors");
  const int64_t M = x.size(0), d = x.size(1);
  TORCH_CHECK(w_down.dim() == 3 && w_down.size(0) >= 1 && w_down.size(1) >= 1 && w_down.size(2) == d,
              "adapterfuse: w_down must be [A, r, ", d, "] with A, r >= 1, got ", w_down.sizes());
  const int64_t A = w_down.size(0), r = w_down.size(1);
  TORCH_CHECK(w_up.sizes() == c10::IntArrayRef({A, d, r}), "adapterfuse: w_up must be [", A, ", ", d, ", ", r,
              "], got ", w_up.sizes());
  for (const auto* t : {&w_down, &w_up})
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == dt,
                "adapterfuse: weights must match x in device and dtype");
  check_bank_tensor(b_down, "b_down", x, {A, r}, true);
  check_bank_tensor(b_up, "b_up", x, {A, d}, true);
  if (scale) check_bank_tensor(scale, "scale", x, scale->dim() == 1 ? std::vector<int64_t>{A} : std::vector<int64_t>{A, d},
                               false);
  TORCH_CHECK(tokens >= 0, "adapterfuse: tokens per sample must be >= 0, got ", tokens);
  if (sample_scale) {
    check_vector(sample_scale, "sample_scale", x, {sample_scale->numel()}, false);
    TORCH_CHECK(M == 0 || sample_scale->numel() * tokens == M, "adapterfuse: sample_scale has ",
                sample_scale->numel(), " entries of ", tokens, " rows each, but x has ", M, " rows");
  }
  // [M]: one id per row; [B]: one id per sample of `tokens` rows (B * tokens = M)
  const bool per_row = index.dim() == 1 && index.numel() == M;
  const bool per_sample = index.dim() == 1 && tokens >= 1 && index.numel() * tokens == M;
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 &&
                  (per_row || per_sample || (M == 0 && tokens == 0)) && index.is_contiguous() &&
                  index.device() == x.device(),
              "adapterfuse: index must be a contiguous int64 [M] = [", M, "] tensor (one id per row) or [B] with B * ",
              tokens, " = M (one id per sample) on ", x.device(), ", got ", index.scalar_type(), " ", index.sizes());
}

// The bank's w_up as the kernels take it: in its up-major layout (bank_up_major) as it is, else contiguous.
at::Tensor bank_up(const at::Tensor& w) { return bank_up_major(w) ? w : w.contiguous(); }

void bank_fwd(const at::Tensor& x, const at::Tensor& w_down_in, const OptTensor& b_down_in, const at::Tensor& w_up_in,
              const OptTensor& b_up_in, const OptTensor& scale, double scale_value, const OptTensor& skip,
              bool skip_is_x, const OptTensor& sample_scale, int64_t tokens, int64_t act, const at::Tensor& index,
              at::Tensor y, at::Tensor h) {
  check_bank(x, w_down_in, w_up_in, b_down_in, b_up_in, scale, sample_scale, tokens, index);
  if (skip) check_2d_rows(*skip, "skip", x);
  check_2d_rows(y, "y", x);
  check_saved_h(h, x, w_down_in.size(1), "h (the forward's output buffer)");
  TORCH_CHECK(act >= 0 && act <= 4, "adapterfuse: unknown activation id ", act);
  adapter_bank_fwd_cpu(x, contig(w_down_in), contig(b_down_in), bank_up(w_up_in), contig(b_up_in), scale, scale_value,
                       skip, skip_is_x, sample_scale, tokens, act, index, y, h);
}

std::vector<at::Tensor> bank_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& h,
                                 const at::Tensor& w_down_in, const OptTensor& b_down_in, const at::Tensor& w_up_in,
                                 const OptTensor& b_up_in, const OptTensor& scale, double scale_value,
                                 const OptTensor& sample_scale, int64_t tokens, int64_t act, bool skip_is_x,
                                 const std::vector<bool>& needs, const at::Tensor& index, bool packed) {
  check_bank(x, w_down_in, w_up_in, b_down_in, b_up_in, scale, sample_scale, tokens, index);
  check_2d_rows(dy, "dy", x);
  check_saved_h(h, x, w_down_in.size(1), "h (saved by the forward)");
  TORCH_CHECK(act >= 0 && act <= 4, "adapterfuse: unknown activation id ", act);
  const Needs n = make_needs(needs, b_down_in, b_up_in, scale, sample_scale);
  const at::Tensor w_down = contig(w_down_in), w_up = bank_up(w_up_in);
  const OptTensor b_down = contig(b_down_in), b_up = contig(b_up_in);
  const BankRaw raw = adapter_bank_bwd_cpu(dy, x, h, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale,
                                           tokens, act, skip_is_x, n, index, packed);
  std::vector<at::Tensor> out = empty_grads(x);
  if (n.x) out[0] = raw.dx;
  if (n.wd) out[1] = raw.wd.to(w_down.scalar_type());
  if (n.bd) out[2] = raw.bd.to(b_down->scalar_type());
  if (n.wu) {  // (rt: w_up's own layout in the eager path; the custom op's contiguous, as its fake impl says)
    const at::Tensor R = raw.rt ? raw.R.transpose(1, 2) : raw.R;
    out[3] = (packed ? R : R.contiguous()).to(w_up.scalar_type());
  }
  if (n.bu) out[4] = raw.q.to(b_up->scalar_type());
  if (n.s) {
    const at::Tensor ds = scale->numel() != raw.ds.numel() ? raw.ds.sum(-1) : raw.ds;  // [A] scale: over d too
    out[5] = ds.reshape(scale->sizes()).to(scale->scalar_type());
  }
  if (n.g) out[6] = finish_sample_scale(raw.dg_row, x, sample_scale, tokens);
  return out;
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

// Linear + adapter forward (linear_adapter_cpu.cpp), CPU tensors: y always; t and h when given non-empty
// (a backward will follow).
void linear_fwd(const at::Tensor& inp, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& w_down_in,
                const OptTensor& b_down_in, const at::Tensor& w_up_in, const OptTensor& b_up_in,
                const OptTensor& scale, double scale_value, const OptTensor& residual, bool residual_before,
                int64_t act, const OptTensor& ln_weight, const OptTensor& ln_bias, double ln_eps, at::Tensor y,
                at::Tensor t, at::Tensor h) {
  TORCH_CHECK(inp.dim() == 2 && inp.is_cpu(), "adapterfuse: inp must be a CPU [M, k] tensor, got ", inp.sizes(),
              " on ", inp.device());
  check_row_layout(inp, "inp");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == inp.size(1) && weight.scalar_type() == inp.scalar_type() &&
                  weight.is_cpu(),
              "adapterfuse: weight must be a CPU [d, k] = [d, ", inp.size(1), "] tensor of inp's dtype, got ",
              weight.sizes(), " ", weight.scalar_type());
  TORCH_CHECK(y.dim() == 2 && y.size(0) == inp.size(0) && y.size(1) == weight.size(0),
              "adapterfuse: y must be [M, d] = [", inp.size(0), ", ", weight.size(0), "], got ", y.sizes());
  // the adapter's checks, with y standing in for its input (the Linear's output, [M, d])
  check_common(y, w_down_in, w_up_in, b_down_in, b_up_in, scale, c10::nullopt, 1);
  check_vector(bias, "bias", y, {weight.size(0)}, true);
  if (residual) check_2d_rows(*residual, "residual", y);
  const bool save = t.numel() > 0;
  if (save) {
    check_2d_rows(t, "t", y);
    check_saved_h(h, y, w_down_in.size(0), "h (the forward's output buffer)");
  }
  TORCH_CHECK(act >= 0 && act <= 4, "adapterfuse: unknown activation id ", act);
  check_vector(ln_weight, "ln_weight", y, {weight.size(0)}, true);
  check_vector(ln_bias, "ln_bias", y, {weight.size(0)}, true);
  linear_adapter_fwd_cpu(inp, contig(weight), contig(bias), contig(w_down_in), contig(b_down_in), contig(w_up_in),
                         contig(b_up_in), scale, scale_value, residual, residual_before, act, ln_weight, ln_bias,
                         ln_eps, y, t, h);
}

}  // namespace
}  // namespace adapterfuse

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adapterfuse C++/CUDA extension: fused adapter forward/backward";
  m.def("fwd", &adapterfuse::fwd, "fused adapter forward (fills y and h)");
  m.def("bwd", &adapterfuse::bwd, "fused adapter backward: [dx, dw_down, db_down, dw_up, db_up, dscale, dsample]");
  m.def("ln_dropout_fwd", &adapterfuse::ln_dropout_fwd,
        "fused adapter with input LayerNorm and / or dropout, forward (fills y, h and stats), CPU tensors");
  m.def("ln_dropout_bwd", &adapterfuse::ln_dropout_bwd,
        "fused adapter with input LayerNorm and / or dropout, backward (the adapter's seven gradients), CPU tensors");
  m.def("bank_fwd", &adapterfuse::bank_fwd, "fused adapter bank forward (fills y and h), CPU tensors");
  m.def("bank_bwd", &adapterfuse::bank_bwd,
        "fused adapter bank backward: [dx, dw_down, db_down, dw_up, db_up, dscale, dsample], CPU tensors (packed: "
        "the weight gradients as views of one allocation)");
  m.def("linear_fwd", &adapterfuse::linear_fwd,
        "fused Linear + adapter forward (fills y, and t and h when a backward follows), CPU tensors");
  m.def("build_info", &adapterfuse::build_info, "versions this extension was built against");
}
