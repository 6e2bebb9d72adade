// Fused CPU implementation of the adapter op (forward and backward), fp32 / fp16 / bf16 with fp32
// accumulation. The math is docs/design.md, Math; the schema is the one in adapterfuse/ops/_common.py.
//
// Why this beats the eager chain: eager writes and re-reads h, u, s*u and the residual sum as separate
// tensors (~7 passes over [M, d]). Here rows are processed in blocks of kBlockRows (128): a block of x,
// its h / a ([128, r]) and its output rows ([128, d], 384 KiB in fp32 for d = 768) stay in L2 (>= 1 MiB
// per core on the machines we target), so DRAM sees one read of x and one write of y. The skinny
// matmuls of a block go straight to the BLAS sgemm that libtorch links (MKL on x86; no dispatcher
// overhead per block), or through at::addmm_out where that symbol is not exported; in the forward with
// r <= cpu::kSkinnyFullRank (8) they are the register-accumulating loops of common/cpu_blocks.h instead, the
// up-projection with its epilogue in one pass per row (16 x 32 rows, d = 768, r = 8, fp32: the call 294-310 ->
// 210-223 us on the 2-core AMD EPYC CI machine).
//
// The scale is folded into the up-projection once per call: ws = s (.) w_up ([d, r]), bs = s (.) b_up
// (except in a forward whose scale has inf / NaN entries: there it is applied after u, as the reference
// does, since inf * 0 inside a folded GEMM sum would give NaN where the reference gives inf).
// Forward, per block:   h = x w_down^T + b_down;   y = skip + g (.) (a ws^T + bs)
//   (y's rows are initialised to skip + g bs and the sgemm accumulates into them with beta = 1; for
//   fp32 that is y itself, so u never exists anywhere as a tensor).
// Backward, per block, with P = dy ws ([rows, r]; this is d_a / g):
//   d_h = g P (.) act'(h);  dx = d_h w_down (+ dy when skip is x);  d_w_down += d_h^T x;  d_b_down += sum d_h
//   R += dy^T (g a)  ([d, r]);  q += sum_m g dy  ([d])
//   d_g[m] = a[m] . P[m] + dy[m] . bs          (= sum_c dy s u without recomputing u)
// and once per call (bindings.cpp finish_backward, shared with the CUDA path):  d_w_up = s (.) R,
//   d_b_up = s (.) q,  d_s[c] = w_up[c] . R[c] + b_up[c] q[c]
//   (d_s = sum_m dy g u expanded through u = a w_up^T + b_up: again no recomputation of u).
// The weight-gradient sums are deterministic: the row blocks are split into a fixed number of groups
// (independent of the thread count), each group accumulates its own fp32 partial in row order, and the
// partials are summed in group order afterwards.
//
// The adapter_ln_dropout variant (docs/design.md, LayerNorm and dropout inside the adapter) adds, per block:
//   input LayerNorm (its weight and bias already folded into w_down / b_down by the caller): the block's rows,
//     in cache, are normalised into a block buffer, x^ = ((x - x0) - (mean - x0)) rstd (mean / variance per row
//     in double, two passes over the cached row; x0 = the row's first element: x - x0 is exact in fp32 where
//     |mean| >> std, so x^ keeps its precision where a rounded fp32 mean would not), and
//     h = x^ w_down^T + b_down; (x0, mean - x0, rstd) per row go to stats. Backward: d_w_down += d_h^T x^, and with d_x^ = d_h w_down,
//     dx = rstd (d_x^ - mean_c(d_x^) - x^ mean_c(d_x^ x^)) (+ dy when the skip is x).
//   dropout on the adapter branch: y = skip + keep (.) (g s u) / (1 - p), keep regenerated from the seed
//     (common/philox.h); the backward uses keep (.) dy / (1 - p) for every adapter term and the raw dy for the
//     skip's.
// DRAM traffic stays one read of x and one write of y (the normalised block never leaves the cache).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "adapter_cpu.h"
#include "common/activations.h"
#include "common/cpu_blocks.h"
#include "common/cpu_prepare.h"
#include "common/philox.h"

