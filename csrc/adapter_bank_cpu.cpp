// Fused CPU implementation of the adapter bank (docs/design.md, Adapter bank): A adapters stacked in one set
// of weights, each row of x run through the adapter its index names (-1: none, y = skip), every adapter of
// the batch in ONE call per direction, whatever A and however the ids are mixed.
//
// Grouping: a stable counting sort of the index (O(M), no comparison sort) gives each adapter's rows as one
// contiguous segment of `order`; the segments are cut into blocks of kBlockRows rows. A block belongs to one
// adapter, so its math is exactly the single-adapter math of adapter_cpu.cpp with that adapter's weights
// (same folding of the scale, same fp32 accumulation), on rows gathered from wherever they sit in x:
//   forward, per block:  h = x w_down[a]^T + b_down[a];  y = skip + g (.) (act(h) ws[a]^T + bs[a])
//   backward, per block: P = dy ws[a];  d_h = g P (.) act'(h);  dx = d_h w_down[a] (+ dy if skip is x)
//                        R[a] += dy^T (g a);  q[a] += sum g dy;  d_w_down[a] += d_h^T x;  d_b_down[a] += sum d_h
//                        d_g[m] = a[m] . P[m] + dy[m] . bs[a]
// with ws[a] = s[a] (.) w_up[a], bs[a] = s[a] (.) b_up[a] folded once per call; bindings.cpp turns R, q into
// d_w_up, d_b_up, d_scale exactly as for one adapter (finish_scale, shared).
// Rows whose index is -1 get y = skip (or 0), h = 0, dx = dy (skip is x) or 0, d_g = 0; an adapter no row uses
// gets exactly zero gradients.
// Parallelism: the forward runs every block of every adapter in parallel. The backward runs adapters in
// parallel and each adapter's blocks in order on one thread, so its weight-gradient sums are deterministic
// (the same rounding on every machine) without partial buffers per block.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "adapter_bank_cpu.h"
#include "common/activations.h"
#include "common/cpu_blocks.h"

