// Prompt attention straight from the paged KV cache, for CPUs: flash-attention tiling in float32.
// torch's CPU SDPA runs these shapes (a few hundred rows, head_dim 64, grouped KV heads) at a small
// fraction of the GEMM peak and needs each chunk's earlier context gathered out of the cache first.
// Here a task is (prompt chunk, KV head, block of query rows): the query heads sharing that KV head
// are stacked as rows, each context tile is read from its cache blocks once for all of them, scores
// and the weighted sum run as register-blocked FMAs, and tiles past a block's last position are skipped.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "dispatch.h"
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>
#include "amx.h"
#include "simd.h"

namespace {

constexpr int64_t kTile = 32;        // context tokens per tile
constexpr int64_t kQueryBlock = 32;  // query rows per task, each stacked once per query head of the KV head
constexpr float kMasked = -1e30f;    // finite: -ffast-math assumes no infinities

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }
inline void from_float(float x, float* out) { *out = x; }
inline void from_float(float x, at::BFloat16* out) { *out = at::BFloat16(x); }

struct Problem {
  const int32_t* tables;
  const int32_t* query_start;  // absolute first row of each request, plus one past the last
  const int32_t* lens;
  int64_t width, heads, kv_heads, group, block_size;
  float scale;
};

struct Task {
  int64_t request, kv_head, first_row, num_rows, cost;
};

// Per-thread buffers, sized for the largest task (rows = kQueryBlock x group, padded to 16 lanes).
struct Workspace {
  std::vector<float> qt, k, v, scores, o, max, sum, alpha;
  std::vector<int32_t> pos;
  Workspace(int64_t rows, int64_t dim)
      : qt(dim * rows), k(kTile * dim), v(kTile * dim), scores(kTile * 32), o(rows * dim), max(rows), sum(rows),
        alpha(rows), pos(rows) {}
};

template <typename T, int DIM>
void load_tile(const Problem& P, const T* cache, int64_t request, int64_t kv_head, int64_t n0, int64_t count,
               float* tile) {
  const int32_t* table = P.tables + request * P.width;
  const int64_t row = P.kv_heads * DIM;
  for (int64_t t = 0; t < kTile; ++t) {
    float* dst = tile + t * DIM;
    if (t >= count) {  // past the context: zeros, and the causal mask drops their scores
      std::fill(dst, dst + DIM, 0.f);
      continue;
    }
    const int64_t n = n0 + t, slot = static_cast<int64_t>(table[n / P.block_size]) * P.block_size + n % P.block_size;
    const T* src = cache + slot * row + kv_head * DIM;
    for (int d = 0; d < DIM; ++d) dst[d] = to_float(src[d]);
  }
}

#if defined(ORCA_SIMD)
using simd::vfloat;
constexpr int L = simd::kLanes;
constexpr int kRowsPerBlock = 32;  // query rows whose scores a tile computes together: 32 / L vectors

// scores[t][j] = sum_d k[t][d] * qt[d][m0 + j] for the tile's tokens and NV x L rows from m0.
template <int DIM, int NV>
inline void tile_scores(const float* qt, int64_t stride, const float* k, int64_t m0, float* scores) {
  constexpr int kTokens = L == 16 ? 8 : 2;  // accumulators: kTokens x NV, within the 32 (16) registers
  for (int64_t t0 = 0; t0 < kTile; t0 += kTokens) {
    vfloat acc[kTokens][NV];
    for (int t = 0; t < kTokens; ++t)
      for (int j = 0; j < NV; ++j) acc[t][j] = simd::zero();
    for (int d = 0; d < DIM; ++d) {
      vfloat qv[NV];
      for (int j = 0; j < NV; ++j) qv[j] = simd::load(qt + d * stride + m0 + L * j);
      for (int t = 0; t < kTokens; ++t) {
        const vfloat kv = simd::set1(k[(t0 + t) * DIM + d]);
        for (int j = 0; j < NV; ++j) acc[t][j] = simd::fmadd(kv, qv[j], acc[t][j]);
      }
    }
    for (int t = 0; t < kTokens; ++t)
      for (int j = 0; j < NV; ++j) simd::store(scores + (t0 + t) * 32 + L * j, acc[t][j]);
  }
}

