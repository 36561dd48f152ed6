// Causal self-attention over packed variable-length sequences, float32,
// forward and backward (AVX2 + FMA).
//
// Training batches of RL and SFT on a CPU hold many short sequences (tens of
// tokens). Per sequence, torch's fused SDPA kernel spends most of its time in
// per-call setup and in tiles sized for long sequences: at the PPO shape
// (8 sequences of 42-60 tokens, 4 query / 2 KV heads, head_dim 64) one
// layer's attention took 2.2-2.4 ms forward + backward, for ~30 MFLOP.
//
// Here one call covers every sequence. A task is one (sequence, KV head):
// its keys (and values, for the backward) are transposed once into a
// [head_dim, len] panel that stays in L1/L2. Query rows (a token under one of
// the query heads sharing the KV head, GQA) go four at a time: each vector of
// keys loaded serves four rows' scores, each value (or key) row four rows'
// outputs, and the backward's dK/dV rows take four rows' updates per pass, so
// the loops do 2-4 FMAs per load instead of one. The softmax exponent is a
// vectorized polynomial (relative error < 2e-7). The forward saves each row's
// log-sum-exp; the backward recomputes the probabilities from it (no
// [len, len] tensor is kept) and accumulates dK/dV of its task, which no other
// task writes, so tasks run in parallel without atomics. One core, 4 query /
// 2 KV heads, head_dim 64: 8 sequences of 42-60 tokens 0.26-0.28 ms forward,
// 0.6-0.8 ms backward (a row at a time: 0.35-0.39 and 1.2); 16 of 32-256
// tokens 4.4-4.9 and 10.4-10.6 ms (7.5-7.8 and 19.3).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "panel_matmul.h"

namespace realhf {

struct VarlenShape {
  int64_t n_q_heads, n_kv_heads, dim;
  int64_t q_stride() const { return n_q_heads * dim; }
  int64_t kv_stride() const { return n_kv_heads * dim; }
  int64_t rep() const { return n_q_heads / n_kv_heads; }
};

// A run of query rows [q0, q0 + n) whose keys are the prefix rows [k0, k0 + p)
// (none when p == 0) followed by the run's own rows, causal within the run: a
// packed sequence (p == 0), or a branch of a prefix tree keyed by its group's
// prefix. Row i of the run sees keys 0 .. p + i of that list.
struct Segment {
  int64_t q0, n, k0, p;
  int64_t keys() const { return p + n; }
  // The row of key j of the list.
  int64_t key_row(int64_t j) const { return j < p ? k0 + j : q0 + j - p; }
  // Whether the list is one run of rows (no prefix, or the prefix right before the own rows),
  // starting at key_row(0).
  bool keys_adjacent() const { return p == 0 || k0 + p == q0; }
};

#ifdef REALHF_X86_AVX2

inline bool varlen_attention_supported() { return avx2_fma_supported(); }

// exp(x) for 8 lanes: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-6
// polynomial, 2^n through the exponent bits. Inputs below -87.3 give 0.
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// y[0:8*NV] = scale * sum_{j < n} w[j] * rows[j * stride + 0:8*NV].
template <int NV>
__attribute__((target("avx2,fma"))) inline void weighted_rows(const float* w, const float* rows, int64_t stride,
                                                             int64_t n, float scale, float* y) {
  __m256 acc[NV];
  #pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 b = _mm256_broadcast_ss(w + j);
    const float* row = rows + j * stride;
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(b, _mm256_loadu_ps(row + 8 * v), acc[v]);
  }
  const __m256 s = _mm256_set1_ps(scale);
  #pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(y + 8 * v, _mm256_mul_ps(acc[v], s));
}

// y[0:dim] = scale * sum_{j < n} w[j] * rows[j * stride + 0:dim], dim % 8 == 0.
__attribute__((target("avx2,fma"))) inline void weighted_sum(const float* w, const float* rows, int64_t stride,
                                                            int64_t n, int64_t dim, float scale, float* y) {
  for (int64_t c = 0; c < dim; c += 64) {
    const int64_t vecs = std::min<int64_t>(8, (dim - c) / 8);
    switch (vecs) {
      case 1: weighted_rows<1>(w, rows + c, stride, n, scale, y + c); break;
      case 2: weighted_rows<2>(w, rows + c, stride, n, scale, y + c); break;
      case 3: weighted_rows<3>(w, rows + c, stride, n, scale, y + c); break;
      case 4: weighted_rows<4>(w, rows + c, stride, n, scale, y + c); break;
      case 5: weighted_rows<5>(w, rows + c, stride, n, scale, y + c); break;
      case 6: weighted_rows<6>(w, rows + c, stride, n, scale, y + c); break;
      case 7: weighted_rows<7>(w, rows + c, stride, n, scale, y + c); break;
      default: weighted_rows<8>(w, rows + c, stride, n, scale, y + c); break;
    }
  }
}

