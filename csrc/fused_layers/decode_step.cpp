// One decoding step through all transformer blocks of a llama-family model.
//
// Decoding feeds one token per row, so every matrix product is tiny and a
// step written as ~25 torch operations per block spends most of its time in
// per-operation overhead (Python, dispatch, allocation). Here the whole block
// loop is one call. On AVX2 + FMA CPUs the matrix products run over weights
// packed once per generation (panel_matmul.h) and the attention over the
// cached prefix is vectorized (four keys per reduction, exp8, broadcast FMAs
// for the values); elsewhere the products go to at::mm / at::addmm over
// [in, out] copies and the attention is scalar. Everything else (RMS norm,
// rotary, writing the new key/value into each row's cache slot, the residual
// adds, SwiGLU's silu(gate) * up with exp8) is plain loops over float32 data.
// A generation whose products a training forward will replay passes capture
// tensors, and the products are written into them (ProductOutputs).
//
// The arithmetic is that of realhf/impl/model/nn/fast_decode.py, which remains
// the reference (and the path for other dtypes and activations).

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu_team.h"
#include "panel_matmul.h"
#include "row_ops.h"
#include "varlen_attention.h"

namespace {

constexpr int64_t kWeightsPerBlock = 10;  // ln1, qkv_w, qkv_b, o_w, o_b, ln2, gu_w, gu_b, d_w, d_b
// Packed weights per block (pack_panels): qkv, o, gate/up, down.
constexpr int64_t kPackedPerBlock = 4;
// Matrix products per block whose outputs a capture keeps: q/k/v, o, gate/up, down.
constexpr int64_t kProductsPerBlock = 4;

// Softmax attention of one query head over ``len`` cached positions whose
// keys / values are ``stride`` floats apart: out = softmax(q . k_j * scale) @ v.
void attend_head_scalar(const float* q, const float* keys, const float* vals, int64_t len, int64_t stride, int64_t d,
                        float scale, float* scores, float* out) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < len; ++j) {
    scores[j] = realhf::sum_products(q, keys + j * stride, d) * scale;
    mx = std::max(mx, scores[j]);
  }
  float total = 0.f;
  for (int64_t j = 0; j < len; ++j) {
    scores[j] = std::exp(scores[j] - mx);
    total += scores[j];
  }
  std::fill(out, out + d, 0.f);
  for (int64_t j = 0; j < len; ++j) {
    const float p = scores[j] / total;
    const float* v = vals + j * stride;
    for (int64_t e = 0; e < d; ++e) out[e] += p * v[e];
  }
}

#ifdef REALHF_X86_AVX2
// out[j] = scale * (q . keys[j * stride : + d]) for j < n, d % 8 == 0. Four keys
// share one horizontal reduction (three hadds), the rest of the work is FMAs.
__attribute__((target("avx2,fma"))) void scaled_dots(const float* q, const float* keys, int64_t stride, int64_t d,
                                                    int64_t n, float scale, float* out) {
  const __m128 sv = _mm_set1_ps(scale);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* k0 = keys + j * stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t e = 0; e < d; e += 8) {
      const __m256 qv = _mm256_loadu_ps(q + e);
      a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + e), a0);
      a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + stride + e), a1);
      a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * stride + e), a2);
      a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * stride + e), a3);
    }
    // hadd(hadd(a0, a1), hadd(a2, a3)) holds the four low-half sums, then the four high-half sums.
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(out + j, _mm_mul_ps(s, sv));
  }
  for (; j < n; ++j) {
    const float* k = keys + j * stride;
    __m256 a = _mm256_setzero_ps();
    for (int64_t e = 0; e < d; e += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + e), _mm256_loadu_ps(k + e), a);
    out[j] = realhf::lane_sum(a) * scale;
  }
}

// attend_head_scalar for d % 8 == 0 in AVX2: dots four keys at a time, the
// exponentials by exp8 (exp_shifted), and the weighted sum of values by
// broadcast FMAs.
__attribute__((target("avx2,fma"))) void attend_head_avx2(const float* q, const float* keys, const float* vals,
                                                         int64_t len, int64_t stride, int64_t d, float scale,
                                                         float* scores, float* out) {
  scaled_dots(q, keys, stride, d, len, scale, scores);
  const float mx = *std::max_element(scores, scores + len);
  const float total = realhf::exp_shifted(scores, len, mx);
  realhf::weighted_sum(scores, vals, stride, len, d, 1.f / total, out);
}
#endif