// Online softmax over one tile for L rows at column j of `scores`: masks positions past each row's
// own, turns scores into weights in place, and returns the factor that rescales the rows' old sums.
inline vfloat tile_softmax(float* scores, int64_t j, int64_t n0, const int32_t* pos, float* max, float* sum) {
  const simd::vint rows = simd::load_int(pos);
  const vfloat masked = simd::set1(kMasked);
  vfloat tile_max = masked;
  for (int64_t t = 0; t < kTile; ++t)
    tile_max = simd::max(tile_max, simd::keep_if_at_most(static_cast<int32_t>(n0 + t), rows,
                                                         simd::load(scores + t * 32 + j), masked));
  const vfloat old_max = simd::load(max), new_max = simd::max(old_max, tile_max);
  const vfloat alpha = simd::exp(simd::sub(old_max, new_max));
  vfloat total = simd::zero();
  for (int64_t t = 0; t < kTile; ++t) {
    const vfloat p = simd::keep_if_at_most(static_cast<int32_t>(n0 + t), rows,
                                           simd::exp(simd::sub(simd::load(scores + t * 32 + j), new_max)),
                                           simd::zero());
    simd::store(scores + t * 32 + j, p);
    total = simd::add(total, p);
  }
  simd::store(max, new_max);
  simd::store(sum, simd::fmadd(simd::load(sum), alpha, total));
  return alpha;
}

// o[m] = o[m] * alpha[m] + sum_t weights[t][m] * v[t] for `count` rows from m0.
template <int DIM>
inline void tile_values(const float* weights, const float* v, const float* alpha, int64_t m0, int64_t count, float* o) {
  constexpr int V = DIM / L, kAccumulators = L == 16 ? 16 : 8, R = std::max(1, kAccumulators / V);
  for (int64_t r0 = 0; r0 < count; r0 += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, count - r0));
    vfloat acc[R][V];
    for (int r = 0; r < rows; ++r) {
      const vfloat a = simd::set1(alpha[r0 + r]);
      for (int i = 0; i < V; ++i) acc[r][i] = simd::mul(a, simd::load(o + (m0 + r0 + r) * DIM + L * i));
    }
    for (int64_t t = 0; t < kTile; ++t) {
      vfloat vv[V];
      for (int i = 0; i < V; ++i) vv[i] = simd::load(v + t * DIM + L * i);
      for (int r = 0; r < rows; ++r) {
        const vfloat p = simd::set1(weights[t * 32 + r0 + r]);
        for (int i = 0; i < V; ++i) acc[r][i] = simd::fmadd(p, vv[i], acc[r][i]);
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int i = 0; i < V; ++i) simd::store(o + (m0 + r0 + r) * DIM + L * i, acc[r][i]);
  }
}

// tile_scores for the block's nv vectors of rows (1 .. kRowsPerBlock / L, known only at run time).
template <int DIM, int NV = kRowsPerBlock / L>
inline void block_scores(int nv, const float* qt, int64_t stride, const float* k, int64_t m0, float* scores) {
  if (nv == NV) return tile_scores<DIM, NV>(qt, stride, k, m0, scores);
  if constexpr (NV > 1) block_scores<DIM, NV - 1>(nv, qt, stride, k, m0, scores);
}

