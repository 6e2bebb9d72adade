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
// with ws[a] = s[a] (.) w_up[a], bs[a] = s[a] (.) b_up[a] folded per adapter (AdapterUp); R[a], q[a] become d_w_up,
// d_b_up, d_scale per adapter at the end of its rows, with the algebra of bindings.cpp finish_scale
// (finish_adapter_grads).
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
#include "common/cpu_prepare.h"

namespace adapterfuse {
namespace {

using cpu::gather_rows_f32;
using cpu::gemm_rm;
using cpu::Rows;
using cpu::row_stride;
using cpu::scatter_rows;

constexpr int64_t kBlockRows = 128;
// Blocks of fewer rows take the skinny loops (r <= kSkinnyRank), and so do full fp32 blocks whose rows are
// scattered over x (read in place instead of gathered) and, for r <= kSkinnyFullRank, every full fp32 block (the
// loops beat sgemm there: a bank of one adapter over 512 rows, d = 768, r = 8: ~160 us vs ~225 us). Full blocks of
// consecutive rows with larger r sgemm (at r = 32 the loops measured 1.4x slower: 637 vs 448 us).
constexpr int64_t kSkinnyBlockRows = 128;

// The rows of each adapter, contiguous: order[seg[a + 1] .. seg[a + 2]) are adapter a's rows in ascending
// order; order[0 .. seg[1]) the rows without an adapter. index is [M] (one id per row) or [B] (one id per sample
// of `tokens` rows: expanded here, so the caller makes no [M] copy). Validates every id (the same ValueError as
// functional.fused_adapter_bank's check) before anything is computed.
struct Grouping {
  std::vector<int64_t> order, seg;  // seg has A + 2 entries
};

Grouping group_rows(const at::Tensor& index, int64_t A, int64_t M, int64_t tokens) {
  const int64_t n_ids = index.numel();
  const int64_t per = n_ids == M ? 1 : tokens;  // rows per id
  const int64_t* idx = index.data_ptr<int64_t>();
  Grouping g;
  g.seg.assign(A + 2, 0);
  for (int64_t j = 0; j < n_ids; ++j) {
    const int64_t v = idx[j];
    TORCH_CHECK_VALUE(v >= -1 && v < A, "adapter_index holds ", v, " (at ", per == 1 ? "row " : "sample ", j,
                      "); ids must be in [-1, A) = [-1, ", A, ") (-1: no adapter)");
    g.seg[v + 2] += per;
  }
  for (int64_t a = 1; a < A + 2; ++a) g.seg[a] += g.seg[a - 1];
  g.order.resize(M);
  std::vector<int64_t> next(g.seg.begin(), g.seg.end() - 1);
  for (int64_t j = 0; j < n_ids; ++j) {
    int64_t& pos = next[idx[j] + 1];
    for (int64_t m = j * per; m < (j + 1) * per; ++m) g.order[pos++] = m;
  }
  return g;
}

// Per-call fp32 views of the bank's weights and its scale, read in place: the scale is folded into each adapter's
// up-projection per work item (AdapterUp, in a per-thread buffer). Folded [A, d, r] copies of the whole bank were
// allocated per call, and their page faults cost more than the serving-size math (A = 64, d = 768); so did an
// [A, d] copy of the scale (zero-filled, then filled per used adapter: 4 % of a serving-size forward at A = 64).
struct BankPrepared {
  at::Tensor wd, wu, bd, bu, sc, g;  // [A,r,d] [A,d,r] [A,r] [A,d] ([A,d] | [A] | undefined) [B]
  const float* scp = nullptr;        // sc's data: [A, d] (channel) or [A]; null: every adapter's scale is `value`
  // wu's layout: each adapter's [d, r] block row-major (contiguous), or (wu_t) stored as its transpose, [r, d]
  // rows: the layout AdapterBank keeps (bank_up_major), which the skinny loops read as it is, with no transpose
  bool wu_t = false;
  bool channel = false;
  float value = 1.f;
  bool folded = true;  // false when a used adapter's scale has inf / NaN entries (the forward applies it after u)
  bool unit = true;    // every used adapter's scale is 1: nothing to fold