namespace adapterfuse {
namespace {

using cpu::gemm_rm;
using cpu::prepare;
using cpu::Prepared;
using cpu::Rows;
using cpu::row_stride;
using cpu::rows_f32;
using cpu::store_rows;

constexpr int64_t kBlockRows = 128;
constexpr int64_t kMaxGroups = 16;  // partial buffers of the weight-gradient reduction

struct Shape {
  int64_t M, d, r, tokens;
  int act;
};

inline float sample_factor(const Prepared& p, const float* g, int64_t m, int64_t tokens) {
  return g ? g[m / tokens] : 1.f;
}

// The variant's per-call state (all off for the plain adapter op).
struct Extra {
  bool ln = false;
  float eps = 0.f;
  float* stats = nullptr;  // [M, 3] fp32 (x0, mean - x0, rstd): written by the forward, read by the backward
  cpu::Dropout drop;
};

Extra make_extra(const LnDropout* e) {
  Extra ex;
  if (e == nullptr) return ex;
  if (e->ln_eps >= 0) {
    ex.ln = true;
    ex.eps = static_cast<float>(e->ln_eps);
    TORCH_CHECK(e->stats.defined() && e->stats.scalar_type() == at::kFloat && e->stats.is_contiguous() &&
                    e->stats.dim() == 2 && e->stats.size(1) == 3,
                "adapterfuse: stats must be a contiguous float32 [M, 3] tensor");
    ex.stats = e->stats.data_ptr<float>();
  }
  if (e->dropout_p > 0) {
    ex.drop.on = true;
    ex.drop.seed = static_cast<uint64_t>(e->seed);
    ex.drop.threshold = static_cast<uint32_t>(std::llround(e->dropout_p * 16777216.0));
    ex.drop.keep_scale = static_cast<float>(1.0 / (1.0 - e->dropout_p));
  }
  return ex;
}

// x^ = ((x - x0) - (mean - x0)) rstd for `rows` cached rows (row stride ldx) into out ([rows, d]); (x0, mean - x0,
// rstd) per row into stats (forward: computed, double accumulation; backward: read, compute = false).
void normalize_rows(const float* x, int64_t ldx, int64_t rows, int64_t d, float eps, float* stats, bool compute,
                    float* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x + i * ldx;
    if (compute) {
      double mean;
      stats[3 * i + 2] = cpu::row_mean_rstd(xi, d, eps, &mean);
      stats[3 * i] = xi[0];
      stats[3 * i + 1] = static_cast<float>(mean - xi[0]);
    }
    const float x0 = stats[3 * i], mean_s = stats[3 * i + 1], rstd = stats[3 * i + 2];
    float* o = out + i * d;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) o[c] = ((xi[c] - x0) - mean_s) * rstd;
  }
}