template <typename T, int DIM>
void prefill_task(const Problem& P, const T* q, const T* k_cache, const T* v_cache, T* out, const Task& task,
                  Workspace& w) {
  const int64_t G = P.group, r = task.request, h = task.kv_head;
  const int64_t first = P.query_start[r] + task.first_row;  // absolute row of the task's first query
  const int64_t query_len = P.query_start[r + 1] - P.query_start[r];
  const int64_t pos0 = P.lens[r] - query_len + task.first_row;
  const int64_t M = task.num_rows * G, stride = (M + L - 1) / L * L;
  // Rows m = i x G + g: query row i of the task under query head h x G + g, pre-scaled.
  for (int64_t m = 0; m < stride; ++m) {
    const int64_t i = std::min(m, M - 1) / G, g = std::min(m, M - 1) % G;
    const T* src = q + ((first + i) * P.heads + h * G + g) * DIM;
    for (int d = 0; d < DIM; ++d) w.qt[d * stride + m] = m < M ? to_float(src[d]) * P.scale : 0.f;
    w.pos[m] = static_cast<int32_t>(pos0 + i);
    w.max[m] = kMasked;
    w.sum[m] = 0.f;
  }
  std::fill(w.o.begin(), w.o.begin() + stride * DIM, 0.f);
  const int64_t last = pos0 + task.num_rows - 1;
  for (int64_t n0 = 0; n0 <= last; n0 += kTile) {
    const int64_t count = std::min(kTile, last + 1 - n0);
    load_tile<T, DIM>(P, k_cache, r, h, n0, count, w.k.data());
    load_tile<T, DIM>(P, v_cache, r, h, n0, count, w.v.data());
    for (int64_t m0 = 0; m0 < stride; m0 += kRowsPerBlock) {
      const int nv = static_cast<int>(std::min<int64_t>(kRowsPerBlock, stride - m0) / L);
      if (n0 > w.pos[m0 + L * nv - 1]) continue;  // the whole tile lies past these rows
      block_scores<DIM>(nv, w.qt.data(), stride, w.k.data(), m0, w.scores.data());
      for (int j = 0; j < nv; ++j) {
        const vfloat alpha = tile_softmax(w.scores.data(), L * j, n0, w.pos.data() + m0 + L * j,
                                          w.max.data() + m0 + L * j, w.sum.data() + m0 + L * j);
        simd::store(w.alpha.data() + m0 + L * j, alpha);
      }
      tile_values<DIM>(w.scores.data(), w.v.data(), w.alpha.data() + m0, m0, L * nv, w.o.data());
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    const float inv = 1.f / w.sum[m];
    T* dst = out + ((first + m / G) * P.heads + h * G + m % G) * DIM;
    for (int d = 0; d < DIM; ++d) from_float(w.o[m * DIM + d] * inv, dst + d);
  }
}
#else
// Portable fallback: one query row and head at a time, two passes over its context.
template <typename T, int DIM>
void prefill_task(const Problem& P, const T* q, const T* k_cache, const T* v_cache, T* out, const Task& task,
                  Workspace& w) {
  const int64_t G = P.group, r = task.request, h = task.kv_head, row = P.kv_heads * DIM;
  const int64_t query_len = P.query_start[r + 1] - P.query_start[r];
  const int32_t* table = P.tables + r * P.width;
  std::vector<float> scores;
  for (int64_t i = task.first_row; i < task.first_row + task.num_rows; ++i) {
    const int64_t pos = P.lens[r] - query_len + i, absolute = P.query_start[r] + i;
    scores.resize(pos + 1);
    for (int64_t g = 0; g < G; ++g) {
      const T* qr = q + (absolute * P.heads + h * G + g) * DIM;
      float mx = kMasked, total = 0.f, acc[DIM] = {};
      for (int64_t n = 0; n <= pos; ++n) {
        const int64_t slot = static_cast<int64_t>(table[n / P.block_size]) * P.block_size + n % P.block_size;
        const T* kp = k_cache + slot * row + h * DIM;
        float s = 0.f;
        for (int d = 0; d < DIM; ++d) s += to_float(qr[d]) * to_float(kp[d]);
        scores[n] = s * P.scale;
        mx = std::max(mx, scores[n]);
      }
      for (int64_t n = 0; n <= pos; ++n) {
        const int64_t slot = static_cast<int64_t>(table[n / P.block_size]) * P.block_size + n % P.block_size;
        const T* vp = v_cache + slot * row + h * DIM;
        const float p = std::exp(scores[n] - mx);
        total += p;
        for (int d = 0; d < DIM; ++d) acc[d] += p * to_float(vp[d]);
      }
      T* dst = out + (absolute * P.heads + h * G + g) * DIM;
      for (int d = 0; d < DIM; ++d) from_float(acc[d] / total, dst + d);
    }
  }
}
#endif


#if defined(ORCA_AMX)
// bf16 prompt attention on AMX tiles (Sapphire Rapids and later): per 32-token context tile,
// S = Q K^T and O += P V are 16 x 16 x 32 tile products; the online softmax between them runs on
// AVX-512 rows. The tile's keys are laid out once as K^T in AMX's pair layout, and its values as
// token pairs, for all of the task's query rows. P goes to the second product in bf16, as
// FlashAttention does.
constexpr int64_t kAmxTile = 32;  // context tokens per tile: two 16-token score tiles, one value k-step

struct AmxWorkspace {
  std::vector<uint16_t> q, keys, values, probs;
  std::vector<float> scores, partial, o, max, sum;
  std::vector<int32_t> pos;
  AmxWorkspace(int64_t rows, int64_t dim)
      : q(rows * dim), keys(2 * dim * 16), values(dim * kAmxTile), probs(16 * kAmxTile), scores(16 * kAmxTile),
        partial(16 * dim), o(rows * dim), max(rows), sum(rows), pos(rows) {}
};

inline const uint16_t* cache_row(const Problem& P, const c10::BFloat16* cache, int64_t request, int64_t kv_head,
                                 int64_t n, int64_t dim) {
  const int32_t* table = P.tables + request * P.width;
  const int64_t slot = static_cast<int64_t>(table[n / P.block_size]) * P.block_size + n % P.block_size;
  return reinterpret_cast<const uint16_t*>(cache + (slot * P.kv_heads + kv_head) * dim);
}

// A 16 x 16 matrix of 32-bit words, one row a register, transposed in place (64 shuffles).
inline void transpose_16x16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: rows 2i and 2i+1 interleaved by word
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // per lane: word k of rows 4i .. 4i+3
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int k = 0; k < 4; ++k) {  // gather the four row groups' lanes
    const __m512i a = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x88), b = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xDD);
    const __m512i c = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x88), d = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xDD);
    r[k] = _mm512_shuffle_i32x4(a, c, 0x88);
    r[8 + k] = _mm512_shuffle_i32x4(a, c, 0xDD);
    r[4 + k] = _mm512_shuffle_i32x4(b, d, 0x88);
    r[12 + k] = _mm512_shuffle_i32x4(b, d, 0xDD);
  }
}