// s[j] = exp(s[j] - shift) for j < n; returns their sum.
__attribute__((target("avx2,fma"))) inline float exp_shifted(float* s, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), sh));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  float total = lane_sum(acc);
  if (j < n) {
    alignas(32) float buf[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t t = j; t < n; ++t) buf[t - j] = s[t] - shift;
    alignas(32) float out[8];
    _mm256_store_ps(out, exp8(_mm256_load_ps(buf)));
    for (int64_t t = j; t < n; ++t) {
      s[t] = out[t - j];
      total += out[t - j];
    }
  }
  return total;
}

__attribute__((target("avx2,fma"))) inline float dot_rows(const float* a, const float* b, int64_t dim) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t c = 0; c < dim; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), acc);
  return lane_sum(acc);
}

// panel[d * ld + j] = x[(base + j) * stride + d] for j < len, zero for len <= j < ld.
inline void transpose_rows(const float* x, int64_t stride, int64_t len, int64_t dim, int64_t ld, float* panel) {
  for (int64_t d = 0; d < dim; ++d) {
    float* out = panel + d * ld;
    for (int64_t j = 0; j < len; ++j) out[j] = x[j * stride + d];
    for (int64_t j = len; j < ld; ++j) out[j] = 0.f;
  }
}

// Query rows (a token under one query head) of a task handled together: every
// key vector loaded feeds kRows rows, so the loops below do 2-4 FMAs per load
// where a row at a time did one (and was bound by the loads).
// (The constant-count loops carry unroll pragmas: unrolled late, GCC kept the
// accumulator arrays on the stack and stored every accumulator on every pass.)
constexpr int kRows = 4;

// out[r][c : c + 8*NV] = scale[r] * sum_{k < K} a[r][k] * B[k * ldb + 0 : 8*NV] for r < kRows:
// kRows rows (given by pointers) times 8*NV columns of B, each vector of B loaded once for
// all rows. With one vector of columns there would be only kRows FMA chains: even and odd k
// then accumulate apart, so the chains cover the FMA latency.
// acc[r] += a[r][k] * cols[0 : 8*NV] for r < kRows.
template <int NV>
__attribute__((target("avx2,fma"))) inline void accumulate_outer(__m256 (&acc)[kRows][NV], const float* const* a,
                                                                const float* cols, int64_t k) {
  __m256 bv[NV];
  #pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(cols + 8 * v);
  #pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    const __m256 x = _mm256_broadcast_ss(a[r] + k);
    #pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(x, bv[v], acc[r][v]);
  }
}

template <int NV>
__attribute__((target("avx2,fma"))) inline void rows_times_block(const float* const* a, const float* B, int64_t ldb,
                                                                int64_t K, const float* scale, float* const* out,
                                                                int64_t c) {
  constexpr int kSets = NV == 1 ? 2 : 1;
  __m256 acc[kSets][kRows][NV];
  #pragma GCC unroll 2
  for (auto& set : acc)
    #pragma GCC unroll 4
    for (auto& row : set)
      #pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) row[v] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + kSets <= K; k += kSets)
    #pragma GCC unroll 2
    for (int s = 0; s < kSets; ++s) accumulate_outer<NV>(acc[s], a, B + (k + s) * ldb, k + s);
  for (; k < K; ++k) accumulate_outer<NV>(acc[0], a, B + k * ldb, k);
  #pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    const __m256 sc = _mm256_set1_ps(scale[r]);
    #pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      __m256 sum = acc[0][r][v];
      #pragma GCC unroll 2
      for (int s = 1; s < kSets; ++s) sum = _mm256_add_ps(sum, acc[s][r][v]);
      _mm256_storeu_ps(out[r] + c + 8 * v, _mm256_mul_ps(sum, sc));
    }
  }
}

