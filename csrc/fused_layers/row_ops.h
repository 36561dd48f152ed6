// Per-row float32 loops shared by the fused layer kernels and the native
// decoding step: a dot product, one row of RMS norm, one head of rotary.
#pragma once

#include <cmath>
#include <cstdint>

namespace realhf {

// sum(a[j] * b[j]) with 8 independent accumulators, so that -O3 vectorizes
// the reduction without reassociating floating point (no -ffast-math).
inline float sum_products(const float* a, const float* b, int64_t n) {
  constexpr int kLanes = 8;
  float acc[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += a[j + k] * b[j + k];
  float s = 0.f;
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// y = w * (x * rstd) with rstd = 1 / sqrt(mean(x^2) + eps) over one row of
// length d (RMSNorm's order of operations); returns rstd.
inline float rms_row(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int64_t d,
                     float eps) {
  const float rs = 1.f / std::sqrt(sum_products(x, x, d) / static_cast<float>(d) + eps);
  for (int64_t j = 0; j < d; ++j) y[j] = w[j] * (x[j] * rs);
  return rs;
}

// dst = src (length d) rotated by the angles whose cos/sin are c/s (length
// d/2). Non-interleaved pairs dimension j with j + d/2, interleaved 2j with 2j+1.
inline void rotate_head(const float* src, const float* c, const float* s, float* dst, int64_t d,
                        bool interleaved) {
  const int64_t half = d / 2;
  if (interleaved) {
    for (int64_t j = 0; j < half; ++j) {
      const float x1 = src[2 * j], x2 = src[2 * j + 1];
      dst[2 * j] = x1 * c[j] - x2 * s[j];
      dst[2 * j + 1] = x2 * c[j] + x1 * s[j];
    }
  } else {
    for (int64_t j = 0; j < half; ++j) {
      const float x1 = src[j], x2 = src[j + half];
      dst[j] = x1 * c[j] - x2 * s[j];
      dst[j + half] = x2 * c[j] + x1 * s[j];
    }
  }
}

}  // namespace realhf