// keys[j][c]: B tile of K^T for tokens 16j.. and dimensions 32c..: row p holds (k[n][32c+2p], k[n][32c+2p+1])
// for n = 0..15. values[e]: B tile of V for dimensions 16e..: row p holds (v[2p][d], v[2p+1][d]) for 16 d.
// Tokens past `count` are zeros.
template <int DIM>
void load_amx_tile(const Problem& P, const c10::BFloat16* k_cache, const c10::BFloat16* v_cache, int64_t request,
                   int64_t kv_head, int64_t n0, int64_t count, AmxWorkspace& w) {
  const uint16_t* rows_k[kAmxTile];
  const uint16_t* rows_v[kAmxTile];
  static const uint16_t zeros[DIM] = {};
  for (int64_t t = 0; t < kAmxTile; ++t) {
    rows_k[t] = t < count ? cache_row(P, k_cache, request, kv_head, n0 + t, DIM) : zeros;
    rows_v[t] = t < count ? cache_row(P, v_cache, request, kv_head, n0 + t, DIM) : zeros;
  }
  for (int j = 0; j < 2; ++j)
    for (int c = 0; c < DIM / 32; ++c) {
      __m512i words[16];  // token n's 32 dimensions as 16 pairs, transposed to pair p's 16 tokens
      for (int n = 0; n < 16; ++n) words[n] = _mm512_loadu_si512(rows_k[16 * j + n] + 32 * c);
      transpose_16x16(words);
      uint16_t* tile = w.keys.data() + (j * (DIM / 32) + c) * 512;
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(tile + 32 * p, words[p]);
    }
  // interleave rows 2p and 2p+1 element by element, 32 dimensions at a time
  static const __m512i low = [] {
    alignas(64) uint16_t idx[32];
    for (int i = 0; i < 16; ++i) idx[2 * i] = i, idx[2 * i + 1] = 32 + i;
    return _mm512_load_si512(idx);
  }();
  static const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int p = 0; p < 16; ++p)
    for (int c = 0; c < DIM / 32; ++c) {
      const __m512i a = _mm512_loadu_si512(rows_v[2 * p] + 32 * c), b = _mm512_loadu_si512(rows_v[2 * p + 1] + 32 * c);
      _mm512_storeu_si512(w.values.data() + (2 * c) * 512 + p * 32, _mm512_permutex2var_epi16(a, low, b));
      _mm512_storeu_si512(w.values.data() + (2 * c + 1) * 512 + p * 32, _mm512_permutex2var_epi16(a, high, b));
    }
}

