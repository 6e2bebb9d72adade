// Fused CPU implementation of the adapter op (forward and backward), fp32 / fp16 / bf16 with fp32
// accumulation. The math is DESIGN.md section 2; the schema is the one in adapterfuse/ops/_common.py.
//
// Why this is faster than the eager chain: eager writes and re-reads u, u*s and the residual sum as
// full [M, d] tensors (~7 passes over [M, d]). Here the rows are processed in blocks of kBlockRows:
// one block of x, its h / a ([rows, r]) and its u ([rows, d], fp32) live in a thread-local buffer that
// stays in L2 (64 x 768 x 4 B = 192 KiB per [rows, d] buffer, L2 is >= 1 MiB per core on the machines
// we target), so DRAM sees one read of x and one write of y. The two skinny matmuls of a block go to
// MKL/OpenBLAS sgemm through at::native::cpublas::gemm (no dispatcher overhead per block).
//
// Backward, with gy = dy * g[m] * s (per block, fp32, never written to memory):
//   d_a = gy @ w_up;  d_h = d_a * act'(h);  dx = d_h @ w_down (+ dy when skip is x)
//   d_w_up += gy^T @ a;  d_b_up += sum_m gy;  d_w_down += d_h^T @ x;  d_s[c] += sum_m dy g u
//   d_g[m] = sum_c dy s u  (u recomputed from a only when scale or sample_scale needs a gradient)
// Weight gradients are reduced deterministically in two stages: the row blocks are split into a fixed
// number of groups (independent of the thread count); each group accumulates its own fp32 partial
// in row order; the partials are then summed in group order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "adapter_cpu.h"

namespace adapterfuse {
namespace {

constexpr int64_t kBlockRows = 64;
constexpr int64_t kMaxGroups = 16;  // partial buffers of the weight-gradient reduction

}  // namespace
}  // namespace adapterfuse

// Fortran BLAS sgemm (LP64), exported by libtorch_cpu on x86 (MKL). Weak: null where it is absent.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace adapterfuse {
namespace {

// Row-major C[m, n] = op(A)[m, k] @ op(B)[k, n] + beta * C through column-major BLAS:
// (row-major C) = (col-major C^T) = op(B)^T op(A)^T, so A and B swap places and keep their op flags.
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
             const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.f ? 0.f : beta * c[i * ldc + j];
    return;
  }
  if (sgemm_ != nullptr) {
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
    const float one = 1.f;
    sgemm_(&tb, &ta, &in, &im, &ik, &one, b, &ildb, a, &ilda, &beta, c, &ildc);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  auto A = at::from_blob(const_cast<float*>(a), {trans_a ? k : m, trans_a ? m : k}, {lda, 1}, opts);
  auto B = at::from_blob(const_cast<float*>(b), {trans_b ? n : k, trans_b ? k : n}, {ldb, 1}, opts);
  auto C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::addmm_out(C, C, trans_a ? A.t() : A, trans_b ? B.t() : B, beta, 1.f);
}

inline float act_fwd(float h, int act) {
  switch (act) {
    case 0: return h;
    case 1: return h < 0.f ? 0.f : h;  // NaN stays NaN
    case 2: return 0.5f * h * (1.f + std::erf(h * 0.70710678118654752f));
    case 3: {
      const float t = std::tanh(0.7978845608028654f * (h + 0.044715f * h * h * h));
      return 0.5f * h * (1.f + t);
    }
    default: return h / (1.f + std::exp(-h));
  }
}

inline float act_grad(float h, int act) {
  switch (act) {
    case 0: return 1.f;
    case 1: return h <= 0.f ? 0.f : 1.f;  // like torch's threshold_backward
    case 2:
      return 0.5f * (1.f + std::erf(h * 0.70710678118654752f)) +
             h * 0.3989422804014327f * std::exp(-0.5f * h * h);
    case 3: {
      const float k = 0.7978845608028654f;
      const float t = std::tanh(k * (h + 0.044715f * h * h * h));
      return 0.5f * (1.f + t) + 0.5f * h * (1.f - t * t) * k * (1.f + 0.134145f * h * h);
    }
    default: {
      const float sg = 1.f / (1.f + std::exp(-h));
      return sg * (1.f + h * (1.f - sg));
    }
  }
}

