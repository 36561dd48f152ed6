// Rotary embedding of one head vector, shared by the fused layer kernels and
// the native decoding step.
#pragma once

#include <cstdint>

namespace realhf {

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
