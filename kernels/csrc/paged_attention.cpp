// Decode attention straight from the paged KV cache, for CPUs.
// Gathering K/V into a padded buffer and calling SDPA reads the cache once and the copy twice;
// here each (request, KV head) task reads its blocks once, for all query heads that share them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "dispatch.h"
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>
#include "simd.h"

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

#if defined(ORCA_SIMD)
// Blocks sit anywhere in the cache, so the hardware prefetcher loses the stream at every block
// boundary; fetching the next block's rows while the current one computes hides that.
constexpr int64_t kAhead = 4;  // blocks fetched ahead of the one being computed

template <typename T>
inline void prefetch_block(const T* p, int64_t tokens, int64_t row, int64_t width) {
  constexpr int kLine = 64 / sizeof(T);
  for (int64_t t = 0; t < tokens; ++t, p += row)
    for (int64_t d = 0; d < width; d += kLine) _mm_prefetch(reinterpret_cast<const char*>(p + d), _MM_HINT_T1);
}

// Softmax in place of the scores times `scale`, vectorized (the scalar one's exp does not vectorize
// on every compiler).
inline void softmax_simd(float* s, int64_t len, float scale) {
  using simd::vfloat;
  constexpr int L = simd::kLanes;
  const int64_t whole = len / L * L;
  const vfloat vscale = simd::set1(scale);
  vfloat vmax = simd::set1(-3.4e38f);
  for (int64_t t = 0; t < whole; t += L) {
    const vfloat x = simd::mul(simd::load(s + t), vscale);
    simd::store(s + t, x);
    vmax = simd::max(vmax, x);
  }
  alignas(64) float lanes[L];
  simd::store(lanes, vmax);
  float mx = lanes[0];
  for (int i = 1; i < L; ++i) mx = std::max(mx, lanes[i]);
  for (int64_t t = whole; t < len; ++t) mx = std::max(mx, s[t] *= scale);
  const vfloat vmx = simd::set1(mx);
  vfloat vsum = simd::zero();
  for (int64_t t = 0; t < whole; t += L) {
    const vfloat e = simd::exp(simd::sub(simd::load(s + t), vmx));
    simd::store(s + t, e);
    vsum = simd::add(vsum, e);
  }
  float sum = simd::reduce_add(vsum);
  for (int64_t t = whole; t < len; ++t) { s[t] = std::exp(s[t] - mx); sum += s[t]; }
  const vfloat inv = simd::set1(1.f / sum);
  for (int64_t t = 0; t < whole; t += L) simd::store(s + t, simd::mul(simd::load(s + t), inv));
  for (int64_t t = whole; t < len; ++t) s[t] *= 1.f / sum;
}

#if defined(__AVX512BF16__)
// One query head's unscaled scores against `count` bf16 key rows `row` elements apart, by AVX512-BF16's
// pairwise dot product: a 64-wide row is two instructions, with no widening of the keys to float32
// first (which made bf16 decode attention compute-bound at a third of the copy bandwidth on a
// Sapphire Rapids Xeon). Products of two bf16 are exact in float32, sums are float32 as before.
template <int DIM>
inline void score_rows_bf16(const c10::BFloat16* q, const c10::BFloat16* kp, int64_t row, int64_t count, float* sh) {
  constexpr int W = DIM / 32;  // 32 bf16 per register
  const auto load_pairs = [](const c10::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); };
  __m512bh qv[W];
  for (int i = 0; i < W; ++i) qv[i] = load_pairs(q + 32 * i);
  int64_t t = 0;
  for (; t + 8 <= count; t += 8, kp += 8 * row) {
    __m512 a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], load_pairs(kp + j * row));
    for (int i = 1; i < W; ++i)
      for (int j = 0; j < 8; ++j) a[j] = _mm512_dpbf16_ps(a[j], qv[i], load_pairs(kp + j * row + 32 * i));
    simd::reduce_add_8(a, sh + t);
  }
  for (; t < count; ++t, kp += row) {
    __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], load_pairs(kp));
    for (int i = 1; i < W; ++i) a = _mm512_dpbf16_ps(a, qv[i], load_pairs(kp + 32 * i));
    sh[t] = simd::reduce_add(a);
  }
}
#endif

