// Fused CPU kernels for the element-wise parts of a llama block.
//
// On a CPU, a transformer block's matrix products run near the core's peak
// while RMS norm, rotary embedding and the gated MLP's product each take
// 5-15 separate passes over memory (and as many autograd nodes).  Here each of
// them is one pass forward and one pass backward, over float32 rows spread on
// torch's threads with at::parallel_for.  Python wraps them in autograd
// functions (realhf/impl/ops/fused_layers.py), whose torch fallbacks are the
// reference the tests compare against.
//
// Inner loops use 8 independent accumulators so that -O3 vectorizes the
// reductions without reassociating floating point (no -ffast-math).
//
// Causal attention over packed sequences (varlen_attention.h) is here too:
// AVX2 + FMA kernels chosen at run time, for every sequence of a batch in one
// call, forward and backward.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "row_ops.h"
#include "varlen_attention.h"

namespace {

constexpr int kLanes = 8;

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

int64_t row_grain(int64_t width) {
  // About 32k elements per task: enough work to amortize a task.
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, width));
}

// ---------------------------------------------------------------- RMS norm
// y = w * x * rstd, rstd = 1 / sqrt(mean(x^2) + eps), per row of x [N, D].
std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_f32(x, "x");
  check_f32(w, "weight");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1),
              "rms_norm_fwd expects x [N, D] and weight [D]");
  const int64_t n = x.size(0), d = x.size(1);
  auto y = at::empty_like(x);
  auto rstd = at::empty({n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, n, row_grain(d), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) rp[r] = realhf::rms_row(xp + r * d, wp, yp + r * d, d, feps);
  });
  return {y, rstd};
}

// dx = rstd * (g*w - xhat * mean(g*w*xhat)), dw = sum over rows of g * xhat.
std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& rstd) {
  check_f32(g, "grad");
  check_f32(x, "x");
  check_f32(w, "weight");
  check_f32(rstd, "rstd");
  TORCH_CHECK(g.sizes() == x.sizes() && x.dim() == 2 && w.size(0) == x.size(1) && rstd.size(0) == x.size(0),
              "rms_norm_bwd: shapes of grad, x, weight and rstd disagree");
  const int64_t n = x.size(0), d = x.size(1);
  auto dx = at::empty_like(x);
  const int nthreads = at::get_num_threads();
  auto partial = at::zeros({nthreads, d}, x.options());
  const float* gp = g.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, n, row_grain(d), [&](int64_t b, int64_t e) {
    float* __restrict__ dw = pp + static_cast<int64_t>(at::get_thread_num()) * d;
    for (int64_t r = b; r < e; ++r) {
      const float* __restrict__ gr = gp + r * d;
      const float* __restrict__ xr = xp + r * d;
      float* __restrict__ dxr = dxp + r * d;
      const float rs = rp[r];
      // mean(g*w*xhat) = rs * mean(g*w*x)
      float acc[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      int64_t j = 0;
      for (; j + kLanes <= d; j += kLanes)
        for (int k = 0; k < kLanes; ++k) acc[k] += gr[j + k] * wp[j + k] * xr[j + k];
      float dot = 0.f;
      for (int k = 0; k < kLanes; ++k) dot += acc[k];
      for (; j < d; ++j) dot += gr[j] * wp[j] * xr[j];
      const float c = rs * rs * dot / static_cast<float>(d);
      for (int64_t q = 0; q < d; ++q) {
        dxr[q] = rs * (gr[q] * wp[q] - xr[q] * c);
        dw[q] += gr[q] * (xr[q] * rs);
      }
    }
  });
  return {dx, partial.sum(0)};
}

// ------------------------------------------------------------------ rotary
// x [N, H, D] rotated by per-token angles with cos/sin [N, D/2]; sign = -1
// rotates back (the backward of a rotation is the opposite rotation).
// Non-interleaved pairs dimension j with j + D/2, interleaved 2j with 2j+1.
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved,
                  double sign) {
  check_f32(x, "x");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) &&
                  2 * cos.size(1) == x.size(2),
              "rotary expects x [N, H, D], cos and sin [N, D/2]");
  const int64_t n = x.size(0), h = x.size(1), d = x.size(2), half = d / 2;
  auto out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sg = static_cast<float>(sign);
  at::parallel_for(0, n, row_grain(h * d), [&](int64_t b, int64_t e) {
    std::vector<float> s(half);
    for (int64_t t = b; t < e; ++t) {
      const float* c = cp + t * half;
      for (int64_t j = 0; j < half; ++j) s[j] = sg * sp[t * half + j];
      for (int64_t hh = 0; hh < h; ++hh)
        realhf::rotate_head(xp + (t * h + hh) * d, c, s.data(), op + (t * h + hh) * d, d, interleaved);
    }
  });
  return out;
}