void attend_head(const float* q, const float* keys, const float* vals, int64_t len, int64_t stride, int64_t d,
                 float scale, float* scores, float* out) {
#ifdef REALHF_X86_AVX2
  if (d % 8 == 0 && realhf::avx2_fma_supported())
    return attend_head_avx2(q, keys, vals, len, stride, d, scale, scores, out);
#endif
  attend_head_scalar(q, keys, vals, len, stride, d, scale, scores, out);
}

// y[j] = silu(g[j]) * u[j] for j < n: the sigmoid by exp8 where the CPU has AVX2 + FMA
// (relative error < 2e-7, as the fused training forward), libm elsewhere.
#ifdef REALHF_X86_AVX2
__attribute__((target("avx2,fma"))) int64_t silu_times_avx2(const float* g, const float* u, float* y, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 gv = _mm256_loadu_ps(g + j);
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, realhf::exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
    _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + j)));
  }
  return j;
}
#endif

void silu_times(const float* g, const float* u, float* y, int64_t n) {
  int64_t j = 0;
#ifdef REALHF_X86_AVX2
  if (realhf::avx2_fma_supported()) j = silu_times_avx2(g, u, y, n);
#endif
  for (; j < n; ++j) y[j] = g[j] / (1.f + std::exp(-g[j])) * u[j];
}

// act[i] = silu(gu[i, :inter]) * gu[i, inter:] for every row of gu [n, 2 * inter] (contiguous).
void silu_times_rows(const at::Tensor& gu, int64_t inter, at::Tensor& act) {
  const float* gp = gu.data_ptr<float>();
  float* ap = act.data_ptr<float>();
  for (int64_t i = 0; i < gu.size(0); ++i) silu_times(gp + i * 2 * inter, gp + i * 2 * inter + inter, ap + i * inter, inter);
}

// Asks for the next row's cached keys and values (``n`` floats each) while this row's
// attention runs: the caches of a step's rows (several MB) sit in L3 or memory, and
// each row's short run of lines was fetched on demand.
inline void prefetch_row(const float* keys, const float* vals, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    __builtin_prefetch(keys + j, 0, 2);
    __builtin_prefetch(vals + j, 0, 2);
  }
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
}

