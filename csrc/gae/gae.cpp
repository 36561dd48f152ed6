// Generalized advantage estimation over packed (variable-length) sequences.
//
// PPO batches are packed without padding: `values` holds sum(L_i) entries
// (sequence i occupies cu_seqlens[i] .. cu_seqlens[i+1]) and its last value is
// the bootstrap value, while `rewards` holds sum(L_i - 1) entries (sequence i
// starts at cu_seqlens[i] - i).  The recursion is sequential in time but
// independent across sequences, so each sequence is one backward loop and
// sequences are spread over threads with at::parallel_for (the extension is
// built with -fopenmp and shares torch's OpenMP runtime and thread count;
// without OpenMP the loop simply runs on the calling thread).

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>

namespace {

// Sequences per thread task; a sequence costs a few hundred cycles at most.
constexpr int64_t kSequenceGrain = 64;

[[noreturn]] void value_error(const std::string& msg) {
  throw std::invalid_argument(msg);
}

template <typename index_t>
void check_layout(const index_t* cu, int64_t bs, int64_t n_values,
                  int64_t n_rewards) {
  if (cu[0] != 0) {
    std::ostringstream os;
    os << "cu_seqlens[0] must be 0, got " << static_cast<int64_t>(cu[0]);
    value_error(os.str());
  }
  for (int64_t i = 0; i < bs; ++i) {
    const int64_t a = cu[i], b = cu[i + 1];
    if (b - a < 1) {
      std::ostringstream os;
      os << "sequence " << i << " has length " << (b - a) << " (cu_seqlens["
         << i << "]=" << a << ", cu_seqlens[" << i + 1 << "]=" << b
         << "); each sequence needs at least its bootstrap value";
      value_error(os.str());
    }
  }
  const int64_t last = cu[bs];
  if (last != n_values) {
    std::ostringstream os;
    os << "values has " << n_values << " elements but cu_seqlens[-1] is "
       << last;
    value_error(os.str());
  }
  if (n_rewards != n_values - bs) {
    std::ostringstream os;
    os << "rewards has " << n_rewards
       << " elements but the sequences need sum(L_i - 1) = " << n_values - bs;
    value_error(os.str());
  }
}

template <typename scalar_t, typename index_t>
void gae_kernel(const scalar_t* rewards, const scalar_t* values,
                const index_t* cu, const bool* truncate, int64_t bs,
                scalar_t gamma, scalar_t lam, scalar_t* adv, scalar_t* ret) {
  const scalar_t decay = gamma * lam;
  at::parallel_for(0, bs, kSequenceGrain, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t v0 = cu[i];
      const int64_t steps = static_cast<int64_t>(cu[i + 1]) - v0 - 1;
      const int64_t r0 = v0 - i;
      scalar_t next_value = truncate[i] ? values[v0 + steps] : scalar_t(0);
      scalar_t gae = 0;
      for (int64_t t = steps - 1; t >= 0; --t) {
        const scalar_t v = values[v0 + t];
        const scalar_t delta = rewards[r0 + t] + gamma * next_value - v;
        gae = delta + decay * gae;
        adv[r0 + t] = gae;
        ret[r0 + t] = gae + v;
        next_value = v;
      }
    }
  });
}

void check_1d(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must live on the CPU");
  TORCH_CHECK_VALUE(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

std::tuple<torch::Tensor, torch::Tensor> gae_1d(const torch::Tensor& rewards,
                                                const torch::Tensor& values,
                                                const torch::Tensor& cu_seqlens,
                                                const torch::Tensor& truncate,
                                                double gamma, double lam) {
  check_1d(rewards, "rewards");
  check_1d(values, "values");
  check_1d(cu_seqlens, "cu_seqlens");
  check_1d(truncate, "truncate");
  TORCH_CHECK_TYPE(rewards.scalar_type() == values.scalar_type(),
                   "rewards and values dtypes differ: ", rewards.scalar_type(),
                   " vs ", values.scalar_type());
  TORCH_CHECK_TYPE(truncate.scalar_type() == torch::kBool,
                   "truncate must be bool, got ", truncate.scalar_type());
  const auto index_type = cu_seqlens.scalar_type();
  TORCH_CHECK_TYPE(index_type == torch::kInt32 || index_type == torch::kInt64,
                   "cu_seqlens must be int32 or int64, got ", index_type);
  const int64_t bs = cu_seqlens.numel() - 1;
  TORCH_CHECK_VALUE(bs >= 0, "cu_seqlens must have at least one entry");
  TORCH_CHECK_VALUE(truncate.numel() == bs, "truncate must have shape [", bs,
                    "], got ", truncate.sizes());

  torch::Tensor adv = torch::empty_like(rewards);
  torch::Tensor ret = torch::empty_like(rewards);
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "gae_1d", [&] {
    AT_DISPATCH_INDEX_TYPES(index_type, "gae_1d_index", [&] {
      const index_t* cu = cu_seqlens.data_ptr<index_t>();
      check_layout(cu, bs, values.numel(), rewards.numel());
      gae_kernel<scalar_t, index_t>(
          rewards.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), cu,
          truncate.data_ptr<bool>(), bs, static_cast<scalar_t>(gamma),
          static_cast<scalar_t>(lam), adv.data_ptr<scalar_t>(),
          ret.data_ptr<scalar_t>());
    });
  });
  return {adv, ret};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Packed generalized advantage estimation on the CPU";
  m.def("gae_1d", &gae_1d, py::arg("rewards"), py::arg("values"),
        py::arg("cu_seqlens"), py::arg("truncate"), py::arg("gamma"),
        py::arg("lam"), py::call_guard<py::gil_scoped_release>(),
        "Advantages and returns for packed sequences (fp32 or fp64).");
}