// ---------------------------------------------------------------- gated MLP
// y = silu(gate) * up = gate * sig * up with sig = sigmoid(gate), computed
// in the same pass (exp8, relative error < 2e-7) instead of a separate torch
// pass over gate. For autograd the forward also writes sig: the backward then
// reads it back rather than recomputing it, which measured faster there (the
// saved activations come back from memory, and the exponential did not hide
// behind those reads).
namespace {

#ifdef REALHF_X86_AVX2
__attribute__((target("avx2,fma"))) int64_t swiglu_fwd_avx2(const float* g, const float* u, float* y, float* sig,
                                                             int64_t n) {
  const __m256 one = _mm256_set1_ps(1.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, realhf::exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
    if (sig) _mm256_storeu_ps(sig + i, s);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(gv, s), _mm256_loadu_ps(u + i)));
  }
  return i;
}
#endif

// Where the vector loop stops (all of [0, n) is left to the scalar loop without AVX2).
int64_t swiglu_fwd_vec(const float* g, const float* u, float* y, float* sig, int64_t n) {
#ifdef REALHF_X86_AVX2
  if (realhf::avx2_fma_supported()) return swiglu_fwd_avx2(g, u, y, sig, n);
#endif
  return 0;
}

}  // namespace

// (y) or, with save_sigmoid, (y, sigmoid(gate)).
std::vector<at::Tensor> swiglu_fwd(const at::Tensor& gate, const at::Tensor& up, bool save_sigmoid) {
  check_f32(gate, "gate");
  check_f32(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "swiglu_fwd: shapes disagree");
  auto y = at::empty_like(gate);
  at::Tensor sig = save_sigmoid ? at::empty_like(gate) : at::Tensor();
  const float* gp = gate.data_ptr<float>();
  const float* up_ = up.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* sp = save_sigmoid ? sig.data_ptr<float>() : nullptr;
  at::parallel_for(0, gate.numel(), 32768, [&](int64_t b, int64_t e) {
    for (int64_t i = b + swiglu_fwd_vec(gp + b, up_ + b, yp + b, sp ? sp + b : nullptr, e - b); i < e; ++i) {
      const float s = 1.f / (1.f + std::exp(-gp[i]));
      if (sp) sp[i] = s;
      yp[i] = (gp[i] * s) * up_[i];
    }
  });
  if (save_sigmoid) return {y, sig};
  return {y};
}

// d up = dy * silu(gate); d gate = dy * up * sig * (1 + gate * (1 - sig)).
std::vector<at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& sig,
                                   const at::Tensor& up) {
  check_f32(dy, "grad");
  check_f32(gate, "gate");
  check_f32(sig, "sigmoid(gate)");
  check_f32(up, "up");
  TORCH_CHECK(dy.sizes() == gate.sizes() && gate.sizes() == up.sizes() && gate.sizes() == sig.sizes(),
              "swiglu_bwd: shapes disagree");
  auto dgate = at::empty_like(gate);
  auto dup = at::empty_like(up);
  const float* dyp = dy.data_ptr<float>();
  const float* gp = gate.data_ptr<float>();
  const float* sp = sig.data_ptr<float>();
  const float* upp = up.data_ptr<float>();
  float* dgp = dgate.data_ptr<float>();
  float* dup_ = dup.data_ptr<float>();
  at::parallel_for(0, gate.numel(), 32768, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float s = sp[i], g = gp[i], d = dyp[i];
      dup_[i] = d * (g * s);
      dgp[i] = d * upp[i] * s * (1.f + g * (1.f - s));
    }
  });
  return {dgate, dup};
}

