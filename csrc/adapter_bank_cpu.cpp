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
// Products: for r <= kSkinnyRank (cpu_blocks.h) vectorised loops over d on the rows where they sit in x, y, dy,
// dx (fp32: no gather, no scatter, any row order), since one sgemm call per block has a fixed cost that dominates
// a segment of a few rows (a serving batch with 64 adapters has ~8 rows per adapter); larger r: sgemm per block.
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
// Blocks of fewer rows take the skinny loops (r <= kSkinnyRank), and so do full fp32 blocks whose rows are
// scattered over x (read in place instead of gathered); full blocks of consecutive rows sgemm, which measured
// faster there (a bank of one adapter over 512 rows: 345 us with loops, ~250 us with sgemm per 128-row block).
constexpr int64_t kSkinnyBlockRows = 128;

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

// Per-call fp32 views of the bank's weights and the per-adapter scale s [A, d]. The scale is folded into each
// adapter's up-projection per work item (AdapterUp, in a per-thread buffer): folded [A, d, r] copies of the whole
// bank were allocated per call, and their page faults cost more than the serving-size math (A = 64, d = 768).
struct BankPrepared {
  at::Tensor wd, wu, bd, bu, s, g;  // [A,r,d] [A,d,r] [A,r] [A,d] [A,d] [B]
  bool folded = true;  // false when the scale has inf / NaN entries (the forward then applies it after u)
  bool unit = true;    // every used adapter's scale is 1: nothing to fold
};

// One adapter's scaled up-projection, ws = s (.) w_up[a] ([d, r], or transposed [r, d] for the skinny loops) and
// bs = s (.) b_up[a], in per-thread buffers; the unscaled weights themselves where nothing is folded (unit or
// non-finite scale) and no transpose is asked for. Reloaded only when the adapter changes.
struct AdapterUp {
  std::vector<float> wbuf, bbuf;
  const float* ws = nullptr;
  const float* bs = nullptr;
  int64_t a = -1;
  bool t = false;

  void load(const BankPrepared& pr, int64_t adapter, int64_t d, int64_t r, bool transposed) {
    if (adapter == a && transposed == t) return;
    a = adapter;
    t = transposed;
    const float* wu = pr.wu.data_ptr<float>() + a * d * r;
    const float* bu = pr.bu.defined() ? pr.bu.data_ptr<float>() + a * d : nullptr;
    const bool fold = pr.folded && !pr.unit;
    const float* sc = pr.s.data_ptr<float>() + a * d;
    ws = wu;
    bs = bu;
    if (fold || transposed) {
      wbuf.resize(d * r);
      for (int64_t c = 0; c < d; ++c) {
        const float f = fold ? sc[c] : 1.f;
        for (int64_t k = 0; k < r; ++k) wbuf[transposed ? k * d + c : c * r + k] = wu[c * r + k] * f;
      }
      ws = wbuf.data();
    }
    if (fold && bu) {
      bbuf.resize(d);
      for (int64_t c = 0; c < d; ++c) bbuf[c] = bu[c] * sc[c];
      bs = bbuf.data();
    }
  }
};

