// CUDA emulation: nvcuda::wmma for 16x16x16 fragments on the CPU, checking the API's rules.
//
// A fragment holds the whole 16x16 tile as fp32 values (what each element converts to exactly). Loads,
// stores and mma_sync are warp-collective (emu::warp_collective): every live thread of the warp must call
// them with the same pointer, leading dimension and layout, and the operation happens once, when the last
// thread arrives, as on the hardware. Rules checked (CUDA C++ Programming Guide, "Warp Matrix Functions"):
// the pointer is 256-bit (32-byte) aligned and ldm is a multiple of 16 bytes (8 elements of a 16-bit type,
// 4 of float). A violation fails the launch with a message.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation implements 16x16x16 fragments");
  static constexpr int num_elements = 256;
  float v[256];  // element (i, j) of the tile at v[i * 16 + j] (for matrix_b: (k, j))
};

namespace detail {
inline float to_float(float x) { return x; }
inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
void check(const T* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    emu::fail("wmma::%s: pointer %p is not 256-bit (32-byte) aligned", what, static_cast<const void*>(p));
  if ((ldm * sizeof(T)) % 16 != 0)
    emu::fail("wmma::%s: ldm = %u elements is not a multiple of 16 bytes", what, ldm);
}

inline uint64_t key(uint64_t op, const void* p, unsigned ldm, int layout) {
  uint64_t h = op * 0x9E3779B97F4A7C15ull;
  h ^= reinterpret_cast<uintptr_t>(p) + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
  h ^= (static_cast<uint64_t>(ldm) << 8 | static_cast<uint64_t>(layout)) + (h << 6) + (h >> 2);
  return h;
}
}  // namespace detail

// matrix_a / matrix_b from memory (layout from the fragment type)
template <class Use, class T, class Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(std::is_same<Use, matrix_a>::value || std::is_same<Use, matrix_b>::value, "operand fragments");
  detail::check(p, ldm, "load_matrix_sync");
  constexpr bool col = std::is_same<Layout, col_major>::value;
  emu::warp_collective(detail::key(1, p, ldm, col), "load_matrix_sync", &f, sizeof(f), [p, ldm](void* out) {
    auto* g = static_cast<fragment<Use, 16, 16, 16, T, Layout>*>(out);
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j)  // (row i, column j) of the tile
        g->v[i * 16 + j] = detail::to_float(col ? p[j * ldm + i] : p[i * ldm + j]);
  });
}

// accumulator from memory
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  detail::check(p, ldm, "load_matrix_sync");
  emu::warp_collective(detail::key(2, p, ldm, l), "load_matrix_sync", &f, sizeof(f), [p, ldm, l](void* out) {
    auto* g = static_cast<fragment<accumulator, 16, 16, 16, float>*>(out);
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) g->v[i * 16 + j] = l == mem_row_major ? p[i * ldm + j] : p[j * ldm + i];
  });
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  detail::check(p, ldm, "store_matrix_sync");
  emu::warp_collective(detail::key(3, p, ldm, l), "store_matrix_sync", nullptr, 0, [p, ldm, l, &f](void*) {
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) (l == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.v[i * 16 + j];
  });
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float value) {
  for (float& x : f.v) x = value;
}

// d = a b + c, fp32 accumulation
template <class T, class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  static_assert(!std::is_same<T, float>::value, "16x16x16 WMMA takes half / bfloat16 operands");
  emu::warp_collective(4, "mma_sync", &d, sizeof(d), [&a, &b, &c](void* out) {
    float r[256];
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        float acc = c.v[i * 16 + j];
        for (int k = 0; k < 16; ++k) acc += a.v[i * 16 + k] * b.v[k * 16 + j];
        r[i * 16 + j] = acc;
      }
    std::memcpy(static_cast<fragment<accumulator, 16, 16, 16, float>*>(out)->v, r, sizeof(r));
  });
}

}  // namespace wmma
}  // namespace nvcuda
