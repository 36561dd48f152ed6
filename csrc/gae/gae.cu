// CUDA packed GAE: one thread per sequence walking backwards in time.
//
// The recursion is sequential within a sequence, and PPO batches hold
// hundreds to thousands of sequences, so a thread per sequence is enough
// parallelism and needs no cross-thread communication.  Layout and formula
// match csrc/gae/gae.cpp.

#include <cuda_runtime.h>

#include <cstdint>

#include "gae_kernels.h"

namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void gae_kernel(const T* __restrict__ rewards,
                           const T* __restrict__ values,
                           const int64_t* __restrict__ cu_seqlens,
                           const bool* __restrict__ truncate, int64_t bs,
                           T gamma, T lam, T* __restrict__ advantages,
                           T* __restrict__ returns) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= bs) return;
  const int64_t v0 = cu_seqlens[i];
  const int64_t steps = cu_seqlens[i + 1] - v0 - 1;
  const int64_t r0 = v0 - i;
  const T decay = gamma * lam;
  T next_value = truncate[i] ? values[v0 + steps] : T(0);
  T gae = T(0);
  for (int64_t t = steps - 1; t >= 0; --t) {
    const T v = values[v0 + t];
    const T delta = rewards[r0 + t] + gamma * next_value - v;
    gae = delta + decay * gae;
    advantages[r0 + t] = gae;
    returns[r0 + t] = gae + v;
    next_value = v;
  }
}

template <typename T>
int launch_typed(const T* rewards, const T* values, const int64_t* cu_seqlens,
                 const bool* truncate, int64_t bs, T gamma, T lam, T* adv,
                 T* ret, void* stream) {
  if (bs <= 0) return static_cast<int>(cudaSuccess);
  const int64_t blocks = (bs + kThreads - 1) / kThreads;
  gae_kernel<T><<<static_cast<unsigned int>(blocks), kThreads, 0,
                  static_cast<cudaStream_t>(stream)>>>(
      rewards, values, cu_seqlens, truncate, bs, gamma, lam, adv, ret);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

namespace realhf {

int launch_gae_1d(const float* rewards, const float* values,
                  const int64_t* cu_seqlens, const bool* truncate, int64_t bs,
                  float gamma, float lam, float* advantages, float* returns,
                  void* stream) {
  return launch_typed<float>(rewards, values, cu_seqlens, truncate, bs, gamma,
                             lam, advantages, returns, stream);
}

int launch_gae_1d(const double* rewards, const double* values,
                  const int64_t* cu_seqlens, const bool* truncate, int64_t bs,
                  double gamma, double lam, double* advantages,
                  double* returns, void* stream) {
  return launch_typed<double>(rewards, values, cu_seqlens, truncate, bs, gamma,
                              lam, advantages, returns, stream);
}

const char* gae_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // namespace realhf