// Everything a block needs, as raw pointers. Row offsets are int64 (M * d may exceed 2^31).
template <typename T>
struct Args {
  const T* x; int64_t sx;              // [M, d], row stride sx
  const T* skip; int64_t ss;           // [M, d] or nullptr
  const T* dy; int64_t sdy;            // backward only
  const float* wd;                     // [r, d] fp32
  const float* wu;                     // [d, r] fp32
  const float* bd;                     // [r] or nullptr
  const float* bu;                     // [d] or nullptr
  const float* scale; int64_t scale_n; // [1] or [d]; nullptr -> scale_value
  float scale_value;
  const float* g; int64_t tokens;      // [B] or nullptr
  int64_t M, d, r;
  int act;
  bool skip_is_x;
};

template <typename T>
inline void load_rows(const T* src, int64_t stride, int64_t rows, int64_t d, float* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = src + i * stride;
    float* o = dst + i * d;
    for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(s[c]);
  }
}

inline float scale_at(const float* scale, int64_t scale_n, float value, int64_t c) {
  return scale == nullptr ? value : (scale_n == 1 ? scale[0] : scale[c]);
}

// Per-channel scale expanded to a [d] vector once per call, so the inner loops are plain FMAs.
std::vector<float> scale_vector(const float* scale, int64_t scale_n, float value, int64_t d) {
  std::vector<float> s(d);
  for (int64_t c = 0; c < d; ++c) s[c] = scale_at(scale, scale_n, value, c);
  return s;
}

// x rows as fp32: the tensor itself for fp32 (with its row stride), else converted into buf.
template <typename T>
inline const float* rows_f32(const T* src, int64_t stride, int64_t rows, int64_t d, std::vector<float>& buf,
                             int64_t* ld) {
  if constexpr (std::is_same_v<T, float>) {
    *ld = stride;
    return src;
  } else {
    load_rows(src, stride, rows, d, buf.data());
    *ld = d;
    return buf.data();
  }
}

template <typename T>
void forward_block(const Args<T>& p, const float* s, int64_t m0, int64_t rows, float* h_out, T* y, int64_t sy,
                   std::vector<float>& xbuf, std::vector<float>& abuf, std::vector<float>& ubuf) {
  const int64_t d = p.d, r = p.r;
  int64_t ldx;
  const float* xb = rows_f32(p.x + m0 * p.sx, p.sx, rows, d, xbuf, &ldx);
  float* h = h_out + m0 * r;
  gemm_rm(false, true, rows, r, d, xb, ldx, p.wd, d, 0.f, h, r);  // h = x @ w_down^T
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < r; ++k) {
      float v = h[i * r + k] + (p.bd ? p.bd[k] : 0.f);
      h[i * r + k] = v;
      abuf[i * r + k] = act_fwd(v, p.act);
    }
  float* u = ubuf.data();
  gemm_rm(false, true, rows, d, r, abuf.data(), r, p.wu, r, 0.f, u, d);  // u = a @ w_up^T
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t m = m0 + i;
    const float g = p.g ? p.g[m / p.tokens] : 1.f;
    const float* ui = u + i * d;
    T* yi = y + m * sy;
    const T* sk = p.skip_is_x ? p.x + m * p.sx : (p.skip ? p.skip + m * p.ss : nullptr);
    for (int64_t c = 0; c < d; ++c) {
      float v = g * s[c] * (ui[c] + (p.bu ? p.bu[c] : 0.f));
      if (sk) v += static_cast<float>(sk[c]);
      yi[c] = static_cast<T>(v);
    }
  }
}

template <typename T>
void forward(const Args<T>& p, float* h_out, T* y, int64_t sy) {
  const std::vector<float> s = scale_vector(p.scale, p.scale_n, p.scale_value, p.d);
  const int64_t blocks = (p.M + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> xbuf(std::is_same_v<T, float> ? 0 : kBlockRows * p.d), abuf(kBlockRows * p.r),
        ubuf(kBlockRows * p.d);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * kBlockRows;
      forward_block(p, s.data(), m0, std::min(kBlockRows, p.M - m0), h_out, y, sy, xbuf, abuf, ubuf);
    }
  });
}

