// Building blocks of the fused CPU paths (adapter_cpu.cpp, adapter_bank_cpu.cpp, linear_adapter_cpu.cpp): a row-major GEMM straight
// into the BLAS sgemm that libtorch links (no dispatcher per block), and fp32 views / conversions of row
// blocks of an [M, d] operand.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "activations.h"

// Fortran BLAS sgemm (LP64), exported by libtorch_cpu on x86 (MKL). Weak: null where it is absent.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace adapterfuse {
namespace cpu {

// Row-major C[m, n] = op(A)[m, k] @ op(B)[k, n] + beta * C through column-major BLAS:
// (row-major C) = (col-major C^T) = op(B)^T op(A)^T, so A and B swap places and keep their op flags.
inline void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
             const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // BLAS refuses a leading dimension below the row length (MKL prints an error and skips the GEMM,
  // leaving C unwritten): never hand it one. The entry points check the operand layouts, so this
  // only fires on an internal error.
  TORCH_CHECK(lda >= std::max<int64_t>(1, trans_a ? m : k) && ldb >= std::max<int64_t>(1, trans_b ? k : n) &&
                  ldc >= std::max<int64_t>(1, n),
              "adapterfuse: internal error: invalid GEMM leading dimension (lda ", lda, ", ldb ", ldb, ", ldc ", ldc,
              " for m ", m, ", n ", n, ", k ", k, ")");
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

// Skinny products of the adapter for small r (the Linear + adapter epilogue, the adapter bank's short or scattered
// blocks). Through sgemm the r = 8 epilogue of a LLaMA down_proj cost 3-4 % of its GEMM (r = 1: 0.6 %), and each
// call has a fixed cost that dominates a bank segment of a few rows; these loops, vectorised over d, keep each
// row and the weights in L1 / L2 and read rows where they sit (any row order, no gather). (A full 128-row block
// of consecutive rows still measured faster through sgemm: the bank keeps it there.) Larger r: sgemm. Rows are
// given as row(i) -> pointer to row i's d fp32 values.
constexpr int64_t kSkinnyRank = 32;

// row(i) = base + i * ld
template <typename P>
inline auto strided(P* base, int64_t ld) {
  return [base, ld](int64_t i) { return base + i * ld; };
}

// The loops below work on 8-float column chunks (one AVX2 register; the compiler vectorises the lane loops
// under omp simd) with independent accumulators per output, so no dependency chain limits them and each row
// or weight chunk is loaded once per use; columns past the last full chunk are a scalar tail.
constexpr int kLanes = 8;

// f(std::integral_constant<int, K>, k0) over the outputs [0, r) in groups [k0, k0 + K): K = 8, then the remainder
// (each group's accumulators are a compile-time count, so they live in registers)
template <typename F>
inline void in_groups_of_8(int64_t r, F&& f) {
  int64_t k0 = 0;
  for (; k0 + 8 <= r; k0 += 8) f(std::integral_constant<int, 8>{}, k0);
  switch (r - k0) {
    case 1: f(std::integral_constant<int, 1>{}, k0); break;
    case 2: f(std::integral_constant<int, 2>{}, k0); break;
    case 3: f(std::integral_constant<int, 3>{}, k0); break;
    case 4: f(std::integral_constant<int, 4>{}, k0); break;
    case 5: f(std::integral_constant<int, 5>{}, k0); break;
    case 6: f(std::integral_constant<int, 6>{}, k0); break;
    case 7: f(std::integral_constant<int, 7>{}, k0); break;
    default: break;
  }
}

// h[i, k0 + k] = sum_c row(i)[c] w[k0 + k, c] for k < K: each row read once, K vector accumulators.
template <int K, typename RowPtr>
inline void rows_times_wt_k(RowPtr row, int64_t n, int64_t d, const float* w, int64_t r, int64_t k0, float* h) {
  const int64_t dv = d - d % kLanes;
  const float* wk0 = w + k0 * d;
  for (int64_t i = 0; i < n; ++i) {
    const float* ti = row(i);
    float acc[K][kLanes] = {};
    for (int64_t c = 0; c < dv; c += kLanes)
      for (int k = 0; k < K; ++k)
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) acc[k][l] += ti[c + l] * wk0[k * d + c + l];
    for (int k = 0; k < K; ++k) {
      float sum = 0.f;
      for (int l = 0; l < kLanes; ++l) sum += acc[k][l];
      for (int64_t c = dv; c < d; ++c) sum += ti[c] * wk0[k * d + c];
      h[i * r + k0 + k] = sum;
    }
  }
}

