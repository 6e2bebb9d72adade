// Fused CPU forward of a frozen Linear and a bottleneck adapter on its output (docs/design.md, Linear +
// adapter; the op's schema is adapterfuse/ops/linear_adapter.py):
//
//     z = inp weight^T + bias,   t = z (+ residual, "before"),   y = t + s A(t) (+ residual, "after")
//     A(t) = act(t w_down^T + b_down) w_up^T + b_up
//
// What memory sees. The unfused pair (F.linear, then the fused adapter) writes z ([M, d]) to memory, reads it
// back and writes y, into two freshly allocated [M, d] tensors. Here the rows are processed in chunks (8 MiB
// of fp32 t, see kChunkBytes): the chunk's t is computed by one sgemm over the whole
// chunk (BLAS threads across the cores, the weight packed once per chunk), then the adapter runs on the chunk
// in parallel row blocks while t is in the last-level cache, and y's rows are written. For fp32 the chunk's t
// is computed straight into y's rows and the adapter finishes them in place, so memory sees one write of y
// (plus the cache-resident re-read); for fp16 / bf16 t lives in an fp32 chunk buffer. t goes to memory only
// when a backward will need it (training: the tensor the unfused pair saves too), h ([M, r] fp32) likewise.
//
// Per chunk (fp32 throughout; inp converted to fp32 per chunk for fp16 / bf16, the weights once per call):
//   tc  = bias (+ residual rows, "before");   tc += inp_c weight^T                 (sgemm, k = in_features)
// then per row block of the chunk, in parallel:
//   hb  = tb w_down^T + b_down;   ab = act(hb)                                    (sgemm, [rows, r])
//   out = tb + s b_up;   out += ab (s w_up)^T   (+ residual rows, "after")        (sgemm accumulating, beta 1)
// with the scale folded into w_up and b_up (cpu_prepare.h); a scale with inf / NaN entries is applied after u,
// as the reference does. With a LayerNorm on t ("before" only, inference: BERT's output block), each row block's
// t is normalised in place first (mean / variance in double over the cached row), t = LN(z + residual).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/activations.h"
#include "common/cpu_blocks.h"
#include "common/cpu_prepare.h"
#include "linear_adapter_cpu.h"

namespace adapterfuse {
namespace {

using cpu::gemm_rm;
using cpu::Prepared;
using cpu::Rows;
using cpu::row_stride;
using cpu::rows_f32;
using cpu::store_rows;

// Chunk rows: large enough that the chunk's sgemm runs at the BLAS's full rate on every core (the weight is
// packed once per chunk: per-128-row sgemms re-packed it per block and cost 6-8 %), small enough that the
// chunk's fp32 t (kChunkBytes) stays in the last-level cache for the adapter pass: 2730 rows at d = 768,
// 512 at d = 4096. Row blocks of the adapter pass: kBlockRows.
constexpr int64_t kChunkBytes = 8 << 20;
constexpr int64_t kMinChunkRows = 256;
constexpr int64_t kMaxChunkRows = 4096;
constexpr int64_t kBlockRows = 64;

struct LinearShape {
  int64_t M, k, d, r;
  int act;
  bool before;
};

// The LayerNorm on t (ln_eps >= 0): weight / bias [d] fp32 or null.
struct RowNorm {
  const float* w = nullptr;
  const float* b = nullptr;
  float eps = 0.f;
  bool on = false;