// One request's KV heads [h0, h1): scores for every context token, softmax, weighted sum of values.
// A block's rows are read whole (all the range's KV heads side by side), as one stream per block;
// one head's 1/kv_heads slice of each row, strided, left DRAM bandwidth unused.
template <typename T, int DIM>
void decode_task(const Problem& P, const T* q, const T* k_cache, const T* v_cache, T* out, int64_t seq,
                 int64_t h0, int64_t h1, std::vector<float>& scores, std::vector<float>& accumulators) {
  using simd::vfloat;
  constexpr int L = simd::kLanes, V = DIM / L;
  const int64_t len = P.lens[seq], G = P.group, bs = P.block_size, row = P.kv_heads * DIM;
  const int64_t heads = (h1 - h0) * G, width = (h1 - h0) * DIM;  // query heads, row elements of the range
  const int32_t* table = P.tables + seq * P.width;
  const T* q0 = q + (seq * P.heads + h0 * G) * DIM;
  scores.resize(heads * len);
  const auto block_of = [&](const T* cache, int64_t b) { return cache + static_cast<int64_t>(table[b]) * bs * row + h0 * DIM; };
  for (int64_t b = 1; b < kAhead && b * bs < len; ++b) prefetch_block(block_of(k_cache, b), bs, row, width);
  for (int64_t t0 = 0; t0 < len; t0 += bs) {
    if (t0 + kAhead * bs < len) prefetch_block(block_of(k_cache, t0 / bs + kAhead), bs, row, width);
    const T* block = block_of(k_cache, t0 / bs);
    const int64_t count = std::min(bs, len - t0);
    for (int64_t h = 0; h < heads; ++h) {
      const T* kp = block + (h / G) * DIM;
      float* sh = scores.data() + h * len + t0;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, c10::BFloat16> && DIM % 32 == 0) {
        score_rows_bf16<DIM>(q0 + h * DIM, kp, row, count, sh);
        continue;
      }
#endif
      vfloat qv[V];
      for (int i = 0; i < V; ++i) qv[i] = simd::load(q0 + h * DIM + L * i);
      int64_t t = 0;
      for (; t + 8 <= count; t += 8, kp += 8 * row) {  // eight tokens' dot products, reduced together
        vfloat a[8];
        for (int j = 0; j < 8; ++j) a[j] = simd::mul(qv[0], simd::load(kp + j * row));
        for (int i = 1; i < V; ++i)
          for (int j = 0; j < 8; ++j) a[j] = simd::fmadd(qv[i], simd::load(kp + j * row + L * i), a[j]);
        simd::reduce_add_8(a, sh + t);
      }
      for (; t < count; ++t, kp += row) {
        vfloat a = simd::mul(qv[0], simd::load(kp));
        for (int i = 1; i < V; ++i) a = simd::fmadd(qv[i], simd::load(kp + L * i), a);
        sh[t] = simd::reduce_add(a);
      }
    }
  }
  for (int64_t b = 0; b < kAhead && b * bs < len; ++b)  // arrives while the softmax runs
    prefetch_block(block_of(v_cache, b), bs, row, width);
  for (int64_t h = 0; h < heads; ++h) softmax_simd(scores.data() + h * len, len, P.scale);
  accumulators.assign(heads * DIM, 0.f);
  for (int64_t t0 = 0; t0 < len; t0 += bs) {
    if (t0 + kAhead * bs < len) prefetch_block(block_of(v_cache, t0 / bs + kAhead), bs, row, width);
    const T* block = block_of(v_cache, t0 / bs);
    const int64_t count = std::min(bs, len - t0);
    for (int64_t h = 0; h < heads; ++h) {
      float* o = accumulators.data() + h * DIM;
      vfloat acc[V];
      for (int i = 0; i < V; ++i) acc[i] = simd::load(o + L * i);
      const T* vp = block + (h / G) * DIM;
      const float* sh = scores.data() + h * len + t0;
      for (int64_t t = 0; t < count; ++t, vp += row) {
        const vfloat p = simd::set1(sh[t]);
        for (int i = 0; i < V; ++i) acc[i] = simd::fmadd(p, simd::load(vp + L * i), acc[i]);
      }
      for (int i = 0; i < V; ++i) simd::store(o + L * i, acc[i]);
    }
  }
  for (int64_t h = 0; h < heads; ++h)
    for (int i = 0; i < V; ++i)
      simd::store_as(out + (seq * P.heads + h0 * G + h) * DIM + L * i, simd::load(accumulators.data() + h * DIM + L * i));
}
#else
template <typename T, int DIM>
void decode_head(const Problem& P, const T* q, const T* k_cache, const T* v_cache, T* out, int64_t seq,
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

template <typename T, int DIM>
void decode_task(const Problem& P, const T* q, const T* k_cache, const T* v_cache, T* out, int64_t seq,
                 int64_t h0, int64_t h1, std::vector<float>& scores, std::vector<float>&) {
  for (int64_t kvh = h0; kvh < h1; ++kvh) decode_head<T, DIM>(P, q, k_cache, v_cache, out, seq, kvh, scores);
}
#endif

template <typename T, int DIM>
void decode(const Problem& P, const T* q, const T* k_cache, const T* v_cache, T* out, int64_t num_seqs) {
  // A task is one request's KV heads, split into parts only when there are too few requests to keep
  // every thread busy (a lone decode still spreads over its KV heads).
  const int64_t threads = at::get_num_threads();
  const int64_t parts = std::min<int64_t>(P.kv_heads, (2 * threads + num_seqs - 1) / num_seqs);
  // Rows arrive sorted by context length; interleave short and long ones so both threads' halves
  // of the task range carry about the same work.
  at::parallel_for(0, num_seqs * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, accumulators;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / parts, part = task % parts, seq = (r % 2 == 0) ? r / 2 : num_seqs - 1 - r / 2;
      decode_task<T, DIM>(P, q, k_cache, v_cache, out, seq, part * P.kv_heads / parts,
                          (part + 1) * P.kv_heads / parts, scores, accumulators);
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