template <typename T>
void forward(const Shape& sh, const Prepared& pr, Rows<T> x, Rows<T> skip, bool skip_is_x, float* h_out, T* y,
             int64_t sy, const Extra& ex) {
  const int64_t d = sh.d, r = sh.r;
  const float* wd = pr.wd.data_ptr<float>();
  const float* ws = pr.ws.data_ptr<float>();
  const float* bd = pr.bd.defined() ? pr.bd.data_ptr<float>() : nullptr;
  const float* bs = pr.bs.defined() ? pr.bs.data_ptr<float>() : nullptr;
  const float* g = pr.g.defined() ? pr.g.data_ptr<float>() : nullptr;
  const int64_t blocks = (sh.M + kBlockRows - 1) / kBlockRows;
  constexpr bool kF32 = std::is_same_v<T, float>;
  // r <= kSkinnyFullRank: the products are the register-accumulating loops of cpu_blocks.h instead of sgemm (they
  // beat it there: 512 rows, d = 768, r = 8, one AMD EPYC core, down-projection 167 vs 207 us), the up-projection
  // transposed once per call (wst [r, d], 0.7 us at d = 768).
  const bool skinny = r <= cpu::kSkinnyFullRank;
  std::vector<float> wst(skinny ? r * d : 0);
  if (skinny) cpu::transpose_scaled(ws, nullptr, d, r, wst.data());
  // h = src w_down^T ([rows, r]) for `rows` fp32 rows of row stride ld
  const auto down = [&](const float* src, int64_t ld, int64_t rows, float* h) {
    if (skinny) cpu::rows_times_wt(cpu::strided(src, ld), rows, d, wd, r, h);
    else gemm_rm(false, true, rows, r, d, src, ld, wd, d, 0.f, h, r);
  };
  // out (+)= a ws^T over `rows` rows (row stride ldo): added to what out holds (accumulate) or stored
  const auto up = [&](const float* a, int64_t rows, float* out, int64_t ldo, bool accumulate) {
    if (!skinny) {
      gemm_rm(false, true, rows, d, r, a, r, ws, r, accumulate ? 1.f : 0.f, out, ldo);
    } else if (accumulate) {
      cpu::add_rows_times_w(a, rows, r, wst.data(), d, cpu::strided(out, ldo));
    } else {
      cpu::rows_times_w_into(a, rows, r, wst.data(), d, cpu::strided(out, ldo),
                             [](int64_t) -> const float* { return nullptr; }, nullptr, [](int64_t) { return 0.f; });
    }
  };
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> xbuf(kF32 ? 0 : kBlockRows * d), obuf(kF32 ? 0 : kBlockRows * d), abuf(kBlockRows * r),
        nbuf(ex.ln ? kBlockRows * d : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * kBlockRows, rows = std::min(kBlockRows, sh.M - m0);
      int64_t ldx;
      const float* xb = rows_f32(x, m0, rows, d, xbuf, &ldx);
      float* h = h_out + m0 * r;
      if (ex.ln) {  // h = x^ w_down^T: the block normalised in cache
        normalize_rows(xb, ldx, rows, d, ex.eps, ex.stats + 3 * m0, true, nbuf.data());
        down(nbuf.data(), d, rows, h);
      } else {
        down(xb, ldx, rows, h);  // h = x w_down^T
      }
      for (int64_t i = 0; i < rows; ++i) {
        const float gi = sample_factor(pr, g, m0 + i, sh.tokens);
        for (int64_t k = 0; k < r; ++k) {
          const float v = h[i * r + k] + (bd ? bd[k] : 0.f);
          h[i * r + k] = v;
          // g folded into a: (g a) ws^T = g (a ws^T); not when the scale is applied last (below)
          abuf[i * r + k] = (pr.folded ? gi : 1.f) * act_fwd(v, sh.act);
        }
      }
      float* out = kF32 ? reinterpret_cast<float*>(y) + m0 * sy : obuf.data();
      const int64_t ldo = kF32 ? sy : d;
      if (!pr.folded) {  // non-finite scale: out = u = a w_up^T + b_up, then y = skip + g s u per element
        const float* bu = pr.bu.defined() ? pr.bu.data_ptr<float>() : nullptr;
        const float* sc = pr.s.data_ptr<float>();
        for (int64_t i = 0; bu && i < rows; ++i) std::copy(bu, bu + d, out + i * ldo);
        up(abuf.data(), rows, out, ldo, bu != nullptr);
        for (int64_t i = 0; i < rows; ++i) {
          float* o = out + i * ldo;
          const float gi = sample_factor(pr, g, m0 + i, sh.tokens);
          for (int64_t c = 0; c < d; ++c) o[c] = gi * (sc[c] * o[c]);
          if (ex.drop.on) ex.drop.apply_row(o, m0 + i, d);
          if (skip_is_x) {
            for (int64_t c = 0; c < d; ++c) o[c] = xb[i * ldx + c] + o[c];
          } else if (skip.ptr) {
            const T* sk = skip.ptr + (m0 + i) * skip.stride;
            for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(sk[c]) + o[c];
          }
        }
        if constexpr (!kF32) store_rows(out, ldo, y + m0 * sy, sy, rows, d);
        continue;
      }
      if (ex.drop.on) {  // out = (g a) ws^T + g bs, then y = skip + keep (.) out / (1 - p) row by row
        for (int64_t i = 0; bs && i < rows; ++i) {
          const float gi = sample_factor(pr, g, m0 + i, sh.tokens);
          float* o = out + i * ldo;
          for (int64_t c = 0; c < d; ++c) o[c] = gi * bs[c];
        }
        up(abuf.data(), rows, out, ldo, bs != nullptr);
        for (int64_t i = 0; i < rows; ++i) {
          float* o = out + i * ldo;
          ex.drop.apply_row(o, m0 + i, d);
          if (skip_is_x) {
            const float* sk = xb + i * ldx;
            for (int64_t c = 0; c < d; ++c) o[c] += sk[c];
          } else if (skip.ptr) {
            const T* sk = skip.ptr + (m0 + i) * skip.stride;
            for (int64_t c = 0; c < d; ++c) o[c] += static_cast<float>(sk[c]);
          }
        }
        if constexpr (!kF32) store_rows(out, ldo, y + m0 * sy, sy, rows, d);
        continue;
      }
      if (skinny && (kF32 || skip_is_x || !skip.ptr)) {
        // one pass per row and column tile: out = skip (x's fp32 rows, or skip's in place: fp32 here) + g bs + (g a) ws^T
        const T* sk = skip_is_x ? nullptr : skip.ptr;
        const auto init = [&](int64_t i) -> const float* {
          if (skip_is_x) return xb + i * ldx;
          if constexpr (kF32) return sk ? sk + (m0 + i) * skip.stride : nullptr;
          return nullptr;
        };
        cpu::rows_times_w_into(abuf.data(), rows, r, wst.data(), d, cpu::strided(out, ldo), init, bs,
                               [&](int64_t i) { return sample_factor(pr, g, m0 + i, sh.tokens); });
        if constexpr (!kF32) store_rows(out, ldo, y + m0 * sy, sy, rows, d);
        continue;
      }
      // out rows = skip + g bs, then out += (g a) ws^T
      const bool init = bs != nullptr || skip.ptr != nullptr || skip_is_x;
      for (int64_t i = 0; init && i < rows; ++i) {
        float* o = out + i * ldo;
        const float gi = sample_factor(pr, g, m0 + i, sh.tokens);
        if (skip_is_x) {  // x's rows are already fp32 in xb (phase 1): no second read-and-convert
          const float* sk = xb + i * ldx;
          if (bs) for (int64_t c = 0; c < d; ++c) o[c] = sk[c] + gi * bs[c];
          else for (int64_t c = 0; c < d; ++c) o[c] = sk[c];
        } else if (skip.ptr) {
          const T* sk = skip.ptr + (m0 + i) * skip.stride;
          if (bs) for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(sk[c]) + gi * bs[c];
          else for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(sk[c]);
        } else {
          for (int64_t c = 0; c < d; ++c) o[c] = gi * bs[c];
        }
      }
      up(abuf.data(), rows, out, ldo, init);
      if constexpr (!kF32) store_rows(out, ldo, y + m0 * sy, sy, rows, d);
    }
  });
}