template <int DIM>
void prefill_task_amx(const Problem& P, const c10::BFloat16* q, const c10::BFloat16* k_cache,
                      const c10::BFloat16* v_cache, c10::BFloat16* out, const Task& task, AmxWorkspace& w) {
  const int64_t G = P.group, r = task.request, h = task.kv_head;
  const int64_t first = P.query_start[r] + task.first_row;
  const int64_t query_len = P.query_start[r + 1] - P.query_start[r];
  const int64_t pos0 = P.lens[r] - query_len + task.first_row;
  const int64_t M = task.num_rows * G, padded = (M + 15) / 16 * 16;
  // Rows m = i x G + g: query row i under query head h x G + g; padding repeats the last row.
  for (int64_t m = 0; m < padded; ++m) {
    const int64_t i = std::min(m, M - 1) / G, g = std::min(m, M - 1) % G;
    std::memcpy(w.q.data() + m * DIM, q + ((first + i) * P.heads + h * G + g) * DIM, DIM * sizeof(uint16_t));
    w.pos[m] = static_cast<int32_t>(pos0 + i);
    w.max[m] = kMasked;
    w.sum[m] = 0.f;
  }
  std::fill(w.o.begin(), w.o.begin() + padded * DIM, 0.f);
  const __m512 scale = _mm512_set1_ps(P.scale), masked = _mm512_set1_ps(kMasked);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t last = pos0 + task.num_rows - 1;
  amx::Scope tiles;
  for (int64_t n0 = 0; n0 <= last; n0 += kAmxTile) {
    const int64_t count = std::min(kAmxTile, last + 1 - n0);
    load_amx_tile<DIM>(P, k_cache, v_cache, r, h, n0, count, w);
    for (int64_t m0 = 0; m0 < padded; m0 += 16) {
      if (n0 > w.pos[std::min(m0 + 15, padded - 1)]) continue;  // the whole tile lies past these rows
      // S = Q K^T: tiles 0 and 1 hold the scores of tokens 0-15 and 16-31
      _tile_zero(0);
      _tile_zero(1);
      for (int c = 0; c < DIM / 32; ++c) {
        _tile_loadd(2, w.q.data() + m0 * DIM + 32 * c, DIM * sizeof(uint16_t));
        _tile_loadd(4, w.keys.data() + (0 * (DIM / 32) + c) * 512, 64);
        _tile_loadd(5, w.keys.data() + (1 * (DIM / 32) + c) * 512, 64);
        _tile_dpbf16ps(0, 2, 4);
        _tile_dpbf16ps(1, 2, 5);
      }
      _tile_stored(0, w.scores.data(), kAmxTile * sizeof(float));
      _tile_stored(1, w.scores.data() + 16, kAmxTile * sizeof(float));
      // online softmax: a row's 32 scores are two vectors; the rows' maxima and rescaling factors one
      alignas(64) float tile_max[16], alpha[16], new_max[16];
      __mmask16 keep[16][2];
      for (int row = 0; row < 16; ++row) {
        const float* s = w.scores.data() + row * kAmxTile;
        const __m512i limit = _mm512_set1_epi32(static_cast<int32_t>(std::min<int64_t>(w.pos[m0 + row] - n0, count - 1)));
        keep[row][0] = _mm512_cmple_epi32_mask(lane, limit);
        keep[row][1] = _mm512_cmple_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32(16)), limit);
        tile_max[row] = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_mask_mov_ps(masked, keep[row][0], _mm512_loadu_ps(s)),
                                                           _mm512_mask_mov_ps(masked, keep[row][1], _mm512_loadu_ps(s + 16))));
      }
      {
        const __m512 old_max = _mm512_loadu_ps(w.max.data() + m0);
        // scores are scaled after the product: max(scale x s) = scale x max(s), scale > 0
        const __m512 next = _mm512_max_ps(old_max, _mm512_mul_ps(_mm512_load_ps(tile_max), scale));
        _mm512_store_ps(alpha, simd::exp(_mm512_sub_ps(old_max, next)));
        _mm512_store_ps(new_max, next);
        _mm512_storeu_ps(w.max.data() + m0, next);
      }
      for (int row = 0; row < 16; ++row) {
        const float* s = w.scores.data() + row * kAmxTile;
        const __m512 vmax = _mm512_set1_ps(new_max[row]);
        const __m512 p0 = _mm512_maskz_mov_ps(keep[row][0], simd::exp(_mm512_fmsub_ps(_mm512_loadu_ps(s), scale, vmax)));
        const __m512 p1 = _mm512_maskz_mov_ps(keep[row][1], simd::exp(_mm512_fmsub_ps(_mm512_loadu_ps(s + 16), scale, vmax)));
        w.sum[m0 + row] = w.sum[m0 + row] * alpha[row] + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
        _mm512_storeu_si512(w.probs.data() + row * kAmxTile, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
      }
      // O = O x alpha + P V, sixteen dimensions per tile product
      _tile_loadd(2, w.probs.data(), kAmxTile * sizeof(uint16_t));
      for (int e = 0; e < DIM / 16; ++e) {
        _tile_zero(0);
        _tile_loadd(4, w.values.data() + e * 512, 64);
        _tile_dpbf16ps(0, 2, 4);
        _tile_stored(0, w.partial.data() + 16 * e, DIM * sizeof(float));
      }
      for (int row = 0; row < 16; ++row) {
        float* o = w.o.data() + (m0 + row) * DIM;
        const float* part = w.partial.data() + row * DIM;
        const __m512 a = _mm512_set1_ps(alpha[row]);
        for (int d = 0; d < DIM; d += 16)
          _mm512_storeu_ps(o + d, _mm512_fmadd_ps(_mm512_loadu_ps(o + d), a, _mm512_loadu_ps(part + d)));
      }
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    const __m512 inv = _mm512_set1_ps(1.f / w.sum[m]);
    c10::BFloat16* dst = out + ((first + m / G) * P.heads + h * G + m % G) * DIM;
    for (int d = 0; d < DIM; d += 16) simd::store(dst + d, _mm512_mul_ps(_mm512_loadu_ps(w.o.data() + m * DIM + d), inv));
  }
}
#endif

