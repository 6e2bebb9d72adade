// Building blocks of the fused CPU paths (adapter_cpu.cpp, adapter_bank_cpu.cpp, linear_adapter_cpu.cpp): a row-major GEMM straight
// into the BLAS sgemm that libtorch links (no dispatcher per block), and fp32 views / conversions of row
// blocks of an [M, d] operand.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
// row and the weights in L1 / L2 and read rows where they sit (any row order, no gather). Larger r: sgemm, which
// reaches 2-3x their GFLOP/s from r = 16 on. Rows are given as row(i) -> pointer to row i's d fp32 values.
constexpr int64_t kSkinnyRank = 32;
// Up to this r the loops beat sgemm even on full 128-row blocks of consecutive fp32 rows (one AMD EPYC core, 512
// rows, d = 768: r = 8 down 167 us vs 207 us; at r = 32 sgemm is 2-3x faster, 74-83 vs 27-40 GFLOP/s).
constexpr int64_t kSkinnyFullRank = 8;

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

// 8 fp32 lanes as a GCC / Clang vector: one AVX register under -march=native (the JIT build), two SSE registers
// otherwise. Loads and stores go through memcpy (unaligned; compiled to one vmovups). Written with these rather
// than arrays under omp simd, which GCC 12 left in memory for the up-projection's accumulators.
typedef float f32x8 __attribute__((vector_size(32)));
static_assert(sizeof(f32x8) == kLanes * sizeof(float), "f32x8 is 8 floats");
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // (the vector ABI note for non-AVX builds: everything here is inline)
inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }
inline float sum8(f32x8 v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// Column tiles: the loops below run all n rows over one tile of columns [c0, c0 + tile) before the next, so the
// weights' tile (r x tile floats, 16 KiB) is read from L2 once per tile and stays in L1 for every row. Without
// tiles each row streamed the whole [r, d] weights (d = 4096, r = 16: 256 KiB per row, L2-bound). A multiple of
// kLanes.
inline int64_t skinny_tile(int64_t r) {
  constexpr int64_t kTileFloats = 4096;  // 16 KiB of one weight matrix's tile
  return std::max<int64_t>(kLanes, kTileFloats / std::max<int64_t>(r, 1) / kLanes * kLanes);
}

// h[i, k0 + k] (+)= sum_{c in [c0, c1)} row(i)[c] cs[c] w[k0 + k, c] for k < K (kScaled; else without cs): each row
// chunk loaded (and scaled) once, K register accumulators; `add`: add to h (the later tiles), else store.
template <int K, bool kScaled, typename RowPtr>
inline void rows_times_wt_k(RowPtr row, int64_t n, int64_t c0, int64_t c1, int64_t d, const float* w, int64_t r,
                            int64_t k0, float* h, bool add, const float* cs) {
  const int64_t cv = c0 + (c1 - c0) / kLanes * kLanes;
  const float* wk0 = w + k0 * d;
  for (int64_t i = 0; i < n; ++i) {
    const float* ti = row(i);
    f32x8 acc[K];
    for (int k = 0; k < K; ++k) acc[k] = f32x8{};
    for (int64_t c = c0; c < cv; c += kLanes) {
      f32x8 xv = load8(ti + c);
      if constexpr (kScaled) xv *= load8(cs + c);
      for (int k = 0; k < K; ++k) acc[k] += xv * load8(wk0 + k * d + c);
    }
    for (int k = 0; k < K; ++k) {
      float sum = sum8(acc[k]);
      for (int64_t c = cv; c < c1; ++c) sum += (kScaled ? ti[c] * cs[c] : ti[c]) * wk0[k * d + c];
      float& hk = h[i * r + k0 + k];
      hk = add ? hk + sum : sum;
    }
  }
}

// h[i, k] = sum_c row(i)[c] w[k, c]   (w [r, d], h [n, r]); outputs in groups of 8, columns in tiles (d = 0: h = 0).
// cs (optional, [d]): a column scale, h[i, k] = sum_c row(i)[c] cs[c] w[k, c] (the bank's P = (dy s) w_up with w_up
// read unscaled, as AdapterBank stores it).
template <typename RowPtr>
inline void rows_times_wt(RowPtr row, int64_t n, int64_t d, const float* w, int64_t r, float* h,
                          const float* cs = nullptr) {
  const int64_t tile = skinny_tile(r);
  int64_t c0 = 0;
  do {
    const int64_t c1 = std::min(d, c0 + tile);
    in_groups_of_8(r, [&](auto K, int64_t k0) {
      if (cs) rows_times_wt_k<decltype(K)::value, true>(row, n, c0, c1, d, w, r, k0, h, c0 > 0, cs);
      else rows_times_wt_k<decltype(K)::value, false>(row, n, c0, c1, d, w, r, k0, h, c0 > 0, nullptr);
    });
    c0 = c1;
  } while (c0 < d);
}

// One group of K <= 8 outputs of rows_times_w_into for one row over columns [c0, c1): o[c] = src[c] (0 if src is
// null) + bc bias[c] (none if bias is null) + sum_k ak[k] wt[k, c]. Per 8-column chunk the K products are summed
// in a register and the chunk is stored once (K load-add-store passes over the row measured 2.5x slower: 275 vs
// 110 us for 512 rows, r = 8, d = 768, one AMD EPYC core); the K coefficients stay broadcast in registers.
// kScaled: o[c] = src[c] + cs[c] (bc bias[c] + sum_k ak[k] wt[k, c]), a column scale applied to the branch.
template <int K, bool kScaled = false>
inline void rows_times_w_group(const float* ak, const float* wt, int64_t c0, int64_t c1, int64_t d, const float* src,
                               float* o, const float* bias, float bc, const float* cs = nullptr) {
  f32x8 av[K > 0 ? K : 1];
  for (int k = 0; k < K; ++k) av[k] = f32x8{} + ak[k];
  const f32x8 bcv = f32x8{} + bc;
  const int64_t cv = c0 + (c1 - c0) / kLanes * kLanes;
  for (int64_t c = c0; c < cv; c += kLanes) {
    if constexpr (kScaled) {
      f32x8 u = bias ? bcv * load8(bias + c) : f32x8{};
      for (int k = 0; k < K; ++k) u += av[k] * load8(wt + k * d + c);
      store8(o + c, (src ? load8(src + c) : f32x8{}) + load8(cs + c) * u);
    } else {
      f32x8 v = src ? load8(src + c) : f32x8{};
      if (bias) v += bcv * load8(bias + c);
      for (int k = 0; k < K; ++k) v += av[k] * load8(wt + k * d + c);
      store8(o + c, v);
    }
  }
  for (int64_t c = cv; c < c1; ++c) {
    if constexpr (kScaled) {
      float u = bias ? bc * bias[c] : 0.f;
      for (int k = 0; k < K; ++k) u += ak[k] * wt[k * d + c];
      o[c] = (src ? src[c] : 0.f) + cs[c] * u;
    } else {
      float v = src ? src[c] : 0.f;
      if (bias) v += bc * bias[c];
      for (int k = 0; k < K; ++k) v += ak[k] * wt[k * d + c];
      o[c] = v;
    }
  }
}

// out(i)[c] = init(i)[c] + coef(i) bias[c] + sum_k a[i, k] wt[k, c]   (a [n, r], wt [r, d]: e.g. w_up transposed,
// or w_down itself). init(i) null: 0; it may be out(i) itself (accumulate in place). bias null: no bias term.
// The adapter's up-projection with its epilogue (skip + g b_up + (g a) w_up^T) in one pass per row, tile and 8
// outputs; r > 8 takes one more pass per further group of 8. cs (optional, [d]): a column scale on everything but
// init, out = init + cs (.) (coef bias + a wt) (the bank's channel scale, with w_up read unscaled as AdapterBank
// stores it: no scaled copy per adapter and call).
template <typename OutRow, typename InitRow, typename Coef>
inline void rows_times_w_into(const float* a, int64_t n, int64_t r, const float* wt, int64_t d, OutRow out,
                              InitRow init, const float* bias, Coef coef, const float* cs = nullptr) {
  const int64_t tile = skinny_tile(r);
  for (int64_t c0 = 0; c0 < d; c0 += tile) {
    const int64_t c1 = std::min(d, c0 + tile);
    for (int64_t i = 0; i < n; ++i) {
      float* o = out(i);
      const float* src = init(i);
      const float bc = bias ? coef(i) : 0.f;
      if (r == 0) {
        if (cs) rows_times_w_group<0, true>(a, wt, c0, c1, d, src, o, bias, bc, cs);
        else rows_times_w_group<0>(a, wt, c0, c1, d, src, o, bias, bc);
        continue;
      }
      bool first = true;
      in_groups_of_8(r, [&](auto K, int64_t k0) {
        constexpr int kK = decltype(K)::value;
        const float* s0 = first ? src : o;
        const float* b0 = first ? bias : nullptr;
        if (cs) rows_times_w_group<kK, true>(a + i * r + k0, wt + k0 * d, c0, c1, d, s0, o, b0, bc, cs);
        else rows_times_w_group<kK>(a + i * r + k0, wt + k0 * d, c0, c1, d, s0, o, b0, bc);
        first = false;
      });
    }
  }
}

// out(i)[c] += sum_k a[i, k] wt[k, c]   (times cs[c] when given)
template <typename RowPtr>
inline void add_rows_times_w(const float* a, int64_t n, int64_t r, const float* wt, int64_t d, RowPtr out,
                             const float* cs = nullptr) {
  rows_times_w_into(a, n, r, wt, d, out, [&](int64_t i) -> const float* { return out(i); }, nullptr,
                    [](int64_t) { return 0.f; }, cs);
}

// wt[k, c] = w[c, k] s[c]   (w [d, r] -> wt [r, d]; s null: 1): an up-projection transposed for the loops above, with
// its scale folded in. With AVX, 8 x 8 blocks are transposed in registers (8 loads, 24 shuffles, 8 stores: 0.7 us
// instead of 2 us for d = 768, r = 8, which a bank with 64 adapters per token pays per adapter and call); other
// builds and r not a multiple of 8: the scalar loop.
inline void transpose_scaled(const float* w, const float* s, int64_t d, int64_t r, float* wt) {
  int64_t c0 = 0;
#if defined(__AVX__)
  typedef int i32x8 __attribute__((vector_size(32)));
#if defined(__clang__)
#define AF_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define AF_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, i32x8{__VA_ARGS__})
#endif
  if (r % kLanes == 0) {
    for (; c0 + kLanes <= d; c0 += kLanes) {
      const f32x8 sc = s ? load8(s + c0) : f32x8{} + 1.f;
      for (int64_t k0 = 0; k0 < r; k0 += kLanes) {
        // rows c0..c0+7 of w, columns k0..k0+7: v[l][k] = w[c0 + l, k0 + k]
        const float* b = w + c0 * r + k0;
        const f32x8 v0 = load8(b), v1 = load8(b + r), v2 = load8(b + 2 * r), v3 = load8(b + 3 * r),
                    v4 = load8(b + 4 * r), v5 = load8(b + 5 * r), v6 = load8(b + 6 * r), v7 = load8(b + 7 * r);
        // interleave pairs of rows (within 128-bit halves), then pairs of pairs, then swap the halves
        const f32x8 t0 = AF_SHUFFLE(v0, v1, 0, 8, 1, 9, 4, 12, 5, 13), t1 = AF_SHUFFLE(v0, v1, 2, 10, 3, 11, 6, 14, 7, 15);
        const f32x8 t2 = AF_SHUFFLE(v2, v3, 0, 8, 1, 9, 4, 12, 5, 13), t3 = AF_SHUFFLE(v2, v3, 2, 10, 3, 11, 6, 14, 7, 15);
        const f32x8 t4 = AF_SHUFFLE(v4, v5, 0, 8, 1, 9, 4, 12, 5, 13), t5 = AF_SHUFFLE(v4, v5, 2, 10, 3, 11, 6, 14, 7, 15);
        const f32x8 t6 = AF_SHUFFLE(v6, v7, 0, 8, 1, 9, 4, 12, 5, 13), t7 = AF_SHUFFLE(v6, v7, 2, 10, 3, 11, 6, 14, 7, 15);
        const f32x8 s0 = AF_SHUFFLE(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13), s1 = AF_SHUFFLE(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
        const f32x8 s2 = AF_SHUFFLE(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13), s3 = AF_SHUFFLE(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
        const f32x8 s4 = AF_SHUFFLE(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13), s5 = AF_SHUFFLE(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);
        const f32x8 s6 = AF_SHUFFLE(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13), s7 = AF_SHUFFLE(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);
        float* o = wt + k0 * d + c0;  // row k0 + k of wt holds column k0 + k of w
        store8(o + 0 * d, AF_SHUFFLE(s0, s4, 0, 1, 2, 3, 8, 9, 10, 11) * sc);
        store8(o + 1 * d, AF_SHUFFLE(s1, s5, 0, 1, 2, 3, 8, 9, 10, 11) * sc);
        store8(o + 2 * d, AF_SHUFFLE(s2, s6, 0, 1, 2, 3, 8, 9, 10, 11) * sc);
        store8(o + 3 * d, AF_SHUFFLE(s3, s7, 0, 1, 2, 3, 8, 9, 10, 11) * sc);
        store8(o + 4 * d, AF_SHUFFLE(s0, s4, 4, 5, 6, 7, 12, 13, 14, 15) * sc);
        store8(o + 5 * d, AF_SHUFFLE(s1, s5, 4, 5, 6, 7, 12, 13, 14, 15) * sc);
        store8(o + 6 * d, AF_SHUFFLE(s2, s6, 4, 5, 6, 7, 12, 13, 14, 15) * sc);
        store8(o + 7 * d, AF_SHUFFLE(s3, s7, 4, 5, 6, 7, 12, 13, 14, 15) * sc);
      }
    }
  }
#undef AF_SHUFFLE
#endif
  for (int64_t c = c0; c < d; ++c) {
    const float f = s ? s[c] : 1.f;
    for (int64_t k = 0; k < r; ++k) wt[k * d + c] = w[c * r + k] * f;
  }
}
#pragma GCC diagnostic pop

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