// rows_times_block over all 8-column vectors of [0, width) (width % 8 == 0), three at a time.
__attribute__((target("avx2,fma"))) inline void rows_times_columns(const float* const* a, const float* B, int64_t ldb,
                                                                  int64_t K, int64_t width, const float* scale,
                                                                  float* const* out) {
  for (int64_t c = 0; c < width; c += 24) {
    switch (std::min<int64_t>(3, (width - c) / 8)) {
      case 1: rows_times_block<1>(a, B + c, ldb, K, scale, out, c); break;
      case 2: rows_times_block<2>(a, B + c, ldb, K, scale, out, c); break;
      default: rows_times_block<3>(a, B + c, ldb, K, scale, out, c); break;
    }
  }
}

// p[j] *= scale for j < n; returns the largest (n >= 1).
__attribute__((target("avx2,fma"))) inline float scale_and_max(float* p, int64_t n, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  __m256 mx = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(p + j), s);
    _mm256_storeu_ps(p + j, x);
    mx = _mm256_max_ps(mx, x);
  }
  float m = lane_max(mx);
  for (; j < n; ++j) {
    p[j] *= scale;
    m = std::max(m, p[j]);
  }
  return m;
}

// S[r * sld + j] = a[r] . panel[:, j] for j < n rounded up to 8 (n <= ld, ld % 8 == 0).
__attribute__((target("avx2,fma"))) inline void block_scores(const float* const* a, const float* panel, int64_t ld,
                                                            int64_t depth, int64_t n, float* S, int64_t sld) {
  float ones[kRows], *rows[kRows];
  for (int r = 0; r < kRows; ++r) {
    ones[r] = 1.f;
    rows[r] = S + r * sld;
  }
  rows_times_columns(a, panel, ld, depth, (n + 7) / 8 * 8, ones, rows);
}

// out[r][0:dim] = scale[r] * sum_{j < n} W[r * wld + j] * rows[j * stride + 0:dim], dim % 8 == 0.
__attribute__((target("avx2,fma"))) inline void block_weighted(const float* W, int64_t wld, const float* rows,
                                                              int64_t stride, int64_t n, int64_t dim,
                                                              const float* scale, float* const* out) {
  const float* w[kRows];
  for (int r = 0; r < kRows; ++r) w[r] = W + r * wld;
  rows_times_columns(w, rows, stride, n, dim, scale, out);
}

// rows[j * stride + c : c + 8*NV] += xscale * sum_r W[r * wld + j] * x[r][c : c + 8*NV] for j < n.
template <int NV>
__attribute__((target("avx2,fma"))) inline void block_outer_chunk(const float* W, int64_t wld, const float* const* x,
                                                                 float xscale, float* rows, int64_t stride,
                                                                 int64_t n, int64_t c) {
  const __m256 s = _mm256_set1_ps(xscale);
  __m256 xr[kRows][NV];
  #pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
    #pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) xr[r][v] = _mm256_mul_ps(s, _mm256_loadu_ps(x[r] + c + 8 * v));
  for (int64_t j = 0; j < n; ++j) {
    float* row = rows + j * stride + c;
    __m256 acc[NV];
    #pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[v] = _mm256_loadu_ps(row + 8 * v);
    #pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m256 b = _mm256_broadcast_ss(W + r * wld + j);
      #pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(b, xr[r][v], acc[v]);
    }
    #pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(row + 8 * v, acc[v]);
  }
}

// rows[j * stride + 0:dim] += xscale * sum_r W[r * wld + j] * x[r][0:dim] for j < n, dim % 8 == 0.
__attribute__((target("avx2,fma"))) inline void block_outer(const float* W, int64_t wld, const float* const* x,
                                                           float xscale, float* rows, int64_t stride, int64_t n,
                                                           int64_t dim) {
  for (int64_t c = 0; c < dim; c += 16) {
    if (dim - c >= 16)
      block_outer_chunk<2>(W, wld, x, xscale, rows, stride, n, c);
    else
      block_outer_chunk<1>(W, wld, x, xscale, rows, stride, n, c);
  }
}

