// Decode attention straight from the paged KV cache, for CPUs.
// Gathering K/V into a padded buffer and calling SDPA reads the cache once and the copy twice;
// here each (request, KV head) task reads its blocks once, for all query heads that share them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "dispatch.h"
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxGroup = 16;  // query heads per KV head

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }
inline void from_float(float x, float* out) { *out = x; }
inline void from_float(float x, at::BFloat16* out) { *out = at::BFloat16(x); }

struct Problem {
  const int32_t* tables;
  const int32_t* lens;
  int64_t width, heads, kv_heads, group, block_size;
  float scale;
};

// Softmax in place over one head's scores; exp vectorizes under -ffast-math.
inline void softmax(float* s, int64_t len) {
  float mx = s[0], sum = 0.f;
  for (int64_t t = 1; t < len; ++t) mx = std::max(mx, s[t]);
  for (int64_t t = 0; t < len; ++t) { s[t] = std::exp(s[t] - mx); sum += s[t]; }
  const float inv = 1.f / sum;
  for (int64_t t = 0; t < len; ++t) s[t] *= inv;
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// Blocks sit anywhere in the cache, so the hardware prefetcher loses the stream at every block
// boundary; fetching the next block's rows of this head while the current one computes hides that.
constexpr int64_t kAhead = 2;  // blocks fetched ahead of the one being computed

template <int DIM, typename T>
inline void prefetch_block(const T* p, int64_t tokens, int64_t row) {
  constexpr int kLine = 64 / sizeof(T);
  for (int64_t t = 0; t < tokens; ++t, p += row)
    for (int d = 0; d < DIM; d += kLine) _mm_prefetch(reinterpret_cast<const char*>(p + d), _MM_HINT_T0);
}

// One (request, KV head): scores for every context token, softmax, weighted sum of values.
template <typename T, int DIM>
void decode_task(const Problem& P, const T* q, const T* k_cache, const T* v_cache, T* out, int64_t seq,
                 int64_t kvh, std::vector<float>& scores) {
  constexpr int V = DIM / 16;
  const int64_t len = P.lens[seq], G = P.group, bs = P.block_size, row = P.kv_heads * DIM;
  const int32_t* table = P.tables + seq * P.width;
  __m512 qv[kMaxGroup][V];
  const __m512 scale = _mm512_set1_ps(P.scale);
  for (int64_t g = 0; g < G; ++g)
    for (int i = 0; i < V; ++i)
      qv[g][i] = _mm512_mul_ps(load16(q + (seq * P.heads + kvh * G + g) * DIM + 16 * i), scale);
  scores.resize(G * len);
  for (int64_t b = 1; b < kAhead && b * bs < len; ++b)
    prefetch_block<DIM>(k_cache + static_cast<int64_t>(table[b]) * bs * row + kvh * DIM, bs, row);
  for (int64_t t0 = 0; t0 < len; t0 += bs) {
    const T* kp = k_cache + static_cast<int64_t>(table[t0 / bs]) * bs * row + kvh * DIM;
    if (t0 + kAhead * bs < len) prefetch_block<DIM>(k_cache + static_cast<int64_t>(table[t0 / bs + kAhead]) * bs * row + kvh * DIM, bs, row);
    for (int64_t t = t0, end = std::min(len, t0 + bs); t < end; ++t, kp += row) {
      __m512 k[V];
      for (int i = 0; i < V; ++i) k[i] = load16(kp + 16 * i);
      for (int64_t g = 0; g < G; ++g) {
        __m512 a = _mm512_mul_ps(qv[g][0], k[0]);
        for (int i = 1; i < V; ++i) a = _mm512_fmadd_ps(qv[g][i], k[i], a);
        scores[g * len + t] = _mm512_reduce_add_ps(a);
      }
    }
  }
  for (int64_t b = 0; b < kAhead && b * bs < len; ++b)  // arrives while the softmax runs
    prefetch_block<DIM>(v_cache + static_cast<int64_t>(table[b]) * bs * row + kvh * DIM, bs, row);
  for (int64_t g = 0; g < G; ++g) softmax(scores.data() + g * len, len);
  __m512 acc[kMaxGroup][V];
  for (int64_t g = 0; g < G; ++g)
    for (int i = 0; i < V; ++i) acc[g][i] = _mm512_setzero_ps();
  for (int64_t t0 = 0; t0 < len; t0 += bs) {
    const T* vp = v_cache + static_cast<int64_t>(table[t0 / bs]) * bs * row + kvh * DIM;
    if (t0 + kAhead * bs < len) prefetch_block<DIM>(v_cache + static_cast<int64_t>(table[t0 / bs + kAhead]) * bs * row + kvh * DIM, bs, row);
    for (int64_t t = t0, end = std::min(len, t0 + bs); t < end; ++t, vp += row) {
      __m512 v[V];
      for (int i = 0; i < V; ++i) v[i] = load16(vp + 16 * i);
      for (int64_t g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(scores[g * len + t]);
        for (int i = 0; i < V; ++i) acc[g][i] = _mm512_fmadd_ps(p, v[i], acc[g][i]);
      }
    }
  }
  alignas(64) float res[DIM];
  for (int64_t g = 0; g < G; ++g) {
    for (int i = 0; i < V; ++i) _mm512_store_ps(res + 16 * i, acc[g][i]);
    T* o = out + (seq * P.heads + kvh * G + g) * DIM;
    for (int d = 0; d < DIM; ++d) from_float(res[d], o + d);
  }
}
#else
template <typename T, int DIM>
void decode_task(const Problem& P, const T* q, const T* k_cache, const T* v_cache, T* out, int64_t seq,
                 int64_t kvh, std::vector<float>& scores) {
  const int64_t len = P.lens[seq], G = P.group, bs = P.block_size;
  const int32_t* table = P.tables + seq * P.width;
  float qf[kMaxGroup][DIM], acc[kMaxGroup][DIM] = {};
  for (int64_t g = 0; g < G; ++g)
    for (int d = 0; d < DIM; ++d) qf[g][d] = to_float(q[(seq * P.heads + kvh * G + g) * DIM + d]) * P.scale;
  scores.resize(G * len);
  for (int64_t t = 0; t < len; ++t) {
    const T* kp = k_cache + ((static_cast<int64_t>(table[t / bs]) * bs + t % bs) * P.kv_heads + kvh) * DIM;
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int d = 0; d < DIM; ++d) s += qf[g][d] * to_float(kp[d]);
      scores[g * len + t] = s;
    }
  }
  for (int64_t g = 0; g < G; ++g) softmax(scores.data() + g * len, len);
  for (int64_t t = 0; t < len; ++t) {
    const T* vp = v_cache + ((static_cast<int64_t>(table[t / bs]) * bs + t % bs) * P.kv_heads + kvh) * DIM;
    for (int64_t g = 0; g < G; ++g)
      for (int d = 0; d < DIM; ++d) acc[g][d] += scores[g * len + t] * to_float(vp[d]);
  }
  for (int64_t g = 0; g < G; ++g)
    for (int d = 0; d < DIM; ++d) from_float(acc[g][d], out + (seq * P.heads + kvh * G + g) * DIM + d);
}
#endif

