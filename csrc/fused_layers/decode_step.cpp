// One decoding step through all transformer blocks of a llama-family model.
//
// Decoding feeds one token per row, so every matrix product is tiny and a
// step written as ~25 torch operations per block spends most of its time in
// per-operation overhead (Python, dispatch, allocation). Here the whole block
// loop is one call: the matrix products still go to at::mm / at::addmm, and
// everything between them (RMS norm, rotary, writing the new key/value into
// each row's cache slot, attention over the cached prefix, the residual adds)
// is plain loops over float32 data; the attention's dot products use the
// multi-accumulator sum_products (a single-accumulator loop cannot vectorize
// and was a third of a step), and SwiGLU uses torch's vectorized silu.
//
// The arithmetic is that of realhf/impl/model/nn/fast_decode.py, which remains
// the reference (and the path for other dtypes and activations).

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "few_rows.h"
#include "row_ops.h"

namespace {

constexpr int64_t kWeightsPerBlock = 10;  // ln1, qkv_w, qkv_b, o_w, o_b, ln2, gu_w, gu_b, d_w, d_b
// Row-major [out, in] weights per block for steps of few rows: q, k, v, o, gate, up, down.
constexpr int64_t kRowWeightsPerBlock = 7;

// Softmax attention of one query head over ``len`` cached positions whose
// keys / values are ``stride`` floats apart: out = softmax(q . k_j * scale) @ v.
void attend_head(const float* q, const float* keys, const float* vals, int64_t len, int64_t stride, int64_t d,
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

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return b.numel() == 0 ? at::mm(x, w) : at::addmm(b, x, w);
}

// x [n, K] times row-major weights parts[i] [N_i, K] placed side by side: [n, sum N_i], plus
// ``b`` (the parts' biases side by side, or empty). For few rows (see few_rows.h).
at::Tensor linear_parts(const at::Tensor& x, const at::Tensor* parts, int64_t n_parts, const at::Tensor& b) {
  const int64_t n = x.size(0), K = x.size(1);
  int64_t total = 0;
  for (int64_t i = 0; i < n_parts; ++i) {
    TORCH_CHECK(parts[i].dim() == 2 && parts[i].size(1) == K, "decode_blocks: a row weight's width is not ", K);
    total += parts[i].size(0);
  }
  TORCH_CHECK(b.numel() == 0 || b.numel() == total, "decode_blocks: bias of ", b.numel(), " for ", total, " outputs");
  auto y = at::empty({n, total}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  int64_t col = 0;
  for (int64_t i = 0; i < n_parts; ++i) {
    realhf::few_rows_times(xp, parts[i].data_ptr<float>(), b.numel() ? b.data_ptr<float>() + col : nullptr, yp + col,
                           total, n, parts[i].size(0), K);
    col += parts[i].size(0);
  }
  return y;
}

}  // namespace

// x [n, hidden] -> x after every block; keys/values of the fed tokens are
// written at positions pos[i] of cache rows rows[i]. See fast_decode.py.
at::Tensor decode_blocks(at::Tensor x, const std::vector<at::Tensor>& weights, const std::vector<double>& eps,
                         const std::vector<double>& scales, const std::vector<at::Tensor>& row_weights,
                         const std::vector<at::Tensor>& cache_k,
                         const std::vector<at::Tensor>& cache_v, const at::Tensor& rows, const at::Tensor& pos,
                         const at::Tensor& cos, const at::Tensor& sin, int64_t n_q, int64_t n_kv, int64_t head_dim,
                         int64_t inter, bool interleaved) {
  const int64_t n_blocks = static_cast<int64_t>(cache_k.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kWeightsPerBlock * n_blocks &&
                  static_cast<int64_t>(eps.size()) == 2 * n_blocks &&
                  static_cast<int64_t>(scales.size()) == n_blocks &&
                  (row_weights.empty() || static_cast<int64_t>(row_weights.size()) == kRowWeightsPerBlock * n_blocks) &&
                  static_cast<int64_t>(cache_v.size()) == n_blocks,
              "decode_blocks: per-block argument counts disagree");
  check_f32(x, "x");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  TORCH_CHECK(rows.scalar_type() == at::kLong && pos.scalar_type() == at::kLong && rows.is_contiguous() &&
                  pos.is_contiguous(),
              "rows and pos must be contiguous int64 tensors");
  TORCH_CHECK(n_kv > 0 && n_q % n_kv == 0, "n_q_heads must be a multiple of n_kv_heads");
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
  std::vector<float> scores(static_cast<size_t>(max_len));
  const bool few = !row_weights.empty() && n <= realhf::kFewRows && realhf::few_rows_supported();
  if (few)
    for (const auto& t : row_weights) check_f32(t, "row weight");

  for (int64_t b = 0; b < n_blocks; ++b) {
    const at::Tensor* w = weights.data() + kWeightsPerBlock * b;
    const at::Tensor* rw = few ? row_weights.data() + kRowWeightsPerBlock * b : nullptr;
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
    auto qkv = few ? linear_parts(h1, rw, 3, w[2]) : linear(h1, w[1], w[2]);
    const float* qkvp = qkv.data_ptr<float>();
    const int64_t width = (n_q + 2 * n_kv) * d;
    float* qp = q.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(pp[i] < cap, "KV cache capacity ", cap, " exceeded");
      const float* row = qkvp + i * width;
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
    for (int64_t i = 0; i < n; ++i) {
      const int64_t len = pp[i] + 1;
      const float* keys = ckp + rp[i] * cap * n_kv * d;
      const float* vals = cvp + rp[i] * cap * n_kv * d;
      for (int64_t h = 0; h < n_q; ++h) {
        const int64_t kvh = h / group;
        attend_head(qp + (i * n_q + h) * d, keys + kvh * d, vals + kvh * d, len, n_kv * d, d, scale, scores.data(),
                    ap + (i * n_q + h) * d);
      }
    }
    x = x + (few ? linear_parts(attn, rw + 3, 1, w[4]) : linear(attn, w[3], w[4]));

    // Gated MLP: norm, gate and up in one product, silu(gate) * up, down.
    const auto h2 = rms(x, w[5], eps[2 * b + 1]);
    auto gu = few ? linear_parts(h2, rw + 4, 2, w[7]) : linear(h2, w[6], w[7]);
    // torch's vectorized silu (libm's scalar exp would cost more than the products).
    at::mul_out(act, at::silu(gu.narrow(1, 0, inter)), gu.narrow(1, inter, inter));
    x = x + (few ? linear_parts(act, rw + 6, 1, w[9]) : linear(act, w[8], w[9]));
  }
  return x;
}

// x @ w.T + b through the few-row kernel, or an undefined tensor (None in Python) when it
// does not apply (more than kFewRows rows, or no AVX2 + FMA on this CPU).
at::Tensor few_rows_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  check_f32(x, "x");
  check_f32(w, "w");
  if (x.size(0) > realhf::kFewRows || !realhf::few_rows_supported()) return at::Tensor();
  if (b.numel()) check_f32(b, "b");
  return linear_parts(x, &w, 1, b);
}