// ----------------------------------------------------- next-token log-probs
// logp[i] = x[r, labels[i]] - logsumexp(x[r]) with r = rows[i], over logits x
// [R, V]: each row read once into L1 for its max and exp-sum (exp8), where the
// torch composition made several passes over the whole [R, V] tensor. The
// backward writes grad[r] = g[i] * (onehot(labels[i]) - softmax(x[r])) in one
// pass, zero for rows no entry reads.
namespace {

#ifdef REALHF_X86_AVX2
__attribute__((target("avx2,fma"))) float row_lse_avx2(const float* x, int64_t n) {
  __m256 mx = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(x + j));
  float m = realhf::lane_max(mx);
  for (int64_t t = j; t < n; ++t) m = std::max(m, x[t]);
  if (std::isinf(m)) return m;  // every entry -inf (or some +inf): no finite normalizer
  const __m256 sh = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) acc = _mm256_add_ps(acc, realhf::exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), sh)));
  float sum = realhf::lane_sum(acc);
  for (; j < n; ++j) sum += std::exp(x[j] - m);
  return m + std::log(sum);
}

__attribute__((target("avx2,fma"))) void softmax_grad_avx2(const float* x, int64_t n, float lse, float g, float* out) {
  const __m256 sh = _mm256_set1_ps(lse), ng = _mm256_set1_ps(-g);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(out + j, _mm256_mul_ps(ng, realhf::exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), sh))));
  for (; j < n; ++j) out[j] = -g * std::exp(x[j] - lse);
}
#endif

float row_lse(const float* x, int64_t n) {
#ifdef REALHF_X86_AVX2
  if (realhf::avx2_fma_supported()) return row_lse_avx2(x, n);
#endif
  float m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  if (std::isinf(m)) return m;
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) sum += std::exp(x[j] - m);
  return m + std::log(sum);
}

// out = -g * softmax(x) given x's log-sum-exp.
void softmax_grad(const float* x, int64_t n, float lse, float g, float* out) {
#ifdef REALHF_X86_AVX2
  if (realhf::avx2_fma_supported()) return softmax_grad_avx2(x, n, lse, g, out);
#endif
  for (int64_t j = 0; j < n; ++j) out[j] = -g * std::exp(x[j] - lse);
}

void check_token_index(const at::Tensor& logits, const at::Tensor& rows, const at::Tensor& labels) {
  check_f32(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "logits must be [rows, vocab]");
  for (const auto* t : {&rows, &labels})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous(),
                "rows and labels must be contiguous 1-D int64 CPU tensors");
  TORCH_CHECK(rows.numel() == labels.numel(), "rows and labels must have one entry each");
  const int64_t R = logits.size(0), V = logits.size(1);
  const int64_t *rp = rows.data_ptr<int64_t>(), *lp = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < R && lp[i] >= 0 && lp[i] < V, "entry ", i, ": row ", rp[i], " / label ", lp[i],
                " outside logits of ", R, " x ", V);
}

}  // namespace

std::vector<at::Tensor> token_logprobs_fwd(const at::Tensor& logits, const at::Tensor& rows,
                                           const at::Tensor& labels) {
  check_token_index(logits, rows, labels);
  const int64_t n = rows.numel(), V = logits.size(1);
  auto logp = at::empty({n}, logits.options());
  auto lse = at::empty({n}, logits.options());
  const float* xp = logits.data_ptr<float>();
  const int64_t *rp = rows.data_ptr<int64_t>(), *lp = labels.data_ptr<int64_t>();
  float *op = logp.data_ptr<float>(), *sp = lse.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float* x = xp + rp[i] * V;
      sp[i] = row_lse(x, V);
      op[i] = x[lp[i]] - sp[i];
    }
  });
  return {logp, lse};
}

