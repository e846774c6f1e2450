// Fused token-wise ops for CPUs. Torch runs each of these as 3-6 separate bf16 passes over the
// [tokens, hidden] tensor; fused, each element is read and written once, in float32 registers.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include "simd.h"

namespace {

// Elements are handled as raw storage (uint16_t for bf16) with branch-free conversions, so the
// compiler vectorizes every loop; c10's BFloat16 casts do not vectorize. NaN is not special-cased.
template <typename T> struct Raw { using type = T; };
template <> struct Raw<at::BFloat16> { using type = uint16_t; };

inline float load(float x) { return x; }
inline float load(double x) { return static_cast<float>(x); }
inline float load(at::Half x) { return static_cast<float>(x); }
inline float load(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <typename R> inline R store(float x) { return static_cast<R>(x); }
template <> inline uint16_t store<uint16_t>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);  // round to nearest even
}

template <typename T>
typename Raw<T>::type* raw(torch::Tensor& t) { return reinterpret_cast<typename Raw<T>::type*>(t.data_ptr<T>()); }

template <typename T>
void add_rms_norm_rows(T* x, T* residual, const T* weight, int64_t rows, int64_t hidden, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* xr = x + r * hidden;
      T* rr = residual + r * hidden;
      float sum = 0.f;
      for (int64_t i = 0; i < hidden; ++i) {
        const T s = store<T>(load(xr[i]) + load(rr[i]));  // rounded to T like torch's add
        rr[i] = s;
        const float f = load(s);
        sum += f * f;
      }
      const float inv = 1.f / std::sqrt(sum / hidden + eps);
      for (int64_t i = 0; i < hidden; ++i)
        xr[i] = store<T>(load(weight[i]) * load(store<T>(load(rr[i]) * inv)));
    }
  });
}

template <typename T>
void silu_mul_rows(T* out, const T* gate_up, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gate_up + r * 2 * inter;
      const T* u = g + inter;
      T* o = out + r * inter;
      for (int64_t i = 0; i < inter; ++i) {
        const float x = load(g[i]);
        // Under -ffast-math exp(-x) past float's range is not inf but garbage (x < -88 gave NaN): clamp it.
        o[i] = store<T>(x / (1.f + std::exp(std::min(-x, 88.f))) * load(u[i]));
      }
    }
  });
}

template <typename R> struct ElementOf { using type = R; };
template <> struct ElementOf<uint16_t> { using type = c10::BFloat16; };
template <typename R> using Element = typename ElementOf<R>::type;  // the dtype behind a raw storage type

#if defined(ORCA_SIMD)
template <typename T>
constexpr bool kVector = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

// x[i], x[i + half] rotated by (cos[i], sin[i]) in float32 lanes, half a multiple of the lane count.
template <typename T>
inline void rotate_half(T* x, const T* cos, const T* sin, int64_t half) {
  for (int64_t i = 0; i < half; i += simd::kLanes) {
    const simd::vfloat x1 = simd::load(x + i), x2 = simd::load(x + i + half);
    const simd::vfloat c = simd::load(cos + i), s = simd::load(sin + i);
    simd::store(x + i, simd::sub(simd::mul(x1, c), simd::mul(x2, s)));
    simd::store(x + i + half, simd::fmadd(x1, s, simd::mul(x2, c)));
  }
}
#endif

// Rotate-half (NeoX) rotary embedding in place; q and k are row-strided views of the fused QKV output.
template <typename T>
void rotary_rows(const int64_t* positions, T* q, T* k, const T* cos_sin, int64_t rows, int64_t q_stride,
                 int64_t k_stride, int64_t heads, int64_t kv_heads, int64_t dim) {
  const int64_t half = dim / 2;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* cos = cos_sin + positions[r] * dim;
      const T* sin = cos + half;
      for (int64_t h = 0; h < heads + kv_heads; ++h) {
        T* x = h < heads ? q + r * q_stride + h * dim : k + r * k_stride + (h - heads) * dim;
#if defined(ORCA_SIMD)
        if constexpr (kVector<Element<T>>) {
          if (half % simd::kLanes == 0) {
            rotate_half(reinterpret_cast<Element<T>*>(x), reinterpret_cast<const Element<T>*>(cos),
                        reinterpret_cast<const Element<T>*>(sin), half);
            continue;
          }
        }
#endif
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = load(x[i]), x2 = load(x[i + half]);
          const float c = load(cos[i]), s = load(sin[i]);
          x[i] = store<T>(x1 * c - x2 * s);
          x[i + half] = store<T>(x2 * c + x1 * s);
        }
      }
    }
  });
}