// Only the adapters some row uses get their scale (the rest of s stays zero: never read, their R, q are 0), so the
// per-call cost grows with the adapters in the batch, not with the bank.
BankPrepared prepare_bank(const at::Tensor& w_down, const OptTensor& b_down, const at::Tensor& w_up,
                          const OptTensor& b_up, const OptTensor& scale, double scale_value,
                          const OptTensor& sample_scale, bool for_forward, const std::vector<int64_t>& used) {
  BankPrepared p;
  const int64_t A = w_up.size(0), d = w_up.size(1);
  auto f32 = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous(); };
  p.wd = f32(w_down);
  p.wu = f32(w_up);
  p.s = at::zeros({A, d}, w_up.options().dtype(at::kFloat));
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
  p.unit = unit;
  if (b_down) p.bd = f32(*b_down);
  if (b_up) p.bu = f32(*b_up);
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
  const bool skinny = r <= cpu::kSkinnyRank;
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
    AdapterUp up;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t a = items[w].first, i0 = items[w].second;
      const int64_t n = std::min(kBlockRows, gr.seg[a + 2] - i0);
      const int64_t* rows = gr.order.data() + i0;
      const float* wd = pr.wd.data_ptr<float>() + a * r * d;
      // skinny loops: a short block, or (fp32, r <= 32) a full one whose rows are scattered over x (the loops
      // read them in place; gathering and scattering 128 rows cost more than sgemm saved)
      const bool scattered = rows[n - 1] - rows[0] != n - 1;
      const bool skinny_b = skinny && (n < kSkinnyBlockRows || (std::is_same_v<T, float> && scattered));
      up.load(pr, a, d, r, skinny_b);
      const float* ws = up.ws;  // [d, r], or [r, d] for the skinny loops
      const float* bs = up.bs;
      const float* bd = pr.bd.defined() ? pr.bd.data_ptr<float>() + a * r : nullptr;
      // Where the block's rows are read and written. fp32: in x and y themselves (in place) when the products
      // are skinny loops (any row order) or the rows are consecutive in x (sorted or per-sample ids: the common
      // case; sgemm wants one row stride); otherwise gathered into xb as fp32 and scattered back from ob.
      bool in_place = false;
      const float* xbase = xb.data();
      float* obase = ob.data();
      int64_t ldx = d, ldo = d;
      if constexpr (std::is_same_v<T, float>) {
        in_place = skinny_b || !scattered;
        if (in_place) {
          xbase = x.ptr;
          ldx = x.stride;
          obase = y;
          ldo = sy;
        }
      }
      const auto xrow = [&](int64_t i) { return xbase + (in_place ? rows[i] : i) * ldx; };
      const auto orow = [&](int64_t i) { return obase + (in_place ? rows[i] : i) * ldo; };
      if (!in_place) gather_rows_f32(x, rows, n, d, xb.data());
      if (skinny_b) cpu::rows_times_wt(xrow, n, d, wd, r, hb.data());  // h = x w_down[a]^T
      else gemm_rm(false, true, n, r, d, xrow(0), ldx, wd, d, 0.f, hb.data(), r);
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
        float* o = orow(i);
        const float gi = g ? g[rows[i] / sh.tokens] : 1.f;
        if (!pr.folded) {
          for (int64_t c = 0; c < d; ++c) o[c] = bs ? bs[c] : 0.f;
        } else {  // branch-free inner loops (vectorised): the skip row, then g bs
          if (skip_is_x) {
            std::copy(xrow(i), xrow(i) + d, o);
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
      if (skinny_b) cpu::add_rows_times_w(ab.data(), n, r, ws, d, orow);
      else gemm_rm(false, true, n, d, r, ab.data(), r, ws, r, 1.f, orow(0), ldo);
      if (!pr.folded) {  // non-finite scale: ob = u; y = skip + g s u elementwise, as the reference does
        const float* sc = pr.s.data_ptr<float>() + a * d;
        for (int64_t i = 0; i < n; ++i) {
          float* o = orow(i);
          const float gi = g ? g[rows[i] / sh.tokens] : 1.f;
          const T* sko = skip.ptr ? skip.ptr + rows[i] * skip.stride : nullptr;
          for (int64_t c = 0; c < d; ++c) {
            const float sk = skip_is_x ? xrow(i)[c] : (sko ? static_cast<float>(sko[c]) : 0.f);
            o[c] = sk + gi * (sc[c] * o[c]);
          }
        }
      }
      if (!in_place) scatter_rows(ob.data(), n, d, rows, y, sy);
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
  const bool skinny = r <= cpu::kSkinnyRank;
  at::parallel_for(0, static_cast<int64_t>(used.size()), 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> dyb(kBlockRows * d), xb(kBlockRows * d), dxb(kBlockRows * d), P(kBlockRows * r),
        ga(kBlockRows * r), dh(kBlockRows * r), RT(skinny && R_all ? r * d : 0);
    AdapterUp up;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t a = used[u];
      const float* wd = pr.wd.data_ptr<float>() + a * r * d;
      float* R = R_all ? R_all + a * d * r : nullptr;
      float* q = q_all ? q_all + a * d : nullptr;
      float* wd_acc = wd_all ? wd_all + a * r * d : nullptr;
      float* bd_acc = bd_all ? bd_all + a * r : nullptr;
      if (skinny && R) std::fill(RT.begin(), RT.end(), 0.f);  // R^T [r, d], summed row by row, transposed below
      for (int64_t i0 = gr.seg[a + 1]; i0 < gr.seg[a + 2]; i0 += kBlockRows) {
        const int64_t nb = std::min(kBlockRows, gr.seg[a + 2] - i0);
        const int64_t* rows = gr.order.data() + i0;
        // fp32 with skinny loops: dy, x and dx rows used where they sit; otherwise gathered / scattered (sgemm)
        const bool scattered = rows[nb - 1] - rows[0] != nb - 1;
        const bool skinny_b = skinny && (nb < kSkinnyBlockRows || (std::is_same_v<T, float> && scattered));
        up.load(pr, a, d, r, skinny_b);
        const float* ws = up.ws;  // [d, r], or [r, d] for the skinny loops
        const float* bs = up.bs;
        bool in_place = false;
        const float *dybase = dyb.data(), *xbase = xb.data();
        float* dxbase = dxb.data();
        int64_t lddy = d, ldx = d, lddx = d;
        if constexpr (std::is_same_v<T, float>) {
          in_place = skinny_b;
          if (in_place) {
            dybase = dy.ptr, lddy = dy.stride, xbase = x.ptr, ldx = x.stride;
            if (dx) dxbase = dx, lddx = sdx;
          }
        }
        const auto dyrow = [&](int64_t i) { return dybase + (in_place ? rows[i] : i) * lddy; };
        const auto xrow = [&](int64_t i) { return xbase + (in_place ? rows[i] : i) * ldx; };
        const auto dxrow = [&](int64_t i) { return dxbase + (in_place ? rows[i] : i) * lddx; };
        if (!in_place) gather_rows_f32(dy, rows, nb, d, dyb.data());
        if (skinny_b) cpu::rows_times_wt(dyrow, nb, d, ws, r, P.data());
        else gemm_rm(false, false, nb, r, d, dyb.data(), d, ws, r, 0.f, P.data(), r);  // P = dy ws[a]
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t m = rows[i];
          const float gi = g ? g[m / sh.tokens] : 1.f;
          float dot = cpu::backward_row(h_all + m * r, P.data() + i * r, gi, r, sh.act, ga.data() + i * r,
                                        dh.data() + i * r);
          const float* dyi = dyrow(i);
          if (dg_row) {
            if (bs)
              for (int64_t c = 0; c < d; ++c) dot += dyi[c] * bs[c];
            dg_row[m] = dot;
          }
          if (q)
            for (int64_t c = 0; c < d; ++c) q[c] += gi * dyi[c];
        }
        if (R) {  // R += dy^T (g a)
          if (skinny_b) cpu::add_coef_t_rows(ga.data(), nb, r, dyrow, d, RT.data());
          else if (skinny) gemm_rm(true, false, r, d, nb, ga.data(), r, dyb.data(), d, 1.f, RT.data(), d);
          else gemm_rm(true, false, d, r, nb, dyb.data(), d, ga.data(), r, 1.f, R, r);
        }
        if (!need_dh) continue;
        if (bd_acc)
          for (int64_t i = 0; i < nb; ++i)
            for (int64_t k = 0; k < r; ++k) bd_acc[k] += dh[i * r + k];
        if (wd_acc) {  // += d_h^T x
          if (!in_place) gather_rows_f32(x, rows, nb, d, xb.data());
          if (skinny_b) cpu::add_coef_t_rows(dh.data(), nb, r, xrow, d, wd_acc);
          else gemm_rm(true, false, r, d, nb, dh.data(), r, xb.data(), d, 1.f, wd_acc, d);
        }
        if (n.x) {  // dx = d_h w_down[a] (+ dy)
          for (int64_t i = 0; i < nb && (skip_is_x || skinny_b); ++i) {  // (sgemm with beta 0 needs no zeros)
            if (skip_is_x) std::copy(dyrow(i), dyrow(i) + d, dxrow(i));
            else std::fill(dxrow(i), dxrow(i) + d, 0.f);
          }
          if (skinny_b) cpu::add_rows_times_w(dh.data(), nb, r, wd, d, dxrow);
          else gemm_rm(false, false, nb, d, r, dh.data(), r, wd, d, skip_is_x ? 1.f : 0.f, dxb.data(), d);
          if (!in_place) scatter_rows(dxb.data(), nb, d, rows, dx, sdx);
        }
      }
      if (skinny && R)
        for (int64_t c = 0; c < d; ++c)
          for (int64_t k = 0; k < r; ++k) R[c * r + k] = RT[k * d + c];
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
