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
// [head_dim, len] panel that stays in L1/L2, so a query row's scores are
// broadcast-FMAs over 8 keys at a time with no horizontal sums; the query
// heads that share the KV head (GQA) reuse the panel. The softmax exponent is
// a vectorized polynomial (relative error < 2e-7). The forward saves each
// row's log-sum-exp; the backward recomputes the probabilities from it (no
// [len, len] tensor is kept) and accumulates dK/dV of its task, which no
// other task writes, so tasks run in parallel without atomics.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "panel_matmul.h"

namespace realhf {

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

// out[j] = sum_d a[d] * panel[d * ld + j] for j < 8 * NV (a panel of transposed rows).
// With few vectors, even and odd d accumulate separately: twice the independent
// FMA chains, so short rows are not bound by the FMA latency (depth is even).
// (The constant-count loops carry unroll pragmas in these kernels: unrolled
// late, GCC kept the accumulator arrays on the stack and stored every
// accumulator on every iteration.)
template <int NV>
__attribute__((target("avx2,fma"))) inline void panel_times(const float* a, const float* panel, int64_t ld,
                                                           int64_t depth, float* out) {
  constexpr int kSets = NV <= 4 ? 2 : 1;
  __m256 acc[kSets][NV];
  #pragma GCC unroll 8
  for (auto& set : acc)
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) set[v] = _mm256_setzero_ps();
  for (int64_t d = 0; d < depth; d += kSets) {
    #pragma GCC unroll 8
    for (int s = 0; s < kSets; ++s) {
      const __m256 b = _mm256_broadcast_ss(a + d + s);
      const float* row = panel + (d + s) * ld;
      #pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[s][v] = _mm256_fmadd_ps(b, _mm256_loadu_ps(row + 8 * v), acc[s][v]);
    }
  }
  #pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    __m256 sum = acc[0][v];
    #pragma GCC unroll 8
    for (int s = 1; s < kSets; ++s) sum = _mm256_add_ps(sum, acc[s][v]);
    _mm256_storeu_ps(out + 8 * v, sum);
  }
}

