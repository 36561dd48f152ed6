// Torch binding for the CUDA interval copy kernels in interval_op.cu.
//
// Validation of the intervals and construction of the copy plan happen on
// the host in Python (realhf.impl.ops.intervals), which must read the
// intervals anyway to size the output; this file checks tensors and launches.

#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "interval_op_kernels.h"

namespace {

void check_flat(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK_VALUE(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_plan(const torch::Tensor& plan, const torch::Tensor& like,
                int64_t n_intervals) {
  TORCH_CHECK(plan.device() == like.device(),
              "the copy plan must be on the data's device");
  TORCH_CHECK_TYPE(plan.scalar_type() == torch::kInt64, "plan must be int64");
  TORCH_CHECK(plan.is_contiguous(), "plan must be contiguous");
  TORCH_CHECK_VALUE(plan.numel() == 3 * n_intervals + 2,
                    "plan must hold 3 * n + 2 = ", 3 * n_intervals + 2,
                    " entries, got ", plan.numel());
}

void check_alignment(const torch::Tensor& t, int64_t unit_bytes,
                     const char* name) {
  TORCH_CHECK_VALUE(unit_bytes == 1 || unit_bytes == 2 || unit_bytes == 4 ||
                        unit_bytes == 8 || unit_bytes == 16,
                    "unit_bytes must be a power of two up to 16, got ",
                    unit_bytes);
  const auto addr = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  TORCH_CHECK(addr % static_cast<std::uintptr_t>(unit_bytes) == 0, name,
              " is not aligned to ", unit_bytes, " bytes");
}

void launch(void* flat, void* packed, const torch::Tensor& plan,
            int64_t n_intervals, int64_t n_chunks, int64_t chunk_units,
            int64_t unit_bytes, bool gather) {
  const int err = realhf::launch_interval_copy(
      flat, packed, plan.data_ptr<int64_t>(), n_intervals, n_chunks,
      chunk_units, static_cast<int>(unit_bytes), gather,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "interval copy kernel failed: ",
              realhf::interval_copy_error_string(err));
}

torch::Tensor slice_intervals(const torch::Tensor& src,
                              const torch::Tensor& plan, int64_t n_intervals,
                              int64_t n_chunks, int64_t chunk_units,
                              int64_t unit_bytes, int64_t output_size) {
  check_flat(src, "src");
  check_plan(plan, src, n_intervals);
  check_alignment(src, unit_bytes, "src");
  const c10::cuda::CUDAGuard guard(src.device());
  torch::Tensor out = torch::empty({output_size}, src.options());
  if (output_size == 0) return out;
  check_alignment(out, unit_bytes, "output");
  launch(src.data_ptr(), out.data_ptr(), plan, n_intervals, n_chunks,
         chunk_units, unit_bytes, /*gather=*/true);
  return out;
}

void set_intervals(const torch::Tensor& src, torch::Tensor& dst,
                   const torch::Tensor& plan, int64_t n_intervals,
                   int64_t n_chunks, int64_t chunk_units, int64_t unit_bytes) {
  check_flat(src, "src");
  check_flat(dst, "dst");
  TORCH_CHECK(src.device() == dst.device(), "src and dst devices differ");
  TORCH_CHECK_TYPE(src.scalar_type() == dst.scalar_type(),
                   "src and dst dtypes differ");
  check_plan(plan, dst, n_intervals);
  if (src.numel() == 0) return;
  check_alignment(src, unit_bytes, "src");
  check_alignment(dst, unit_bytes, "dst");
  const c10::cuda::CUDAGuard guard(dst.device());
  launch(dst.data_ptr(), src.data_ptr(), plan, n_intervals, n_chunks,
         chunk_units, unit_bytes, /*gather=*/false);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA interval gather/scatter over flat buffers";
  m.def("slice_intervals", &slice_intervals, py::arg("src"), py::arg("plan"),
        py::arg("n_intervals"), py::arg("n_chunks"), py::arg("chunk_units"),
        py::arg("unit_bytes"), py::arg("output_size"),
        "Gather planned intervals of a flat CUDA tensor into a packed one.");
  m.def("set_intervals", &set_intervals, py::arg("src"), py::arg("dst"),
        py::arg("plan"), py::arg("n_intervals"), py::arg("n_chunks"),
        py::arg("chunk_units"), py::arg("unit_bytes"),
        "Scatter a packed CUDA tensor into planned intervals in place.");
}