#if defined(ORCA_SIMD)
// The vector forms of the three ops for float and bf16 rows, computing in float32 lanes with the
// scalar forms' roundings. The scalar forms relied on auto-vectorization, which left bf16 conversions,
// libmvec's expf and a true division in the loops (2-3 cycles an element on a Sapphire Rapids Xeon).
template <typename T>
void add_rms_norm_rows_simd(T* x, T* residual, const T* weight, int64_t rows, int64_t hidden, float eps) {
  constexpr int L = simd::kLanes;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* xr = x + r * hidden;
      T* rr = residual + r * hidden;
      simd::vfloat squares = simd::zero();
      for (int64_t i = 0; i < hidden; i += L) {
        const simd::vfloat sum = simd::round_to(rr, simd::add(simd::load(xr + i), simd::load(rr + i)));
        simd::store(rr + i, sum);  // rounded to T like torch's add
        squares = simd::fmadd(sum, sum, squares);
      }
      const simd::vfloat inv = simd::set1(1.f / std::sqrt(simd::reduce_add(squares) / hidden + eps));
      for (int64_t i = 0; i < hidden; i += L)
        simd::store(xr + i, simd::mul(simd::load(weight + i), simd::round_to(xr, simd::mul(simd::load(rr + i), inv))));
    }
  });
}

template <typename T>
void silu_mul_rows_simd(T* out, const T* gate_up, int64_t rows, int64_t inter) {
  constexpr int L = simd::kLanes;
  const simd::vfloat one = simd::set1(1.f), limit = simd::set1(88.f);
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gate_up + r * 2 * inter;
      const T* u = g + inter;
      T* o = out + r * inter;
      for (int64_t i = 0; i < inter; i += L) {
        const simd::vfloat gate = simd::load(g + i);
        // exp(-x) clamped: past float's range it would be inf (x < -88), and silu there is 0
        const simd::vfloat e = simd::exp(simd::min(simd::sub(simd::zero(), gate), limit));
        simd::store(o + i, simd::mul(simd::mul(gate, simd::reciprocal(simd::add(one, e))), simd::load(u + i)));
      }
    }
  });
}

#endif

}  // namespace

void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_add_rms_norm", [&] {
#if defined(ORCA_SIMD)
    if constexpr (kVector<scalar_t>) {
      if (x.size(1) % simd::kLanes == 0) {
        return add_rms_norm_rows_simd(x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                      x.size(0), x.size(1), static_cast<float>(eps));
      }
    }
#endif
    add_rms_norm_rows(raw<scalar_t>(x), raw<scalar_t>(residual), raw<scalar_t>(weight),
                      x.size(0), x.size(1), static_cast<float>(eps));
  });
}

void silu_and_mul(torch::Tensor out, torch::Tensor gate_up) {
  TORCH_CHECK(out.is_contiguous() && gate_up.is_contiguous());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "silu_and_mul", [&] {
#if defined(ORCA_SIMD)
    if constexpr (kVector<scalar_t>) {
      if (out.size(1) % simd::kLanes == 0)
        return silu_mul_rows_simd(out.data_ptr<scalar_t>(), gate_up.data_ptr<scalar_t>(), out.size(0), out.size(1));
    }
#endif
    silu_mul_rows(raw<scalar_t>(out), raw<scalar_t>(gate_up), out.size(0), out.size(1));
  });
}

// q: [tokens, heads, dim] and k: [tokens, kv_heads, dim], each with contiguous heads inside a row;
// cos_sin: [positions, dim] = [cos | sin] in q's dtype.
void rotary_embedding(torch::Tensor positions, torch::Tensor q, torch::Tensor k, torch::Tensor cos_sin) {
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && k.stride(2) == 1 && k.stride(1) == k.size(2));
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && cos_sin.scalar_type() == q.scalar_type() &&
              cos_sin.is_contiguous());
  const auto pos = positions.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary_embedding", [&] {
    rotary_rows(pos.data_ptr<int64_t>(), raw<scalar_t>(q), raw<scalar_t>(k),
                raw<scalar_t>(cos_sin), q.size(0), q.stride(0), k.stride(0), q.size(1), k.size(1), q.size(2));
  });
}
