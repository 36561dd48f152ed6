// Products of a few rows with a row-major weight, y = x @ w^T (+ b), for
// decoding steps of up to kFewRows rows.
//
// With so few rows a step's matrix products are bound by reading the weights:
// every weight is read once per step. A BLAS sgemm first packs the weight
// into its panel layout, which for 8 rows doubles the memory traffic and
// costs more than the products themselves; here each pair of weight rows is
// read once, straight from the model's own [out, in] layout, and multiplied
// with up to four input rows at a time (AVX2 + FMA, 8 lanes).
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define REALHF_FEW_ROWS_X86 1
#endif

namespace realhf {

constexpr int64_t kFewRows = 16;

#ifdef REALHF_FEW_ROWS_X86
inline bool few_rows_supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

__attribute__((target("avx2,fma"))) inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[m * ldy + j] = sum_k x[m * K + k] * w[j * K + k] + (b ? b[j] : 0) for m < M, j < N.
__attribute__((target("avx2,fma"))) inline void few_rows_times(const float* x, const float* w, const float* b,
                                                              float* y, int64_t ldy, int64_t M, int64_t N,
                                                              int64_t K) {
  const int64_t K8 = K - K % 8;
  auto tail = [&](const float* xr, const float* wr) {
    float s = 0.f;
    for (int64_t k = K8; k < K; ++k) s += xr[k] * wr[k];
    return s;
  };
  for (int64_t j = 0; j < N; j += 2) {
    const bool pair = j + 1 < N;
    const float* w0 = w + j * K;
    const float* w1 = pair ? w0 + K : w0;
    const float b0 = b ? b[j] : 0.f, b1 = (b && pair) ? b[j + 1] : 0.f;
    for (int64_t m = 0; m < M; m += 4) {
      const int64_t rows = M - m < 4 ? M - m : 4;
      const float* xr[4];
      for (int64_t r = 0; r < 4; ++r) xr[r] = x + (m + (r < rows ? r : 0)) * K;
      __m256 a[4][2];
      for (auto& row : a) row[0] = row[1] = _mm256_setzero_ps();
      for (int64_t k = 0; k < K8; k += 8) {
        const __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
        for (int64_t r = 0; r < 4; ++r) {
          const __m256 xv = _mm256_loadu_ps(xr[r] + k);
          a[r][0] = _mm256_fmadd_ps(xv, v0, a[r][0]);
          a[r][1] = _mm256_fmadd_ps(xv, v1, a[r][1]);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* out = y + (m + r) * ldy + j;
        out[0] = lane_sum(a[r][0]) + tail(xr[r], w0) + b0;
        if (pair) out[1] = lane_sum(a[r][1]) + tail(xr[r], w1) + b1;
      }
    }
  }
}
#else
inline bool few_rows_supported() { return false; }
inline void few_rows_times(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t) {}
#endif

}  // namespace realhf
