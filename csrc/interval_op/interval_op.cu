// CUDA interval gather/scatter: one block per chunk of one interval.
//
// Splitting intervals into fixed-size chunks keeps blocks balanced whether
// there are a few huge intervals or many small ones.  A block finds its
// interval by binary search over the chunk prefix sums of the copy plan (see
// interval_op_kernels.h), then its threads copy the chunk with coalesced
// accesses of the widest aligned unit.

#include <cuda_runtime.h>

#include <cstdint>

#include "interval_op_kernels.h"

namespace {

constexpr int kThreads = 256;
// Grid-stride over chunks beyond this many blocks.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

template <typename Unit>
__global__ void interval_copy_kernel(Unit* __restrict__ flat,
                                     Unit* __restrict__ packed,
                                     const int64_t* __restrict__ starts,
                                     const int64_t* __restrict__ offsets,
                                     const int64_t* __restrict__ chunk_offsets,
                                     int64_t n, int64_t n_chunks,
                                     int64_t chunk_units, bool gather) {
  __shared__ int64_t interval;
  for (int64_t c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    if (threadIdx.x == 0) {
      // First interval k whose chunks end after c.  Empty intervals own no
      // chunks and are never selected.
      int64_t lo = 0, hi = n - 1;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (chunk_offsets[mid + 1] > c) {
          hi = mid;
        } else {
          lo = mid + 1;
        }
      }
      interval = lo;
    }
    __syncthreads();
    const int64_t k = interval;
    const int64_t begin = (c - chunk_offsets[k]) * chunk_units;
    const int64_t length = offsets[k + 1] - offsets[k];
    const int64_t end = begin + chunk_units < length ? begin + chunk_units : length;
    Unit* f = flat + starts[k];
    Unit* p = packed + offsets[k];
    if (gather) {
      for (int64_t u = begin + threadIdx.x; u < end; u += blockDim.x) p[u] = f[u];
    } else {
      for (int64_t u = begin + threadIdx.x; u < end; u += blockDim.x) f[u] = p[u];
    }
    // `interval` is rewritten on the next grid-stride step.
    __syncthreads();
  }
}

template <typename Unit>
int launch_typed(void* flat, void* packed, const int64_t* plan, int64_t n,
                 int64_t n_chunks, int64_t chunk_units, bool gather,
                 cudaStream_t stream) {
  const int64_t blocks = n_chunks < kMaxBlocks ? n_chunks : kMaxBlocks;
  interval_copy_kernel<Unit><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      static_cast<Unit*>(flat), static_cast<Unit*>(packed), plan, plan + n,
      plan + 2 * n + 1, n, n_chunks, chunk_units, gather);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

namespace realhf {

int launch_interval_copy(void* flat, void* packed, const int64_t* plan,
                         int64_t n_intervals, int64_t n_chunks,
                         int64_t chunk_units, int unit_bytes, bool gather,
                         void* stream) {
  if (n_intervals <= 0 || n_chunks <= 0) return static_cast<int>(cudaSuccess);
  if (chunk_units <= 0) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (unit_bytes) {
    case 1:
      return launch_typed<uint8_t>(flat, packed, plan, n_intervals, n_chunks, chunk_units, gather, s);
    case 2:
      return launch_typed<uint16_t>(flat, packed, plan, n_intervals, n_chunks, chunk_units, gather, s);
    case 4:
      return launch_typed<uint32_t>(flat, packed, plan, n_intervals, n_chunks, chunk_units, gather, s);
    case 8:
      return launch_typed<uint2>(flat, packed, plan, n_intervals, n_chunks, chunk_units, gather, s);
    case 16:
      return launch_typed<uint4>(flat, packed, plan, n_intervals, n_chunks, chunk_units, gather, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

const char* interval_copy_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // namespace realhf