namespace adapterfuse {
namespace {

using cpu::gather_rows_f32;
using cpu::gemm_rm;
using cpu::Rows;
using cpu::row_stride;
using cpu::scatter_rows;

constexpr int64_t kBlockRows = 128;

// The rows of each adapter, contiguous: order[seg[a + 1] .. seg[a + 2]) are adapter a's rows in ascending
// order; order[0 .. seg[1]) the rows without an adapter. Validates every id (ValueError otherwise).
struct Grouping {
  std::vector<int64_t> order, seg;  // seg has A + 2 entries
};

Grouping group_rows(const at::Tensor& index, int64_t A) {
  const int64_t M = index.numel();
  const int64_t* idx = index.data_ptr<int64_t>();
  Grouping g;
  g.seg.assign(A + 2, 0);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t v = idx[m];
    TORCH_CHECK_VALUE(v >= -1 && v < A, "adapterfuse: adapter_index holds ", v, " at row ", m,
                      "; ids must be in [-1, ", A, ") (-1: no adapter)");
    ++g.seg[v + 2];
  }
  for (int64_t a = 1; a < A + 2; ++a) g.seg[a] += g.seg[a - 1];
  g.order.resize(M);
  std::vector<int64_t> next(g.seg.begin(), g.seg.end() - 1);
  for (int64_t m = 0; m < M; ++m) g.order[next[idx[m] + 1]++] = m;
  return g;
}

// Per-call fp32 weights of the whole bank, the scale folded into the up-projection.
struct BankPrepared {
  at::Tensor wd, wu, ws, bd, bu, bs, s, g;  // [A,r,d] [A,d,r] [A,d,r] [A,r] [A,d] [A,d] [A,d] [B]
  bool folded = true;  // false when the scale has inf / NaN entries (the forward then applies it after u)
};

// Only the adapters some row uses are converted and folded (the rest of s, ws, bs stays unset: never read),
// so the per-call cost grows with the adapters in the batch, not with the bank.
BankPrepared prepare_bank(const at::Tensor& w_down, const OptTensor& b_down, const at::Tensor& w_up,
                          const OptTensor& b_up, const OptTensor& scale, double scale_value,
                          const OptTensor& sample_scale, bool for_forward, const std::vector<int64_t>& used) {
  BankPrepared p;
  const int64_t A = w_up.size(0), d = w_up.size(1), r = w_up.size(2);
  auto f32 = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous(); };
  p.wd = f32(w_down);
  p.wu = f32(w_up);
  p.s = at::zeros({A, d}, w_up.options().dtype(at::kFloat));  // zero for unused adapters: their R, q are 0
  float* s = p.s.data_ptr<float>();
  at::Tensor sc;
  if (scale) sc = f32(*scale);  // [A] (one scalar per adapter) or [A, d] (channel scaling)
  const float* src = scale ? sc.data_ptr<float>() : nullptr;
  const bool per_adapter = scale && sc.dim() == 1;
  bool finite = true, unit = true;
  for (const int64_t a : used) {
    for (int64_t c = 0; c < d; ++c) {
      const float v = !src ? static_cast<float>(scale_value) : (per_adapter ? src[a] : src[a * d + c]);
      s[a * d + c] = v;
      finite = finite && std::isfinite(v);
      unit = unit && v == 1.f;
    }
  }
  p.folded = !for_forward || finite;
  if (b_down) p.bd = f32(*b_down);
  if (b_up) p.bu = f32(*b_up);
  p.ws = p.wu;
  p.bs = p.bu;
  if (p.folded && !unit) {
    p.ws = at::empty({A, d, r}, p.wu.options());
    if (b_up) p.bs = at::empty({A, d}, p.bu.options());
    const float* wu = p.wu.data_ptr<float>();
    float* ws = p.ws.data_ptr<float>();
    at::parallel_for(0, static_cast<int64_t>(used.size()), 4, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t a = used[u];
        for (int64_t i = a * d; i < (a + 1) * d; ++i)
          for (int64_t k = 0; k < r; ++k) ws[i * r + k] = wu[i * r + k] * s[i];
        if (b_up) {
          const float* bu = p.bu.data_ptr<float>();
          float* bs = p.bs.data_ptr<float>();
          for (int64_t i = a * d; i < (a + 1) * d; ++i) bs[i] = bu[i] * s[i];
        }
      }
    });
  }
  if (sample_scale) p.g = f32(*sample_scale);
  return p;
}

std::vector<int64_t> used_adapters(const Grouping& gr, int64_t A) {
  std::vector<int64_t> used;
  for (int64_t a = 0; a < A; ++a)
    if (gr.seg[a + 2] > gr.seg[a + 1]) used.push_back(a);
  return used;
}

inline const float* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

struct BankShape {
  int64_t M, d, r, A, tokens;
  int act;
};