template <typename T, int DIM>
void decode(const Problem& P, const T* q, const T* k_cache, const T* v_cache, T* out, int64_t num_seqs) {
  // Rows arrive sorted by context length; interleave short and long ones so both threads' halves
  // of the task range carry about the same work.
  at::parallel_for(0, num_seqs * P.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / P.kv_heads, seq = (r % 2 == 0) ? r / 2 : num_seqs - 1 - r / 2;
      decode_task<T, DIM>(P, q, k_cache, v_cache, out, seq, task % P.kv_heads, scores);
    }
  });
}

}  // namespace

// q, out: [n, heads, dim]; caches: [slots, kv_heads, dim]; block_tables: [n, width] int32; context_lens: [n] int32.
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor context_lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() && out.is_contiguous(),
              "paged_decode_attention: tensors must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && context_lens.scalar_type() == torch::kInt32,
              "paged_decode_attention: block_tables and context_lens must be int32");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 || q.scalar_type() == torch::kBFloat16,
              "paged_decode_attention: float32 or bfloat16 only");
  const auto tables = block_tables.contiguous();
  const auto lens = context_lens.contiguous();
  const int64_t n = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(1);
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= kMaxGroup, "paged_decode_attention: bad head counts");
  const Problem P{tables.data_ptr<int32_t>(), lens.data_ptr<int32_t>(), tables.size(1), heads, kv_heads,
                  heads / kv_heads, block_size, static_cast<float>(scale)};
  dispatch_attention(q.scalar_type(), dim, "paged_decode_attention", [&](auto element, auto head_dim) {
    using T = decltype(element);
    decode<T, decltype(head_dim)::value>(P, q.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), out.data_ptr<T>(), n);
  });
}

