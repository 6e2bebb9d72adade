// CUDA kernels of the fused adapter (docs/design.md, Math), fp32 / fp16 / bf16 with fp32 accumulation.
// No torch headers: launchers take raw pointers, sizes and a cudaStream_t (see adapter_kernels.cuh).
//
//   h = x @ w_down^T + b_down   [M, r]   fp32, saved for backward
//   u = act(h) @ w_up^T + b_up  [M, d]   never written to memory
//   y = skip + g[m] * s * u     [M, d]   g[m] = sample_scale[m / tokens]
//
// Structure. Every matmul here is skinny (one side is r <= 256 wide), so the op is memory bound
// (arithmetic intensity ~ r FLOP/byte). Each kernel stages tiles of its operands in shared memory
// and multiplies them with block_mm: fp16/bf16 tiles go to the tensor cores through WMMA 16x16x16
// fragments (fp32 accumulators), fp32 tiles to a SIMT loop (exact fp32, like torch's default).
// block_mm keeps one accumulator fragment live per warp and round-trips it through shared memory
// between K chunks: slower than register-resident accumulators, but it bounds register use whatever
// r is, which is what keeps `-Xptxas -v` at zero spill bytes for every instantiation (CI checks).
//
// Forward, one block per BM rows: phase 1 streams the rows of x once (16-byte vector loads where
// d and the row stride allow) and accumulates h in shared memory; phase 2 walks d in BN-column tiles,
// recomputes u from a = act(h) and w_up, and writes y. With skip == x the phase-2 read of x hits L2.
// Backward: the algebra every backend implements (docs/design.md, Backward), which never recomputes u.
// With P = (dy * s) @ w_up ([M, r]; d_a = g P):
//   d_h = g P act'(h)    dx = d_h @ w_down (+ dy when skip is x)    d_w_down = d_h^T x   d_b_down = sum d_h
//   R = dy^T (g a) [d, r]    q = sum_m g dy [d]    d_w_up = s R    d_b_up = s q
//   d_s[c] = w_up[c] . R[c] + b_up[c] q[c]    d_g[m] = a[m] . P[m] + (dy[m] * s) . b_up
//   (both sum_m / sum_c of dy g u with u = a w_up^T + b_up expanded). The scale multiplies R and q only
//   after the reduction (on the host, in fp32), so a tiny s never meets fp16 rounding in the weight
//   gradients.
//   rows kernel (block per BM rows): pass 1 over d accumulates P (tensor cores) and the (dy s) . b_up
//     row sums; then d_h -> dh (fp32) and d_g per row; pass 2 over d writes dx.
//   cols kernel (grid = d tiles x row splits): per column tile, over its rows: R += dy^T (g a),
//     q += sum g dy, d_w_down += d_h^T x; one fp32 partial per split, summed by the caller together
//     with the [d]-sized scale products above (deterministic two-stage reduction, no atomics).
// Tiles: defaults per kernel and r, smaller ones where the device has less shared memory (see fit_tiles).
// Offsets: row indices are int64 and multiplied by int64 strides (M * d may exceed 2^31).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "adapter_kernels.cuh"
#include "common/activations.h"
#include "common/switch.h"