template <typename T>
void bank_forward(const BankShape& sh, const BankPrepared& pr, const Grouping& gr, Rows<T> x, Rows<T> skip,
                  bool skip_is_x, float* h_out, T* y, int64_t sy) {
  const int64_t d = sh.d, r = sh.r;
  const float* g = ptr_or_null(pr.g);
  // rows without an adapter: y = skip (or 0), h = 0
  const int64_t n_none = gr.seg[1];
  at::parallel_for(0, n_none, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = gr.order[i];
      T* o = y + m * sy;
      const T* sk = skip_is_x ? x.ptr + m * x.stride : (skip.ptr ? skip.ptr + m * skip.stride : nullptr);
      for (int64_t c = 0; c < d; ++c) o[c] = sk ? sk[c] : static_cast<T>(0.f);
      std::fill(h_out + m * r, h_out + (m + 1) * r, 0.f);
    }
  });
  // the work items: (adapter, first row of the block in `order`)
  std::vector<std::pair<int64_t, int64_t>> items;
  for (int64_t a = 0; a < sh.A; ++a)
    for (int64_t i = gr.seg[a + 1]; i < gr.seg[a + 2]; i += kBlockRows) items.emplace_back(a, i);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> xb(kBlockRows * d), ob(kBlockRows * d), hb(kBlockRows * r), ab(kBlockRows * r);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t a = items[w].first, i0 = items[w].second;
      const int64_t n = std::min(kBlockRows, gr.seg[a + 2] - i0);
      const int64_t* rows = gr.order.data() + i0;
      const float* wd = pr.wd.data_ptr<float>() + a * r * d;
      const float* ws = pr.ws.data_ptr<float>() + a * d * r;
      const float* bd = pr.bd.defined() ? pr.bd.data_ptr<float>() + a * r : nullptr;
      const float* bs = pr.bs.defined() ? pr.bs.data_ptr<float>() + a * d : nullptr;
      // fp32 rows that are consecutive in x (sorted or per-sample ids: the common case) are read and written in
      // place, as the single-adapter path does; any other block is gathered into xb / scattered from ob
      const float* xp = xb.data();
      float* op = ob.data();
      int64_t ldx = d, ldo = d;
      bool direct = false;
      if constexpr (std::is_same_v<T, float>) {
        direct = rows[n - 1] - rows[0] == n - 1;
        if (direct) {
          xp = x.ptr + rows[0] * x.stride;
          ldx = x.stride;
          op = y + rows[0] * sy;
          ldo = sy;
        }
      }
      if (!direct) gather_rows_f32(x, rows, n, d, xb.data());
      gemm_rm(false, true, n, r, d, xp, ldx, wd, d, 0.f, hb.data(), r);  // h = x w_down[a]^T
      for (int64_t i = 0; i < n; ++i) {
        const int64_t m = rows[i];
        const float gi = g ? g[m / sh.tokens] : 1.f;
        for (int64_t k = 0; k < r; ++k) {
          const float v = hb[i * r + k] + (bd ? bd[k] : 0.f);
          h_out[m * r + k] = v;
          ab[i * r + k] = (pr.folded ? gi : 1.f) * act_fwd(v, sh.act);
        }
      }
      // ob = skip + g bs (folded) or b_up (not folded), then += (g a) ws^T
      for (int64_t i = 0; i < n; ++i) {
        float* o = op + i * ldo;
        const float gi = g ? g[rows[i] / sh.tokens] : 1.f;
        if (!pr.folded) {
          for (int64_t c = 0; c < d; ++c) o[c] = bs ? bs[c] : 0.f;
        } else {  // branch-free inner loops (vectorised): the skip row, then g bs
          if (skip_is_x) {
            std::copy(xp + i * ldx, xp + i * ldx + d, o);
          } else if (skip.ptr) {
            const T* sko = skip.ptr + rows[i] * skip.stride;
            for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(sko[c]);
          } else {
            std::fill(o, o + d, 0.f);
          }
          if (bs)
            for (int64_t c = 0; c < d; ++c) o[c] += gi * bs[c];
        }
      }
      gemm_rm(false, true, n, d, r, ab.data(), r, ws, r, 1.f, op, ldo);
      if (!pr.folded) {  // non-finite scale: ob = u; y = skip + g s u elementwise, as the reference does
        const float* sc = pr.s.data_ptr<float>() + a * d;
        for (int64_t i = 0; i < n; ++i) {
          float* o = op + i * ldo;
          const float gi = g ? g[rows[i] / sh.tokens] : 1.f;
          const T* sko = skip.ptr ? skip.ptr + rows[i] * skip.stride : nullptr;
          for (int64_t c = 0; c < d; ++c) {
            const float sk = skip_is_x ? xp[i * ldx + c] : (sko ? static_cast<float>(sko[c]) : 0.f);
            o[c] = sk + gi * (sc[c] * o[c]);
          }
        }
      }
      if (!direct) scatter_rows(ob.data(), n, d, rows, y, sy);
    }
  });
}

