// The activations and their derivatives, defined once for every C++ / CUDA path: the CPU kernels
// (adapter_cpu.cpp), the CUDA kernels (adapter_kernels.cu, built by nvcc, or as C++ by the CUDA
// emulation) and any later op. ids (adapterfuse/_checks.py ACTIVATIONS): 0 identity, 1 relu, 2 gelu (erf),
// 3 gelu_tanh, 4 silu. act(0) = 0 for all of them (the kernels zero-pad r). Inputs and results are fp32.
//   relu' = [h > 0] (NaN passes through, like torch's threshold_backward); gelu' = Phi(h) + h phi(h);
//   gelu_tanh' = 0.5 (1 + t) + 0.5 h (1 - t^2) k (1 + 3 c h^2), t = tanh(k (h + c h^3)), k = sqrt(2 / pi),
//   c = 0.044715;  silu' = sig(h) (1 + h (1 - sig(h))).
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define ADAPTERFUSE_HD __host__ __device__ __forceinline__
#else
#define ADAPTERFUSE_HD inline
#endif

namespace adapterfuse {

ADAPTERFUSE_HD float act_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);  // the fast SFU exponential on the GPU
#else
  return std::exp(x);
#endif
}

ADAPTERFUSE_HD float act_fwd(float h, int act) {
  switch (act) {
    case 0: return h;
    case 1: return h < 0.f ? 0.f : h;  // NaN stays NaN
    case 2: return 0.5f * h * (1.f + erff(h * 0.70710678118654752f));
    case 3: return 0.5f * h * (1.f + tanhf(0.7978845608028654f * (h + 0.044715f * h * h * h)));
    default: return h / (1.f + act_exp(-h));
  }
}

ADAPTERFUSE_HD float act_grad(float h, int act) {
  switch (act) {
    case 0: return 1.f;
    case 1: return h <= 0.f ? 0.f : 1.f;
    case 2: return 0.5f * (1.f + erff(h * 0.70710678118654752f)) + h * 0.3989422804014327f * act_exp(-0.5f * h * h);
    case 3: {
      const float k = 0.7978845608028654f;
      const float t = tanhf(k * (h + 0.044715f * h * h * h));
      return 0.5f * (1.f + t) + 0.5f * h * (1.f - t * t) * k * (1.f + 0.134145f * h * h);
    }
    default: {
      const float sg = 1.f / (1.f + act_exp(-h));
      return sg * (1.f + h * (1.f - sg));
    }
  }
}

}  // namespace adapterfuse
