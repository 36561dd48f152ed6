// Launchers for the CUDA interval copy kernels.
//
// Only plain C++ types appear here so that interval_op.cu compiles with
// `nvcc -c` alone and the torch binding never needs CUDA headers for it.
#pragma once

#include <cstdint>

namespace realhf {

// Copy plan, a device int64 array of 3 * n + 2 entries laid out as
//   starts[n]             start of each interval in the flat buffer
//   offsets[n + 1]        exclusive prefix sum of the lengths (packed offsets)
//   chunk_offsets[n + 1]  exclusive prefix sum of ceil(length / chunk_units)
// with every quantity counted in units of `unit_bytes` (1, 2, 4, 8 or 16),
// the widest access that all intervals and both base pointers are aligned
// to.  Each CUDA block copies one chunk of `chunk_units` units.
//
// gather = true copies flat -> packed (slice), false copies packed -> flat
// (set).  `stream` is a cudaStream_t.  Returns a cudaError_t value.
int launch_interval_copy(void* flat, void* packed, const int64_t* plan,
                         int64_t n_intervals, int64_t n_chunks,
                         int64_t chunk_units, int unit_bytes, bool gather,
                         void* stream);

// Human-readable text for an error code returned by a launcher.
const char* interval_copy_error_string(int code);

}  // namespace realhf