at::Tensor token_logprobs_bwd(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& rows,
                              const at::Tensor& labels, const at::Tensor& lse) {
  check_token_index(logits, rows, labels);
  check_f32(grad, "grad");
  check_f32(lse, "lse");
  const int64_t n = rows.numel(), R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(grad.numel() == n && lse.numel() == n, "grad and lse must have one entry per row index");
  const float *xp = logits.data_ptr<float>(), *gp = grad.data_ptr<float>(), *sp = lse.data_ptr<float>();
  const int64_t *rp = rows.data_ptr<int64_t>(), *lp = labels.data_ptr<int64_t>();
  bool increasing = true;
  for (int64_t i = 1; i < n && increasing; ++i) increasing = rp[i] > rp[i - 1];
  if (!increasing) {  // a row read twice: accumulate its entries' gradients
    auto out = at::zeros_like(logits);
    float* dp = out.data_ptr<float>();
    std::vector<float> tmp(static_cast<size_t>(V));
    for (int64_t i = 0; i < n; ++i) {
      softmax_grad(xp + rp[i] * V, V, sp[i], gp[i], tmp.data());
      float* d = dp + rp[i] * V;
      for (int64_t j = 0; j < V; ++j) d[j] += tmp[j];
      d[lp[i]] += gp[i];
    }
    return out;
  }
  auto out = at::empty_like(logits);
  float* dp = out.data_ptr<float>();
  at::parallel_for(0, n + 1, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      // Rows between the previous entry's and this one's (after the last, to the end) are not read.
      const int64_t from = i == 0 ? 0 : rp[i - 1] + 1, to = i == n ? R : rp[i];
      std::fill(dp + from * V, dp + to * V, 0.f);
      if (i == n) continue;
      float* d = dp + rp[i] * V;
      softmax_grad(xp + rp[i] * V, V, sp[i], gp[i], d);
      d[lp[i]] += gp[i];
    }
  });
  return out;
}

// ------------------------------------------------------- causal attention
// q [T, Hq, D], k/v [T, Hkv, D].
realhf::VarlenShape check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(realhf::varlen_attention_supported(), "varlen attention needs a CPU with AVX2 and FMA");
  check_f32(q, "q");
  check_f32(k, "k");
  check_f32(v, "v");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && q.size(0) == k.size(0) &&
                  q.size(2) == k.size(2),
              "varlen attention expects q [T, Hq, D] and k, v [T, Hkv, D]");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(q.size(2) % 8 == 0, "head_dim must be a multiple of 8, got ", q.size(2));
  return {q.size(1), k.size(1), q.size(2)};
}

// Packed sequences (cu_seqlens [B + 1], int64).
realhf::VarlenShape check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& cu) {
  const realhf::VarlenShape sh = check_qkv(q, k, v);
  TORCH_CHECK(cu.device().is_cpu() && cu.scalar_type() == at::kLong && cu.dim() == 1 && cu.size(0) >= 1,
              "cu_seqlens must be a 1-D int64 CPU tensor");
  const int64_t* c = cu.data_ptr<int64_t>();
  TORCH_CHECK(c[0] == 0 && c[cu.size(0) - 1] == q.size(0), "cu_seqlens must run from 0 to the token count");
  for (int64_t b = 0; b + 1 < cu.size(0); ++b) TORCH_CHECK(c[b + 1] >= c[b], "cu_seqlens must not decrease");
  return sh;
}

// The segments of packed sequences: one per sequence, each its own task group.
std::vector<realhf::Segment> sequence_segments(const at::Tensor& cu, std::vector<int64_t>* groups) {
  const int64_t* c = cu.data_ptr<int64_t>();
  std::vector<realhf::Segment> segs;
  groups->assign(1, 0);
  for (int64_t b = 0; b + 1 < cu.size(0); ++b) {
    segs.push_back({c[b], c[b + 1] - c[b], c[b], 0});
    groups->push_back(static_cast<int64_t>(segs.size()));
  }
  return segs;
}

