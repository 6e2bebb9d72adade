// The one switch from runtime (dtype, bottleneck r) to the kernel templates instantiated for them, for every
// CUDA op's launchers: dispatch<F>(dtype, r, args...) calls F<T, RP>::run(args...) with T the element type
// (float, __half, __nv_bfloat16) and RP the rank r padded to 16, 32, 64, 128 or 256. A new op adds a launcher
// struct template, never another switch. (The CPU path dispatches with ATen's AT_DISPATCH macros: it is not
// specialised on r.) Include after <cuda_fp16.h>, <cuda_bf16.h> and adapter_kernels.cuh (DType).
#pragma once
#include <cstdint>
#include <utility>

namespace adapterfuse {

// r padded to the power of two >= 16 that the kernels are instantiated for (r <= 256, checked by the caller)
inline int padded_rank(int64_t r) { return r <= 16 ? 16 : r <= 32 ? 32 : r <= 64 ? 64 : r <= 128 ? 128 : 256; }

template <template <typename, int> class F, typename T, typename... Args>
auto dispatch_rank(int64_t r, Args&&... args) {
  switch (padded_rank(r)) {
    case 16: return F<T, 16>::run(std::forward<Args>(args)...);
    case 32: return F<T, 32>::run(std::forward<Args>(args)...);
    case 64: return F<T, 64>::run(std::forward<Args>(args)...);
    case 128: return F<T, 128>::run(std::forward<Args>(args)...);
    default: return F<T, 256>::run(std::forward<Args>(args)...);
  }
}

template <template <typename, int> class F, typename... Args>
auto dispatch(DType dtype, int64_t r, Args&&... args) {
  switch (dtype) {
    case DType::kFloat32: return dispatch_rank<F, float>(r, std::forward<Args>(args)...);
    case DType::kFloat16: return dispatch_rank<F, __half>(r, std::forward<Args>(args)...);
    default: return dispatch_rank<F, __nv_bfloat16>(r, std::forward<Args>(args)...);
  }
}

}  // namespace adapterfuse
