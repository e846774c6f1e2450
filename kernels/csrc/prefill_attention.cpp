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
#include <vector>
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