// h[i, k] = sum_c row(i)[c] w[k, c]   (w [r, d], h [n, r]); outputs in groups of 8
template <typename RowPtr>
inline void rows_times_wt(RowPtr row, int64_t n, int64_t d, const float* w, int64_t r, float* h) {
  in_groups_of_8(r, [&](auto K, int64_t k0) { rows_times_wt_k<decltype(K)::value>(row, n, d, w, r, k0, h); });
}

// out(i)[c] += sum_k a[i, k] wt[k, c]   (a [n, r], wt [r, d]: e.g. w_up transposed, or w_down itself): r
// vectorised passes over the row (in L1). (Loading each output chunk once and adding the r products in registers
// measured 5x slower here with GCC 12: the chunk did not stay in a register.)
template <typename RowPtr>
inline void add_rows_times_w(const float* a, int64_t n, int64_t r, const float* wt, int64_t d, RowPtr out) {
  for (int64_t i = 0; i < n; ++i) {
    float* o = out(i);
    for (int64_t k = 0; k < r; ++k) {
      const float ak = a[i * r + k];
      const float* wk = wt + k * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) o[c] += ak * wk[c];
    }
  }
}

// acc[k0 + k, c] += sum_i coef[i, k0 + k] row(i)[c] for k < K: per column chunk, K accumulators in registers over
// all n rows (rows added in order i = 0, 1, ...: deterministic), each acc chunk loaded and stored once.
template <int K, typename RowPtr>
inline void add_coef_t_rows_k(const float* coef, int64_t n, int64_t r, int64_t k0, RowPtr row, int64_t d,
                              float* acc) {
  const int64_t dv = d - d % kLanes;
  float* a0 = acc + k0 * d;
  for (int64_t c = 0; c < dv; c += kLanes) {
    float v[K][kLanes];
    for (int k = 0; k < K; ++k)
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) v[k][l] = a0[k * d + c + l];
    for (int64_t i = 0; i < n; ++i) {
      const float* xi = row(i) + c;
      for (int k = 0; k < K; ++k) {
        const float ck = coef[i * r + k0 + k];
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) v[k][l] += ck * xi[l];
      }
    }
    for (int k = 0; k < K; ++k)
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) a0[k * d + c + l] = v[k][l];
  }
  for (int64_t c = dv; c < d; ++c)
    for (int64_t i = 0; i < n; ++i)
      for (int k = 0; k < K; ++k) a0[k * d + c] += coef[i * r + k0 + k] * row(i)[c];
}

// acc[k, c] += sum_i coef[i, k] row(i)[c]   (coef [n, r], acc [r, d]: the weight-gradient sums d_w_down += d_h^T x
// and (transposed) d_w_up's R^T += (g a)^T dy)
template <typename RowPtr>
inline void add_coef_t_rows(const float* coef, int64_t n, int64_t r, RowPtr row, int64_t d, float* acc) {
  in_groups_of_8(r, [&](auto K, int64_t k0) { add_coef_t_rows_k<decltype(K)::value>(coef, n, r, k0, row, d, acc); });
}

template <typename T>
struct Rows {  // a [M, d] operand: pointer and row stride
  const T* ptr = nullptr;
  int64_t stride = 0;
};

