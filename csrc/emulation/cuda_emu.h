// CUDA emulation: the device-side vocabulary of adapter_kernels.cu mapped onto a CPU runtime in which
// every CUDA thread of a block is a fiber (emu_runtime.cpp). Fibers switch only at __syncthreads() and
// at warp-collective operations (the WMMA *_sync calls), under a chosen schedule, so a missing barrier
// or a cross-thread race shows up as a result that differs from the reference or between schedules.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __shared__
#define __launch_bounds__(...)
#define __forceinline__ inline

namespace emu {

struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

// The calling fiber's indices (valid inside a kernel only).
const ThreadState& current();
// The block's dynamic shared memory (poisoned with 0xFF bytes, NaN in every float type, at block start).
unsigned char* dynamic_smem();
void syncthreads();
// A warp-collective operation: every live thread of the warp must arrive with the same key. The last
// to arrive runs `op` once (on its own fragment `frag`) and copies `frag_bytes` of it into every other
// arrival's fragment; then the warp goes on. Returns when the operation is done for this thread.
void warp_collective(uint64_t key, const char* what, void* frag, size_t frag_bytes, const std::function<void(void*)>& op);
// Report a rule violation (misaligned WMMA pointer, bad ldm, ...): the launch fails with this message.
void fail(const char* fmt, ...);

// Runs body once per thread of every block of the grid; returns the launch's error code.
cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

template <class Kernel, class... Args>
cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  return run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, [=] { kernel(args...); });
}

}  // namespace emu

#define threadIdx (::emu::current().thread_idx)
#define blockIdx (::emu::current().block_idx)
#define blockDim (::emu::current().block_dim)
#define gridDim (::emu::current().grid_dim)
#define __syncthreads() ::emu::syncthreads()
