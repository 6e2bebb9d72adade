// CUDA emulation (ADAPTERFUSE_CUDA_EMULATION): stands in for <cuda_runtime.h> when the kernels of
// adapter_kernels.cu are compiled as C++ for the CPU. The toolkit's own host headers give the types
// (cudaError_t, cudaStream_t, dim3, uint4, __half, __nv_bfloat16); the runtime calls the launch code
// makes are implemented by emu_runtime.cpp. Not a performance path: see emu_runtime.cpp.
#pragma once
#include <cuda_runtime_api.h>

template <class T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

#include "cuda_emu.h"
