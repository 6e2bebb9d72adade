// Fused CPU forward of a frozen Linear and a bottleneck adapter on its output (docs/design.md, Linear +
// adapter; the op's schema is adapterfuse/ops/linear_adapter.py):
//
//     z = inp weight^T + bias,   t = z (+ residual, "before"),   y = t + s A(t) (+ residual, "after")
//     A(t) = act(t w_down^T + b_down) w_up^T + b_up
//
// What memory sees. The unfused pair (F.linear, then the fused adapter) writes z ([M, d]) to memory and reads it
// back, then writes y. Here the rows are processed in blocks of kBlockRows: the block's z / t is computed by one
// sgemm into a thread-local fp32 buffer ([kBlockRows, d], 768 KiB at d = 768: L2 / L3), the adapter runs on it
// while it is in cache (two skinny sgemms and the epilogue), and only y's rows go to memory. t is written out
// only when a backward will need it (training: then it is the tensor the unfused pair would have saved too),
// h ([M, r], fp32) likewise.
//
// Per block (fp32 throughout; inp rows converted to fp32 for fp16 / bf16, the weights converted once per call):
//   tb  = bias (+ residual rows, "before");   tb += inp_b weight^T                 (sgemm, k = in_features)
//   hb  = tb w_down^T + b_down;   ab = act(hb)                                    (sgemm, [rows, r])
//   out = tb (+ residual rows, "after") + s b_up;   out += ab (s w_up)^T          (sgemm accumulating, beta 1)
// with the scale folded into w_up and b_up (cpu_prepare.h); a scale with inf / NaN entries is applied after u,
// as the reference does. fp32 y: `out` is y's rows themselves. The sgemms of a block run single-threaded inside
// at::parallel_for over blocks (MKL does not nest): the weight is re-read from cache per block, the price of
// keeping the block's t on chip (measured in the benchmark, op level).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
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

// 128 rows: the block's fp32 t and output rows (2 x 384 KiB at d = 768) stay in a core's L2 / its L3 slice,
// and the block's sgemm (128 x d x k) is large enough for the BLAS kernel to run at full rate.
constexpr int64_t kBlockRows = 128;

struct LinearShape {
  int64_t M, k, d, r;
  int act;
  bool before;
};

