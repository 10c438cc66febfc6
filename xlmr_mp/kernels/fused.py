"""The fused CUDA kernels of `xlmr_mp._cuda` (csrc/cuda) are the CUDA keys of registered ops,
torch.ops.xlmr_mp.* (each beside its torch reference, its fake and its autograd formula):

    bias_gelu_op.py                   bias_gelu, bias_gelu_backward
    bias_dropout_add_layernorm_op.py  bias_dropout_add_layernorm, bias_dropout_add_layernorm_backward
    masked_softmax_op.py              scaled_masked_softmax, scaled_masked_softmax_backward
    mlm_xent_op.py                    mlm_xent_stats, mlm_xent_grad_, mlm_xent_rows_ (the masked-LM loss's rows)

Importing this module registers all of them; it also offers the masked-LM rows under the names
parallel/vocab.py's loss calls. dispatch.py decides where a fused op runs instead of its reference.
"""
from xlmr_mp.kernels import bias_dropout_add_layernorm_op, bias_gelu_op, masked_softmax_op  # noqa: F401  (registers)
from xlmr_mp.kernels.mlm_xent_op import mlm_xent_grad_, mlm_xent_stats  # noqa: F401  (the loss's entry points)