  void apply(float* t, int64_t ldt, int64_t n, int64_t d) const {
    for (int64_t i = 0; i < n; ++i) {
      float* ti = t + i * ldt;
      double mean;
      const float rstd = cpu::row_mean_rstd(ti, d, eps, &mean), mf = static_cast<float>(mean);
      for (int64_t c = 0; c < d; ++c) {
        const float v = (ti[c] - mf) * rstd;
        ti[c] = (w ? v * w[c] : v) + (b ? b[c] : 0.f);
      }
    }
  }
};

template <typename T>
void forward(const LinearShape& sh, Rows<T> inp, const float* w, const float* bias, Rows<T> res, const Prepared& pr,
             const RowNorm& norm, T* y, int64_t sy, T* t_out, int64_t st, float* h_out) {
  const int64_t d = sh.d, r = sh.r, k = sh.k;
  const float* wd = pr.wd.data_ptr<float>();
  const float* ws = pr.ws.data_ptr<float>();
  const float* bd = pr.bd.defined() ? pr.bd.data_ptr<float>() : nullptr;
  const float* bs = pr.bs.defined() ? pr.bs.data_ptr<float>() : nullptr;
  const float* bu = pr.bu.defined() ? pr.bu.data_ptr<float>() : nullptr;
  const float* sc = pr.s.data_ptr<float>();
  constexpr bool kF32 = std::is_same_v<T, float>;
  const bool skinny = r <= cpu::kSkinnyRank;
  at::Tensor wst;  // [r, d]: the (scaled) up-projection transposed, for add_rows_times_w
  if (skinny) wst = pr.ws.t().contiguous();
  const float* wsT = skinny ? wst.data_ptr<float>() : nullptr;
  const int64_t chunk = std::min(sh.M, std::max(kMinChunkRows, std::min(kMaxChunkRows, kChunkBytes / (4 * d))));
  std::vector<float> ibuf(kF32 ? 0 : chunk * k), tbuf(kF32 ? 0 : chunk * d);
  for (int64_t c0 = 0; c0 < sh.M; c0 += chunk) {
    const int64_t rows = std::min(chunk, sh.M - c0);
    // the chunk's t: y's own rows (fp32) or the fp32 chunk buffer
    float* tc = kF32 ? reinterpret_cast<float*>(y) + c0 * sy : tbuf.data();
    const int64_t ldt = kF32 ? sy : d;
    const bool init = bias != nullptr || (sh.before && res.ptr != nullptr);
    at::parallel_for(0, rows, kBlockRows, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; init && i < i1; ++i) {
        float* o = tc + i * ldt;
        if (sh.before && res.ptr) {
          const T* rs = res.ptr + (c0 + i) * res.stride;
          if (bias) for (int64_t c = 0; c < d; ++c) o[c] = bias[c] + static_cast<float>(rs[c]);
          else for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(rs[c]);
        } else {
          std::copy(bias, bias + d, o);
        }
      }
    });
    int64_t ldi;
    const float* ic = rows_f32(inp, c0, rows, k, ibuf, &ldi);  // (outside a parallel region: ATen's threads)
    gemm_rm(false, true, rows, d, k, ic, ldi, w, k, init ? 1.f : 0.f, tc, ldt);  // (the BLAS's threads)
    if (t_out) store_rows(tc, ldt, t_out + c0 * st, st, rows, d);
    // the adapter on the chunk, row blocks in parallel, while t is in cache
    at::parallel_for(0, (rows + kBlockRows - 1) / kBlockRows, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> hbuf(kBlockRows * r), abuf(kBlockRows * r), obuf(kF32 && pr.folded ? 0 : kBlockRows * d);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kBlockRows, n = std::min(kBlockRows, rows - i0), m0 = c0 + i0;
        float* tb = tc + i0 * ldt;
        if (norm.on) norm.apply(tb, ldt, n, d);  // t = LN(z + residual), in place, in cache
        float* hb = h_out ? h_out + m0 * r : hbuf.data();
        if (skinny) cpu::rows_times_wt(cpu::strided(tb, ldt), n, d, wd, r, hb);
        else gemm_rm(false, true, n, r, d, tb, ldt, wd, d, 0.f, hb, r);
        for (int64_t i = 0; i < n * r; ++i) {
          const float v = hb[i] + (bd ? bd[i % r] : 0.f);
          hb[i] = v;
          abuf[i] = act_fwd(v, sh.act);
        }
        // out: y's rows in place over t (fp32, folded scale), else a block buffer
        const bool in_place = kF32 && pr.folded;
        float* out = in_place ? tb : obuf.data();
        const int64_t ldo = in_place ? ldt : d;
        if (pr.folded) {  // out = t + s b_up, then out += a (s w_up)^T
          for (int64_t i = 0; i < n; ++i) {
            float* o = out + i * ldo;
            const float* ti = tb + i * ldt;
            if (bs) for (int64_t c = 0; c < d; ++c) o[c] = ti[c] + bs[c];
            else if (!in_place) std::copy(ti, ti + d, o);
          }
          if (skinny) cpu::add_rows_times_w(abuf.data(), n, r, wsT, d, cpu::strided(out, ldo));
          else gemm_rm(false, true, n, d, r, abuf.data(), r, ws, r, 1.f, out, ldo);
        } else {  // non-finite scale: out = u = a w_up^T + b_up, then out = t + s u per element
          for (int64_t i = 0; i < n; ++i) {
            if (bu) std::copy(bu, bu + d, out + i * ldo);
            else std::fill(out + i * ldo, out + i * ldo + d, 0.f);
          }
          if (skinny) cpu::add_rows_times_w(abuf.data(), n, r, wsT, d, cpu::strided(out, ldo));
          else gemm_rm(false, true, n, d, r, abuf.data(), r, ws, r, 1.f, out, ldo);
          for (int64_t i = 0; i < n; ++i) {
            float* o = out + i * ldo;
            const float* ti = tb + i * ldt;
            for (int64_t c = 0; c < d; ++c) o[c] = ti[c] + sc[c] * o[c];
          }
        }
        if (!sh.before && res.ptr) {  // "after": y = residual + t + s A(t)
          for (int64_t i = 0; i < n; ++i) {
            float* o = out + i * ldo;
            const T* rs = res.ptr + (m0 + i) * res.stride;
            for (int64_t c = 0; c < d; ++c) o[c] += static_cast<float>(rs[c]);
          }
        }
        if (!in_place) store_rows(out, ldo, y + m0 * sy, sy, n, d);
      }
    });
  }
}

}  // namespace