namespace adapterfuse {
namespace {

constexpr int kThreads = 128;  // 4 warps: one 16-row band of a 64-row tile each
// Every kernel is declared __launch_bounds__(kThreads, 1): shared memory, not registers, bounds how many
// blocks share an SM here (2-4), and without the explicit minimum ptxas capped some fp16 instantiations
// at 32 registers and spilled (the CI gate requires zero spill bytes).
constexpr int kPadT = 8;       // smem row padding (elements) for operand tiles: breaks bank conflicts,
constexpr int kPadF = 4;       // keeps rows 16-byte aligned as WMMA's ldm rules need

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The row scales g[m] = sample_scale[m / tokens] of a tile's rows m0 .. m0 + bm - 1 into shared memory (0
// past `rows`), once per tile rather than per element. The division is 32-bit: the host guarantees
// M < 2^32 (a 64-bit division is a long subroutine on the GPU, and its register convention made ptxas
// spill around it).
__device__ __forceinline__ void load_row_scales(float* gs, const AdapterParams& p, int64_t m0, int64_t rows, int bm) {
  for (int i = threadIdx.x; i < bm; i += blockDim.x) {
    const int64_t m = m0 + i;
    gs[i] = m >= rows ? 0.f
                      : (p.sample_scale ? p.sample_scale[static_cast<uint32_t>(m) / static_cast<uint32_t>(p.tokens)]
                                        : 1.f);
  }
}

__device__ __forceinline__ float col_scale(const AdapterParams& p, int64_t c) {
  return p.scale == nullptr ? p.scale_value : (p.scale_n == 1 ? p.scale[0] : p.scale[c]);
}

// Copy the tile src[row0 : row0 + rows_t, col0 : col0 + cols_t] (row stride `stride`) into smem dst
// (row stride ldd), zero-filling outside [rows, cols]. cols_t is a multiple of 16 elements, so it holds
// whole 16-byte vectors; those are loaded as one when `vec` (every row start and col0 aligned to 16
// bytes) and the chunk lies inside the tensor.
template <typename T>
__device__ __forceinline__ void load_tile(T* dst, int ldd, int rows_t, int cols_t, const T* __restrict__ src,
                                          int64_t stride, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                                          bool vec) {
  constexpr int V = 16 / sizeof(T);
  const int vecs = cols_t / V;
  for (int idx = threadIdx.x; idx < rows_t * vecs; idx += blockDim.x) {
    const int i = idx / vecs, j = (idx % vecs) * V;
    const int64_t gr = row0 + i, gc = col0 + j;
    T* out = dst + i * ldd + j;
    if (gr < rows && vec && gc + V <= cols) {
      *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(src + gr * stride + gc);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v)
        out[v] = (gr < rows && gc + v < cols) ? src[gr * stride + gc + v] : from_f<T>(0.f);
    }
  }
}

// C[M, N] (fp32, row-major, ldc) (+)= A[M, K] @ B[K, N] over shared-memory tiles. A is row-major
// (A(i, k) = A[i * lda + k]) or column-major (A[k * lda + i]); B likewise. M, N, K multiples of 16.
template <typename T, bool A_COL, bool B_COL>
struct BlockMM {
  static __device__ __forceinline__ void run(const T* A, int lda, const T* B, int ldb, float* C, int ldc, int M, int N, int K,
                             bool accumulate) {
    using namespace nvcuda;
    using LA = typename std::conditional<A_COL, wmma::col_major, wmma::row_major>::type;
    using LB = typename std::conditional<B_COL, wmma::col_major, wmma::row_major>::type;
    const int warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    const int tiles_n = N / 16, tiles = (M / 16) * tiles_n;
    for (int t = warp; t < tiles; t += nwarps) {
      const int tm = (t / tiles_n) * 16, tn = (t % tiles_n) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      if (accumulate) wmma::load_matrix_sync(c, C + tm * ldc + tn, ldc, wmma::mem_row_major);
      else wmma::fill_fragment(c, 0.f);
      for (int k = 0; k < K; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> b;
        wmma::load_matrix_sync(a, A_COL ? A + k * lda + tm : A + tm * lda + k, lda);
        wmma::load_matrix_sync(b, B_COL ? B + tn * ldb + k : B + k * ldb + tn, ldb);
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(C + tm * ldc + tn, c, ldc, wmma::mem_row_major);
    }
  }
};

template <bool A_COL, bool B_COL>
struct BlockMM<float, A_COL, B_COL> {  // exact fp32 on CUDA cores
  static __device__ __forceinline__ void run(const float* A, int lda, const float* B, int ldb, float* C, int ldc, int M, int N,
                             int K, bool accumulate) {
    for (int idx = threadIdx.x; idx < M * N; idx += blockDim.x) {
      const int i = idx / N, j = idx % N;
      float acc = accumulate ? C[i * ldc + j] : 0.f;
      for (int k = 0; k < K; ++k)
        acc = fmaf(A_COL ? A[k * lda + i] : A[i * lda + k], B_COL ? B[j * ldb + k] : B[k * ldb + j], acc);
      C[i * ldc + j] = acc;
    }
  }
};

template <typename T, bool A_COL, bool B_COL>
__device__ __forceinline__ void block_mm(const T* A, int lda, const T* B, int ldb, float* C, int ldc, int M, int N,
                                         int K, bool accumulate) {
  BlockMM<T, A_COL, B_COL>::run(A, lda, B, ldb, C, ldc, M, N, K, accumulate);
}

__host__ __device__ constexpr size_t align128(size_t n) { return (n + 127) / 128 * 128; }

// Shared memory of a kernel is carved into 128-byte aligned regions, in order. The same code runs on the
// host (to size the launch and to choose tiles that fit the device) and in the kernel (to place the
// regions), so the two can never disagree.
struct Carve {
  size_t used = 0;
  __host__ __device__ size_t take(size_t bytes) {
    const size_t at = used;
    used += align128(bytes);
    return at;
  }
};

// Tiles. Every kernel has default tile sizes (rows BM x columns BN, compile-time constants in the
// instantiation the launcher prefers) and a second instantiation whose tiles come from the launch
// parameters (p.tile_m, p.tile_n). The launcher takes the defaults when their shared memory fits the
// device's opt-in limit (227 KiB on H100/H200, 163 KiB on A100, 99 KiB on sm_86/sm_89), otherwise it
// halves BM down to 16, then BN down to 16, until it fits (see fit_tiles). Tiles stay multiples of 16
// (the WMMA fragment), so every WMMA pointer and leading dimension rule still holds.

// Tile sizes and the padded leading dimensions (in elements) of the [.][RP] and [.][bn] shared-memory
// tiles, in T (ld_r, ld_n) and in fp32 (ld_rf, ld_nf).
template <int RP>
struct Tiles {
  int bm, bn, ld_r, ld_rf, ld_n, ld_nf;
  __host__ __device__ Tiles(int bm_, int bn_)
      : bm(bm_), bn(bn_), ld_r(RP + kPadT), ld_rf(RP + kPadF), ld_n(bn_ + kPadT), ld_nf(bn_ + kPadF) {}
};

// ----------------------------------------------------------------------------------------- forward

// Shared memory of the forward: the h accumulator (fp32) and a = act(h) live across both phases;
// phase 1 (x chunk [BM][BN] + w_down chunk [RP][BN]) and phase 2 (w_up tile [BN][RP] + u tile
// [BM][BN], fp32) share one scratch region. The d chunk of phase 1 and the d tile of phase 2 are both BN.
template <typename T, int RP>
struct Fwd : Tiles<RP> {
  static constexpr int BM = RP >= 256 ? 32 : 64;
  static constexpr int BN = 64;
  using Tiles<RP>::bm, Tiles<RP>::bn, Tiles<RP>::ld_r, Tiles<RP>::ld_rf, Tiles<RP>::ld_n, Tiles<RP>::ld_nf;
  size_t hacc, as, gs, xs, ws, wus, us, smem;
  __host__ __device__ Fwd(int bm_, int bn_) : Tiles<RP>(bm_, bn_) {
    Carve c;
    hacc = c.take(sizeof(float) * bm * ld_rf);
    as = c.take(sizeof(T) * bm * ld_r);
    gs = c.take(sizeof(float) * bm);
    Carve p1 = c, p2 = c;
    xs = p1.take(sizeof(T) * bm * ld_n);
    ws = p1.take(sizeof(T) * RP * ld_n);
    wus = p2.take(sizeof(T) * bn * ld_r);
    us = p2.take(sizeof(float) * bm * ld_nf);
    smem = p1.used > p2.used ? p1.used : p2.used;
  }
};

template <typename T, int RP, bool DYN>
__global__ void __launch_bounds__(kThreads, 1) adapter_fwd_kernel(const AdapterParams p) {
  using C = Fwd<T, RP>;
  const C L(DYN ? p.tile_m : C::BM, DYN ? p.tile_n : C::BN);
  extern __shared__ __align__(128) unsigned char smem[];
  float* hacc = reinterpret_cast<float*>(smem + L.hacc);  // [bm][ld_rf]
  T* as = reinterpret_cast<T*>(smem + L.as);               // [bm][ld_r]  a = act(h)
  float* gs = reinterpret_cast<float*>(smem + L.gs);       // [bm]        row scales
  T* xs = reinterpret_cast<T*>(smem + L.xs);               // phase 1: [bm][ld_n]
  T* ws = reinterpret_cast<T*>(smem + L.ws);               // phase 1: [RP][ld_n]
  T* wus = reinterpret_cast<T*>(smem + L.wus);             // phase 2: [bn][ld_r]
  float* us = reinterpret_cast<float*>(smem + L.us);       // phase 2: [bm][ld_nf]

  const T* x = static_cast<const T*>(p.x);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * L.bm;
  load_row_scales(gs, p, m0, p.M, L.bm);  // (the phase-1 barriers order it before its use in phase 2)

  // phase 1: h = x @ w_down^T
  for (int64_t k0 = 0; k0 < p.d; k0 += L.bn) {
    load_tile<T>(xs, L.ld_n, L.bm, L.bn, x, p.stride_x, m0, p.M, k0, p.d, p.vec_x);
    load_tile<T>(ws, L.ld_n, RP, L.bn, static_cast<const T*>(p.w_down), p.d, 0, p.r, k0, p.d, p.vec_wd);
    __syncthreads();
    block_mm<T, false, true>(xs, L.ld_n, ws, L.ld_n, hacc, L.ld_rf, L.bm, RP, L.bn, k0 > 0);
    __syncthreads();
  }
  const T* bd = static_cast<const T*>(p.b_down);
  for (int idx = threadIdx.x; idx < L.bm * RP; idx += blockDim.x) {
    const int i = idx / RP, k = idx % RP;
    const int64_t m = m0 + i;
    float v = 0.f;
    if (k < p.r) {
      v = hacc[i * L.ld_rf + k] + (bd ? to_f(bd[k]) : 0.f);
      if (m < p.M) p.h[m * p.r + k] = v;
      v = act_fwd(v, p.act);
    }
    as[i * L.ld_r + k] = from_f<T>(v);
  }
  __syncthreads();

  // phase 2: u = a @ w_up^T per bn-column tile, then the epilogue writes y
  const T* bu = static_cast<const T*>(p.b_up);
  const T* skip = p.skip_mode == 1 ? x : static_cast<const T*>(p.skip);
  const int64_t sstride = p.skip_mode == 1 ? p.stride_x : p.stride_skip;
  T* y = static_cast<T*>(p.y);
  for (int64_t n0 = 0; n0 < p.d; n0 += L.bn) {
    load_tile<T>(wus, L.ld_r, L.bn, RP, static_cast<const T*>(p.w_up), p.r, n0, p.d, 0, p.r, p.vec_wu);
    __syncthreads();
    block_mm<T, false, true>(as, L.ld_r, wus, L.ld_r, us, L.ld_nf, L.bm, L.bn, RP, false);
    __syncthreads();
    for (int idx = threadIdx.x; idx < L.bm * L.bn; idx += blockDim.x) {
      const int i = idx / L.bn, j = idx % L.bn;
      const int64_t m = m0 + i, c = n0 + j;
      if (m < p.M && c < p.d) {
        float v = gs[i] * col_scale(p, c) * (us[i * L.ld_nf + j] + (bu ? to_f(bu[c]) : 0.f));
        if (p.skip_mode != 0) v += to_f(skip[m * sstride + c]);
        y[m * p.stride_y + c] = from_f<T>(v);
      }
    }
    __syncthreads();
  }
}

// --------------------------------------------------------------------------------- backward: rows

// Shared memory of the rows kernel: h (fp32), the P accumulator (fp32), a then d_h (T), the dy and
// dy * s tiles (T), one weight tile (w_up [BN][RP] in pass 1, w_down [RP][BN] in pass 2), the dx tile
// (fp32) and the per-row (dy * s) . b_up sums.
template <typename T, int RP>
struct BwdRows : Tiles<RP> {
  static constexpr int BM = RP >= 256 ? 32 : 64;
  static constexpr int BN = RP >= 128 ? 32 : 64;
  using Tiles<RP>::bm, Tiles<RP>::bn, Tiles<RP>::ld_r, Tiles<RP>::ld_rf, Tiles<RP>::ld_n, Tiles<RP>::ld_nf;
  size_t hs, pa, dhs, dys, sdys, wt, us, dgb, gs, smem;
  __host__ __device__ BwdRows(int bm_, int bn_) : Tiles<RP>(bm_, bn_) {
    Carve c;
    hs = c.take(sizeof(float) * bm * ld_rf);
    pa = c.take(sizeof(float) * bm * ld_rf);
    dhs = c.take(sizeof(T) * bm * ld_r);
    dys = c.take(sizeof(T) * bm * ld_n);
    sdys = c.take(sizeof(T) * bm * ld_n);
    const size_t wu = sizeof(T) * bn * ld_r, wd = sizeof(T) * RP * ld_n;
    wt = c.take(wu > wd ? wu : wd);
    us = c.take(sizeof(float) * bm * ld_nf);
    dgb = c.take(sizeof(float) * bm);
    gs = c.take(sizeof(float) * bm);
    smem = c.used;
  }
};

template <typename T, int RP, bool DYN>
__global__ void __launch_bounds__(kThreads, 1) adapter_bwd_rows_kernel(const AdapterParams p) {
  using C = BwdRows<T, RP>;
  const C L(DYN ? p.tile_m : C::BM, DYN ? p.tile_n : C::BN);
  extern __shared__ __align__(128) unsigned char smem[];
  float* hs = reinterpret_cast<float*>(smem + L.hs);     // [bm][ld_rf] h
  float* pa = reinterpret_cast<float*>(smem + L.pa);     // [bm][ld_rf] P = (dy * s) @ w_up
  T* dhs = reinterpret_cast<T*>(smem + L.dhs);           // [bm][ld_r]  d_h (for the dx matmul)
  T* dys = reinterpret_cast<T*>(smem + L.dys);           // [bm][ld_n]  dy
  T* sdys = reinterpret_cast<T*>(smem + L.sdys);         // [bm][ld_n]  dy * s
  T* wt = reinterpret_cast<T*>(smem + L.wt);             // w_up [bn][ld_r], then w_down [RP][ld_n]
  float* us = reinterpret_cast<float*>(smem + L.us);     // [bm][ld_nf] dx tile
  float* dgb = reinterpret_cast<float*>(smem + L.dgb);   // [bm] (dy * s) . b_up
  float* gs = reinterpret_cast<float*>(smem + L.gs);     // [bm] row scales

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * L.bm;
  const T* dy = static_cast<const T*>(p.dy);
  const T* bu = static_cast<const T*>(p.b_up);
  for (int idx = threadIdx.x; idx < L.bm * RP; idx += blockDim.x) {
    const int i = idx / RP, k = idx % RP;
    const int64_t m = m0 + i;
    hs[i * L.ld_rf + k] = (m < p.M && k < p.r) ? p.h[m * p.r + k] : 0.f;
    pa[i * L.ld_rf + k] = 0.f;
  }
  for (int i = threadIdx.x; i < L.bm; i += blockDim.x) dgb[i] = 0.f;
  load_row_scales(gs, p, m0, p.M, L.bm);
  __syncthreads();

  // pass 1 over d: P += (dy * s) @ w_up; the (dy * s) . b_up row sums for d_g
  for (int64_t n0 = 0; n0 < p.d; n0 += L.bn) {
    load_tile<T>(dys, L.ld_n, L.bm, L.bn, dy, p.stride_dy, m0, p.M, n0, p.d, p.vec_dy);
    load_tile<T>(wt, L.ld_r, L.bn, RP, static_cast<const T*>(p.w_up), p.r, n0, p.d, 0, p.r, p.vec_wu);
    __syncthreads();
    for (int idx = threadIdx.x; idx < L.bm * L.bn; idx += blockDim.x) {
      const int i = idx / L.bn, j = idx % L.bn;
      const int64_t c = n0 + j;
      sdys[i * L.ld_n + j] = from_f<T>(c < p.d ? to_f(dys[i * L.ld_n + j]) * col_scale(p, c) : 0.f);
    }
    __syncthreads();
    block_mm<T, false, false>(sdys, L.ld_n, wt, L.ld_r, pa, L.ld_rf, L.bm, RP, L.bn, true);
    if (p.need_dg && bu) {
      for (int i = threadIdx.x; i < L.bm; i += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < L.bn && n0 + j < p.d; ++j)
          acc += to_f(dys[i * L.ld_n + j]) * col_scale(p, n0 + j) * to_f(bu[n0 + j]);
        dgb[i] += acc;
      }
    }
    __syncthreads();
  }