  // adapter a's scale over the d channels: its row of an [A, d] scale, or buf filled with its one value
  const float* scale_row(int64_t a, int64_t d, std::vector<float>& buf) const {
    if (channel) return scp + a * d;
    buf.assign(d, scp ? scp[a] : value);
    return buf.data();
  }
};

// One adapter's scaled up-projection, ws = s (.) w_up[a] ([d, r], or transposed [r, d] for the skinny loops) and
// bs = s (.) b_up[a], in per-thread buffers; the unscaled weights themselves where nothing is folded (unit or
// non-finite scale) and no transpose is asked for; s = its scale row. Reloaded only when the adapter changes.
struct AdapterUp {
  std::vector<float> wbuf, bbuf, sbuf;
  const float* ws = nullptr;
  const float* bs = nullptr;
  const float* s = nullptr;
  // w_up stored [r, d] (wu_t), asked for transposed: ws is the stored, unscaled w_up[a], and the skinny loops apply
  // the scale per column on the fly: cs = s (null when nothing is folded), braw = b_up[a] unscaled (bs is still
  // s (.) b_up, for the backward's d_g and the two-pass forward). No per-adapter copy at all.
  const float* cs = nullptr;
  const float* braw = nullptr;
  int64_t a = -1;
  bool t = false;
  bool rd = false;  // ws is [r, d] (asked for transposed, or the bank stores w_up that way: BankPrepared::wu_t)

