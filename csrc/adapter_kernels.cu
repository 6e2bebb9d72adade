// CUDA kernels of the fused adapter (DESIGN.md section 2), fp32 / fp16 / bf16 with fp32 accumulation.
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
// Backward, gy = dy * g * s:
//   rows kernel (block per BM rows): d_a = gy @ w_up over d tiles (+ sum_c dy s u per row for d_g),
//     d_h = d_a * act'(h) -> dh (fp32), then dx = d_h @ w_down (+ dy when skip is x).
//   cols kernel (grid = d tiles x row splits): per column tile, over its rows:
//     d_w_up += gy^T a, d_b_up += sum gy, d_w_down += d_h^T x, d_s += sum dy g u; one fp32 partial per
//     split, summed by the caller (deterministic two-stage reduction, no atomics).
// Offsets: row indices are int64 and multiplied by int64 strides (M * d may exceed 2^31).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "adapter_kernels.cuh"

namespace adapterfuse {
namespace {

constexpr int kThreads = 128;  // 4 warps: one 16-row band of a 64-row tile each
constexpr int kPadT = 8;       // smem row padding (elements) for operand tiles: breaks bank conflicts,
constexpr int kPadF = 4;       // keeps rows 16-byte aligned as WMMA's ldm rules need

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float act_fwd(float h, int act) {
  switch (act) {
    case 0: return h;
    case 1: return h < 0.f ? 0.f : h;  // NaN stays NaN
    case 2: return 0.5f * h * (1.f + erff(h * 0.70710678118654752f));
    case 3: return 0.5f * h * (1.f + tanhf(0.7978845608028654f * (h + 0.044715f * h * h * h)));
    default: return h / (1.f + __expf(-h));
  }
}

__device__ __forceinline__ float act_grad(float h, int act) {
  switch (act) {
    case 0: return 1.f;
    case 1: return h <= 0.f ? 0.f : 1.f;
    case 2: return 0.5f * (1.f + erff(h * 0.70710678118654752f)) + h * 0.3989422804014327f * __expf(-0.5f * h * h);
    case 3: {
      const float k = 0.7978845608028654f;
      const float t = tanhf(k * (h + 0.044715f * h * h * h));
      return 0.5f * (1.f + t) + 0.5f * h * (1.f - t * t) * k * (1.f + 0.134145f * h * h);
    }
    default: {
      const float sg = 1.f / (1.f + __expf(-h));
      return sg * (1.f + h * (1.f - sg));
    }
  }
}

__device__ __forceinline__ float row_scale(const AdapterParams& p, int64_t m) {
  return p.sample_scale ? p.sample_scale[m / p.tokens] : 1.f;
}

__device__ __forceinline__ float col_scale(const AdapterParams& p, int64_t c) {
  return p.scale == nullptr ? p.scale_value : (p.scale_n == 1 ? p.scale[0] : p.scale[c]);
}

// Copy the tile src[row0 : row0 + ROWS, col0 : col0 + COLS] (row stride `stride`) into smem dst
// (row stride ldd), zero-filling outside [rows, cols]. 16-byte vector loads when `vec` (every row
// start and col0 aligned to 16 bytes) and the chunk lies inside the tensor.
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void load_tile(T* dst, int ldd, const T* __restrict__ src, int64_t stride, int64_t row0,
                                          int64_t rows, int64_t col0, int64_t cols, bool vec) {
  constexpr int V = 16 / sizeof(T);
  static_assert(COLS % V == 0, "tile width must hold whole 16-byte vectors");
  for (int idx = threadIdx.x; idx < ROWS * (COLS / V); idx += blockDim.x) {
    const int i = idx / (COLS / V), j = (idx % (COLS / V)) * V;
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
  static __device__ void run(const T* A, int lda, const T* B, int ldb, float* C, int ldc, int M, int N, int K,
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
  static __device__ void run(const float* A, int lda, const float* B, int ldb, float* C, int ldc, int M, int N,
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

// ----------------------------------------------------------------------------------------- forward

template <typename T, int RP>
struct Fwd {
  static constexpr int BM = RP >= 256 ? 32 : 64;  // rows per block
  static constexpr int BK = 64;                   // d chunk of phase 1
  static constexpr int BN = 64;                   // d tile of phase 2
  static constexpr int LD_X = BK + kPadT, LD_R = RP + kPadT, LD_HF = RP + kPadF, LD_U = BN + kPadF;
  static constexpr size_t HACC = align128(sizeof(float) * BM * LD_HF);
  static constexpr size_t AS = align128(sizeof(T) * BM * LD_R);
  static constexpr size_t P1 = align128(sizeof(T) * BM * LD_X) + align128(sizeof(T) * RP * LD_X);
  static constexpr size_t P2 = align128(sizeof(T) * BN * LD_R) + align128(sizeof(float) * BM * LD_U);
  static constexpr size_t SMEM = HACC + AS + (P1 > P2 ? P1 : P2);
};

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads) adapter_fwd_kernel(const AdapterParams p) {
  using C = Fwd<T, RP>;
  extern __shared__ __align__(128) unsigned char smem[];
  float* hacc = reinterpret_cast<float*>(smem);                 // [BM][LD_HF]
  T* as = reinterpret_cast<T*>(smem + C::HACC);                  // [BM][LD_R]  a = act(h)
  unsigned char* scratch = smem + C::HACC + C::AS;
  T* xs = reinterpret_cast<T*>(scratch);                         // phase 1: [BM][LD_X]
  T* ws = reinterpret_cast<T*>(scratch + align128(sizeof(T) * C::BM * C::LD_X));  // [RP][LD_X]
  T* wus = reinterpret_cast<T*>(scratch);                        // phase 2: [BN][LD_R]
  float* us = reinterpret_cast<float*>(scratch + align128(sizeof(T) * C::BN * C::LD_R));  // [BM][LD_U]

  const T* x = static_cast<const T*>(p.x);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * C::BM;

  // phase 1: h = x @ w_down^T
  for (int64_t k0 = 0; k0 < p.d; k0 += C::BK) {
    load_tile<T, C::BM, C::BK>(xs, C::LD_X, x, p.stride_x, m0, p.M, k0, p.d, p.vec_x);
    load_tile<T, RP, C::BK>(ws, C::LD_X, static_cast<const T*>(p.w_down), p.d, 0, p.r, k0, p.d, p.vec_wd);
    __syncthreads();
    block_mm<T, false, true>(xs, C::LD_X, ws, C::LD_X, hacc, C::LD_HF, C::BM, RP, C::BK, k0 > 0);
    __syncthreads();
  }
  const T* bd = static_cast<const T*>(p.b_down);
  for (int idx = threadIdx.x; idx < C::BM * RP; idx += blockDim.x) {
    const int i = idx / RP, k = idx % RP;
    const int64_t m = m0 + i;
    float v = 0.f;
    if (k < p.r) {
      v = hacc[i * C::LD_HF + k] + (bd ? to_f(bd[k]) : 0.f);
      if (m < p.M) p.h[m * p.r + k] = v;
      v = act_fwd(v, p.act);
    }
    as[i * C::LD_R + k] = from_f<T>(v);
  }
  __syncthreads();

  // phase 2: u = a @ w_up^T per BN-column tile, then the epilogue writes y
  const T* bu = static_cast<const T*>(p.b_up);
  const T* skip = p.skip_mode == 1 ? x : static_cast<const T*>(p.skip);
  const int64_t sstride = p.skip_mode == 1 ? p.stride_x : p.stride_skip;
  T* y = static_cast<T*>(p.y);
  for (int64_t n0 = 0; n0 < p.d; n0 += C::BN) {
    load_tile<T, C::BN, RP>(wus, C::LD_R, static_cast<const T*>(p.w_up), p.r, n0, p.d, 0, p.r, p.vec_wu);
    __syncthreads();
    block_mm<T, false, true>(as, C::LD_R, wus, C::LD_R, us, C::LD_U, C::BM, C::BN, RP, false);
    __syncthreads();
    for (int idx = threadIdx.x; idx < C::BM * C::BN; idx += blockDim.x) {
      const int i = idx / C::BN, j = idx % C::BN;
      const int64_t m = m0 + i, c = n0 + j;
      if (m < p.M && c < p.d) {
        float v = row_scale(p, m) * col_scale(p, c) * (us[i * C::LD_U + j] + (bu ? to_f(bu[c]) : 0.f));
        if (p.skip_mode != 0) v += to_f(skip[m * sstride + c]);
        y[m * p.stride_y + c] = from_f<T>(v);
      }
    }
    __syncthreads();
  }
}

// --------------------------------------------------------------------------------- backward: rows

template <typename T, int RP>
struct BwdRows {
  static constexpr int BM = RP >= 256 ? 32 : 64;
  static constexpr int BN = RP >= 128 ? 32 : 64;
  static constexpr int LD_R = RP + kPadT, LD_RF = RP + kPadF, LD_N = BN + kPadT, LD_NF = BN + kPadF;
  static constexpr size_t HS = align128(sizeof(float) * BM * LD_RF);   // h (fp32)
  static constexpr size_t DA = align128(sizeof(float) * BM * LD_RF);   // d_a accumulator
  static constexpr size_t AS = align128(sizeof(T) * BM * LD_R);        // a, later d_h (T)
  static constexpr size_t DYS = align128(sizeof(T) * BM * LD_N);
  static constexpr size_t GYS = align128(sizeof(T) * BM * LD_N);
  static constexpr size_t WUS = align128(sizeof(T) * BN * LD_R);       // also w_down tile [RP][LD_N]
  static constexpr size_t WDS = align128(sizeof(T) * RP * LD_N);
  static constexpr size_t US = align128(sizeof(float) * BM * LD_NF);
  static constexpr size_t DG = align128(sizeof(float) * BM);
  static constexpr size_t W = WUS > WDS ? WUS : WDS;
  static constexpr size_t SMEM = HS + DA + AS + DYS + GYS + W + US + DG;
};

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads) adapter_bwd_rows_kernel(const AdapterParams p) {
  using C = BwdRows<T, RP>;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* q = smem;
  float* hs = reinterpret_cast<float*>(q); q += C::HS;
  float* da = reinterpret_cast<float*>(q); q += C::DA;
  T* as = reinterpret_cast<T*>(q); q += C::AS;
  T* dys = reinterpret_cast<T*>(q); q += C::DYS;
  T* gys = reinterpret_cast<T*>(q); q += C::GYS;
  T* wt = reinterpret_cast<T*>(q); q += C::W;   // w_up tile [BN][LD_R], then w_down tile [RP][LD_N]
  float* us = reinterpret_cast<float*>(q); q += C::US;
  float* dg = reinterpret_cast<float*>(q);

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * C::BM;
  const T* dy = static_cast<const T*>(p.dy);
  const T* bu = static_cast<const T*>(p.b_up);
  for (int idx = threadIdx.x; idx < C::BM * RP; idx += blockDim.x) {
    const int i = idx / RP, k = idx % RP;
    const int64_t m = m0 + i;
    const float h = (m < p.M && k < p.r) ? p.h[m * p.r + k] : 0.f;
    hs[i * C::LD_RF + k] = h;
    as[i * C::LD_R + k] = from_f<T>(k < p.r ? act_fwd(h, p.act) : 0.f);
    da[i * C::LD_RF + k] = 0.f;
  }
  for (int i = threadIdx.x; i < C::BM; i += blockDim.x) dg[i] = 0.f;
  __syncthreads();

  // pass 1 over d: d_a += gy @ w_up; sum_c dy * s * u per row for the sample_scale gradient
  for (int64_t n0 = 0; n0 < p.d; n0 += C::BN) {
    load_tile<T, C::BM, C::BN>(dys, C::LD_N, dy, p.stride_dy, m0, p.M, n0, p.d, p.vec_dy);
    load_tile<T, C::BN, RP>(wt, C::LD_R, static_cast<const T*>(p.w_up), p.r, n0, p.d, 0, p.r, p.vec_wu);
    __syncthreads();
    for (int idx = threadIdx.x; idx < C::BM * C::BN; idx += blockDim.x) {
      const int i = idx / C::BN, j = idx % C::BN;
      const int64_t m = m0 + i, c = n0 + j;
      const float g = m < p.M ? row_scale(p, m) : 0.f;
      const float s = c < p.d ? col_scale(p, c) : 0.f;
      gys[i * C::LD_N + j] = from_f<T>(to_f(dys[i * C::LD_N + j]) * g * s);
    }
    if (p.need_dg) block_mm<T, false, true>(as, C::LD_R, wt, C::LD_R, us, C::LD_NF, C::BM, C::BN, RP, false);
    __syncthreads();
    block_mm<T, false, false>(gys, C::LD_N, wt, C::LD_R, da, C::LD_RF, C::BM, RP, C::BN, true);
    if (p.need_dg) {
      for (int i = threadIdx.x; i < C::BM; i += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < C::BN; ++j) {
          const int64_t c = n0 + j;
          if (c < p.d) acc += to_f(dys[i * C::LD_N + j]) * col_scale(p, c) * (us[i * C::LD_NF + j] + (bu ? to_f(bu[c]) : 0.f));
        }
        dg[i] += acc;
      }
    }
    __syncthreads();
  }

  // d_h = d_a * act'(h): to global (fp32) and, as T, into `as` for the dx matmul
  for (int idx = threadIdx.x; idx < C::BM * RP; idx += blockDim.x) {
    const int i = idx / RP, k = idx % RP;
    const int64_t m = m0 + i;
    const float v = k < p.r ? da[i * C::LD_RF + k] * act_grad(hs[i * C::LD_RF + k], p.act) : 0.f;
    if (p.need_dh && m < p.M && k < p.r) p.dh[m * p.r + k] = v;
    as[i * C::LD_R + k] = from_f<T>(v);
  }
  if (p.need_dg)
    for (int i = threadIdx.x; i < C::BM; i += blockDim.x)
      if (m0 + i < p.M) p.dg_row[m0 + i] = dg[i];
  __syncthreads();
  if (!p.need_dx) return;

  // pass 2 over d: dx = d_h @ w_down (+ dy when the skip was x)
  T* dx = static_cast<T*>(p.dx);
  for (int64_t n0 = 0; n0 < p.d; n0 += C::BN) {
    load_tile<T, RP, C::BN>(wt, C::LD_N, static_cast<const T*>(p.w_down), p.d, 0, p.r, n0, p.d, p.vec_wd);
    __syncthreads();
    block_mm<T, false, false>(as, C::LD_R, wt, C::LD_N, us, C::LD_NF, C::BM, C::BN, RP, false);
    __syncthreads();
    for (int idx = threadIdx.x; idx < C::BM * C::BN; idx += blockDim.x) {
      const int i = idx / C::BN, j = idx % C::BN;
      const int64_t m = m0 + i, c = n0 + j;
      if (m < p.M && c < p.d) {
        float v = us[i * C::LD_NF + j];
        if (p.skip_mode == 1) v += to_f(dy[m * p.stride_dy + c]);
        dx[m * p.stride_dx + c] = from_f<T>(v);
      }
    }
    __syncthreads();
  }
}

// --------------------------------------------------------------------------------- backward: cols

template <typename T, int RP>
struct BwdCols {
  static constexpr int BM = RP >= 256 ? 16 : (RP >= 128 ? 32 : 64);  // rows per step
  static constexpr int BN = RP >= 128 ? 32 : 64;                     // columns per block
  static constexpr int LD_R = RP + kPadT, LD_RF = RP + kPadF, LD_N = BN + kPadT, LD_NF = BN + kPadF;
  static constexpr size_t AWU = align128(sizeof(float) * BN * LD_RF);  // d_w_up tile [BN][RP]
  static constexpr size_t AWD = align128(sizeof(float) * RP * LD_NF);  // d_w_down tile [RP][BN]
  static constexpr size_t VEC = align128(sizeof(float) * BN);          // d_b_up, d_s tiles
  static constexpr size_t WUS = align128(sizeof(T) * BN * LD_R);       // w_up rows of this tile
  static constexpr size_t DYS = align128(sizeof(T) * BM * LD_N);       // dy, gy, x tiles
  static constexpr size_t AS = align128(sizeof(T) * BM * LD_R);        // a, d_h
  static constexpr size_t US = align128(sizeof(float) * BM * LD_NF);
  static constexpr size_t SMEM = AWU + AWD + 2 * VEC + WUS + 3 * DYS + 2 * AS + US;
};

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads) adapter_bwd_cols_kernel(const AdapterParams p) {
  using C = BwdCols<T, RP>;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* q = smem;
  float* awu = reinterpret_cast<float*>(q); q += C::AWU;
  float* awd = reinterpret_cast<float*>(q); q += C::AWD;
  float* abu = reinterpret_cast<float*>(q); q += C::VEC;
  float* asc = reinterpret_cast<float*>(q); q += C::VEC;
  T* wus = reinterpret_cast<T*>(q); q += C::WUS;
  T* dys = reinterpret_cast<T*>(q); q += C::DYS;
  T* gys = reinterpret_cast<T*>(q); q += C::DYS;
  T* xs = reinterpret_cast<T*>(q); q += C::DYS;
  T* as = reinterpret_cast<T*>(q); q += C::AS;
  T* dhs = reinterpret_cast<T*>(q); q += C::AS;
  float* us = reinterpret_cast<float*>(q);

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * C::BN;
  const int64_t row_start = static_cast<int64_t>(blockIdx.y) * p.rows_per_split;
  const int64_t row_end = row_start + p.rows_per_split < p.M ? row_start + p.rows_per_split : p.M;
  const T* bu = static_cast<const T*>(p.b_up);

  for (int idx = threadIdx.x; idx < C::BN * RP; idx += blockDim.x) {
    awu[(idx / RP) * C::LD_RF + idx % RP] = 0.f;
    awd[(idx / C::BN) * C::LD_NF + idx % C::BN] = 0.f;
  }
  for (int j = threadIdx.x; j < C::BN; j += blockDim.x) abu[j] = asc[j] = 0.f;
  load_tile<T, C::BN, RP>(wus, C::LD_R, static_cast<const T*>(p.w_up), p.r, n0, p.d, 0, p.r, p.vec_wu);
  __syncthreads();

  for (int64_t m0 = row_start; m0 < row_end; m0 += C::BM) {
    load_tile<T, C::BM, C::BN>(dys, C::LD_N, static_cast<const T*>(p.dy), p.stride_dy, m0, row_end, n0, p.d, p.vec_dy);
    if (p.need_wd)
      load_tile<T, C::BM, C::BN>(xs, C::LD_N, static_cast<const T*>(p.x), p.stride_x, m0, row_end, n0, p.d, p.vec_x);
    for (int idx = threadIdx.x; idx < C::BM * RP; idx += blockDim.x) {
      const int i = idx / RP, k = idx % RP;
      const int64_t m = m0 + i;
      const bool in = m < row_end && k < p.r;
      as[i * C::LD_R + k] = from_f<T>(in ? act_fwd(p.h[m * p.r + k], p.act) : 0.f);
      if (p.need_wd) dhs[i * C::LD_R + k] = from_f<T>(in ? p.dh[m * p.r + k] : 0.f);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < C::BM * C::BN; idx += blockDim.x) {
      const int i = idx / C::BN, j = idx % C::BN;
      const int64_t m = m0 + i, c = n0 + j;
      const float g = m < row_end ? row_scale(p, m) : 0.f;
      const float s = c < p.d ? col_scale(p, c) : 0.f;
      gys[i * C::LD_N + j] = from_f<T>(to_f(dys[i * C::LD_N + j]) * g * s);
    }
    if (p.need_s) block_mm<T, false, true>(as, C::LD_R, wus, C::LD_R, us, C::LD_NF, C::BM, C::BN, RP, false);
    __syncthreads();
    if (p.need_wu) block_mm<T, true, false>(gys, C::LD_N, as, C::LD_R, awu, C::LD_RF, C::BN, RP, C::BM, true);
    if (p.need_wd) block_mm<T, true, false>(dhs, C::LD_R, xs, C::LD_N, awd, C::LD_NF, RP, C::BN, C::BM, true);
    for (int j = threadIdx.x; j < C::BN; j += blockDim.x) {
      const int64_t c = n0 + j;
      if (c >= p.d) continue;
      const float s = col_scale(p, c), b = bu ? to_f(bu[c]) : 0.f;
      float sum_gy = 0.f, sum_s = 0.f;
      for (int i = 0; i < C::BM && m0 + i < row_end; ++i) {
        const float dyg = to_f(dys[i * C::LD_N + j]) * row_scale(p, m0 + i);
        sum_gy += dyg * s;
        if (p.need_s) sum_s += dyg * (us[i * C::LD_NF + j] + b);
      }
      abu[j] += sum_gy;
      asc[j] += sum_s;
    }
    __syncthreads();
  }

  const int64_t split = blockIdx.y;
  for (int idx = threadIdx.x; idx < C::BN * RP; idx += blockDim.x) {
    const int j = idx / RP, k = idx % RP;
    const int64_t c = n0 + j;
    if (p.need_wu && c < p.d && k < p.r) p.p_wu[(split * p.d + c) * p.r + k] = awu[j * C::LD_RF + k];
    const int kk = idx / C::BN, jj = idx % C::BN;
    const int64_t cc = n0 + jj;
    if (p.need_wd && cc < p.d && kk < p.r) p.p_wd[(split * p.r + kk) * p.d + cc] = awd[kk * C::LD_NF + jj];
  }
  for (int j = threadIdx.x; j < C::BN; j += blockDim.x) {
    const int64_t c = n0 + j;
    if (c >= p.d) continue;
    if (p.need_bu) p.p_bu[split * p.d + c] = abu[j];
    if (p.need_s) p.p_s[split * p.d + c] = asc[j];
  }
}

// ---------------------------------------------------------------------------------------- launch

bool aligned16(const void* ptr, int64_t stride_elems, size_t elem) {
  return ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (stride_elems * elem) % 16 == 0;
}

// 16-byte vector loads are legal for a tensor when its base and every row start are 16-byte aligned.
AdapterParams with_vector_flags(AdapterParams p, size_t elem) {
  p.vec_x = aligned16(p.x, p.stride_x, elem);
  p.vec_dy = aligned16(p.dy, p.stride_dy, elem);
  p.vec_wd = aligned16(p.w_down, p.d, elem);
  p.vec_wu = aligned16(p.w_up, p.r, elem);
  return p;
}

template <typename Kernel>
cudaError_t prepare(Kernel kernel, size_t smem) {
  int device = 0, max_optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (smem > static_cast<size_t>(max_optin)) return cudaErrorInvalidConfiguration;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

// Opt the kernel into its dynamic shared memory and launch it with the vector-load flags filled in.
template <typename T, typename Kernel>
cudaError_t launch(Kernel kernel, size_t smem, dim3 grid, const AdapterParams& p, cudaStream_t stream) {
  cudaError_t err = prepare(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, smem, stream>>>(with_vector_flags(p, sizeof(T)));
  return cudaGetLastError();
}

unsigned blocks_of(int64_t n, int64_t per_block) { return static_cast<unsigned>((n + per_block - 1) / per_block); }

template <typename T, int RP>
cudaError_t launch_fwd(const AdapterParams& p, cudaStream_t stream) {
  using C = Fwd<T, RP>;
  return launch<T>(adapter_fwd_kernel<T, RP>, C::SMEM, dim3(blocks_of(p.M, C::BM)), p, stream);
}

template <typename T, int RP>
cudaError_t launch_bwd_rows(const AdapterParams& p, cudaStream_t stream) {
  using C = BwdRows<T, RP>;
  return launch<T>(adapter_bwd_rows_kernel<T, RP>, C::SMEM, dim3(blocks_of(p.M, C::BM)), p, stream);
}

template <typename T, int RP>
cudaError_t launch_bwd_cols(const AdapterParams& p, cudaStream_t stream) {
  using C = BwdCols<T, RP>;
  const dim3 grid(blocks_of(p.d, C::BN), static_cast<unsigned>(p.splits));
  return launch<T>(adapter_bwd_cols_kernel<T, RP>, C::SMEM, grid, p, stream);
}

// r padded to the power of two >= 16 that the kernels are instantiated for
int padded_rank(int64_t r) { return r <= 16 ? 16 : r <= 32 ? 32 : r <= 64 ? 64 : r <= 128 ? 128 : 256; }

// Dispatch on dtype and on r padded to a power of two >= 16.
template <template <typename, int> class Launch>
cudaError_t dispatch(const AdapterParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.d == 0) return cudaSuccess;
  if (p.r < 1 || p.r > kCudaMaxRank) return cudaErrorInvalidValue;
  const int rp = padded_rank(p.r);
#define ADAPTERFUSE_RP(T)                                       \
  switch (rp) {                                                 \
    case 16: return Launch<T, 16>::run(p, stream);              \
    case 32: return Launch<T, 32>::run(p, stream);              \
    case 64: return Launch<T, 64>::run(p, stream);              \
    case 128: return Launch<T, 128>::run(p, stream);            \
    default: return Launch<T, 256>::run(p, stream);             \
  }
  switch (p.dtype) {
    case DType::kFloat32: ADAPTERFUSE_RP(float)
    case DType::kFloat16: ADAPTERFUSE_RP(__half)
    default: ADAPTERFUSE_RP(__nv_bfloat16)
  }
#undef ADAPTERFUSE_RP
}

template <typename T, int RP> struct FwdLaunch { static cudaError_t run(const AdapterParams& p, cudaStream_t s) { return launch_fwd<T, RP>(p, s); } };
template <typename T, int RP> struct RowsLaunch { static cudaError_t run(const AdapterParams& p, cudaStream_t s) { return launch_bwd_rows<T, RP>(p, s); } };
template <typename T, int RP> struct ColsLaunch { static cudaError_t run(const AdapterParams& p, cudaStream_t s) { return launch_bwd_cols<T, RP>(p, s); } };

}  // namespace

// The host reads the tile sizes off the kernel's own configuration (they do not depend on the dtype).
template <int RP> constexpr int64_t cols_bm() { return BwdCols<float, RP>::BM; }
template <int RP> constexpr int64_t cols_bn() { return BwdCols<float, RP>::BN; }

int64_t adapter_cuda_bwd_cols_block_rows(int64_t r) {
  switch (padded_rank(r)) {
    case 16: return cols_bm<16>();
    case 32: return cols_bm<32>();
    case 64: return cols_bm<64>();
    case 128: return cols_bm<128>();
    default: return cols_bm<256>();
  }
}

int64_t adapter_cuda_bwd_cols_block_cols(int64_t r) {
  switch (padded_rank(r)) {
    case 16: return cols_bn<16>();
    case 32: return cols_bn<32>();
    case 64: return cols_bn<64>();
    case 128: return cols_bn<128>();
    default: return cols_bn<256>();
  }
}

cudaError_t adapter_forward_cuda(const AdapterParams& p, cudaStream_t stream) { return dispatch<FwdLaunch>(p, stream); }
cudaError_t adapter_backward_rows_cuda(const AdapterParams& p, cudaStream_t stream) { return dispatch<RowsLaunch>(p, stream); }
cudaError_t adapter_backward_cols_cuda(const AdapterParams& p, cudaStream_t stream) { return dispatch<ColsLaunch>(p, stream); }

}  // namespace adapterfuse