// out[i] = w * x[i] / sqrt(mean(x[i]^2) + eps), as RMSNorm (fp32).
at::Tensor rms(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t n = x.size(0), h = x.size(1);
  auto out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) realhf::rms_row(xp + i * h, wp, op + i * h, h, static_cast<float>(eps));
  return out;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::Tensor y) {
  return b.numel() == 0 ? at::mm_out(y, x, w) : at::addmm_out(y, b, x, w);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_packed(const at::Tensor& w, int64_t K, int64_t N, const char* name) {
  check_f32(w, name);
  TORCH_CHECK(w.dim() == 3 && w.size(0) == ceil_div(N, realhf::kPanel) && w.size(1) == K &&
                  w.size(2) == realhf::kPanel,
              name, " must be packed panels [", ceil_div(N, realhf::kPanel), ", ", K, ", ", realhf::kPanel,
              "], got ", w.sizes());
}

// Runs fn(i, parts) for i < parts on ``threads`` threads (the caller's alone when 1).
// Always the team of ``threads``, even for less work than threads (the surplus gets
// empty ranges): a team of another size would be rebuilt, threads and all.
void on_threads(int64_t threads, const std::function<void(int, int)>& fn) {
  if (threads <= 1) return fn(0, 1);
  const int n = static_cast<int>(threads);
  realhf::CpuTeam::of_size(n).run([&](int i) { fn(i, n); });
}

void check_threads(int64_t threads) {
  TORCH_CHECK(threads >= 1 && threads <= 256, "threads must be in [1, 256], got ", threads);
}

// x [n, K] @ W + b for W packed by pack_panels with N output columns; with
// several threads each computes a contiguous range of panels (output columns),
// so each weight is read by one core only and every output is the same sum as
// with one thread.
at::Tensor panels_linear(const at::Tensor& x, const at::Tensor& w, int64_t N, const at::Tensor& b,
                         int64_t threads, at::Tensor y = at::Tensor()) {
  TORCH_CHECK(b.numel() == 0 || b.numel() == N, "bias of ", b.numel(), " for ", N, " outputs");
  if (!y.defined()) y = at::empty({x.size(0), N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.numel() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t M = x.size(0), K = x.size(1), panels = w.size(0);
  on_threads(threads, [&](int i, int parts) {
    int64_t p0, p1;
    realhf::team_part(panels, i, parts, &p0, &p1);
    realhf::rows_times_panel_range(xp, wp, bp, yp, N, M, N, K, p0, p1);
  });
  return y;
}

// Where a step's matrix products are written when a training forward is to
// replay them (realhf/impl/model/nn/linear_replay.py): ``capture`` holds
// kProductsPerBlock float32 tensors per block (q/k/v, o, gate/up, down outputs),
// each [rows, width], and the step's n outputs of a product go straight to rows
// [start, start + n) of its tensor instead of a fresh one (a copy afterwards cost
// ~10% of a generation). Empty ``capture``: fresh outputs.
class ProductOutputs {
 public:
  ProductOutputs(const std::vector<at::Tensor>& capture, int64_t start, int64_t n_blocks, int64_t n,
                 const std::vector<int64_t>& widths, const at::TensorOptions& options)
      : capture_(capture), start_(start), n_(n), widths_(widths), options_(options) {
    if (capture.empty()) return;
    TORCH_CHECK(static_cast<int64_t>(capture.size()) == kProductsPerBlock * n_blocks,
                "capture: ", kProductsPerBlock, " tensors per block expected, got ", capture.size());
    for (size_t j = 0; j < capture.size(); ++j) {
      check_f32(capture[j], "capture");
      TORCH_CHECK(capture[j].dim() == 2 && capture[j].size(1) == widths[j % kProductsPerBlock],
                  "capture tensor ", j, " must be [rows, ", widths[j % kProductsPerBlock], "], got ", capture[j].sizes());
      TORCH_CHECK(start >= 0 && start + n <= capture[j].size(0), "capture rows [", start, ", ", start + n,
                  ") outside ", capture[j].size(0), " rows");
    }
  }

  // The [n, width] output of product ``slot`` (block * kProductsPerBlock + which).
  at::Tensor operator()(int64_t slot) const {
    if (capture_.empty()) return at::empty({n_, widths_[slot % kProductsPerBlock]}, options_);
    return capture_[static_cast<size_t>(slot)].narrow(0, start_, n_);
  }

 private:
  const std::vector<at::Tensor>& capture_;
  const int64_t start_, n_;
  const std::vector<int64_t> widths_;
  const at::TensorOptions options_;
};

}  // namespace

// x [n, hidden] -> x after every block; keys/values of the fed tokens are
// written at positions pos[i] of cache rows rows[i]. See fast_decode.py.
at::Tensor decode_blocks(at::Tensor x, const std::vector<at::Tensor>& weights, const std::vector<double>& eps,
                         const std::vector<double>& scales, const std::vector<at::Tensor>& packed,
                         const std::vector<at::Tensor>& cache_k,
                         const std::vector<at::Tensor>& cache_v, const at::Tensor& rows, const at::Tensor& pos,
                         const at::Tensor& cos, const at::Tensor& sin, int64_t n_q, int64_t n_kv, int64_t head_dim,
                         int64_t inter, bool interleaved, int64_t threads, const std::vector<at::Tensor>& capture,
                         int64_t capture_start) {
  const int64_t n_blocks = static_cast<int64_t>(cache_k.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kWeightsPerBlock * n_blocks &&
                  static_cast<int64_t>(eps.size()) == 2 * n_blocks &&
                  static_cast<int64_t>(scales.size()) == n_blocks &&
                  (packed.empty() || static_cast<int64_t>(packed.size()) == kPackedPerBlock * n_blocks) &&
                  static_cast<int64_t>(cache_v.size()) == n_blocks,
              "decode_blocks: per-block argument counts disagree");
  check_threads(threads);
  check_f32(x, "x");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  TORCH_CHECK(rows.scalar_type() == at::kLong && pos.scalar_type() == at::kLong && rows.is_contiguous() &&
                  pos.is_contiguous(),
              "rows and pos must be contiguous int64 tensors");
  TORCH_CHECK(n_kv > 0 && n_q % n_kv == 0, "n_q_heads must be a multiple of n_kv_heads");
  x = x.clone();  // the residual stream, updated in place below; the caller's x stays as given
  const int64_t n = x.size(0), d = head_dim, half = d / 2, group = n_q / n_kv;
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  auto q = at::empty({n, n_q * d}, x.options());
  auto attn = at::empty({n, n_q * d}, x.options());
  auto act = at::empty({n, inter}, x.options());
  int64_t max_len = 0;
  for (int64_t i = 0; i < n; ++i) max_len = std::max(max_len, pp[i] + 1);
  std::vector<float> scores(static_cast<size_t>(max_len * threads));  // one row of scores per thread
  const int64_t hidden = x.size(1), qkv_width = (n_q + 2 * n_kv) * d;
  const bool use_panels = !packed.empty() && realhf::avx2_fma_supported();
  const ProductOutputs out(capture, capture_start, n_blocks, n, {qkv_width, hidden, 2 * inter, hidden}, x.options());
  if (use_panels)
    for (int64_t b = 0; b < n_blocks; ++b) {
      const at::Tensor* pw = packed.data() + kPackedPerBlock * b;
      check_packed(pw[0], hidden, qkv_width, "packed qkv weight");
      check_packed(pw[1], n_q * d, hidden, "packed o weight");
      check_packed(pw[2], hidden, 2 * inter, "packed gate/up weight");
      check_packed(pw[3], inter, hidden, "packed down weight");
    }

  for (int64_t b = 0; b < n_blocks; ++b) {
    const at::Tensor* w = weights.data() + kWeightsPerBlock * b;
    const at::Tensor* pw = use_panels ? packed.data() + kPackedPerBlock * b : nullptr;
    const at::Tensor &ck = cache_k[b], &cv = cache_v[b];
    check_f32(ck, "cache_k");
    check_f32(cv, "cache_v");
    TORCH_CHECK(ck.dim() == 4 && ck.sizes() == cv.sizes() && ck.size(2) == n_kv && ck.size(3) == d,
                "caches must be [rows, capacity, n_kv_heads, head_dim]");
    const int64_t cap = ck.size(1), n_rows = ck.size(0);
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK(rp[i] >= 0 && rp[i] < n_rows && pp[i] >= 0, "row ", rp[i], " / position ", pp[i],
                  " outside a cache of ", n_rows, " rows");
    float* ckp = ck.data_ptr<float>();
    float* cvp = cv.data_ptr<float>();

    // Attention: norm, q/k/v in one product, rotary, cache write, softmax over the prefix.
    const auto h1 = rms(x, w[0], eps[2 * b]);
    const int64_t slot = kProductsPerBlock * b;
    auto qkv = use_panels ? panels_linear(h1, pw[0], qkv_width, w[2], threads, out(slot))
                          : linear(h1, w[1], w[2], out(slot));
    const float* qkvp = qkv.data_ptr<float>();
    float* qp = q.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(pp[i] < cap, "KV cache capacity ", cap, " exceeded");
      const float* row = qkvp + i * qkv_width;
      const float *c = cp + i * half, *s = sp + i * half;
      for (int64_t h = 0; h < n_q; ++h) realhf::rotate_head(row + h * d, c, s, qp + (i * n_q + h) * d, d, interleaved);
      const int64_t slot = (rp[i] * cap + pp[i]) * n_kv;
      for (int64_t h = 0; h < n_kv; ++h) {
        realhf::rotate_head(row + (n_q + h) * d, c, s, ckp + (slot + h) * d, d, interleaved);
        std::copy(row + (n_q + n_kv + h) * d, row + (n_q + n_kv + h + 1) * d, cvp + (slot + h) * d);
      }
    }
    const float scale = static_cast<float>(scales[b]);
    float* ap = attn.data_ptr<float>();
    // Threads take contiguous ranges of rows, each with its own scores.
    on_threads(threads, [&](int t, int parts) {
      int64_t i0, i1;
      realhf::team_part(n, t, parts, &i0, &i1);
      float* sc = scores.data() + t * max_len;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t len = pp[i] + 1;
        const float* keys = ckp + rp[i] * cap * n_kv * d;
        const float* vals = cvp + rp[i] * cap * n_kv * d;
        if (i + 1 < i1) prefetch_row(ckp + rp[i + 1] * cap * n_kv * d, cvp + rp[i + 1] * cap * n_kv * d,
                                     (pp[i + 1] + 1) * n_kv * d);
        for (int64_t h = 0; h < n_q; ++h) {
          const int64_t kvh = h / group;
          attend_head(qp + (i * n_q + h) * d, keys + kvh * d, vals + kvh * d, len, n_kv * d, d, scale, sc,
                      ap + (i * n_q + h) * d);
        }
      }
    });
    const auto o = use_panels ? panels_linear(attn, pw[1], hidden, w[4], threads, out(slot + 1))
                              : linear(attn, w[3], w[4], out(slot + 1));
    x.add_(o);

    // Gated MLP: norm, gate and up in one product, silu(gate) * up, down.
    const auto h2 = rms(x, w[5], eps[2 * b + 1]);
    auto gu = use_panels ? panels_linear(h2, pw[2], 2 * inter, w[7], threads, out(slot + 2))
                         : linear(h2, w[6], w[7], out(slot + 2));
    silu_times_rows(gu, inter, act);
    const auto down = use_panels ? panels_linear(act, pw[3], hidden, w[9], threads, out(slot + 3))
                                 : linear(act, w[8], w[9], out(slot + 3));
    x.add_(down);
  }
  return x;
}

