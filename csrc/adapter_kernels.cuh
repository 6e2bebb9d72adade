// Launchers of the CUDA adapter kernels. Plain C++ types only (no torch headers), so that
// adapter_kernels.cu compiles with nvcc alone; bindings.cpp fills AdapterParams from tensors.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace adapterfuse {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Shapes (M < 2^32 rows, 1 <= tokens < 2^32; M * d may exceed 2^31): x, skip, y, dy, dx are [M, d] with the given row strides and column stride 1; w_down [r, d],
// w_up [d, r], b_down [r], b_up [d] are contiguous in the dtype of x; scale ([1] or [d]) and
// sample_scale ([B]) are contiguous fp32; h, dh are [M, r] fp32; dg_row is [M] fp32; the partials
// are fp32 [splits, d, r] (p_R), [splits, r, d] (p_wd), [splits, d] (p_q).
struct AdapterParams {
  DType dtype;
  int64_t M, d, r;
  int act;        // 0 identity, 1 relu, 2 gelu (erf), 3 gelu_tanh, 4 silu
  int skip_mode;  // 0 none, 1 skip is x, 2 separate skip tensor
  const void* x; int64_t stride_x;
  const void* skip; int64_t stride_skip;
  const void* w_down; const void* b_down;
  const void* w_up; const void* b_up;
  const float* scale; int64_t scale_n; float scale_value;
  const float* sample_scale; int64_t tokens;
  // forward outputs
  void* y; int64_t stride_y;
  float* h;
  // backward
  const void* dy; int64_t stride_dy;
  void* dx; int64_t stride_dx;
  float* dh; float* dg_row;
  float* p_R; float* p_q; float* p_wd;  // R = dy^T (g a), q = sum g dy, d_w_down (see adapter_kernels.cu)
  int64_t splits, rows_per_split;
  bool need_dx, need_dh, need_dg, need_R, need_q, need_wd;
  // set by the launchers (callers leave them unset): 16-byte vector loads allowed per tensor, and the
  // tiles chosen for the device's shared memory
  bool vec_x, vec_dy, vec_wd, vec_wu;
  int tile_m, tile_n;
};

// What a launch did. err is the CUDA error (cudaSuccess when it launched); when even the smallest tiles
// need more shared memory than the device allows, err is cudaErrorInvalidConfiguration and smem_needed >
// smem_limit say by how much (any other invalid configuration leaves both 0). tile_m x tile_n: the tiles used.
struct LaunchStatus {
  cudaError_t err = cudaSuccess;
  int64_t smem_needed = 0, smem_limit = 0;
  int tile_m = 0, tile_n = 0;
};

// Largest bottleneck r the CUDA kernels take (r is padded to a power of two >= 16).
constexpr int64_t kCudaMaxRank = 256;

// Default rows per block of the weight-gradient kernel for this r (rows_per_split must be a multiple;
// the smaller tiles chosen on devices with less shared memory divide it).
int64_t adapter_cuda_bwd_cols_block_rows(int64_t r);
// Columns per block of the weight-gradient kernel for this r (its grid is ceil(d / that) x splits).
int64_t adapter_cuda_bwd_cols_block_cols(int64_t r);

LaunchStatus adapter_forward_cuda(const AdapterParams& p, cudaStream_t stream);
// dx, dh and dg_row (per-row sums for the sample_scale gradient).
LaunchStatus adapter_backward_rows_cuda(const AdapterParams& p, cudaStream_t stream);
// Per-split partials of R, q and d_w_down (summed and scaled by the caller: stage two).
LaunchStatus adapter_backward_cols_cuda(const AdapterParams& p, cudaStream_t stream);

}  // namespace adapterfuse