struct Accumulators {  // fp32 partials, [groups, ...] each, or undefined
  at::Tensor R, q, wd, bd;
};

template <typename T>
void backward(const Shape& sh, const Prepared& pr, Rows<T> x, Rows<T> dy, const float* h_all, const Needs& n,
              bool skip_is_x, int64_t groups, T* dx, int64_t sdx, float* dg_row, Accumulators& acc,
              const Extra& ex) {
  const int64_t d = sh.d, r = sh.r;
  const float* wd = pr.wd.data_ptr<float>();
  const float* ws = pr.ws.data_ptr<float>();
  const float* bs = pr.bs.defined() ? pr.bs.data_ptr<float>() : nullptr;
  const float* g = pr.g.defined() ? pr.g.data_ptr<float>() : nullptr;
  const bool need_R = acc.R.defined(), need_q = acc.q.defined();
  const bool need_dh = n.x || acc.wd.defined() || acc.bd.defined();
  const int64_t blocks = (sh.M + kBlockRows - 1) / kBlockRows;
  const int64_t per_group = (blocks + groups - 1) / groups;
  constexpr bool kF32 = std::is_same_v<T, float>;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> xbuf(kF32 ? 0 : kBlockRows * d), dybuf(kF32 ? 0 : kBlockRows * d),
        dxbuf(kF32 || !n.x ? 0 : kBlockRows * d), ga(kBlockRows * r), P(kBlockRows * r),
        dh(kBlockRows * r), dydrop(ex.drop.on ? kBlockRows * d : 0),
        nbuf(ex.ln ? kBlockRows * d : 0), dxf(ex.ln && n.x ? kBlockRows * d : 0);
    for (int64_t grp = g0; grp < g1; ++grp) {
      float* R = need_R ? acc.R.data_ptr<float>() + grp * d * r : nullptr;
      float* q = need_q ? acc.q.data_ptr<float>() + grp * d : nullptr;
      float* wd_acc = acc.wd.defined() ? acc.wd.data_ptr<float>() + grp * r * d : nullptr;
      float* bd_acc = acc.bd.defined() ? acc.bd.data_ptr<float>() + grp * r : nullptr;
      for (int64_t b = grp * per_group; b < std::min(blocks, (grp + 1) * per_group); ++b) {
        const int64_t m0 = b * kBlockRows, rows = std::min(kBlockRows, sh.M - m0);
        int64_t lddy_raw;
        const float* dy_raw = rows_f32(dy, m0, rows, d, dybuf, &lddy_raw);
        // dyb: the adapter branch's dy (keep (.) dy / (1 - p) under dropout); dy_raw: the skip's
        const float* dyb = dy_raw;
        int64_t lddy = lddy_raw;
        if (ex.drop.on) {
          for (int64_t i = 0; i < rows; ++i) ex.drop.apply_row(dy_raw + i * lddy_raw, dydrop.data() + i * d, m0 + i, d);
          dyb = dydrop.data();
          lddy = d;
        }
        gemm_rm(false, false, rows, r, d, dyb, lddy, ws, r, 0.f, P.data(), r);  // P = dy ws
        const float* h = h_all + m0 * r;
        for (int64_t i = 0; i < rows; ++i) {
          const float gi = sample_factor(pr, g, m0 + i, sh.tokens);
          float dot = cpu::backward_row(h + i * r, P.data() + i * r, gi, r, sh.act, ga.data() + i * r,
                                        dh.data() + i * r);
          if (dg_row) {
            if (bs) {
              const float* dyi = dyb + i * lddy;
              for (int64_t c = 0; c < d; ++c) dot += dyi[c] * bs[c];
            }
            dg_row[m0 + i] = dot;
          }
          if (q) {
            const float* dyi = dyb + i * lddy;
            for (int64_t c = 0; c < d; ++c) q[c] += gi * dyi[c];
          }
        }
        if (R) gemm_rm(true, false, d, r, rows, dyb, lddy, ga.data(), r, 1.f, R, r);  // R += dy^T (g a)
        if (!need_dh) continue;
        if (bd_acc)
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t k = 0; k < r; ++k) bd_acc[k] += dh[i * r + k];
        const float* xhat = nullptr;  // the LayerNorm variant's x^ block (from x and the saved stats)
        if (ex.ln && (wd_acc || n.x)) {
          int64_t ldx;
          const float* xb = rows_f32(x, m0, rows, d, xbuf, &ldx);
          normalize_rows(xb, ldx, rows, d, ex.eps, ex.stats + 3 * m0, false, nbuf.data());
          xhat = nbuf.data();
        }
        if (wd_acc) {
          int64_t ldx = d;
          const float* xb = xhat ? xhat : rows_f32(x, m0, rows, d, xbuf, &ldx);
          gemm_rm(true, false, r, d, rows, dh.data(), r, xb, ldx, 1.f, wd_acc, d);  // += d_h^T x (or x^)
        }
        if (n.x && xhat) {  // d_x^ = d_h w_down, then the LayerNorm's backward row by row (+ dy)
          gemm_rm(false, false, rows, d, r, dh.data(), r, wd, d, 0.f, dxf.data(), d);
          float* out = kF32 ? reinterpret_cast<float*>(dx) + m0 * sdx : dxbuf.data();
          const int64_t ldo = kF32 ? sdx : d;
          for (int64_t i = 0; i < rows; ++i) {
            const float* gx = dxf.data() + i * d;
            const float* xh = xhat + i * d;
            double m1 = 0, m2 = 0;
#pragma omp simd reduction(+ : m1, m2)
            for (int64_t c = 0; c < d; ++c) {
              m1 += gx[c];
              m2 += static_cast<double>(gx[c]) * xh[c];
            }
            const float a1 = static_cast<float>(m1 / d), a2 = static_cast<float>(m2 / d);
            const float rstd = ex.stats[3 * (m0 + i) + 2];
            float* o = out + i * ldo;
            for (int64_t c = 0; c < d; ++c) o[c] = rstd * (gx[c] - a1 - xh[c] * a2);
            if (skip_is_x) {
              const float* dyi = dy_raw + i * lddy_raw;
              for (int64_t c = 0; c < d; ++c) o[c] += dyi[c];
            }
          }
          if constexpr (!kF32) store_rows(out, ldo, dx + m0 * sdx, sdx, rows, d);
        } else if (n.x) {  // dx = d_h w_down (+ dy): fp32 writes straight into dx
          float* out = kF32 ? reinterpret_cast<float*>(dx) + m0 * sdx : dxbuf.data();
          const int64_t ldo = kF32 ? sdx : d;
          if (skip_is_x)
            for (int64_t i = 0; i < rows; ++i) std::copy(dy_raw + i * lddy_raw, dy_raw + i * lddy_raw + d, out + i * ldo);
          gemm_rm(false, false, rows, d, r, dh.data(), r, wd, d, skip_is_x ? 1.f : 0.f, out, ldo);
          if constexpr (!kF32) store_rows(out, ldo, dx + m0 * sdx, sdx, rows, d);
        }
      }
    }
  });
}

}  // namespace

