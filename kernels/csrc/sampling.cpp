// Greedy sampling's argmax for CPUs. torch's max over the vocabulary dimension of bf16 logits ran on
// one core at 3 GB/s (8 ms for 256 rows of SmolLM2's 49,152 logits, a twentieth of a decode step).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include "simd.h"

namespace {

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }

// NaN by its bits: the kernels build with -ffast-math, under which std::isnan is always false.
inline bool is_nan(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7fffffffu) > 0x7f800000u;
}

// The first index of the row's maximum; with a NaN in the row, the first NaN's (torch.max's answers).
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  float best = -INFINITY;
  bool nan = false;
  int64_t i = 0;
#if defined(ORCA_SIMD)
  constexpr int L = simd::kLanes;
  simd::vfloat vmax = simd::set1(-INFINITY);
  for (; i + L <= n; i += L) {
    const simd::vfloat v = simd::load(x + i);
    nan |= simd::any_nan(v);
    vmax = simd::max(vmax, v);
  }
  alignas(64) float lanes[L];
  simd::store(lanes, vmax);
  best = *std::max_element(lanes, lanes + L);
#endif
  for (int64_t t = i; t < n; ++t) {
    const float v = to_float(x[t]);
    nan |= is_nan(v);
    best = std::max(best, v);
  }
  if (nan) {
    for (int64_t t = 0; t < n; ++t)
      if (is_nan(to_float(x[t]))) return t;
  }
  // the maximum's value is known: its first index is one early-exit scan away
  int64_t t = 0;
#if defined(ORCA_SIMD)
  for (; t + L <= n; t += L) {
    const int lane = simd::first_equal(simd::load(x + t), best);
    if (lane >= 0) return t + lane;
  }
#endif
  for (; t < n; ++t)
    if (to_float(x[t]) == best) return t;
  return 0;
}

}  // namespace

// out[r] = argmax of logits[r] (first maximum); logits: [rows, vocab] float32 or bfloat16, contiguous.
void greedy_argmax(torch::Tensor out, torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.size(1) > 0,
              "greedy_argmax: contiguous [rows, vocab] logits");
  TORCH_CHECK(out.scalar_type() == torch::kInt64 && out.is_contiguous() && out.numel() == logits.size(0),
              "greedy_argmax: int64 out of one element per row");
  TORCH_CHECK(logits.scalar_type() == torch::kFloat32 || logits.scalar_type() == torch::kBFloat16,
              "greedy_argmax: float32 or bfloat16 logits");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  int64_t* result = out.data_ptr<int64_t>();
  const auto run = [&](auto* x) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) result[r] = argmax_row(x + r * vocab, vocab);
    });
  };
  if (logits.scalar_type() == torch::kBFloat16) run(logits.data_ptr<at::BFloat16>());
  else run(logits.data_ptr<float>());
}
