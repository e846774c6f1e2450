// Decode attention straight from the paged KV cache, for CPUs.
// Gathering K/V into a padded buffer and calling SDPA reads the cache once and the copy twice;
// here each (request, KV head) task reads its blocks once, for all query heads that share them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "dispatch.h"
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
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
// r[j] = the sum of x[j]'s 16 lanes for sixteen vectors: a transpose-and-add tree, 30 shuffles for all
// sixteen (two reduce_add_8 cost 44).
inline __m512 reduce_add_16(const __m512 x[16]) {
  __m512 y[8], z[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    y[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: that lane's part of the sums of x[4i .. 4i+3]
    z[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(y[2 * i]), _mm512_castps_pd(y[2 * i + 1]))),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(y[2 * i]), _mm512_castps_pd(y[2 * i + 1]))));
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], 0x88), _mm512_shuffle_f32x4(z[2], z[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

// By memcpy: GCC 12 compiles a cast of a loaded __m512i to __m512bh into a round trip through the stack.
inline __m512bh load_pairs(const void* p) {
  __m512bh v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Query heads whose value sums one pass keeps in registers: their 2 * DIM / 32 sums each, plus a token
// pair's DIM / 16 interleaved value vectors, within the 32 vector registers.
template <int DIM>
constexpr int kValueHeads = std::max(1, 16 / (DIM / 16));

// o[h] += sum over the block's tokens of p[h][t] * v[t] for `NG` query heads sharing one KV head.
// Values by pairwise dot products on two tokens at a time: rows t and t+1 interleaved element by element
// (in unpack's lane order), times the broadcast pair (p[t], p[t+1]); each pair of rows is interleaved once,
// in registers, for all the heads.
template <int DIM, int NG>
inline void accumulate_values_fixed(float* o, const uint16_t* p, int64_t padded, const c10::BFloat16* v,
                                    int64_t row, int64_t count) {
  constexpr int W = DIM / 32;
  __m512 acc[NG][2 * W];
  for (int g = 0; g < NG; ++g)
    for (int i = 0; i < 2 * W; ++i) acc[g][i] = _mm512_loadu_ps(o + g * DIM + 16 * i);
  for (int64_t t = 0; t < count; t += 2) {
    __m512i x[2 * W];
    for (int i = 0; i < W; ++i) {
      const __m512i v0 = _mm512_loadu_si512(v + t * row + 32 * i);
      const __m512i v1 = t + 1 < count ? _mm512_loadu_si512(v + (t + 1) * row + 32 * i) : _mm512_setzero_si512();
      x[2 * i] = _mm512_unpacklo_epi16(v0, v1);
      x[2 * i + 1] = _mm512_unpackhi_epi16(v0, v1);
    }
    for (int g = 0; g < NG; ++g) {
      int32_t pair;
      std::memcpy(&pair, p + g * padded + t, sizeof pair);
      const __m512bh probability = (__m512bh)_mm512_set1_epi32(pair);
      for (int i = 0; i < 2 * W; ++i) acc[g][i] = _mm512_dpbf16_ps(acc[g][i], probability, (__m512bh)x[i]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int i = 0; i < 2 * W; ++i) _mm512_storeu_ps(o + g * DIM + 16 * i, acc[g][i]);
}

template <int DIM, int NG = kValueHeads<DIM>>
inline void accumulate_values(int64_t heads, float* o, const uint16_t* p, int64_t padded, const c10::BFloat16* v,
                              int64_t row, int64_t count) {
  if constexpr (NG > 1)
    if (heads < NG) return accumulate_values<DIM, NG - 1>(heads, o, p, padded, v, row, count);
  accumulate_values_fixed<DIM, NG>(o, p, padded, v, row, count);
}

// bf16 decode by AVX512-BF16's pairwise dot products, with no widening of keys or values to float32
// (per token and query head that widening cost more shuffles than the memory system delivers rows:
// the float path reached half of one core's read bandwidth from the L2).
// Scores: sixteen tokens' dot products at a time, reduced together. Values: the probabilities in bf16
// (as FlashAttention feeds P to its second matmul), two tokens per dot product (`accumulate_values`).
template <int DIM>
void decode_task_bf16(const Problem& P, const c10::BFloat16* q, const c10::BFloat16* k_cache,
                      const c10::BFloat16* v_cache, c10::BFloat16* out, int64_t seq, int64_t h0, int64_t h1,
                      std::vector<float>& scores, std::vector<float>& accumulators, std::vector<uint16_t>& probs) {
  using T = c10::BFloat16;
  constexpr int W = DIM / 32;  // 32 bf16 per register
  const int64_t len = P.lens[seq], G = P.group, bs = P.block_size, row = P.kv_heads * DIM;
  const int64_t heads = (h1 - h0) * G, width = (h1 - h0) * DIM, padded = (len + 2) / 2 * 2;  // room for the pair past the last token
  const int32_t* table = P.tables + seq * P.width;
  const T* q0 = q + (seq * P.heads + h0 * G) * DIM;
  scores.resize(heads * len);
  const auto block_of = [&](const T* cache, int64_t b) { return cache + static_cast<int64_t>(table[b]) * bs * row + h0 * DIM; };
  for (int64_t b = 1; b < kAhead && b * bs < len; ++b) prefetch_block(block_of(k_cache, b), bs, row, width);
  for (int64_t t0 = 0; t0 < len; t0 += bs) {
    if (kAhead > 0 && t0 + kAhead * bs < len) prefetch_block(block_of(k_cache, t0 / bs + kAhead), bs, row, width);
    const T* block = block_of(k_cache, t0 / bs);
    const int64_t count = std::min(bs, len - t0);
    for (int64_t h = 0; h < heads; ++h) {
      __m512bh qv[W];
      for (int i = 0; i < W; ++i) qv[i] = load_pairs(q0 + h * DIM + 32 * i);
      float* sh = scores.data() + h * len + t0;
      for (int64_t t = 0; t < count; t += 16) {
        const T* kp = block + (h / G) * DIM + t * row;
        const int64_t n = std::min<int64_t>(16, count - t);
        __m512 a[16];
        if (n == 16) {  // the whole-block case, unrolled so the sixteen sums stay in registers
#pragma GCC unroll 16
          for (int j = 0; j < 16; ++j) {
            a[j] = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], load_pairs(kp + j * row));
            for (int i = 1; i < W; ++i) a[j] = _mm512_dpbf16_ps(a[j], qv[i], load_pairs(kp + j * row + 32 * i));
          }
        } else {
          for (int j = 0; j < 16; ++j) {
            a[j] = _mm512_setzero_ps();
            if (j < n)
              for (int i = 0; i < W; ++i) a[j] = _mm512_dpbf16_ps(a[j], qv[i], load_pairs(kp + j * row + 32 * i));
          }
        }
        _mm512_mask_storeu_ps(sh + t, static_cast<__mmask16>((1u << n) - 1), reduce_add_16(a));
      }
    }
  }
  for (int64_t b = 0; b < kAhead && b * bs < len; ++b)  // arrives while the softmax runs
    prefetch_block(block_of(v_cache, b), bs, row, width);
  probs.resize(heads * padded);
  for (int64_t h = 0; h < heads; ++h) {
    float* sh = scores.data() + h * len;
    softmax_simd(sh, len, P.scale);
    uint16_t* ph = probs.data() + h * padded;
    int64_t t = 0;
    for (; t + 32 <= len; t += 32)
      _mm512_storeu_si512(ph + t, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(sh + t + 16), _mm512_loadu_ps(sh + t)));
    for (; t < padded; ++t) ph[t] = t < len ? c10::BFloat16(sh[t]).x : 0;
  }
  accumulators.assign(heads * DIM, 0.f);
  for (int64_t t0 = 0; t0 < len; t0 += bs) {
    if (kAhead > 0 && t0 + kAhead * bs < len) prefetch_block(block_of(v_cache, t0 / bs + kAhead), bs, row, width);
    const T* block = block_of(v_cache, t0 / bs);
    const int64_t count = std::min(bs, len - t0);
    for (int64_t kvh = 0; kvh < h1 - h0; ++kvh) {
      const T* vp = block + kvh * DIM;
      for (int64_t g = 0; g < G; g += kValueHeads<DIM>) {
        const int64_t h = kvh * G + g;
        accumulate_values<DIM>(std::min<int64_t>(kValueHeads<DIM>, G - g), accumulators.data() + h * DIM,
                               probs.data() + h * padded + t0, padded, vp, row, count);
      }
    }
  }
  // unpack's lane order back to dimension order: for 32 dimensions, lanes of the low half hold
  // [0-3, 8-11, 16-19, 24-27], of the high half [4-7, 12-15, 20-23, 28-31]
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t h = 0; h < heads; ++h) {
    const float* o = accumulators.data() + h * DIM;
    T* dst = out + (seq * P.heads + h0 * G + h) * DIM;
    for (int i = 0; i < W; ++i) {
      const __m512 lo = _mm512_loadu_ps(o + 32 * i), hi = _mm512_loadu_ps(o + 32 * i + 16);
      const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_permutex2var_ps(lo, second, hi),
                                                _mm512_permutex2var_ps(lo, first, hi));
      _mm512_storeu_si512(dst + 32 * i, (__m512i)both);
    }
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
    if (kAhead > 0 && t0 + kAhead * bs < len) prefetch_block(block_of(k_cache, t0 / bs + kAhead), bs, row, width);
    const T* block = block_of(k_cache, t0 / bs);
    const int64_t count = std::min(bs, len - t0);
    for (int64_t h = 0; h < heads; ++h) {
      const T* kp = block + (h / G) * DIM;
      float* sh = scores.data() + h * len + t0;
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
    if (kAhead > 0 && t0 + kAhead * bs < len) prefetch_block(block_of(v_cache, t0 / bs + kAhead), bs, row, width);
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
  // every thread busy (a lone decode still spreads over its KV heads). Longest first, taken from a shared
  // counter: a static split of the range left one thread waiting on the other (context lengths differ
  // tenfold within a batch).
  const int64_t threads = at::get_num_threads();
  const int64_t parts = std::min<int64_t>(P.kv_heads, (2 * threads + num_seqs - 1) / num_seqs);
  std::vector<int64_t> order(num_seqs);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return P.lens[a] > P.lens[b]; });
  const int64_t num_tasks = num_seqs * parts;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, num_tasks), 1, [&](int64_t, int64_t) {
    std::vector<float> scores, accumulators;
    [[maybe_unused]] std::vector<uint16_t> probs;
    for (int64_t task = next++; task < num_tasks; task = next++) {
      const int64_t seq = order[task / parts], part = task % parts;
      const int64_t h0 = part * P.kv_heads / parts, h1 = (part + 1) * P.kv_heads / parts;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, c10::BFloat16> && DIM % 32 == 0) {
        decode_task_bf16<DIM>(P, q, k_cache, v_cache, out, seq, h0, h1, scores, accumulators, probs);
        continue;
      }
#endif
      decode_task<T, DIM>(P, q, k_cache, v_cache, out, seq, h0, h1, scores, accumulators);
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