template <typename T>
void backward(const Args<T>& p, const float* h_all, const Needs& n, int64_t groups, T* dx, int64_t sdx, float* dg_row,
              at::Tensor& pwu, at::Tensor& pwd, at::Tensor& pbu, at::Tensor& pbd, at::Tensor& ps) {
  const int64_t d = p.d, r = p.r;
  const std::vector<float> s = scale_vector(p.scale, p.scale_n, p.scale_value, d);
  const int64_t blocks = (p.M + kBlockRows - 1) / kBlockRows;
  const int64_t per_group = (blocks + groups - 1) / groups;
  const bool need_u = n.s || n.g;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> xbuf(std::is_same_v<T, float> ? 0 : kBlockRows * d), gy(kBlockRows * d),
        ubuf(need_u ? kBlockRows * d : 0), a(kBlockRows * r), dgrad(kBlockRows * r), da(kBlockRows * r),
        dxb(n.x ? kBlockRows * d : 0), dyf(kBlockRows * d);
    for (int64_t grp = g0; grp < g1; ++grp) {
      float* wu_acc = n.wu ? pwu.data_ptr<float>() + grp * d * r : nullptr;
      float* wd_acc = n.wd ? pwd.data_ptr<float>() + grp * r * d : nullptr;
      float* bu_acc = n.bu ? pbu.data_ptr<float>() + grp * d : nullptr;
      float* bd_acc = n.bd ? pbd.data_ptr<float>() + grp * r : nullptr;
      float* s_acc = n.s ? ps.data_ptr<float>() + grp * d : nullptr;
      const int64_t b_end = std::min(blocks, (grp + 1) * per_group);
      for (int64_t b = grp * per_group; b < b_end; ++b) {
        const int64_t m0 = b * kBlockRows, rows = std::min(kBlockRows, p.M - m0);
        const float* h = h_all + m0 * r;
        for (int64_t i = 0; i < rows * r; ++i) {
          a[i] = act_fwd(h[i], p.act);
          dgrad[i] = act_grad(h[i], p.act);
        }
        load_rows(p.dy + m0 * p.sdy, p.sdy, rows, d, dyf.data());
        for (int64_t i = 0; i < rows; ++i) {
          const float g = p.g ? p.g[(m0 + i) / p.tokens] : 1.f;
          const float* dyi = dyf.data() + i * d;
          float* gyi = gy.data() + i * d;
          for (int64_t c = 0; c < d; ++c) gyi[c] = dyi[c] * g * s[c];
        }
        gemm_rm(false, false, rows, r, d, gy.data(), d, p.wu, r, 0.f, da.data(), r);  // d_a = gy @ w_up
        if (need_u) {
          gemm_rm(false, true, rows, d, r, a.data(), r, p.wu, r, 0.f, ubuf.data(), d);  // u = a @ w_up^T
          for (int64_t i = 0; i < rows; ++i) {
            const float g = p.g ? p.g[(m0 + i) / p.tokens] : 1.f;
            const float* dyi = dyf.data() + i * d;
            const float* ui = ubuf.data() + i * d;
            float row_sum = 0.f;
            for (int64_t c = 0; c < d; ++c) {
              const float uc = ui[c] + (p.bu ? p.bu[c] : 0.f);
              if (s_acc) s_acc[c] += dyi[c] * g * uc;
              row_sum += dyi[c] * s[c] * uc;
            }
            if (dg_row) dg_row[m0 + i] = row_sum;
          }
        }
        for (int64_t i = 0; i < rows * r; ++i) da[i] *= dgrad[i];  // da now holds d_h
        if (bd_acc)
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t k = 0; k < r; ++k) bd_acc[k] += da[i * r + k];
        if (bu_acc)
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t c = 0; c < d; ++c) bu_acc[c] += gy[i * d + c];
        if (wu_acc) gemm_rm(true, false, d, r, rows, gy.data(), d, a.data(), r, 1.f, wu_acc, r);  // += gy^T a
        if (wd_acc || n.x) {
          if (wd_acc) {
            int64_t ldx;
            const float* xb = rows_f32(p.x + m0 * p.sx, p.sx, rows, d, xbuf, &ldx);
            gemm_rm(true, false, r, d, rows, da.data(), r, xb, ldx, 1.f, wd_acc, d);  // += d_h^T x
          }
          if (n.x) {
            gemm_rm(false, false, rows, d, r, da.data(), r, p.wd, d, 0.f, dxb.data(), d);  // dx = d_h @ w_down
            for (int64_t i = 0; i < rows; ++i) {
              T* o = dx + (m0 + i) * sdx;
              const float* src = dxb.data() + i * d;
              const float* dyi = dyf.data() + i * d;
              for (int64_t c = 0; c < d; ++c) o[c] = static_cast<T>(p.skip_is_x ? src[c] + dyi[c] : src[c]);
            }
          }
        }
      }
    }
  });
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