  void load(const BankPrepared& pr, int64_t adapter, int64_t d, int64_t r, bool transposed) {
    if (adapter == a && transposed == t) return;
    a = adapter;
    t = transposed;
    rd = transposed || pr.wu_t;
    const float* wu = pr.wu.data_ptr<float>() + a * d * r;  // [d, r], or [r, d] (wu_t)
    const float* bu = pr.bu.defined() ? pr.bu.data_ptr<float>() + a * d : nullptr;
    const bool fold = pr.folded && !pr.unit;
    const float* sc = s = pr.scale_row(a, d, sbuf);
    ws = wu;
    bs = braw = bu;
    cs = nullptr;
    if (pr.wu_t) {  // already [r, d]: the scale applied by the skinny loops, or folded into a copy for sgemm
      if (fold && transposed) {
        cs = sc;
      } else if (fold) {
        wbuf.resize(d * r);
        for (int64_t k = 0; k < r; ++k)
          for (int64_t c = 0; c < d; ++c) wbuf[k * d + c] = wu[k * d + c] * sc[c];
        ws = wbuf.data();
      }
    } else if (fold || transposed) {
      wbuf.resize(d * r);
      if (transposed) {
        cpu::transpose_scaled(wu, fold ? sc : nullptr, d, r, wbuf.data());
      } else {
        for (int64_t c = 0; c < d; ++c)
          for (int64_t k = 0; k < r; ++k) wbuf[c * r + k] = wu[c * r + k] * sc[c];
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

// Whether the used adapters' scales are all finite and all 1 (cpu::ScaleFlags: vectorised over the bit patterns),
// so the per-call cost grows with the adapters in the batch, not with the bank.
BankPrepared prepare_bank(const at::Tensor& w_down, const OptTensor& b_down, const at::Tensor& w_up,
                          const OptTensor& b_up, const OptTensor& scale, double scale_value,
                          const OptTensor& sample_scale, bool for_forward, const std::vector<int64_t>& used) {
  BankPrepared p;
  const int64_t d = w_up.size(1);
  auto f32 = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous(); };
  p.wd = f32(w_down);
  if (bank_up_major(w_up)) {  // kept as it is (fp32: .to keeps the strides of a dense tensor)
    p.wu = w_up.scalar_type() == at::kFloat ? w_up : w_up.to(at::kFloat);
    p.wu_t = bank_up_major(p.wu);
  }
  if (!p.wu_t) p.wu = f32(w_up);
  cpu::ScaleFlags flags;
  if (scale) {  // [A] (one scalar per adapter) or [A, d] (channel scaling)
    p.sc = f32(*scale);
    p.scp = p.sc.data_ptr<float>();
    p.channel = p.sc.dim() == 2;
    for (const int64_t a : used) flags.scan(p.channel ? p.scp + a * d : p.scp + a, p.channel ? d : 1);
  } else {
    p.value = static_cast<float>(scale_value);
    if (!used.empty()) flags.scan(&p.value, 1);
  }
  p.folded = !for_forward || flags.finite;
  p.unit = flags.unit;
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

// One work item: n <= kBlockRows rows of adapter a, order[i0 .. i0 + n). Skinny loops run a block of fewer rows
// than kSkinnyBlockRows, or (fp32) a full one whose rows are scattered over x (read in place; gathering and
// scattering 128 rows cost more than sgemm saved), when r <= kSkinnyRank; such blocks are cut into items of at
// most kSkinnyItemRows rows (the loops have no per-call cost, and small items balance the threads). Full blocks of
// consecutive rows stay whole for sgemm.
struct BankItem {
  int64_t a, i0, n;
  bool skinny, scattered;
};
constexpr int64_t kSkinnyItemRows = 32;

std::vector<BankItem> bank_items(const Grouping& gr, int64_t A, int64_t r, bool fp32) {
  const bool skinny_rank = r <= cpu::kSkinnyRank;
  std::vector<BankItem> items;
  for (int64_t a = 0; a < A; ++a) {
    for (int64_t i = gr.seg[a + 1]; i < gr.seg[a + 2]; i += kBlockRows) {
      const int64_t n = std::min(kBlockRows, gr.seg[a + 2] - i);
      const int64_t* rows = gr.order.data() + i;
      const bool scattered = rows[n - 1] - rows[0] != n - 1;
      const bool sk = skinny_rank && (n < kSkinnyBlockRows || (fp32 && (scattered || r <= cpu::kSkinnyFullRank)));
      if (!sk) {
        items.push_back({a, i, n, false, scattered});
        continue;
      }
      for (int64_t j = 0; j < n; j += kSkinnyItemRows) {
        const int64_t nj = std::min(kSkinnyItemRows, n - j);
        items.push_back({a, i + j, nj, true, rows[j + nj - 1] - rows[j] != nj - 1});
      }
    }
  }
  return items;
}

// Item bounds of `parts` contiguous runs with about equal rows: run t is items[bounds[t] .. bounds[t + 1]).
// (at::parallel_for splits a range evenly by count; adapters' segments are uneven, e.g. per-sample ids.)
// whole_adapters: runs start only where the adapter changes (the backward's per-adapter sums).
std::vector<int64_t> split_by_rows(const std::vector<BankItem>& items, int64_t parts, bool whole_adapters = false) {
  int64_t total = 0;
  for (const BankItem& it : items) total += it.n;
  parts = std::max<int64_t>(1, std::min<int64_t>(parts, static_cast<int64_t>(items.size())));
  std::vector<int64_t> bounds(1, 0);
  int64_t done = 0, t = 0;
  for (int64_t w = 0; w < static_cast<int64_t>(items.size()); ++w) {
    // item w goes to the run its middle row falls in (or its adapter's run)
    if (!(whole_adapters && w > 0 && items[w].a == items[w - 1].a))
      t = std::min(parts - 1, (2 * done + items[w].n) * parts / std::max<int64_t>(1, 2 * total));
    while (static_cast<int64_t>(bounds.size()) <= t) bounds.push_back(w);
    done += items[w].n;
  }
  bounds.push_back(static_cast<int64_t>(items.size()));
  return bounds;
}

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
  // The work items: blocks of one adapter's rows (see BankItem), in adapter order, split between the threads by
  // rows (each thread a contiguous run of items, so it reloads an adapter's up-projection only where the adapter
  // changes).
  const std::vector<BankItem> items = bank_items(gr, sh.A, r, std::is_same_v<T, float>);
  const std::vector<int64_t> bounds = split_by_rows(items, at::get_num_threads());
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> xb, ob, hb(kBlockRows * r), ab(kBlockRows * r);  // xb, ob: only for gathered blocks
    AdapterUp up;
    for (int64_t w = bounds[t0]; w < bounds[t1]; ++w) {
      const BankItem& it = items[w];
      const int64_t a = it.a, n = it.n;
      const int64_t* rows = gr.order.data() + it.i0;
      const float* wd = pr.wd.data_ptr<float>() + a * r * d;
      up.load(pr, a, d, r, it.skinny);
      const float* ws = up.ws;  // [d, r], or [r, d] for the skinny loops
      const float* bs = up.bs;
      const float* bd = pr.bd.defined() ? pr.bd.data_ptr<float>() + a * r : nullptr;
      // Where the block's rows are read and written. fp32: in x and y themselves (in place) when the products
      // are skinny loops (any row order) or the rows are consecutive in x (sorted or per-sample ids: the common
      // case; sgemm wants one row stride); otherwise gathered into xb as fp32 and scattered back from ob.
      bool in_place = false;
      const float* xbase = nullptr;
      float* obase = nullptr;
      int64_t ldx = d, ldo = d;
      if constexpr (std::is_same_v<T, float>) {
        in_place = it.skinny || !it.scattered;
        if (in_place) {
          xbase = x.ptr;
          ldx = x.stride;
          obase = y;
          ldo = sy;
        }
      }
      if (!in_place) {
        xb.resize(kBlockRows * d);
        ob.resize(kBlockRows * d);
        xbase = xb.data();
        obase = ob.data();
        gather_rows_f32(x, rows, n, d, xb.data());
      }
      const auto xrow = [&](int64_t i) { return xbase + (in_place ? rows[i] : i) * ldx; };
      const auto orow = [&](int64_t i) { return obase + (in_place ? rows[i] : i) * ldo; };
      const auto g_of = [&](int64_t i) { return g ? g[rows[i] / sh.tokens] : 1.f; };
      if (it.skinny) cpu::rows_times_wt(xrow, n, d, wd, r, hb.data());  // h = x w_down[a]^T
      else gemm_rm(false, true, n, r, d, xrow(0), ldx, wd, d, 0.f, hb.data(), r);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t m = rows[i];
        const float gi = g_of(i);
        for (int64_t k = 0; k < r; ++k) {
          const float v = hb[i * r + k] + (bd ? bd[k] : 0.f);
          h_out[m * r + k] = v;
          ab[i * r + k] = (pr.folded ? gi : 1.f) * act_fwd(v, sh.act);
        }
      }
      // o = skip + g bs + (g a) ws^T (folded), or o = b_up + a w_up^T (not folded; the scale comes after)
      const T* sk_ptr = skip_is_x ? nullptr : skip.ptr;
      if (it.skinny && pr.folded && (skip_is_x || !sk_ptr || std::is_same_v<T, float>)) {
        // one pass per row: the skip row (x's row, or skip's in place: fp32 here) is the initial value
        const auto init = [&](int64_t i) -> const float* {
          if (skip_is_x) return xrow(i);
          if constexpr (std::is_same_v<T, float>) return sk_ptr ? sk_ptr + rows[i] * skip.stride : nullptr;
          return nullptr;
        };
        cpu::rows_times_w_into(ab.data(), n, r, ws, d, orow, init, up.cs ? up.braw : bs, g_of, up.cs);
      } else {
        for (int64_t i = 0; i < n; ++i) {
          float* o = orow(i);
          const float gi = g_of(i);
          if (!pr.folded) {
            for (int64_t c = 0; c < d; ++c) o[c] = bs ? bs[c] : 0.f;
          } else {  // branch-free inner loops (vectorised): the skip row, then g bs
            if (skip_is_x) {
              std::copy(xrow(i), xrow(i) + d, o);
            } else if (sk_ptr) {
              const T* sko = sk_ptr + rows[i] * skip.stride;
              for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(sko[c]);
            } else {
              std::fill(o, o + d, 0.f);
            }
            if (bs)
              for (int64_t c = 0; c < d; ++c) o[c] += gi * bs[c];
          }
        }
        if (it.skinny) cpu::add_rows_times_w(ab.data(), n, r, ws, d, orow, up.cs);
        else if (up.rd) gemm_rm(false, false, n, d, r, ab.data(), r, ws, d, 1.f, orow(0), ldo);
        else gemm_rm(false, true, n, d, r, ab.data(), r, ws, r, 1.f, orow(0), ldo);
      }
      if (!pr.folded) {  // non-finite scale: ob = u; y = skip + g s u elementwise, as the reference does
        const float* sc = up.s;
        for (int64_t i = 0; i < n; ++i) {
          float* o = orow(i);
          const float gi = g_of(i);
          const T* sko = sk_ptr ? sk_ptr + rows[i] * skip.stride : nullptr;
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

// The end of one adapter's backward, on the thread that summed it (per adapter, so no pass over the whole
// [A, d, r] bank: at A = 64 torch's R * s and (w_up * R).sum(-1) on the bank cost more than the kernel), from the
// unscaled sums R [d, r] and q [d]: d_s[c] = sum_k w_up[c, k] R[c, k] + b_up[c] q[c] (the scale's gradient per
// channel; bindings.cpp sums it over d for an [A] scale), then d_w_up = s (.) R and d_b_up = s (.) q in place.
// rt: R is R^T [r, d] and w_up is stored [r, d] per adapter (BankPrepared::wu_t) — the same sums, in the same
// order over k, vectorised over c.
void finish_adapter_grads(const BankPrepared& pr, const Needs& n, int64_t a, int64_t d, int64_t r, float* R, bool rt,
                          float* q, float* ds, std::vector<float>& sbuf) {
  const float* s = pr.scale_row(a, d, sbuf);
  if (ds) {
    const float* wu = pr.wu.data_ptr<float>() + a * d * r;
    const float* bu = pr.bu.defined() ? pr.bu.data_ptr<float>() + a * d : nullptr;
    if (rt) {
      std::fill(ds, ds + d, 0.f);
      for (int64_t k = 0; k < r; ++k)
        for (int64_t c = 0; c < d; ++c) ds[c] += wu[k * d + c] * R[k * d + c];
      if (bu)
        for (int64_t c = 0; c < d; ++c) ds[c] += bu[c] * q[c];
    } else {
      for (int64_t c = 0; c < d; ++c) {
        float v = 0.f;
        for (int64_t k = 0; k < r; ++k) v += wu[c * r + k] * R[c * r + k];
        ds[c] = bu ? v + bu[c] * q[c] : v;
      }
    }
  }
  if (n.wu && rt)
    for (int64_t k = 0; k < r; ++k)
      for (int64_t c = 0; c < d; ++c) R[k * d + c] *= s[c];
  else if (n.wu)
    for (int64_t c = 0; c < d; ++c)
      for (int64_t k = 0; k < r; ++k) R[c * r + k] *= s[c];
  if (n.bu)
    for (int64_t c = 0; c < d; ++c) q[c] *= s[c];
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
  float* ds_all = raw.ds.defined() ? raw.ds.data_ptr<float>() : nullptr;
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
  // The same items as the forward; each adapter's items run in order on one thread (split by rows at adapter
  // boundaries only), so its weight-gradient sums have one fixed order whatever the thread count.
  const std::vector<BankItem> items = bank_items(gr, sh.A, r, std::is_same_v<T, float>);
  const std::vector<int64_t> bounds = split_by_rows(items, at::get_num_threads(), /*whole_adapters=*/true);
  const bool skinny = r <= cpu::kSkinnyRank;
  // R is summed as R^T [r, d] (row by row, the skinny loops' form): in a per-thread buffer, transposed into R's
  // [d, r] block when the adapter is done; or, with w_up stored [r, d] per adapter (raw.rt: R laid out like it),
  // straight into R's block, with no transpose
  const bool rt_in_place = raw.rt || !skinny;  // (larger r sums R [d, r] with sgemm unless raw.rt)
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> dyb, xb, dxb, P(kBlockRows * r), ga(kBlockRows * r), dh(kBlockRows * r),
        RT(!rt_in_place && R_all ? r * d : 0), sbuf;  // dyb, xb, dxb: only for gathered blocks
    AdapterUp up;
    const auto finish_adapter = [&](int64_t a) {
      if (a < 0) return;
      float* R = R_all ? R_all + a * d * r : nullptr;
      if (R && !rt_in_place) cpu::transpose_scaled(RT.data(), nullptr, r, d, R);  // R^T [r, d] -> R [d, r]
      finish_adapter_grads(pr, n, a, d, r, R, raw.rt, q_all ? q_all + a * d : nullptr,
                           ds_all ? ds_all + a * d : nullptr, sbuf);
    };
    int64_t cur = -1;
    for (int64_t w = bounds[t0]; w < bounds[t1]; ++w) {
      const BankItem& it = items[w];
      const int64_t a = it.a, nb = it.n;
      if (a != cur) {  // the adapter's sums start at zero (their buffers are uninitialised)
        finish_adapter(cur);
        cur = a;
        if (!rt_in_place && R_all) std::fill(RT.begin(), RT.end(), 0.f);
        if (rt_in_place && R_all) std::fill(R_all + a * d * r, R_all + (a + 1) * d * r, 0.f);
        if (q_all) std::fill(q_all + a * d, q_all + (a + 1) * d, 0.f);
        if (wd_all) std::fill(wd_all + a * r * d, wd_all + (a + 1) * r * d, 0.f);
        if (bd_all) std::fill(bd_all + a * r, bd_all + (a + 1) * r, 0.f);
      }
      const float* wd = pr.wd.data_ptr<float>() + a * r * d;
      float* R = R_all ? R_all + a * d * r : nullptr;
      float* q = q_all ? q_all + a * d : nullptr;
      float* wd_acc = wd_all ? wd_all + a * r * d : nullptr;
      float* bd_acc = bd_all ? bd_all + a * r : nullptr;
      const int64_t* rows = gr.order.data() + it.i0;
      up.load(pr, a, d, r, it.skinny);
      const float* ws = up.ws;  // [d, r], or [r, d] for the skinny loops
      const float* bs = up.bs;
      // fp32: dy, x and dx rows used where they sit (skinny loops: any order; sgemm: consecutive rows);
      // otherwise gathered as fp32 and dx scattered back
      const bool in_place = std::is_same_v<T, float> && (it.skinny || !it.scattered);
      const float *dybase = nullptr, *xbase = nullptr;
      float* dxbase = nullptr;
      int64_t lddy = d, ldx = d, lddx = d;
      if constexpr (std::is_same_v<T, float>) {
        if (in_place) {
          dybase = dy.ptr, lddy = dy.stride, xbase = x.ptr, ldx = x.stride;
          if (dx) dxbase = dx, lddx = sdx;
        }
      }
      if (!in_place) {
        dyb.resize(kBlockRows * d);
        dybase = dyb.data();
        gather_rows_f32(dy, rows, nb, d, dyb.data());
      }
      const auto dyrow = [&](int64_t i) { return dybase + (in_place ? rows[i] : i) * lddy; };
      const auto xrow = [&](int64_t i) { return xbase + (in_place ? rows[i] : i) * ldx; };
      const auto dxrow = [&](int64_t i) { return dxbase + (in_place ? rows[i] : i) * lddx; };
      if (it.skinny) cpu::rows_times_wt(dyrow, nb, d, ws, r, P.data(), up.cs);
      else if (up.rd) gemm_rm(false, true, nb, r, d, dyrow(0), lddy, ws, d, 0.f, P.data(), r);  // P = dy ws[a]
      else gemm_rm(false, false, nb, r, d, dyrow(0), lddy, ws, r, 0.f, P.data(), r);
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
      if (R) {  // R += dy^T (g a), as R^T [r, d] (RT, or R itself with raw.rt) or R [d, r] (larger r)
        float* acc_t = raw.rt ? R : RT.data();
        if (!raw.rt && !skinny) gemm_rm(true, false, d, r, nb, dyrow(0), lddy, ga.data(), r, 1.f, R, r);
        else if (it.skinny) cpu::add_coef_t_rows(ga.data(), nb, r, dyrow, d, acc_t);
        else gemm_rm(true, false, r, d, nb, ga.data(), r, dyrow(0), lddy, 1.f, acc_t, d);
      }
      if (!need_dh) continue;
      if (bd_acc)
        for (int64_t i = 0; i < nb; ++i)
          for (int64_t k = 0; k < r; ++k) bd_acc[k] += dh[i * r + k];
      if (wd_acc) {  // += d_h^T x
        if (!in_place) {
          xb.resize(kBlockRows * d);
          xbase = xb.data();
          gather_rows_f32(x, rows, nb, d, xb.data());
        }
        if (it.skinny) cpu::add_coef_t_rows(dh.data(), nb, r, xrow, d, wd_acc);
        else gemm_rm(true, false, r, d, nb, dh.data(), r, xrow(0), ldx, 1.f, wd_acc, d);
      }
      if (n.x) {  // dx = d_h w_down[a] (+ dy)
        if (!in_place) {
          dxb.resize(kBlockRows * d);
          dxbase = dxb.data();
        }
        if (it.skinny) {
          cpu::rows_times_w_into(dh.data(), nb, r, wd, d, dxrow,
                                 [&](int64_t i) -> const float* { return skip_is_x ? dyrow(i) : nullptr; }, nullptr,
                                 [](int64_t) { return 0.f; });
        } else {
          for (int64_t i = 0; i < nb && skip_is_x; ++i) std::copy(dyrow(i), dyrow(i) + d, dxrow(i));
          gemm_rm(false, false, nb, d, r, dh.data(), r, wd, d, skip_is_x ? 1.f : 0.f, dxrow(0), lddx);
        }
        if (!in_place) scatter_rows(dxb.data(), nb, d, rows, dx, sdx);
      }
    }
    finish_adapter(cur);
  });
}

}  // namespace

void adapter_bank_fwd_cpu(const at::Tensor& x, const at::Tensor& w_down, const OptTensor& b_down,
                          const at::Tensor& w_up, const OptTensor& b_up, const OptTensor& scale, double scale_value,
                          const OptTensor& skip, bool skip_is_x, const OptTensor& sample_scale, int64_t tokens,
                          int64_t act, const at::Tensor& index, at::Tensor& y, at::Tensor& h) {
  const int64_t A = w_down.size(0);
  const Grouping gr = group_rows(index, A, x.size(0), tokens);  // validates the ids even when no row needs work
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
                             int64_t act, bool skip_is_x, const Needs& n, const at::Tensor& index, bool packed) {
  const int64_t M = x.size(0), d = x.size(1), A = w_down.size(0), r = w_down.size(1);
  const Grouping gr = group_rows(index, A, M, tokens);
  const std::vector<int64_t> used = used_adapters(gr, A);
  const BankPrepared pr = prepare_bank(w_down, b_down, w_up, b_up, scale, scale_value, sample_scale, false, used);
  const auto fopt = x.options().dtype(at::kFloat);
  BankRaw raw;  // per adapter: written by the adapter's thread if a row uses it, else zeroed here
  // packed (the eager path; a custom op's outputs may not alias, so not there): the weight gradients are views of
  // ONE allocation. Freed together they leave one free block the size of the largest allocation malloc has seen,
  // which glibc's dynamic mmap / trim thresholds keep for the next step; as five blocks (1.5 MiB each for w_down
  // and w_up at A = 64, d = 768, r = 8) the freed heap top passed the trim threshold, went back to the system
  // every step, and the next step page-faulted all of it in again (measured: 833 -> 280 minor faults per
  // training step, bank backward 1.69 -> ~1.1 ms).
  // (what is not returned as it is, R and q as scratch for d_s alone, d_s of an [A] scale (summed over d), stays
  // separate: no returned gradient keeps it alive)
  const bool want_R = n.wu || n.s, want_q = n.bu || (n.s && pr.bu.defined());
  const int64_t sizes[5] = {want_R ? A * d * r : 0, want_q ? A * d : 0, n.s ? A * d : 0, n.wd ? A * r * d : 0,
                            n.bd ? A * r : 0};
  const bool returned[5] = {n.wu, n.bu, n.s && scale && scale->dim() == 2, n.wd, n.bd};  // ([A] scale: summed)
  int64_t total = 0;
  for (int k = 0; k < 5; ++k) total += returned[k] ? sizes[k] : 0;
  const at::Tensor buf = packed ? at::empty({total}, fopt) : at::Tensor();
  int64_t off = 0;
  const auto part = [&](int k, at::IntArrayRef shape) {
    if (!sizes[k]) return at::Tensor();
    if (!packed || !returned[k]) return at::empty(shape, fopt);
    off += sizes[k];
    return buf.narrow(0, off - sizes[k], sizes[k]).view(shape);
  };
  // w_up stored [r, d] per adapter (up-major): R laid out the same way, [A, r, d] memory seen as [A, d, r], so the
  // kernel sums R^T in place and the eager path returns d_w_up in the parameter's own layout (autograd keeps it
  // as .grad with no copy); bindings.cpp returns the custom op's contiguous, as its fake says
  raw.rt = pr.wu_t;
  raw.R = raw.rt ? part(0, {A, r, d}) : part(0, {A, d, r});
  raw.q = part(1, {A, d});
  raw.ds = part(2, {A, d});
  raw.wd = part(3, {A, r, d});
  raw.bd = part(4, {A, r});
  for (int64_t a = 0, u = 0; a < A; ++a) {
    if (u < static_cast<int64_t>(used.size()) && used[u] == a) {
      ++u;
      continue;
    }
    for (at::Tensor* t : {&raw.R, &raw.q, &raw.ds, &raw.wd, &raw.bd}) {
      if (!t->defined()) continue;
      const int64_t per = t->numel() / A;  // (plain memset: a torch op per unused adapter cost ~10 us each)
      std::fill_n(t->data_ptr<float>() + a * per, per, 0.f);
    }
  }
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
