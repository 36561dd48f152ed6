// Torch binding for the CUDA packed-GAE kernel in gae.cu.
//
// Layout validation (which needs cu_seqlens on the host) is done in Python by
// realhf.impl.ops.gae; this file checks tensor properties and launches.

#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <tuple>

#include "gae_kernels.h"

namespace {

void check_1d(const torch::Tensor& t, const torch::Tensor& like,
              const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name,
              " must be on ", like.device());
  TORCH_CHECK_VALUE(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

std::tuple<torch::Tensor, torch::Tensor> gae_1d(const torch::Tensor& rewards,
                                                const torch::Tensor& values,
                                                const torch::Tensor& cu_seqlens,
                                                const torch::Tensor& truncate,
                                                double gamma, double lam) {
  TORCH_CHECK(values.is_cuda(), "values must be a CUDA tensor");
  check_1d(rewards, values, "rewards");
  check_1d(values, values, "values");
  check_1d(cu_seqlens, values, "cu_seqlens");
  check_1d(truncate, values, "truncate");
  TORCH_CHECK_TYPE(rewards.scalar_type() == values.scalar_type(),
                   "rewards and values dtypes differ");
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == torch::kInt64,
                   "cu_seqlens must be int64");
  TORCH_CHECK_TYPE(truncate.scalar_type() == torch::kBool,
                   "truncate must be bool");
  const int64_t bs = cu_seqlens.numel() - 1;
  TORCH_CHECK_VALUE(bs >= 0 && truncate.numel() == bs,
                    "truncate must have one entry per sequence");

  const c10::cuda::CUDAGuard guard(values.device());
  torch::Tensor adv = torch::empty_like(rewards);
  torch::Tensor ret = torch::empty_like(rewards);
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  int err = 0;
  if (values.scalar_type() == torch::kFloat32) {
    err = realhf::launch_gae_1d(
        rewards.data_ptr<float>(), values.data_ptr<float>(),
        cu_seqlens.data_ptr<int64_t>(), truncate.data_ptr<bool>(), bs,
        static_cast<float>(gamma), static_cast<float>(lam),
        adv.data_ptr<float>(), ret.data_ptr<float>(), stream);
  } else if (values.scalar_type() == torch::kFloat64) {
    err = realhf::launch_gae_1d(
        rewards.data_ptr<double>(), values.data_ptr<double>(),
        cu_seqlens.data_ptr<int64_t>(), truncate.data_ptr<bool>(), bs, gamma,
        lam, adv.data_ptr<double>(), ret.data_ptr<double>(), stream);
  } else {
    TORCH_CHECK_TYPE(false, "gae_1d supports float32 and float64, got ",
                     values.scalar_type());
  }
  TORCH_CHECK(err == 0, "gae kernel failed: ", realhf::gae_error_string(err));
  return {adv, ret};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Packed generalized advantage estimation on CUDA";
  m.def("gae_1d", &gae_1d, py::arg("rewards"), py::arg("values"),
        py::arg("cu_seqlens"), py::arg("truncate"), py::arg("gamma"),
        py::arg("lam"),
        "Advantages and returns for packed CUDA sequences (fp32 or fp64).");
}