// x [n, K] @ W + b for W packed by pack_panels (N output columns), or an
// undefined tensor (None in Python) on a CPU without AVX2 + FMA.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& w, int64_t N, const at::Tensor& b,
                         int64_t threads) {
  check_threads(threads);
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2, "packed_linear: x must be [n, in]");
  check_packed(w, x.size(1), N, "w");
  if (b.numel()) check_f32(b, "b");
  if (!realhf::avx2_fma_supported()) return at::Tensor();
  return panels_linear(x, w, N, b, threads);
}

// The common width ``in`` of float32 matrices [out_i, in] to be stacked.
static int64_t check_stackable(const std::vector<at::Tensor>& mats, const char* fn) {
  TORCH_CHECK(!mats.empty(), fn, " needs at least one matrix");
  for (const auto& w : mats) {
    check_f32(w, "weight");
    TORCH_CHECK(w.dim() == 2 && w.size(1) == mats[0].size(1), fn, ": matrices must be [out_i, in] with one in");
  }
  return mats[0].size(1);
}

static int64_t stacked_rows(const std::vector<at::Tensor>& mats) {
  int64_t n = 0;
  for (const auto& w : mats) n += w.size(0);
  return n;
}

// The matrices [out_i, in] stacked (sum(out_i) = N outputs) as W = cat(mats).T
// [in, N] in panels of kPanel columns: [ceil(N / kPanel), in, kPanel], the
// last panel zero padded. Each source row is read once, contiguously; its
// elements land kPanel floats apart within one panel, which stays in cache.
// Threads fill disjoint ranges of panels.
at::Tensor pack_panels(const std::vector<at::Tensor>& mats, int64_t threads) {
  check_threads(threads);
  const int64_t K = check_stackable(mats, "pack_panels"), N = stacked_rows(mats);
  constexpr int64_t P = realhf::kPanel;
  const int64_t panels = ceil_div(N, P);
  auto out = at::empty({panels, K, P}, mats[0].options());
  float* op = out.data_ptr<float>();
  std::vector<const float*> src_rows;  // row c of cat(mats), for every output column c
  src_rows.reserve(static_cast<size_t>(N));
  for (const auto& w : mats)
    for (int64_t r = 0; r < w.size(0); ++r) src_rows.push_back(w.data_ptr<float>() + r * K);
  on_threads(threads, [&](int i, int parts) {
    int64_t p0, p1;
    realhf::team_part(panels, i, parts, &p0, &p1);
    if (p1 == panels && N % P) std::fill(op + (panels - 1) * K * P, op + panels * K * P, 0.f);  // the padding
    for (int64_t col = p0 * P; col < std::min(N, p1 * P); ++col) {
      float* dst = op + (col / P) * K * P + col % P;
      const float* src = src_rows[static_cast<size_t>(col)];
      for (int64_t k = 0; k < K; ++k) dst[k * P] = src[k];
    }
  });
  return out;
}