// The query rows of one block: row f of a segment is token f / rep under query
// head g * rep + f % rep, so a block's rows are a few consecutive tokens (their
// causal lengths, prefix included, differ by at most kRows - 1). Rows past the task's end repeat its last
// row's inputs with zero weights and write to scratch.
struct RowBlock {
  int count = 0;
  int64_t tok[kRows], head[kRows], len[kRows];
  int64_t max_len() const { return len[count - 1]; }
};

inline RowBlock row_block(int64_t f0, int64_t n_rows, int64_t base, int64_t g, int64_t rep, int64_t prefix) {
  RowBlock b;
  b.count = static_cast<int>(std::min<int64_t>(kRows, n_rows - f0));
  for (int r = 0; r < kRows; ++r) {
    const int64_t f = f0 + std::min(r, b.count - 1), i = f / rep;
    b.tok[r] = base + i;
    b.head[r] = g * rep + f % rep;
    b.len[r] = prefix + i + 1;
  }
  return b;
}


// Rows [k0, k0 + p) then [q0, q0 + n) of x (row stride `stride`) as one list:
// a pointer with its stride where the two ranges are adjacent or p == 0, else
// a contiguous copy in buf.
inline const float* segment_rows(const float* x, int64_t stride, const Segment& sg, int64_t dim,
                                 std::vector<float>& buf, int64_t* out_stride) {
  if (sg.keys_adjacent()) {
    *out_stride = stride;
    return x + sg.key_row(0) * stride;
  }
  buf.resize(sg.keys() * dim);
  for (int64_t j = 0; j < sg.keys(); ++j) {
    const float* row = x + sg.key_row(j) * stride;
    std::copy(row, row + dim, &buf[j * dim]);
  }
  *out_stride = dim;
  return buf.data();
}

// Forward of one segment under KV head g: its out rows and lse[h * total + token].
__attribute__((target("avx2,fma"))) inline void segment_attention_fwd(
    const float* q, const float* k, const float* v, float* out, float* lse, int64_t total, const Segment& sg,
    int64_t g, const VarlenShape& sh, float scale) {
  const int64_t dim = sh.dim, keys = sg.keys(), ld = (keys + 7) / 8 * 8, qs = sh.q_stride(), rep = sh.rep();
  std::vector<float> kt(dim * ld), S(kRows * ld), scratch(kRows * dim), kbuf, vbuf;
  int64_t kstride, vstride;
  const float* krows = segment_rows(k + g * dim, sh.kv_stride(), sg, dim, kbuf, &kstride);
  const float* vrows = segment_rows(v + g * dim, sh.kv_stride(), sg, dim, vbuf, &vstride);
  transpose_rows(krows, kstride, keys, dim, ld, kt.data());
  for (int64_t f0 = 0; f0 < sg.n * rep; f0 += kRows) {
    const RowBlock b = row_block(f0, sg.n * rep, sg.q0, g, rep, sg.p);
    const int64_t n_max = b.max_len();
    const float* a[kRows];
    float* o[kRows];
    float inv[kRows];
    for (int r = 0; r < kRows; ++r) {
      a[r] = q + b.tok[r] * qs + b.head[r] * dim;
      o[r] = r < b.count ? out + b.tok[r] * qs + b.head[r] * dim : scratch.data() + r * dim;
    }
    block_scores(a, kt.data(), ld, dim, n_max, S.data(), ld);
    for (int r = 0; r < kRows; ++r) {
      float* p = S.data() + r * ld;
      const int64_t n = r < b.count ? b.len[r] : 0;
      if (n > 0) {
        const float m = scale_and_max(p, n, scale);
        const float l = exp_shifted(p, n, m);
        inv[r] = 1.f / l;
        lse[b.head[r] * total + b.tok[r]] = m + std::log(l);
      } else {
        inv[r] = 0.f;
      }
      std::fill(p + n, p + n_max, 0.f);  // keys after the row's own token (and unused rows) weigh nothing
    }
    block_weighted(S.data(), ld, vrows, vstride, n_max, dim, inv, o);
  }
}