  // d_h = g P act'(h) (padded r columns stay 0: an inf in dy meets zero-padded w_up columns there);
  // d_g[m] = a[m] . P[m] + (dy[m] * s) . b_up
  for (int idx = threadIdx.x; idx < L.bm * RP; idx += blockDim.x) {
    const int i = idx / RP, k = idx % RP;
    const int64_t m = m0 + i;
    const float v = k < p.r ? gs[i] * pa[i * L.ld_rf + k] * act_grad(hs[i * L.ld_rf + k], p.act) : 0.f;
    if (p.need_dh && m < p.M && k < p.r) p.dh[m * p.r + k] = v;
    dhs[i * L.ld_r + k] = from_f<T>(v);
  }
  if (p.need_dg) {
    for (int i = threadIdx.x; i < L.bm; i += blockDim.x) {
      if (m0 + i >= p.M) continue;
      float acc = dgb[i];
      for (int k = 0; k < p.r; ++k) acc += act_fwd(hs[i * L.ld_rf + k], p.act) * pa[i * L.ld_rf + k];
      p.dg_row[m0 + i] = acc;
    }
  }
  __syncthreads();
  if (!p.need_dx) return;

  // pass 2 over d: dx = d_h @ w_down (+ dy when the skip was x)
  T* dx = static_cast<T*>(p.dx);
  for (int64_t n0 = 0; n0 < p.d; n0 += L.bn) {
    load_tile<T>(wt, L.ld_n, RP, L.bn, static_cast<const T*>(p.w_down), p.d, 0, p.r, n0, p.d, p.vec_wd);
    __syncthreads();
    block_mm<T, false, false>(dhs, L.ld_r, wt, L.ld_n, us, L.ld_nf, L.bm, L.bn, RP, false);
    __syncthreads();
    for (int idx = threadIdx.x; idx < L.bm * L.bn; idx += blockDim.x) {
      const int i = idx / L.bn, j = idx % L.bn;
      const int64_t m = m0 + i, c = n0 + j;
      if (m < p.M && c < p.d) {
        float v = us[i * L.ld_nf + j];
        if (p.skip_mode == 1) v += to_f(dy[m * p.stride_dy + c]);
        dx[m * p.stride_dx + c] = from_f<T>(v);
      }
    }
    __syncthreads();
  }
}

// --------------------------------------------------------------------------------- backward: cols

// Shared memory of the cols kernel: the R tile [BN][RP] and d_w_down tile [RP][BN] accumulators and
// the q tile (fp32), then per row step the dy and x tiles [BM][BN] and the g a and d_h tiles [BM][RP] (T).
template <typename T, int RP>
struct BwdCols : Tiles<RP> {
  static constexpr int BM = RP >= 256 ? 16 : (RP >= 128 ? 32 : 64);
  static constexpr int BN = RP >= 128 ? 32 : 64;
  using Tiles<RP>::bm, Tiles<RP>::bn, Tiles<RP>::ld_r, Tiles<RP>::ld_rf, Tiles<RP>::ld_n, Tiles<RP>::ld_nf;
  size_t ar, awd, aq, gs, dys, xs, gas, dhs, smem;
  __host__ __device__ BwdCols(int bm_, int bn_) : Tiles<RP>(bm_, bn_) {
    Carve c;
    ar = c.take(sizeof(float) * bn * ld_rf);
    awd = c.take(sizeof(float) * RP * ld_nf);
    aq = c.take(sizeof(float) * bn);
    gs = c.take(sizeof(float) * bm);
    dys = c.take(sizeof(T) * bm * ld_n);
    xs = c.take(sizeof(T) * bm * ld_n);
    gas = c.take(sizeof(T) * bm * ld_r);
    dhs = c.take(sizeof(T) * bm * ld_r);
    smem = c.used;
  }
};

template <typename T, int RP, bool DYN>
__global__ void __launch_bounds__(kThreads, 1) adapter_bwd_cols_kernel(const AdapterParams p) {
  using C = BwdCols<T, RP>;
  const C L(DYN ? p.tile_m : C::BM, DYN ? p.tile_n : C::BN);
  extern __shared__ __align__(128) unsigned char smem[];
  float* ar = reinterpret_cast<float*>(smem + L.ar);    // [bn][ld_rf]  R = (dy)^T (g a)
  float* awd = reinterpret_cast<float*>(smem + L.awd);  // [RP][ld_nf]  d_w_down = d_h^T x
  float* aq = reinterpret_cast<float*>(smem + L.aq);    // [bn]         q = sum_m g dy
  float* gs = reinterpret_cast<float*>(smem + L.gs);    // [bm]         row scales of this step
  T* dys = reinterpret_cast<T*>(smem + L.dys);          // [bm][ld_n]
  T* xs = reinterpret_cast<T*>(smem + L.xs);            // [bm][ld_n]
  T* gas = reinterpret_cast<T*>(smem + L.gas);          // [bm][ld_r]   g a
  T* dhs = reinterpret_cast<T*>(smem + L.dhs);          // [bm][ld_r]   d_h

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * L.bn;
  const int64_t row_start = static_cast<int64_t>(blockIdx.y) * p.rows_per_split;
  const int64_t row_end = row_start + p.rows_per_split < p.M ? row_start + p.rows_per_split : p.M;
  const bool need_dy = p.need_R || p.need_q;

  for (int idx = threadIdx.x; idx < L.bn * RP; idx += blockDim.x) {
    ar[(idx / RP) * L.ld_rf + idx % RP] = 0.f;
    awd[(idx / L.bn) * L.ld_nf + idx % L.bn] = 0.f;
  }
  for (int j = threadIdx.x; j < L.bn; j += blockDim.x) aq[j] = 0.f;

  for (int64_t m0 = row_start; m0 < row_end; m0 += L.bm) {
    if (need_dy)
      load_tile<T>(dys, L.ld_n, L.bm, L.bn, static_cast<const T*>(p.dy), p.stride_dy, m0, row_end, n0, p.d, p.vec_dy);
    if (p.need_wd)
      load_tile<T>(xs, L.ld_n, L.bm, L.bn, static_cast<const T*>(p.x), p.stride_x, m0, row_end, n0, p.d, p.vec_x);
    load_row_scales(gs, p, m0, row_end, L.bm);
    __syncthreads();
    for (int idx = threadIdx.x; idx < L.bm * RP; idx += blockDim.x) {
      const int i = idx / RP, k = idx % RP;
      const int64_t m = m0 + i;
      const bool in = m < row_end && k < p.r;
      if (p.need_R) gas[i * L.ld_r + k] = from_f<T>(in ? gs[i] * act_fwd(p.h[m * p.r + k], p.act) : 0.f);
      if (p.need_wd) dhs[i * L.ld_r + k] = from_f<T>(in ? p.dh[m * p.r + k] : 0.f);
    }
    __syncthreads();
    if (p.need_R) block_mm<T, true, false>(dys, L.ld_n, gas, L.ld_r, ar, L.ld_rf, L.bn, RP, L.bm, true);
    if (p.need_wd) block_mm<T, true, false>(dhs, L.ld_r, xs, L.ld_n, awd, L.ld_nf, RP, L.bn, L.bm, true);
    if (p.need_q) {
      for (int j = threadIdx.x; j < L.bn; j += blockDim.x) {
        float acc = 0.f;
        for (int i = 0; i < L.bm && m0 + i < row_end; ++i) acc += to_f(dys[i * L.ld_n + j]) * gs[i];
        aq[j] += acc;
      }
    }
    __syncthreads();
  }

  // one fp32 partial per split (stage two of the reduction and the scale products run on the host)
  const int64_t split = blockIdx.y;
  for (int idx = threadIdx.x; idx < L.bn * RP; idx += blockDim.x) {
    const int j = idx / RP, k = idx % RP;
    const int64_t c = n0 + j;
    if (p.need_R && c < p.d && k < p.r) p.p_R[(split * p.d + c) * p.r + k] = ar[j * L.ld_rf + k];
    const int kk = idx / L.bn, jj = idx % L.bn;
    const int64_t cc = n0 + jj;
    if (p.need_wd && cc < p.d && kk < p.r) p.p_wd[(split * p.r + kk) * p.d + cc] = awd[kk * L.ld_nf + jj];
  }
  for (int j = threadIdx.x; j < L.bn; j += blockDim.x)
    if (p.need_q && n0 + j < p.d) p.p_q[split * p.d + n0 + j] = aq[j];
}

// ---------------------------------------------------------------------------------------- launch

bool aligned16(const void* ptr, int64_t stride_elems, size_t elem) {
  return ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (stride_elems * elem) % 16 == 0;
}

// 16-byte vector loads are legal for a tensor when its base and every row start are 16-byte aligned.
void set_vector_flags(AdapterParams& p, size_t elem) {
  p.vec_x = aligned16(p.x, p.stride_x, elem);
  p.vec_dy = aligned16(p.dy, p.stride_dy, elem);
  p.vec_wd = aligned16(p.w_down, p.d, elem);
  p.vec_wu = aligned16(p.w_up, p.r, elem);
}

// The tiles a kernel runs with on a device offering `limit` bytes of shared memory per block: its
// defaults if they fit, else BM halved down to 16, then BN halved down to 16. False if nothing fits.
template <class Cfg>
bool fit_tiles(size_t limit, int* bm, int* bn) {
  *bm = Cfg::BM;
  *bn = Cfg::BN;
  while (Cfg(*bm, *bn).smem > limit) {
    if (*bm > 16) *bm /= 2;
    else if (*bn > 16) *bn /= 2;
    else return false;
  }
  return true;
}

LaunchStatus from_error(cudaError_t err) {
  LaunchStatus s;
  s.err = err;
  return s;
}

// Choose the tiles for this device, opt the kernel into its dynamic shared memory and launch it: the
// default-tile instantiation (FIXED) when they fit, the runtime-tile one (DYN) otherwise. `grid_of`
// gives the grid for the chosen tiles.
template <class Cfg, typename T, typename GridOf>
LaunchStatus launch(void (*fixed)(AdapterParams), void (*dyn)(AdapterParams), GridOf grid_of, AdapterParams p,
                    cudaStream_t stream) {
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return from_error(err);
  int bm = 0, bn = 0;
  if (!fit_tiles<Cfg>(static_cast<size_t>(optin), &bm, &bn)) {
    LaunchStatus s;
    s.err = cudaErrorInvalidConfiguration;
    s.smem_needed = static_cast<int64_t>(Cfg(16, 16).smem);
    s.smem_limit = optin;
    return s;
  }
  const bool defaults = bm == Cfg::BM && bn == Cfg::BN;
  void (*kernel)(AdapterParams) = defaults ? fixed : dyn;
  const size_t smem = Cfg(bm, bn).smem;
  p.tile_m = bm;
  p.tile_n = bn;
  set_vector_flags(p, sizeof(T));
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return from_error(err);
  kernel<<<grid_of(bm, bn), kThreads, smem, stream>>>(p);
  LaunchStatus s = from_error(cudaGetLastError());
  s.tile_m = bm;
  s.tile_n = bn;
  return s;
}

unsigned blocks_of(int64_t n, int64_t per_block) { return static_cast<unsigned>((n + per_block - 1) / per_block); }

template <typename T, int RP>
struct FwdLaunch {
  static LaunchStatus run(const AdapterParams& p, cudaStream_t s) {
    return launch<Fwd<T, RP>, T>(adapter_fwd_kernel<T, RP, false>, adapter_fwd_kernel<T, RP, true>,
                                 [&](int bm, int) { return dim3(blocks_of(p.M, bm)); }, p, s);
  }
};
template <typename T, int RP>
struct RowsLaunch {
  static LaunchStatus run(const AdapterParams& p, cudaStream_t s) {
    return launch<BwdRows<T, RP>, T>(adapter_bwd_rows_kernel<T, RP, false>, adapter_bwd_rows_kernel<T, RP, true>,
                                     [&](int bm, int) { return dim3(blocks_of(p.M, bm)); }, p, s);
  }
};
template <typename T, int RP>
struct ColsLaunch {  // rows_per_split is a multiple of the default BM, hence of every smaller BM
  static LaunchStatus run(const AdapterParams& p, cudaStream_t s) {
    return launch<BwdCols<T, RP>, T>(adapter_bwd_cols_kernel<T, RP, false>, adapter_bwd_cols_kernel<T, RP, true>,
                                     [&](int, int bn) { return dim3(blocks_of(p.d, bn), static_cast<unsigned>(p.splits)); },
                                     p, s);
  }
};

template <template <typename, int> class F>
LaunchStatus launch_checked(const AdapterParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.d == 0) return LaunchStatus{};
  if (p.r < 1 || p.r > kCudaMaxRank) return from_error(cudaErrorInvalidValue);
  return dispatch<F>(p.dtype, p.r, p, stream);
}

template <typename T, int RP>
struct ColsTile {  // the default tile of the cols kernel (it does not depend on the dtype)
  static int64_t run(bool rows) { return rows ? BwdCols<T, RP>::BM : BwdCols<T, RP>::BN; }
};

}  // namespace

int64_t adapter_cuda_bwd_cols_block_rows(int64_t r) { return dispatch<ColsTile>(DType::kFloat32, r, true); }
int64_t adapter_cuda_bwd_cols_block_cols(int64_t r) { return dispatch<ColsTile>(DType::kFloat32, r, false); }

LaunchStatus adapter_forward_cuda(const AdapterParams& p, cudaStream_t stream) { return launch_checked<FwdLaunch>(p, stream); }
LaunchStatus adapter_backward_rows_cuda(const AdapterParams& p, cudaStream_t stream) { return launch_checked<RowsLaunch>(p, stream); }
LaunchStatus adapter_backward_cols_cuda(const AdapterParams& p, cudaStream_t stream) { return launch_checked<ColsLaunch>(p, stream); }

}  // namespace adapterfuse
