// Launchers for the CUDA packed-GAE kernel.
//
// Plain C++ types only, so gae.cu compiles with `nvcc -c` alone.  Layout and
// recursion match csrc/gae/gae.cpp; see realhf.impl.ops.gae_1d for the
// definition.  `stream` is a cudaStream_t; the return value is a cudaError_t.
#pragma once

#include <cstdint>

namespace realhf {

int launch_gae_1d(const float* rewards, const float* values,
                  const int64_t* cu_seqlens, const bool* truncate, int64_t bs,
                  float gamma, float lam, float* advantages, float* returns,
                  void* stream);

int launch_gae_1d(const double* rewards, const double* values,
                  const int64_t* cu_seqlens, const bool* truncate, int64_t bs,
                  double gamma, double lam, double* advantages,
                  double* returns, void* stream);

const char* gae_error_string(int code);

}  // namespace realhf
