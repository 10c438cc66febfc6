// pybind11 bindings of the CUDA launchers as `xlmr_mp._cuda` (built by setup.py's
// cuda_extensions() only with a CUDA build of torch). They are the CUDA keys of the registered ops
// torch.ops.xlmr_mp.* (xlmr_mp/kernels/*_op.py).
#include <torch/extension.h>

#include <vector>

namespace xlmr_mp {
at::Tensor bias_gelu_fwd(const at::Tensor& x, const at::Tensor& bias);
std::vector<at::Tensor> bias_gelu_bwd(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& bias);
std::vector<at::Tensor> bdaln_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                                  const at::Tensor& residual, const c10::optional<at::Tensor>& keep,
                                  const at::Tensor& gamma, const at::Tensor& beta, double eps);
std::vector<at::Tensor> bdaln_bwd(const at::Tensor& dout, const at::Tensor& y, const c10::optional<at::Tensor>& keep,
                                  const at::Tensor& gamma, const at::Tensor& mean, const at::Tensor& rstd);
at::Tensor scaled_masked_softmax_fwd(const at::Tensor& scores, const c10::optional<at::Tensor>& mask,
                                     double scale);
at::Tensor scaled_masked_softmax_bwd(const at::Tensor& dy, const at::Tensor& y, double scale);
std::vector<at::Tensor> mlm_xent_stats(const at::Tensor& logits, const at::Tensor& target);
at::Tensor mlm_xent_grad_(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                          const at::Tensor& gscale);
}  // namespace xlmr_mp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "xlmr_mp fused CUDA kernels (forward and backward)";
  m.def("bias_gelu_fwd", &xlmr_mp::bias_gelu_fwd, "gelu(x + bias)");
  m.def("bias_gelu_bwd", &xlmr_mp::bias_gelu_bwd, "(dx, dbias) of gelu(x + bias)");
  m.def("bdaln_fwd", &xlmr_mp::bdaln_fwd,
        "LayerNorm(residual + keep * (x + bias)) -> (out, y, mean, rstd)");
  m.def("bdaln_bwd", &xlmr_mp::bdaln_bwd, "-> (dx, dresidual, dweight, dln_bias, dbias)");
  m.def("scaled_masked_softmax_fwd", &xlmr_mp::scaled_masked_softmax_fwd, "softmax(scale * s, masked -inf)");
  m.def("scaled_masked_softmax_bwd", &xlmr_mp::scaled_masked_softmax_bwd, "grad of scaled masked softmax");
  m.def("mlm_xent_stats", &xlmr_mp::mlm_xent_stats, "(lse_local, target_logit) of a vocab-shard logits block");
  m.def("mlm_xent_grad_", &xlmr_mp::mlm_xent_grad_, "in-place softmax - onehot gradient of the shard logits");
}
