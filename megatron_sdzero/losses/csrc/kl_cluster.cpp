// Python bindings of kl_cluster.cu (built just in time by megatron_sdzero/losses/_cluster_kernel.py).

#include <torch/extension.h>

namespace sdzero_kl {
void loss_and_grad(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& grad,
                   const at::Tensor& values, const at::Tensor& coef, const at::Tensor& target, int64_t n_valid,
                   double inv_temp, double forward_weight, bool is_ce, int64_t cluster, int64_t nbuf);
void emulate(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& grad, const at::Tensor& values,
             const at::Tensor& coef, const at::Tensor& target, int64_t n_valid, double inv_temp, double forward_weight,
             bool is_ce, int64_t cluster, int64_t threads);
int64_t shared_memory_bytes(int64_t cols, int64_t n_tensors, int64_t cluster, int64_t nbuf);
}  // namespace sdzero_kl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("loss_and_grad", &sdzero_kl::loss_and_grad,
        "One-pass loss values and gradient on the current CUDA stream (cluster kernel)");
  m.def("emulate", &sdzero_kl::emulate, "The cluster kernel's algorithm run sequentially on CPU tensors");
  m.def("shared_memory_bytes", &sdzero_kl::shared_memory_bytes, "Dynamic shared memory per CTA");
}