// out[j] = a . row_j for j < n, the rows being panel's columns (n <= ld, ld % 8 == 0).
__attribute__((target("avx2,fma"))) inline void scores_row(const float* a, const float* panel, int64_t ld,
                                                          int64_t depth, int64_t n, float* out) {
  for (int64_t j = 0; j < n; j += 64) {
    const int64_t vecs = std::min<int64_t>(8, (n - j + 7) / 8);
    switch (vecs) {
      case 1: panel_times<1>(a, panel + j, ld, depth, out + j); break;
      case 2: panel_times<2>(a, panel + j, ld, depth, out + j); break;
      case 3: panel_times<3>(a, panel + j, ld, depth, out + j); break;
      case 4: panel_times<4>(a, panel + j, ld, depth, out + j); break;
      case 5: panel_times<5>(a, panel + j, ld, depth, out + j); break;
      case 6: panel_times<6>(a, panel + j, ld, depth, out + j); break;
      case 7: panel_times<7>(a, panel + j, ld, depth, out + j); break;
      default: panel_times<8>(a, panel + j, ld, depth, out + j); break;
    }
  }
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

// rows[j * stride + 0:dim] += w[j] * x[0:dim] for j < n, dim % 8 == 0.
__attribute__((target("avx2,fma"))) inline void add_outer(const float* w, const float* x, float* rows,
                                                         int64_t stride, int64_t n, int64_t dim) {
  for (int64_t j = 0; j < n; ++j) {
    const __m256 b = _mm256_broadcast_ss(w + j);
    float* row = rows + j * stride;
    for (int64_t c = 0; c < dim; c += 8)
      _mm256_storeu_ps(row + c, _mm256_fmadd_ps(b, _mm256_loadu_ps(x + c), _mm256_loadu_ps(row + c)));
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

struct VarlenShape {
  int64_t n_q_heads, n_kv_heads, dim;
  int64_t q_stride() const { return n_q_heads * dim; }
  int64_t kv_stride() const { return n_kv_heads * dim; }
  int64_t rep() const { return n_q_heads / n_kv_heads; }
};

// Forward of one (sequence [base, base + len), KV head g): out rows and lse[h * total + token].
__attribute__((target("avx2,fma"))) inline void varlen_attention_fwd_task(
    const float* q, const float* k, const float* v, float* out, float* lse, int64_t total, int64_t base,
    int64_t len, int64_t g, const VarlenShape& sh, float scale) {
  const int64_t dim = sh.dim, ld = (len + 7) / 8 * 8;
  std::vector<float> kt(dim * ld), p(ld);
  transpose_rows(k + base * sh.kv_stride() + g * dim, sh.kv_stride(), len, dim, ld, kt.data());
  const float* vrows = v + base * sh.kv_stride() + g * dim;
  for (int64_t r = 0; r < sh.rep(); ++r) {
    const int64_t h = g * sh.rep() + r;
    for (int64_t i = 0; i < len; ++i) {
      const int64_t n = i + 1, tok = base + i;
      scores_row(q + tok * sh.q_stride() + h * dim, kt.data(), ld, dim, n, p.data());
      float m = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        p[j] *= scale;
        m = std::max(m, p[j]);
      }
      const float l = exp_shifted(p.data(), n, m);
      weighted_sum(p.data(), vrows, sh.kv_stride(), n, dim, 1.f / l, out + tok * sh.q_stride() + h * dim);
      lse[h * total + tok] = m + std::log(l);
    }
  }
}

// Backward of one (sequence, KV head): dq rows of its query heads, dk/dv rows of g (zeroed by the caller).
__attribute__((target("avx2,fma"))) inline void varlen_attention_bwd_task(
    const float* dout, const float* q, const float* k, const float* v, const float* out, const float* lse,
    float* dq, float* dk, float* dv, int64_t total, int64_t base, int64_t len, int64_t g, const VarlenShape& sh,
    float scale) {
  const int64_t dim = sh.dim, ld = (len + 7) / 8 * 8;
  std::vector<float> kt(dim * ld), vt(dim * ld), p(ld), ds(ld);
  const int64_t kvs = sh.kv_stride(), qs = sh.q_stride();
  const float* krows = k + base * kvs + g * dim;
  transpose_rows(krows, kvs, len, dim, ld, kt.data());
  transpose_rows(v + base * kvs + g * dim, kvs, len, dim, ld, vt.data());
  float* dkrows = dk + base * kvs + g * dim;
  float* dvrows = dv + base * kvs + g * dim;
  for (int64_t r = 0; r < sh.rep(); ++r) {
    const int64_t h = g * sh.rep() + r;
    for (int64_t i = 0; i < len; ++i) {
      const int64_t n = i + 1, tok = base + i;
      const float* qi = q + tok * qs + h * dim;
      const float* doi = dout + tok * qs + h * dim;
      scores_row(qi, kt.data(), ld, dim, n, p.data());
      for (int64_t j = 0; j < n; ++j) p[j] *= scale;
      exp_shifted(p.data(), n, lse[h * total + tok]);
      scores_row(doi, vt.data(), ld, dim, n, ds.data());  // dP = dO . v_j
      const float delta = dot_rows(doi, out + tok * qs + h * dim, dim);
      for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - delta);
      weighted_sum(ds.data(), krows, kvs, n, dim, scale, dq + tok * qs + h * dim);
      for (int64_t j = 0; j < n; ++j) ds[j] *= scale;
      add_outer(ds.data(), qi, dkrows, kvs, n, dim);
      add_outer(p.data(), doi, dvrows, kvs, n, dim);
    }
  }
}

#else
struct VarlenShape {
  int64_t n_q_heads, n_kv_heads, dim;
};
inline bool varlen_attention_supported() { return false; }
// Never called: the wrappers check varlen_attention_supported() first.
inline void varlen_attention_fwd_task(const float*, const float*, const float*, float*, float*, int64_t, int64_t,
                                      int64_t, int64_t, const VarlenShape&, float) {}
inline void varlen_attention_bwd_task(const float*, const float*, const float*, const float*, const float*,
                                      const float*, float*, float*, float*, int64_t, int64_t, int64_t, int64_t,
                                      const VarlenShape&, float) {}
#endif

}  // namespace realhf