template <typename T>
Args<T> make_args(const at::Tensor& x, const at::Tensor& wd32, const at::Tensor& wu32,
                  const c10::optional<at::Tensor>& bd32, const c10::optional<at::Tensor>& bu32,
                  const c10::optional<at::Tensor>& scale32, double scale_value,
                  const c10::optional<at::Tensor>& g32, int64_t tokens, int64_t act, bool skip_is_x) {
  Args<T> p{};
  p.x = x.data_ptr<T>();
  p.sx = x.stride(0);
  p.wd = wd32.data_ptr<float>();
  p.wu = wu32.data_ptr<float>();
  p.bd = bd32 ? bd32->data_ptr<float>() : nullptr;
  p.bu = bu32 ? bu32->data_ptr<float>() : nullptr;
  p.scale = scale32 ? scale32->data_ptr<float>() : nullptr;
  p.scale_n = scale32 ? scale32->numel() : 0;
  p.scale_value = static_cast<float>(scale_value);
  p.g = g32 ? g32->data_ptr<float>() : nullptr;
  p.tokens = std::max<int64_t>(tokens, 1);
  p.M = x.size(0);
  p.d = x.size(1);
  p.r = wd32.size(0);
  p.act = static_cast<int>(act);
  p.skip_is_x = skip_is_x;
  return p;
}

c10::optional<at::Tensor> opt_f32(const c10::optional<at::Tensor>& t) {
  if (!t) return c10::nullopt;
  return f32(*t);
}

}  // namespace

void adapter_fwd_cpu(const at::Tensor& x, const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down,
                     const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up,
                     const c10::optional<at::Tensor>& scale, double scale_value, const c10::optional<at::Tensor>& skip,
                     bool skip_is_x, const c10::optional<at::Tensor>& sample_scale, int64_t tokens, int64_t act,
                     at::Tensor& y, at::Tensor& h) {
  if (x.size(0) == 0) return;
  const at::Tensor wd32 = f32(w_down), wu32 = f32(w_up);
  const auto bd32 = opt_f32(b_down), bu32 = opt_f32(b_up), s32 = opt_f32(scale), g32 = opt_f32(sample_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adapter_fwd_cpu", [&] {
    Args<scalar_t> p = make_args<scalar_t>(x, wd32, wu32, bd32, bu32, s32, scale_value, g32, tokens, act, skip_is_x);
    if (skip && !skip_is_x) {
      p.skip = skip->data_ptr<scalar_t>();
      p.ss = skip->stride(0);
    }
    forward(p, h.data_ptr<float>(), y.data_ptr<scalar_t>(), y.stride(0));
  });
}

BackwardRaw adapter_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_down,
                            const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                            const c10::optional<at::Tensor>& b_up, const c10::optional<at::Tensor>& scale,
                            double scale_value, const c10::optional<at::Tensor>& sample_scale, int64_t tokens,
                            int64_t act, bool skip_is_x, const Needs& n) {
  const int64_t M = x.size(0), d = x.size(1), r = w_down.size(0);
  const auto fopt = x.options().dtype(at::kFloat);
  const int64_t blocks = (M + kBlockRows - 1) / kBlockRows;
  // a fixed number of groups (not the thread count) so the rounding is the same on every machine
  const int64_t groups = std::max<int64_t>(1, std::min(blocks, kMaxGroups));
  BackwardRaw raw;
  if (n.x) raw.dx = at::empty({M, d}, x.options());
  if (n.wu) raw.p_wu = at::zeros({groups, d, r}, fopt);
  if (n.wd) raw.p_wd = at::zeros({groups, r, d}, fopt);
  if (n.bu) raw.p_bu = at::zeros({groups, d}, fopt);
  if (n.bd) raw.p_bd = at::zeros({groups, r}, fopt);
  if (n.s) raw.p_s = at::zeros({groups, d}, fopt);
  if (n.g) raw.dg_row = at::zeros({M}, fopt);
  if (M == 0) return raw;
  const at::Tensor wd32 = f32(w_down), wu32 = f32(w_up);
  const auto bd32 = opt_f32(b_down), bu32 = opt_f32(b_up), s32 = opt_f32(scale), g32 = opt_f32(sample_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adapter_bwd_cpu", [&] {
    Args<scalar_t> p = make_args<scalar_t>(x, wd32, wu32, bd32, bu32, s32, scale_value, g32, tokens, act, skip_is_x);
    p.dy = dy.data_ptr<scalar_t>();
    p.sdy = dy.stride(0);
    backward(p, h.data_ptr<float>(), n, groups, n.x ? raw.dx.data_ptr<scalar_t>() : nullptr, n.x ? raw.dx.stride(0) : 0,
             n.g ? raw.dg_row.data_ptr<float>() : nullptr, raw.p_wu, raw.p_wd, raw.p_bu, raw.p_bd, raw.p_s);
  });
  return raw;
}

}  // namespace adapterfuse