void linear_adapter_fwd_cpu(const at::Tensor& inp, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                            const c10::optional<at::Tensor>& b_up, const c10::optional<at::Tensor>& scale,
                            double scale_value, const c10::optional<at::Tensor>& residual, bool residual_before,
                            int64_t act, const c10::optional<at::Tensor>& ln_weight,
                            const c10::optional<at::Tensor>& ln_bias, double ln_eps, at::Tensor& y, at::Tensor& t,
                            at::Tensor& h) {
  if (inp.size(0) == 0) return;
  const Prepared pr = cpu::prepare(w_down, b_down, w_up, b_up, scale, scale_value, c10::nullopt, true);
  auto f32 = [](const at::Tensor& x) { return x.scalar_type() == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous(); };
  const at::Tensor w = f32(weight);
  const at::Tensor b = bias ? f32(*bias) : at::Tensor();
  const LinearShape sh{inp.size(0), inp.size(1), weight.size(0), w_down.size(0), static_cast<int>(act),
                       residual_before};
  const at::Tensor lw = ln_weight ? f32(*ln_weight) : at::Tensor(), lb = ln_bias ? f32(*ln_bias) : at::Tensor();
  RowNorm norm;
  if (ln_eps >= 0) {
    TORCH_CHECK(residual_before && t.numel() == 0, "adapterfuse: the Linear + adapter LayerNorm variant is "
                "inference-only and needs residual_before");
    norm = RowNorm{lw.defined() ? lw.data_ptr<float>() : nullptr, lb.defined() ? lb.data_ptr<float>() : nullptr,
                   static_cast<float>(ln_eps), true};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, inp.scalar_type(), "linear_adapter_fwd_cpu", [&] {
    Rows<scalar_t> ir{inp.data_ptr<scalar_t>(), row_stride(inp)}, rr;
    if (residual) rr = Rows<scalar_t>{residual->data_ptr<scalar_t>(), row_stride(*residual)};
    const bool save = t.defined() && t.numel() > 0;
    forward(sh, ir, w.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr, rr, pr, norm,
            y.data_ptr<scalar_t>(),
            row_stride(y), save ? t.data_ptr<scalar_t>() : nullptr, save ? row_stride(t) : 0,
            save ? h.data_ptr<float>() : nullptr);
  });
}

}  // namespace adapterfuse