// Matrices [out_i, in] side by side and transposed: [in, sum(out_i)], the
// layout of the at::mm path (CPUs without AVX2 + FMA). Copied in 32 x 32 tiles, which
// keeps both the rows read and the rows written in cache (a strided
// .t().contiguous() was 3-4x slower than a plain copy).
at::Tensor transpose_cat(const std::vector<at::Tensor>& mats) {
  const int64_t in = check_stackable(mats, "transpose_cat"), total = stacked_rows(mats);
  auto out = at::empty({in, total}, mats[0].options());
  float* op = out.data_ptr<float>();
  constexpr int64_t kTile = 32;
  int64_t col0 = 0;
  for (const auto& w : mats) {
    const int64_t rows = w.size(0);
    const float* wp = w.data_ptr<float>();
    for (int64_t r0 = 0; r0 < rows; r0 += kTile)
      for (int64_t c0 = 0; c0 < in; c0 += kTile) {
        const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(in, c0 + kTile);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = r0; r < r1; ++r) op[c * total + col0 + r] = wp[r * in + c];
      }
    col0 += rows;
  }
  return out;
}

// out[j] = exp(x[j] - shift) for j < n; returns their sum. AVX2 + FMA where the
// CPU has it (exp8: a row of 1024 logits took ~15 us with libm's exp, a third
// of a 32-row decoding step's sampling), libm elsewhere.
static float exp_shifted_into(const float* x, float* out, int64_t n, float shift) {
#ifdef REALHF_X86_AVX2
  if (realhf::avx2_fma_supported()) {
    std::copy(x, x + n, out);
    return realhf::exp_shifted(out, n, shift);
  }
#endif
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    out[j] = std::exp(x[j] - shift);
    sum += out[j];
  }
  return sum;
}