// Matrices [out_i, in] side by side and transposed: [in, sum(out_i)], the
// layout in which few-row products run fastest. Copied in 32 x 32 tiles, which
// keeps both the rows read and the rows written in cache (a strided
// .t().contiguous() was 3-4x slower than a plain copy).
at::Tensor transpose_cat(const std::vector<at::Tensor>& mats) {
  TORCH_CHECK(!mats.empty(), "transpose_cat needs at least one matrix");
  const int64_t in = mats[0].size(1);
  int64_t total = 0;
  for (const auto& w : mats) {
    check_f32(w, "weight");
    TORCH_CHECK(w.dim() == 2 && w.size(1) == in, "transpose_cat: matrices must be [out_i, in] with one in");
    total += w.size(0);
  }
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
    float sum = 0.f;
    for (int64_t j = 0; j < vocab; ++j) {
      prob[j] = std::exp(x[j] - mx);
      sum += prob[j];
    }
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "One decoding step through all llama blocks (float32 CPU)";
  m.def("decode_blocks", &decode_blocks, py::arg("x"), py::arg("weights"), py::arg("eps"), py::arg("scales"),
        py::arg("row_weights"),
        py::arg("cache_k"), py::arg("cache_v"), py::arg("rows"), py::arg("pos"), py::arg("cos"), py::arg("sin"),
        py::arg("n_q"), py::arg("n_kv"), py::arg("head_dim"), py::arg("inter"), py::arg("interleaved"),
        py::call_guard<py::gil_scoped_release>(),
        "x after every block of one decoding step; writes the new keys/values into the caches.");
  m.def("few_rows_linear", &few_rows_linear, py::arg("x"), py::arg("w"), py::arg("b"),
        py::call_guard<py::gil_scoped_release>(),
        "x @ w.T + b for x [n <= 16, in] and row-major w [out, in] (AVX2 + FMA; None where unsupported).");
  m.def("sample_rows", &sample_rows, py::arg("logits"), py::arg("u"), py::arg("banned"), py::arg("temperature"),
        py::call_guard<py::gil_scoped_release>(),
        "(tokens, log-probs): one inverse-CDF draw per row of float32 logits, banned ids removed.");
  m.def("transpose_cat", &transpose_cat, py::arg("mats"), py::call_guard<py::gil_scoped_release>(),
        "[in, sum(out_i)]: the [out_i, in] matrices concatenated and transposed.");
}