// The row stride to use as a leading dimension: a one-row tensor may carry any row stride (it is
// never stepped over), but BLAS still wants ld >= d.
inline int64_t row_stride(const at::Tensor& t) {
  return t.size(0) <= 1 ? std::max<int64_t>(t.stride(0), t.size(1)) : t.stride(0);
}

// Rows [m0, m0 + rows) of src as fp32: src itself for fp32 (with its stride), else converted into buf.
// Conversions go through ATen's vectorised copy on views of the block (inside our parallel region it
// runs on the calling thread); a scalar loop was measured slower than eager torch for bf16.
template <typename T>
inline const float* rows_f32(const Rows<T>& src, int64_t m0, int64_t rows, int64_t d, std::vector<float>& buf,
                             int64_t* ld) {
  if constexpr (std::is_same_v<T, float>) {
    *ld = src.stride;
    return src.ptr + m0 * src.stride;
  } else {
    auto in = at::from_blob(const_cast<T*>(src.ptr + m0 * src.stride), {rows, d}, {src.stride, 1},
                            at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    at::from_blob(buf.data(), {rows, d}, at::TensorOptions().dtype(at::kFloat)).copy_(in);
    *ld = d;
    return buf.data();
  }
}

template <typename T>
inline void store_rows(const float* src, int64_t ld, T* dst, int64_t stride, int64_t rows, int64_t d) {
  auto out = at::from_blob(dst, {rows, d}, {stride, 1}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  out.copy_(at::from_blob(const_cast<float*>(src), {rows, d}, {ld, 1}, at::TensorOptions().dtype(at::kFloat)));
}

// Rows rows[0..n) (any order, e.g. one adapter's rows) of src, gathered as fp32 into buf ([n, d], row stride d).
template <typename T>
inline void gather_rows_f32(const Rows<T>& src, const int64_t* rows, int64_t n, int64_t d, float* buf) {
  for (int64_t i = 0; i < n; ++i) {
    const T* s = src.ptr + rows[i] * src.stride;
    float* o = buf + i * d;
    if constexpr (std::is_same_v<T, float>) {
      std::copy(s, s + d, o);
    } else {
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(s[c]);
    }
  }
}

// The fp32 rows of buf ([n, d], row stride d) written to rows rows[0..n) of dst (row stride `stride`).
template <typename T>
inline void scatter_rows(const float* buf, int64_t n, int64_t d, const int64_t* rows, T* dst, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) {
    T* o = dst + rows[i] * stride;
    const float* s = buf + i * d;
    if constexpr (std::is_same_v<T, float>) {
      std::copy(s, s + d, o);
    } else {
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<T>(s[c]);
    }
  }
}

// One row of the backward block math (docs/design.md, Backward): from the saved h and P = (dy s) w_up of the
// row, ga = g act(h) (for R) and d_h = g P act'(h); returns act(h) . P, the row's d_g before (dy s) . b_up.
inline float backward_row(const float* h, const float* P, float g, int64_t r, int act, float* ga, float* dh) {
  float dot = 0.f;
  for (int64_t k = 0; k < r; ++k) {
    const float av = act_fwd(h[k], act);
    ga[k] = g * av;
    dh[k] = g * P[k] * act_grad(h[k], act);
    dot += av * P[k];
  }
  return dot;
}

// A LayerNorm's row statistics of one cached fp32 row x[0, d): the mean (returned through *mean) and
// rstd = 1 / sqrt(var + eps), both in double over two passes (no cancellation when |mean| >> std); shared by the
// adapter's input LayerNorm (adapter_cpu.cpp) and the Linear + adapter's LayerNorm on t (linear_adapter_cpu.cpp).
inline float row_mean_rstd(const float* x, int64_t d, float eps, double* mean) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < d; ++c) sum += x[c];
  const double m = sum / d;
  double sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t c = 0; c < d; ++c) sq += (x[c] - m) * (x[c] - m);
  *mean = m;
  return static_cast<float>(1.0 / std::sqrt(sq / d + eps));
}

}  // namespace cpu
}  // namespace adapterfuse