// One sampled token per row of ``logits`` [n, V] and its log-probability, in one
// pass per row instead of ~15 torch operations a decoding step: logits are
// divided by ``temperature`` (when not 1), ``banned`` ids are removed (EOS before
// min_new_tokens), then the token is drawn by inverse CDF with the row's uniform
// ``u`` exactly as ``sample_categorical`` does it (softmax probabilities, their
// cumulative sum accumulated in double and stored as float, the first index
// whose sum exceeds ``u * total``, the last drawable index if rounding passes
// the total), and its log-probability is the log-softmax entry.
std::vector<at::Tensor> sample_rows(const at::Tensor& logits, const at::Tensor& u, const at::Tensor& banned,
                                    double temperature) {
  check_f32(logits, "logits");
  check_f32(u, "u");
  TORCH_CHECK(logits.dim() == 2 && u.dim() == 1 && u.size(0) == logits.size(0), "sample_rows: logits [n, V], u [n]");
  TORCH_CHECK(banned.scalar_type() == at::kLong && banned.dim() == 1 && banned.is_contiguous(),
              "sample_rows: banned must be a 1-D int64 tensor");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  auto tokens = at::empty({n}, logits.options().dtype(at::kLong));
  auto logp = at::empty({n}, logits.options());
  const float* lp = logits.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  const int64_t* bp = banned.data_ptr<int64_t>();
  const int64_t n_banned = banned.numel();
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* op = logp.data_ptr<float>();
  const float temp = static_cast<float>(temperature);
  std::vector<float> x(vocab), prob(vocab);
  for (int64_t r = 0; r < n; ++r) {
    const float* row = lp + r * vocab;
    for (int64_t j = 0; j < vocab; ++j) x[j] = temperature == 1.0 ? row[j] : row[j] / temp;
    for (int64_t b = 0; b < n_banned; ++b)
      if (bp[b] >= 0 && bp[b] < vocab) x[bp[b]] = -INFINITY;
    float mx = -INFINITY;
    for (int64_t j = 0; j < vocab; ++j) mx = std::max(mx, x[j]);
    const float sum = exp_shifted_into(x.data(), prob.data(), vocab, mx);
    double run = 0.0;
    float total = 0.f;
    int64_t last_drawable = 0;
    for (int64_t j = 0; j < vocab; ++j) {
      prob[j] /= sum;
      if (prob[j] > 0.f) last_drawable = j;
      run += prob[j];
      total = static_cast<float>(run);
      prob[j] = total;  // now the cumulative sum
    }
    const float thresh = up[r] * total;
    int64_t idx = std::upper_bound(prob.begin(), prob.end(), thresh) - prob.begin();
    if (idx >= vocab) idx = last_drawable;  // rounding pushed the draw past the total
    tp[r] = idx;
    op[r] = (x[idx] - mx) - std::log(sum);
  }
  return {tokens, logp};
}