template <typename T, int DIM>
void prefill(const Problem& P, const T* q, const T* k_cache, const T* v_cache, T* out, int64_t num_requests) {
  std::vector<Task> tasks;
  for (int64_t r = 0; r < num_requests; ++r) {
    const int64_t query_len = P.query_start[r + 1] - P.query_start[r], start = P.lens[r] - query_len;
    for (int64_t b = 0; b < query_len; b += kQueryBlock)
      for (int64_t h = 0; h < P.kv_heads; ++h) {
        const int64_t rows = std::min(kQueryBlock, query_len - b);
        tasks.push_back({r, h, b, rows, rows * (start + b + rows)});
      }
  }
  // Longest first, taken from a shared counter: causal blocks differ in cost by the context they see.
  std::sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
#if defined(ORCA_AMX)
  if constexpr (std::is_same_v<T, c10::BFloat16> && DIM % 32 == 0) {
    if (amx::available()) {
      at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
        AmxWorkspace w((kQueryBlock * P.group + 15) / 16 * 16, DIM);
        for (int64_t t = next++; t < num_tasks; t = next++) prefill_task_amx<DIM>(P, q, k_cache, v_cache, out, tasks[t], w);
      });
      return;
    }
  }
#endif
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Workspace w((kQueryBlock * P.group + 15) / 16 * 16, DIM);
    for (int64_t t = next++; t < num_tasks; t = next++) prefill_task<T, DIM>(P, q, k_cache, v_cache, out, tasks[t], w);
  });
}

}  // namespace

// q, out: [tokens, heads, dim] (absolute rows); caches: [slots, kv_heads, dim]; block_tables: [n, width];
// query_start_loc: [n + 1] absolute first rows; seq_lens: [n] context lengths including the chunk, whose
// K and V must already be in the cache.
void paged_prefill_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                             torch::Tensor block_tables, torch::Tensor query_start_loc, torch::Tensor seq_lens,
                             int64_t block_size, double scale) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() && out.is_contiguous(),
              "paged_prefill_attention: tensors must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && seq_lens.scalar_type() == torch::kInt32 &&
              query_start_loc.scalar_type() == torch::kInt32,
              "paged_prefill_attention: block_tables, query_start_loc and seq_lens must be int32");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 || q.scalar_type() == torch::kBFloat16,
              "paged_prefill_attention: float32 or bfloat16 only");
  const auto tables = block_tables.contiguous();
  const auto starts = query_start_loc.contiguous();
  const auto lens = seq_lens.contiguous();
  const int64_t n = lens.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(1);
  TORCH_CHECK(starts.size(0) == n + 1, "paged_prefill_attention: query_start_loc needs one entry per request plus one");
  TORCH_CHECK(heads % kv_heads == 0, "paged_prefill_attention: query heads must be a multiple of KV heads");
  TORCH_CHECK(out.sizes() == q.sizes() && k_cache.size(2) == dim && v_cache.sizes() == k_cache.sizes(),
              "paged_prefill_attention: out, q and the caches disagree in shape");
  const Problem P{tables.data_ptr<int32_t>(), starts.data_ptr<int32_t>(), lens.data_ptr<int32_t>(), tables.size(1),
                  heads, kv_heads, heads / kv_heads, block_size, static_cast<float>(scale)};
  dispatch_attention(q.scalar_type(), dim, "paged_prefill_attention", [&](auto element, auto head_dim) {
    using T = decltype(element);
    prefill<T, decltype(head_dim)::value>(P, q.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), out.data_ptr<T>(), n);
  });
}