template <typename T>
void bank_backward(const BankShape& sh, const BankPrepared& pr, const Grouping& gr, Rows<T> x, Rows<T> dy,
                   const float* h_all, const Needs& n, bool skip_is_x, T* dx, int64_t sdx, float* dg_row,
                   BankRaw& raw) {
  const int64_t d = sh.d, r = sh.r;
  const float* g = ptr_or_null(pr.g);
  float* R_all = raw.R.defined() ? raw.R.data_ptr<float>() : nullptr;
  float* q_all = raw.q.defined() ? raw.q.data_ptr<float>() : nullptr;
  float* wd_all = raw.wd.defined() ? raw.wd.data_ptr<float>() : nullptr;
  float* bd_all = raw.bd.defined() ? raw.bd.data_ptr<float>() : nullptr;
  const bool need_dh = n.x || wd_all || bd_all;
  // rows without an adapter: dx = dy (skip is x) or 0, d_g = 0
  const int64_t n_none = gr.seg[1];
  at::parallel_for(0, n_none, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = gr.order[i];
      if (dx) {
        T* o = dx + m * sdx;
        const T* src = dy.ptr + m * dy.stride;
        for (int64_t c = 0; c < d; ++c) o[c] = skip_is_x ? src[c] : static_cast<T>(0.f);
      }
      if (dg_row) dg_row[m] = 0.f;
    }
  });
  const std::vector<int64_t> used = used_adapters(gr, sh.A);
  at::parallel_for(0, static_cast<int64_t>(used.size()), 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> dyb(kBlockRows * d), xb(kBlockRows * d), dxb(kBlockRows * d), P(kBlockRows * r),
        ga(kBlockRows * r), dh(kBlockRows * r);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t a = used[u];
      const float* wd = pr.wd.data_ptr<float>() + a * r * d;
      const float* ws = pr.ws.data_ptr<float>() + a * d * r;
      const float* bs = pr.bs.defined() ? pr.bs.data_ptr<float>() + a * d : nullptr;
      float* R = R_all ? R_all + a * d * r : nullptr;
      float* q = q_all ? q_all + a * d : nullptr;
      float* wd_acc = wd_all ? wd_all + a * r * d : nullptr;
      float* bd_acc = bd_all ? bd_all + a * r : nullptr;
      for (int64_t i0 = gr.seg[a + 1]; i0 < gr.seg[a + 2]; i0 += kBlockRows) {
        const int64_t nb = std::min(kBlockRows, gr.seg[a + 2] - i0);
        const int64_t* rows = gr.order.data() + i0;
        gather_rows_f32(dy, rows, nb, d, dyb.data());
        gemm_rm(false, false, nb, r, d, dyb.data(), d, ws, r, 0.f, P.data(), r);  // P = dy ws[a]
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t m = rows[i];
          const float gi = g ? g[m / sh.tokens] : 1.f;
          float dot = cpu::backward_row(h_all + m * r, P.data() + i * r, gi, r, sh.act, ga.data() + i * r,
                                        dh.data() + i * r);
          const float* dyi = dyb.data() + i * d;
          if (dg_row) {
            if (bs)
              for (int64_t c = 0; c < d; ++c) dot += dyi[c] * bs[c];
            dg_row[m] = dot;
          }
          if (q)
            for (int64_t c = 0; c < d; ++c) q[c] += gi * dyi[c];
        }
        if (R) gemm_rm(true, false, d, r, nb, dyb.data(), d, ga.data(), r, 1.f, R, r);  // R += dy^T (g a)
        if (!need_dh) continue;
        if (bd_acc)
          for (int64_t i = 0; i < nb; ++i)
            for (int64_t k = 0; k < r; ++k) bd_acc[k] += dh[i * r + k];
        if (wd_acc) {
          gather_rows_f32(x, rows, nb, d, xb.data());
          gemm_rm(true, false, r, d, nb, dh.data(), r, xb.data(), d, 1.f, wd_acc, d);  // += d_h^T x
        }
        if (n.x) {  // dx = d_h w_down[a] (+ dy)
          if (skip_is_x) std::copy(dyb.begin(), dyb.begin() + nb * d, dxb.begin());
          gemm_rm(false, false, nb, d, r, dh.data(), r, wd, d, skip_is_x ? 1.f : 0.f, dxb.data(), d);
          scatter_rows(dxb.data(), nb, d, rows, dx, sdx);
        }
      }
    }
  });
}

}  // namespace