// Every decoding step of a generation after its prefill, for plain sampling
// (temperature, no top-k / top-p) on the native block loop and panel head: per
// step the sampler (sample_rows with one uniform per active row, drawn as
// ``torch.rand(n_active, 1, generator=...)``), the bookkeeping of
// real_llm_generate.DecodeState (EOS banned before ``min_new`` tokens, rows that
// draw an EOS stop), then the step itself as FastDecoder.step (embedding,
// rotary angles, decode_blocks, the cache lengths, the final norm and the head).
// The same operations in the same order as the Python loop, without its ~0.4 ms
// of interpreter and dispatch work a step. ``logits`` [bs, V] are the prefill's;
// ``tokens``, ``logprobs``, ``gen_lengths`` and ``ended`` (DecodeState's) are
// filled in place. Returns the number of steps taken.
int64_t decode_loop(at::Tensor logits, const std::vector<at::Tensor>& weights, const std::vector<double>& eps,
                    const std::vector<double>& scales, const std::vector<at::Tensor>& packed,
                    const std::vector<at::Tensor>& cache_k, const std::vector<at::Tensor>& cache_v,
                    at::Tensor seqlens, const at::Tensor& wte, const at::Tensor& inv_freq, const at::Tensor& ln_f,
                    double ln_f_eps, const at::Tensor& head_panels, const at::Tensor& eos, int64_t min_new,
                    double temperature, std::optional<at::Generator> generator, at::Tensor tokens,
                    at::Tensor logprobs, at::Tensor gen_lengths, at::Tensor ended, int64_t n_q, int64_t n_kv,
                    int64_t head_dim, int64_t inter, bool interleaved, int64_t threads,
                    const std::vector<at::Tensor>& capture, const std::optional<at::Tensor>& head_capture,
                    int64_t capture_base, const std::optional<at::Tensor>& capture_slots) {
  check_threads(threads);
  check_f32(logits, "logits");
  check_f32(wte, "wte");
  const int64_t bs = logits.size(0), vocab = logits.size(1), max_new = tokens.size(1);
  TORCH_CHECK(!packed.empty() && realhf::avx2_fma_supported(), "decode_loop needs the panel products (AVX2 + FMA)");
  check_packed(head_panels, wte.size(1), vocab, "head panels");
  TORCH_CHECK(seqlens.scalar_type() == at::kLong && seqlens.is_contiguous() && seqlens.numel() == bs,
              "seqlens must be int64 [bs]");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.is_contiguous() && tokens.size(0) == bs &&
                  logprobs.scalar_type() == at::kFloat && logprobs.is_contiguous() && logprobs.sizes() == tokens.sizes() &&
                  gen_lengths.scalar_type() == at::kLong && gen_lengths.numel() == bs &&
                  ended.scalar_type() == at::kBool && ended.numel() == bs && max_new >= 1,
              "decode_loop: tokens/logprobs [bs, max_new], gen_lengths int64 [bs], ended bool [bs]");
  TORCH_CHECK(eos.scalar_type() == at::kLong && eos.dim() == 1 && eos.is_contiguous(), "eos must be int64 [n]");
  const int64_t capacity = cache_k.empty() ? 0 : cache_k[0].size(1);
  const int64_t* ep = eos.data_ptr<int64_t>();
  const int64_t n_eos = eos.numel();
  const auto no_ban = eos.narrow(0, 0, 0);
  const auto f32 = logits.options();
  const auto no_bias = at::empty({0}, f32);
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
  int64_t* glp = gen_lengths.data_ptr<int64_t>();
  bool* edp = ended.data_ptr<bool>();
  int64_t* slp = seqlens.data_ptr<int64_t>();
  // With a capture, each step's products and next-token logits go to the next rows of the
  // capture tensors from ``capture_base`` on (the fed rows in order), and the capture row of
  // the j-th generated token of row r (fed at step j) is written to capture_slots[r, j].
  const bool capturing = !capture.empty();
  int64_t* slots = nullptr;
  int64_t next_row = capture_base;
  if (capturing) {
    TORCH_CHECK(head_capture.has_value() && capture_slots.has_value(),
                "decode_loop: a capture needs head_capture and capture_slots");
    check_f32(*head_capture, "head_capture");
    TORCH_CHECK(head_capture->dim() == 2 && head_capture->size(1) == vocab && capture_base >= 0 &&
                    head_capture->size(0) >= capture_base + bs * (max_new - 1),
                "decode_loop: head_capture must be [>= capture_base + bs * (max_new - 1), vocab]");
    TORCH_CHECK(capture_slots->scalar_type() == at::kLong && capture_slots->is_contiguous() &&
                    capture_slots->numel() == bs * max_new,
                "decode_loop: capture_slots must be int64 [bs, max_new]");
    slots = capture_slots->data_ptr<int64_t>();
  }
  std::vector<int64_t> active(static_cast<size_t>(bs));
  for (int64_t r = 0; r < bs; ++r) active[r] = r;
  for (int64_t step = 0;; ++step) {
    const int64_t n = static_cast<int64_t>(active.size());
    const bool eos_banned = step < min_new && n_eos > 0;
    const auto u = at::rand({n, 1}, generator, f32).reshape({-1});
    const auto drawn = sample_rows(logits.contiguous(), u, eos_banned ? eos : no_ban, temperature);
    const int64_t* next = drawn[0].data_ptr<int64_t>();
    const float* logp = drawn[1].data_ptr<float>();
    std::vector<int64_t> still, feed;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = active[i];
      tp[r * max_new + step] = next[i];
      lp[r * max_new + step] = logp[i];
      glp[r] += 1;
      const bool hit = !eos_banned && std::find(ep, ep + n_eos, next[i]) != ep + n_eos;
      if (hit) {
        edp[r] = true;
      } else {
        still.push_back(r);
        feed.push_back(next[i]);
      }
    }
    if (step == max_new - 1 || still.empty()) return step + 1;
    active.swap(still);
    // FastDecoder.step(feed, active).
    const int64_t m = static_cast<int64_t>(active.size());
    auto rows = at::tensor(active, seqlens.options());
    auto pos = seqlens.index_select(0, rows);
    const int64_t* pp = pos.data_ptr<int64_t>();
    for (int64_t i = 0; i < m; ++i) TORCH_CHECK(pp[i] < capacity, "KV cache capacity ", capacity, " exceeded.");
    const auto freqs = pos.to(at::kFloat).unsqueeze(1) * inv_freq.unsqueeze(0);
    auto x = wte.index_select(0, at::tensor(feed, seqlens.options()));
    const int64_t start = next_row;
    if (capturing) {
      for (int64_t i = 0; i < m; ++i) slots[active[i] * max_new + step] = start + i;
      next_row += m;
    }
    x = decode_blocks(x, weights, eps, scales, packed, cache_k, cache_v, rows, pos, freqs.cos(), freqs.sin(), n_q,
                      n_kv, head_dim, inter, interleaved, threads, capture, start);
    for (int64_t r : active) slp[r] += 1;
    if (ln_f.numel()) x = rms(x, ln_f, ln_f_eps);
    logits = panels_linear(x, head_panels, vocab, no_bias, threads,
                           capturing ? head_capture->narrow(0, start, m) : at::Tensor());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "One decoding step through all llama blocks (float32 CPU)";
  m.def("decode_blocks", &decode_blocks, py::arg("x"), py::arg("weights"), py::arg("eps"), py::arg("scales"),
        py::arg("packed"),
        py::arg("cache_k"), py::arg("cache_v"), py::arg("rows"), py::arg("pos"), py::arg("cos"), py::arg("sin"),
        py::arg("n_q"), py::arg("n_kv"), py::arg("head_dim"), py::arg("inter"), py::arg("interleaved"),
        py::arg("threads") = 1, py::arg("capture") = std::vector<at::Tensor>(), py::arg("capture_start") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "x after every block of one decoding step; writes the new keys/values into the caches "
        "(the products' outputs go to rows [capture_start, + n) of ``capture``, when given).");
  m.def("packed_linear", &packed_linear, py::arg("x"), py::arg("w"), py::arg("n_out"), py::arg("b"),
        py::arg("threads") = 1, py::call_guard<py::gil_scoped_release>(),
        "x @ W + b for W packed by pack_panels (AVX2 + FMA; None where unsupported).");
  m.def("pack_panels", &pack_panels, py::arg("mats"), py::arg("threads") = 1, py::call_guard<py::gil_scoped_release>(),
        "cat(mats).T in panels of 24 columns: [ceil(N / 24), in, 24], zero padded.");
  m.def("sample_rows", &sample_rows, py::arg("logits"), py::arg("u"), py::arg("banned"), py::arg("temperature"),
        py::call_guard<py::gil_scoped_release>(),
        "(tokens, log-probs): one inverse-CDF draw per row of float32 logits, banned ids removed.");
  m.def("decode_loop", &decode_loop, py::arg("logits"), py::arg("weights"), py::arg("eps"), py::arg("scales"),
        py::arg("packed"), py::arg("cache_k"), py::arg("cache_v"), py::arg("seqlens"), py::arg("wte"),
        py::arg("inv_freq"), py::arg("ln_f"), py::arg("ln_f_eps"), py::arg("head_panels"), py::arg("eos"),
        py::arg("min_new"), py::arg("temperature"), py::arg("generator"), py::arg("tokens"), py::arg("logprobs"),
        py::arg("gen_lengths"), py::arg("ended"), py::arg("n_q"), py::arg("n_kv"), py::arg("head_dim"),
        py::arg("inter"), py::arg("interleaved"), py::arg("threads") = 1,
        py::arg("capture") = std::vector<at::Tensor>(), py::arg("head_capture") = py::none(),
        py::arg("capture_base") = 0, py::arg("capture_slots") = py::none(), py::call_guard<py::gil_scoped_release>(),
        "Every decoding step after the prefill (plain sampling); fills the state tensors, returns the step count.");
  m.def("transpose_cat", &transpose_cat, py::arg("mats"), py::call_guard<py::gil_scoped_release>(),
        "[in, sum(out_i)]: the [out_i, in] matrices concatenated and transposed.");
}