void adapter_fwd_cpu(const at::Tensor& x, const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down,
                     const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up,
                     const c10::optional<at::Tensor>& scale, double scale_value, const c10::optional<at::Tensor>& skip,
                     bool skip_is_x, const c10::optional<at::Tensor>& sample_scale, int64_t tokens, int64_t act,
                     at::Tensor& y, at::Tensor& h, const LnDropout* extra) {
  if (x.size(0) == 0) return;
  const Extra ex = make_extra(extra);
  const Prepared pr = prepare(w_down, b_down, w_up, b_up, scale, scale_value, sample_scale, true);
  const Shape sh{x.size(0), x.size(1), w_down.size(0), std::max<int64_t>(tokens, 1), static_cast<int>(act)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adapter_fwd_cpu", [&] {
    Rows<scalar_t> xr{x.data_ptr<scalar_t>(), row_stride(x)}, sr;
    if (skip && !skip_is_x) sr = Rows<scalar_t>{skip->data_ptr<scalar_t>(), row_stride(*skip)};
    forward(sh, pr, xr, sr, skip_is_x, h.data_ptr<float>(), y.data_ptr<scalar_t>(), row_stride(y), ex);
  });
}

BackwardRaw adapter_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_down,
                            const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                            const c10::optional<at::Tensor>& b_up, const c10::optional<at::Tensor>& scale,
                            double scale_value, const c10::optional<at::Tensor>& sample_scale, int64_t tokens,
                            int64_t act, bool skip_is_x, const Needs& n, const LnDropout* extra) {
  const int64_t M = x.size(0), d = x.size(1), r = w_down.size(0);
  const Extra ex = make_extra(extra);
  const auto fopt = x.options().dtype(at::kFloat);
  const int64_t blocks = (M + kBlockRows - 1) / kBlockRows;
  // a fixed number of groups (not the thread count), so the rounding is the same on every machine
  const int64_t groups = std::max<int64_t>(1, std::min(blocks, kMaxGroups));
  const Prepared pr = prepare(w_down, b_down, w_up, b_up, scale, scale_value, sample_scale, false);
  Accumulators acc;
  if (n.wu || n.s) acc.R = at::zeros({groups, d, r}, fopt);
  if (n.bu || (n.s && pr.bu.defined())) acc.q = at::zeros({groups, d}, fopt);
  if (n.wd) acc.wd = at::zeros({groups, r, d}, fopt);
  if (n.bd) acc.bd = at::zeros({groups, r}, fopt);
  BackwardRaw raw;
  if (n.x) raw.dx = at::empty({M, d}, x.options());
  if (n.g) raw.dg_row = at::zeros({M}, fopt);
  if (M > 0) {
    const Shape sh{M, d, r, std::max<int64_t>(tokens, 1), static_cast<int>(act)};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adapter_bwd_cpu", [&] {
      backward(sh, pr, Rows<scalar_t>{x.data_ptr<scalar_t>(), row_stride(x)},
               Rows<scalar_t>{dy.data_ptr<scalar_t>(), row_stride(dy)}, h.data_ptr<float>(), n, skip_is_x, groups,
               n.x ? raw.dx.data_ptr<scalar_t>() : nullptr, n.x ? raw.dx.stride(0) : 0,
               n.g ? raw.dg_row.data_ptr<float>() : nullptr, acc, ex);
    });
  }
  // the group partials; bindings.cpp sums them in order and applies the scale (finish_backward)
  raw.p_wd = acc.wd;
  raw.p_bd = acc.bd;
  raw.p_R = acc.R;
  raw.p_q = acc.q;
  return raw;
}

}  // namespace adapterfuse