void adapter_bank_fwd_cpu(const at::Tensor& x, const at::Tensor& w_down, const OptTensor& b_down,
                          const at::Tensor& w_up, const OptTensor& b_up, const OptTensor& scale, double scale_value,
                          const OptTensor& skip, bool skip_is_x, const OptTensor& sample_scale, int64_t tokens,
                          int64_t act, const at::Tensor& index, at::Tensor& y, at::Tensor& h) {
  const int64_t A = w_down.size(0);
  const Grouping gr = group_rows(index, A);  // validates the ids even when M == 0 rows need work
  if (x.size(0) == 0) return;
  const BankPrepared pr = prepare_bank(w_down, b_down, w_up, b_up, scale, scale_value, sample_scale, true,
                                       used_adapters(gr, A));
  const BankShape sh{x.size(0), x.size(1), w_down.size(1), A, std::max<int64_t>(tokens, 1), static_cast<int>(act)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adapter_bank_fwd_cpu", [&] {
    Rows<scalar_t> xr{x.data_ptr<scalar_t>(), row_stride(x)}, sr;
    if (skip && !skip_is_x) sr = Rows<scalar_t>{skip->data_ptr<scalar_t>(), row_stride(*skip)};
    bank_forward(sh, pr, gr, xr, sr, skip_is_x, h.data_ptr<float>(), y.data_ptr<scalar_t>(), row_stride(y));
  });
}

BankRaw adapter_bank_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_down,
                             const OptTensor& b_down, const at::Tensor& w_up, const OptTensor& b_up,
                             const OptTensor& scale, double scale_value, const OptTensor& sample_scale, int64_t tokens,
                             int64_t act, bool skip_is_x, const Needs& n, const at::Tensor& index) {
  const int64_t M = x.size(0), d = x.size(1), A = w_down.size(0), r = w_down.size(1);
  const Grouping gr = group_rows(index, A);
  const std::vector<int64_t> used = used_adapters(gr, A);
  const BankPrepared pr = prepare_bank(w_down, b_down, w_up, b_up, scale, scale_value, sample_scale, false, used);
  const auto fopt = x.options().dtype(at::kFloat);
  BankRaw raw;
  raw.s = pr.s;
  if (n.wu || n.s) raw.R = at::zeros({A, d, r}, fopt);
  if (n.bu || (n.s && pr.bu.defined())) raw.q = at::zeros({A, d}, fopt);
  if (n.wd) raw.wd = at::zeros({A, r, d}, fopt);
  if (n.bd) raw.bd = at::zeros({A, r}, fopt);
  if (n.x) raw.dx = at::empty({M, d}, x.options());
  if (n.g) raw.dg_row = at::zeros({M}, fopt);
  if (M > 0) {
    const BankShape sh{M, d, r, A, std::max<int64_t>(tokens, 1), static_cast<int>(act)};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adapter_bank_bwd_cpu", [&] {
      bank_backward(sh, pr, gr, Rows<scalar_t>{x.data_ptr<scalar_t>(), row_stride(x)},
                    Rows<scalar_t>{dy.data_ptr<scalar_t>(), row_stride(dy)}, h.data_ptr<float>(), n, skip_is_x,
                    n.x ? raw.dx.data_ptr<scalar_t>() : nullptr, n.x ? raw.dx.stride(0) : 0,
                    n.g ? raw.dg_row.data_ptr<float>() : nullptr, raw);
    });
  }
  return raw;
}

}  // namespace adapterfuse