template <typename T>
void forward(const LinearShape& sh, Rows<T> inp, const float* w, const float* bias, Rows<T> res, const Prepared& pr,
             T* y, int64_t sy, T* t_out, int64_t st, float* h_out) {
  const int64_t d = sh.d, r = sh.r, k = sh.k;
  const float* wd = pr.wd.data_ptr<float>();
  const float* ws = pr.ws.data_ptr<float>();
  const float* bd = pr.bd.defined() ? pr.bd.data_ptr<float>() : nullptr;
  const float* bs = pr.bs.defined() ? pr.bs.data_ptr<float>() : nullptr;
  const float* sc = pr.s.data_ptr<float>();
  const int64_t blocks = (sh.M + kBlockRows - 1) / kBlockRows;
  constexpr bool kF32 = std::is_same_v<T, float>;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> ibuf(kF32 ? 0 : kBlockRows * k), tbuf(kBlockRows * d), obuf(kF32 ? 0 : kBlockRows * d),
        hbuf(kBlockRows * r), abuf(kBlockRows * r);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * kBlockRows, rows = std::min(kBlockRows, sh.M - m0);
      float* tb = tbuf.data();
      // tb = bias (+ residual), then += inp weight^T
      const bool init = bias != nullptr || (sh.before && res.ptr != nullptr);
      for (int64_t i = 0; init && i < rows; ++i) {
        float* o = tb + i * d;
        if (sh.before && res.ptr) {
          const T* rs = res.ptr + (m0 + i) * res.stride;
          if (bias) for (int64_t c = 0; c < d; ++c) o[c] = bias[c] + static_cast<float>(rs[c]);
          else for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(rs[c]);
        } else {
          std::copy(bias, bias + d, o);
        }
      }
      int64_t ldi;
      const float* ib = rows_f32(inp, m0, rows, k, ibuf, &ldi);
      gemm_rm(false, true, rows, d, k, ib, ldi, w, k, init ? 1.f : 0.f, tb, d);
      if (t_out) store_rows(tb, d, t_out + m0 * st, st, rows, d);
      // the adapter on the block, while tb is in cache
      float* hb = h_out ? h_out + m0 * r : hbuf.data();
      gemm_rm(false, true, rows, r, d, tb, d, wd, d, 0.f, hb, r);
      for (int64_t i = 0; i < rows * r; ++i) {
        const float v = hb[i] + (bd ? bd[i % r] : 0.f);
        hb[i] = v;
        abuf[i] = act_fwd(v, sh.act);
      }
      float* out = kF32 ? reinterpret_cast<float*>(y) + m0 * sy : obuf.data();
      const int64_t ldo = kF32 ? sy : d;
      if (pr.folded) {  // out = tb (+ residual) + s b_up, then out += a (s w_up)^T
        for (int64_t i = 0; i < rows; ++i) {
          float* o = out + i * ldo;
          const float* ti = tb + i * d;
          if (bs) for (int64_t c = 0; c < d; ++c) o[c] = ti[c] + bs[c];
          else std::copy(ti, ti + d, o);
        }
        gemm_rm(false, true, rows, d, r, abuf.data(), r, ws, r, 1.f, out, ldo);
      } else {  // non-finite scale: out = u = a w_up^T + b_up, then out = tb (+ residual) + s u per element
        const float* bu = pr.bu.defined() ? pr.bu.data_ptr<float>() : nullptr;
        for (int64_t i = 0; bu && i < rows; ++i) std::copy(bu, bu + d, out + i * ldo);
        gemm_rm(false, true, rows, d, r, abuf.data(), r, ws, r, bu ? 1.f : 0.f, out, ldo);
        for (int64_t i = 0; i < rows; ++i) {
          float* o = out + i * ldo;
          const float* ti = tb + i * d;
          for (int64_t c = 0; c < d; ++c) o[c] = ti[c] + sc[c] * o[c];
        }
      }
      if (!sh.before && res.ptr) {  // "after": y = residual + t + s A(t)
        for (int64_t i = 0; i < rows; ++i) {
          float* o = out + i * ldo;
          const T* rs = res.ptr + (m0 + i) * res.stride;
          for (int64_t c = 0; c < d; ++c) o[c] += static_cast<float>(rs[c]);
        }
      }
      if constexpr (!kF32) store_rows(out, ldo, y + m0 * sy, sy, rows, d);
    }
  });
}

}  // namespace

void linear_adapter_fwd_cpu(const at::Tensor& inp, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                            const c10::optional<at::Tensor>& b_up, const c10::optional<at::Tensor>& scale,
                            double scale_value, const c10::optional<at::Tensor>& residual, bool residual_before,
                            int64_t act, at::Tensor& y, at::Tensor& t, at::Tensor& h) {
  if (inp.size(0) == 0) return;
  const Prepared pr = cpu::prepare(w_down, b_down, w_up, b_up, scale, scale_value, c10::nullopt, true);
  auto f32 = [](const at::Tensor& x) { return x.scalar_type() == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous(); };
  const at::Tensor w = f32(weight);
  const at::Tensor b = bias ? f32(*bias) : at::Tensor();
  const LinearShape sh{inp.size(0), inp.size(1), weight.size(0), w_down.size(0), static_cast<int>(act),
                       residual_before};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, inp.scalar_type(), "linear_adapter_fwd_cpu", [&] {
    Rows<scalar_t> ir{inp.data_ptr<scalar_t>(), row_stride(inp)}, rr;
    if (residual) rr = Rows<scalar_t>{residual->data_ptr<scalar_t>(), row_stride(*residual)};
    const bool save = t.defined() && t.numel() > 0;
    forward(sh, ir, w.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr, rr, pr, y.data_ptr<scalar_t>(),
            row_stride(y), save ? t.data_ptr<scalar_t>() : nullptr, save ? row_stride(t) : 0,
            save ? h.data_ptr<float>() : nullptr);
  });
}

}  // namespace adapterfuse
