// One switch from (dtype, head_dim) to a kernel's compiled specialization, for the attention kernels.
#pragma once
#include <torch/extension.h>
#include <type_traits>

// Calls kernel(T{}, std::integral_constant<int, DIM>{}) for float32 or bfloat16 and a compiled head size.
template <typename Kernel>
void dispatch_attention(torch::ScalarType dtype, int64_t dim, const char* name, Kernel&& kernel) {
  auto by_dim = [&](auto element) {
    switch (dim) {
      case 32: return kernel(element, std::integral_constant<int, 32>{});
      case 64: return kernel(element, std::integral_constant<int, 64>{});
      case 96: return kernel(element, std::integral_constant<int, 96>{});
      case 128: return kernel(element, std::integral_constant<int, 128>{});
      case 256: return kernel(element, std::integral_constant<int, 256>{});
    }
    TORCH_CHECK(false, name, ": unsupported head_dim ", dim);
  };
  if (dtype == torch::kBFloat16) by_dim(at::BFloat16{});
  else by_dim(float{});
}