// Prefix-tree segments [S, 4] = (first query row, queries, first prefix key row, prefix keys)
// and their task groups [G + 1] (segment boundaries). The query runs must tile [0, T) in
// order, and a segment's prefix must lie in its group, before its own rows: a group's tasks
// are then the only writers of its keys' dK/dV.
std::vector<realhf::Segment> tree_segments(const at::Tensor& segments, const at::Tensor& groups, int64_t total,
                                           std::vector<int64_t>* bounds) {
  TORCH_CHECK(segments.device().is_cpu() && segments.scalar_type() == at::kLong && segments.dim() == 2 &&
                  segments.size(1) == 4,
              "segments must be an int64 CPU tensor [S, 4]");
  TORCH_CHECK(groups.device().is_cpu() && groups.scalar_type() == at::kLong && groups.dim() == 1 &&
                  groups.size(0) >= 1,
              "groups must be a 1-D int64 CPU tensor");
  const at::Tensor sc = segments.contiguous(), gc = groups.contiguous();
  const int64_t* sp = sc.data_ptr<int64_t>();
  const int64_t* gp = gc.data_ptr<int64_t>();
  const int64_t n_seg = sc.size(0), n_groups = gc.size(0) - 1;
  TORCH_CHECK(gp[0] == 0 && gp[n_groups] == n_seg, "groups must run from 0 to the segment count");
  std::vector<realhf::Segment> segs(static_cast<size_t>(n_seg));
  int64_t row = 0;
  for (int64_t i = 0; i < n_seg; ++i) {
    segs[i] = {sp[4 * i], sp[4 * i + 1], sp[4 * i + 2], sp[4 * i + 3]};
    TORCH_CHECK(segs[i].q0 == row && segs[i].n >= 0, "segment ", i, " must start at row ", row);
    row += segs[i].n;
  }
  TORCH_CHECK(row == total, "segments cover ", row, " rows of ", total);
  for (int64_t g = 0; g < n_groups; ++g) {
    TORCH_CHECK(gp[g + 1] > gp[g], "groups must increase");
    const int64_t first = segs[gp[g]].q0;
    for (int64_t i = gp[g]; i < gp[g + 1]; ++i)
      TORCH_CHECK(segs[i].p == 0 || (segs[i].p > 0 && segs[i].k0 >= first && segs[i].k0 + segs[i].p <= segs[i].q0),
                  "segment ", i, ": its prefix must lie in its group, before its own rows");
  }
  bounds->assign(gp, gp + n_groups + 1);
  return segs;
}

std::vector<at::Tensor> segments_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const std::vector<realhf::Segment>& segs, const std::vector<int64_t>& groups,
                                     const realhf::VarlenShape& sh, double scale) {
  const int64_t total = q.size(0), n_groups = static_cast<int64_t>(groups.size()) - 1;
  auto out = at::empty_like(q);
  auto lse = at::empty({sh.n_q_heads, total}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  at::parallel_for(0, n_groups * sh.n_kv_heads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t grp = t / sh.n_kv_heads, g = t % sh.n_kv_heads;
      for (int64_t i = groups[grp]; i < groups[grp + 1]; ++i)
        if (segs[i].n > 0)
          realhf::segment_attention_fwd(qp, kp, vp, op, lp, total, segs[i], g, sh, static_cast<float>(scale));
    }
  });
  return {out, lse};
}

std::vector<at::Tensor> segments_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                     const std::vector<realhf::Segment>& segs, const std::vector<int64_t>& groups,
                                     const realhf::VarlenShape& sh, double scale) {
  check_f32(dout, "grad");
  check_f32(out, "out");
  check_f32(lse, "lse");
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "grad and out must have q's shape");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == sh.n_q_heads && lse.size(1) == q.size(0), "lse must be [Hq, T]");
  const int64_t total = q.size(0), n_groups = static_cast<int64_t>(groups.size()) - 1;
  auto dq = at::empty_like(q);
  auto dk = at::zeros_like(k);
  auto dv = at::zeros_like(v);
  const float *gp = dout.data_ptr<float>(), *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>();
  const float *vp = v.data_ptr<float>(), *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  at::parallel_for(0, n_groups * sh.n_kv_heads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t grp = t / sh.n_kv_heads, g = t % sh.n_kv_heads;
      for (int64_t i = groups[grp]; i < groups[grp + 1]; ++i)
        if (segs[i].n > 0)
          realhf::segment_attention_bwd(gp, qp, kp, vp, op, lp, dqp, dkp, dvp, total, segs[i], g, sh,
                                        static_cast<float>(scale));
    }
  });
  return {dq, dk, dv};
}

std::vector<at::Tensor> varlen_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& cu_seqlens, double scale) {
  const at::Tensor cu = cu_seqlens.contiguous();
  const realhf::VarlenShape sh = check_attention(q, k, v, cu);
  std::vector<int64_t> groups;
  const auto segs = sequence_segments(cu, &groups);
  return segments_fwd(q, k, v, segs, groups, sh, scale);
}

std::vector<at::Tensor> varlen_attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                             const at::Tensor& cu_seqlens, double scale) {
  const at::Tensor cu = cu_seqlens.contiguous();
  const realhf::VarlenShape sh = check_attention(q, k, v, cu);
  std::vector<int64_t> groups;
  const auto segs = sequence_segments(cu, &groups);
  return segments_bwd(dout, q, k, v, out, lse, segs, groups, sh, scale);
}

