// The KV-cache write for CPUs: one pass of row copies, where torch's index_copy_ runs a general
// indexing kernel per tensor.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>

// Write each row's K and V into its cache slot; rows with slot -1 pad a batch and are skipped.
void reshape_and_cache(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
                       torch::Tensor slot_mapping) {
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type(),
              "reshape_and_cache: K and V must have the cache's dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && slot_mapping.scalar_type() == torch::kInt64,
              "reshape_and_cache: contiguous caches and int64 slots");
  const int64_t rows = slot_mapping.size(0), width = k_cache.size(1) * k_cache.size(2);
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.size(0) >= rows && v.size(0) >= rows &&
              k.size(1) * k.size(2) == width && v.size(1) * v.size(2) == width && v_cache.sizes() == k_cache.sizes(),
              "reshape_and_cache: K, V and the caches disagree in shape");
  const auto slots = slot_mapping.contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0);
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(slot[r] < num_slots, "reshape_and_cache: slot ", slot[r], " is past the cache's ", num_slots);
  const int64_t item = k_cache.element_size();
  const int64_t k_stride = k.stride(0) * item, v_stride = v.stride(0) * item;
  TORCH_CHECK(k.stride(-1) == 1 && v.stride(-1) == 1 && k.stride(1) == k.size(2) && v.stride(1) == v.size(2),
              "reshape_and_cache: each row's heads must be contiguous");
  const char* ks = static_cast<const char*>(k.data_ptr());
  const char* vs = static_cast<const char*>(v.data_ptr());
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {  // scattered rows: latency-bound, both threads help
    for (int64_t r = begin; r < end; ++r) {
      if (slot[r] < 0) continue;
      std::memcpy(kc + slot[r] * width * item, ks + r * k_stride, width * item);
      std::memcpy(vc + slot[r] * width * item, vs + r * v_stride, width * item);
    }
  });
}