// Backward of one segment under KV head g: dq rows of its query heads; dk/dv of
// its keys accumulate (prefix rows may be shared with the other segments of a
// task, which runs them one after another).
__attribute__((target("avx2,fma"))) inline void segment_attention_bwd(
    const float* dout, const float* q, const float* k, const float* v, const float* out, const float* lse,
    float* dq, float* dk, float* dv, int64_t total, const Segment& sg, int64_t g, const VarlenShape& sh,
    float scale) {
  const int64_t dim = sh.dim, keys = sg.keys(), ld = (keys + 7) / 8 * 8, rep = sh.rep();
  const int64_t kvs = sh.kv_stride(), qs = sh.q_stride();
  std::vector<float> kt(dim * ld), vt(dim * ld), P(kRows * ld), dS(kRows * ld), scratch(kRows * dim), kbuf, vbuf;
  int64_t kstride, vstride;
  const float* krows = segment_rows(k + g * dim, kvs, sg, dim, kbuf, &kstride);
  transpose_rows(krows, kstride, keys, dim, ld, kt.data());
  const float* vrows = segment_rows(v + g * dim, kvs, sg, dim, vbuf, &vstride);
  transpose_rows(vrows, vstride, keys, dim, ld, vt.data());
  // dK/dV of the key list: in place where its rows are adjacent, else in a buffer added back below.
  const bool split = !sg.keys_adjacent();
  std::vector<float> dkbuf(split ? keys * dim : 0), dvbuf(split ? keys * dim : 0);
  float* dkrows = split ? dkbuf.data() : dk + sg.key_row(0) * kvs + g * dim;
  float* dvrows = split ? dvbuf.data() : dv + sg.key_row(0) * kvs + g * dim;
  const int64_t dstride = split ? dim : kvs;
  float scales[kRows];
  std::fill(scales, scales + kRows, scale);
  for (int64_t f0 = 0; f0 < sg.n * rep; f0 += kRows) {
    const RowBlock b = row_block(f0, sg.n * rep, sg.q0, g, rep, sg.p);
    const int64_t n_max = b.max_len();
    const float *qi[kRows], *doi[kRows];
    float* dqi[kRows];
    for (int r = 0; r < kRows; ++r) {
      const int64_t at = b.tok[r] * qs + b.head[r] * dim;
      qi[r] = q + at;
      doi[r] = dout + at;
      dqi[r] = r < b.count ? dq + at : scratch.data() + r * dim;
    }
    block_scores(qi, kt.data(), ld, dim, n_max, P.data(), ld);
    block_scores(doi, vt.data(), ld, dim, n_max, dS.data(), ld);  // dP = dO . v_j
    for (int r = 0; r < kRows; ++r) {
      float* p = P.data() + r * ld;
      float* ds = dS.data() + r * ld;
      const int64_t n = r < b.count ? b.len[r] : 0;
      if (n > 0) {
        for (int64_t j = 0; j < n; ++j) p[j] *= scale;
        exp_shifted(p, n, lse[b.head[r] * total + b.tok[r]]);
        const float delta = dot_rows(doi[r], out + b.tok[r] * qs + b.head[r] * dim, dim);
        for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - delta);
      }
      std::fill(p + n, p + n_max, 0.f);
      std::fill(ds + n, ds + n_max, 0.f);
    }
    block_weighted(dS.data(), ld, krows, kstride, n_max, dim, scales, dqi);  // dq = scale * dS . k
    block_outer(dS.data(), ld, qi, scale, dkrows, dstride, n_max, dim);     // dk += scale * dS^T . q
    block_outer(P.data(), ld, doi, 1.f, dvrows, dstride, n_max, dim);       // dv += P^T . dO
  }
  if (split) {
    for (int64_t j = 0; j < keys; ++j) {
      float* dkr = dk + sg.key_row(j) * kvs + g * dim;
      float* dvr = dv + sg.key_row(j) * kvs + g * dim;
      for (int64_t c = 0; c < dim; ++c) {
        dkr[c] += dkbuf[j * dim + c];
        dvr[c] += dvbuf[j * dim + c];
      }
    }
  }
}

#else
inline bool varlen_attention_supported() { return false; }
// Never called: the wrappers check varlen_attention_supported() first.
inline void segment_attention_fwd(const float*, const float*, const float*, float*, float*, int64_t,
                                  const Segment&, int64_t, const VarlenShape&, float) {}
inline void segment_attention_bwd(const float*, const float*, const float*, const float*, const float*,
                                  const float*, float*, float*, float*, int64_t, const Segment&, int64_t,
                                  const VarlenShape&, float) {}
#endif

}  // namespace realhf