std::vector<at::Tensor> tree_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& segments, const at::Tensor& groups, double scale) {
  const realhf::VarlenShape sh = check_qkv(q, k, v);
  std::vector<int64_t> bounds;
  const auto segs = tree_segments(segments, groups, q.size(0), &bounds);
  return segments_fwd(q, k, v, segs, bounds, sh, scale);
}

std::vector<at::Tensor> tree_attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                           const at::Tensor& segments, const at::Tensor& groups, double scale) {
  const realhf::VarlenShape sh = check_qkv(q, k, v);
  std::vector<int64_t> bounds;
  const auto segs = tree_segments(segments, groups, q.size(0), &bounds);
  return segments_bwd(dout, q, k, v, out, lse, segs, bounds, sh, scale);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused float32 CPU kernels: RMS norm, rotary embedding, gated MLP product, packed causal "
            "attention, next-token log-probs";
  m.def("rms_norm_fwd", &rms_norm_fwd, py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::call_guard<py::gil_scoped_release>(), "(y, rstd) of an RMS norm over the last dim of x [N, D].");
  m.def("rms_norm_bwd", &rms_norm_bwd, py::arg("grad"), py::arg("x"), py::arg("weight"), py::arg("rstd"),
        py::call_guard<py::gil_scoped_release>(), "(dx, dweight) of rms_norm_fwd.");
  m.def("rotary", &rotary, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("interleaved"),
        py::arg("sign"), py::call_guard<py::gil_scoped_release>(),
        "x [N, H, D] rotated by the angles of cos/sin [N, D/2] (sign=-1: the inverse rotation).");
  m.def("swiglu_fwd", &swiglu_fwd, py::arg("gate"), py::arg("up"), py::arg("save_sigmoid"),
        py::call_guard<py::gil_scoped_release>(),
        "(gate * sig * up) or, with save_sigmoid, (gate * sig * up, sig) with sig = sigmoid(gate).");
  m.def("swiglu_bwd", &swiglu_bwd, py::arg("grad"), py::arg("gate"), py::arg("sig"), py::arg("up"),
        py::call_guard<py::gil_scoped_release>(), "(dgate, dup) of swiglu_fwd.");
  m.def("token_logprobs_fwd", &token_logprobs_fwd, py::arg("logits"), py::arg("rows"), py::arg("labels"),
        py::call_guard<py::gil_scoped_release>(),
        "(logp, lse) with logp[i] = log_softmax(logits[rows[i]])[labels[i]], logits [R, V] float32.");
  m.def("token_logprobs_bwd", &token_logprobs_bwd, py::arg("grad"), py::arg("logits"), py::arg("rows"),
        py::arg("labels"), py::arg("lse"), py::call_guard<py::gil_scoped_release>(),
        "d logits [R, V] of token_logprobs_fwd.");
  m.def("varlen_attention_supported", &realhf::varlen_attention_supported,
        "Whether this CPU runs the packed causal attention kernels (AVX2 + FMA).");
  m.def("varlen_attention_fwd", &varlen_attention_fwd, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("cu_seqlens"), py::arg("scale"), py::call_guard<py::gil_scoped_release>(),
        "(out, lse [Hq, T]) of causal attention over packed sequences, q [T, Hq, D], k/v [T, Hkv, D].");
  m.def("varlen_attention_bwd", &varlen_attention_bwd, py::arg("grad"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("cu_seqlens"), py::arg("scale"),
        py::call_guard<py::gil_scoped_release>(), "(dq, dk, dv) of varlen_attention_fwd.");
  m.def("tree_attention_fwd", &tree_attention_fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("segments"),
        py::arg("groups"), py::arg("scale"), py::call_guard<py::gil_scoped_release>(),
        "(out, lse [Hq, T]) of attention over prefix-tree segments [S, 4] = (first query row, queries, first "
        "prefix key row, prefix keys), grouped by groups [G + 1] (segments sharing prefix keys).");
  m.def("tree_attention_bwd", &tree_attention_bwd, py::arg("grad"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("segments"), py::arg("groups"), py::arg("scale"),
        py::call_guard<py::gil_scoped_release>(), "(dq, dk, dv) of tree_attention_fwd.");
}
