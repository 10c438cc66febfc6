"""Fused ops of an XLM-R step beside their torch references, applied to a built model from outside:

    applied = kernels.apply(chunks, device, compile=cfg.train.compile)   # once, before the first step
    PipelineSchedule(..., micro_batch=applied.micro_batch)

fast_paths.py  `apply`: installs the ops and C++ nodes below on a model's modules, then torch.compile
             where asked (parallel/compile.py), says what it applied
ops.py       bias_gelu, bias_dropout_add_layernorm, scaled_masked_softmax (+ *_ref, backward refs):
             the registered op where dispatch says so, the model's reference otherwise
attention_cpu.py  fused CPU self-attention (csrc/attention_cpu.cpp) beside SDPA, at short sequences
bias_gelu_op.py  torch.ops.xlmr_mp.bias_gelu: bias + exact GELU as a registered op (CPU and CUDA keys,
             fake, autograd through the registered backward op)
bias_gelu_cpu.py  when the op's AVX2 CPU key (csrc/bias_gelu_cpu.cpp) replaces ops.bias_gelu_ref
bias_dropout_add_layernorm_op.py  torch.ops.xlmr_mp.bias_dropout_add_layernorm: the post-LN epilogue, the
             dropout multiplier an input (dropout_keep draws F.dropout's), CPU key csrc/layernorm_cpu.cpp
masked_softmax_op.py  torch.ops.xlmr_mp.scaled_masked_softmax (CUDA key; the reference elsewhere)
mlm_xent_op.py  torch.ops.xlmr_mp.mlm_xent_stats / mlm_xent_grad_: the masked-LM loss's fused rows
encoder_layer_cpu.py  a model's (or stage's) post-LN layers as one autograd node on a CPU at TP = 1: one
             C++ call each way (csrc/encoder_layer_cpu.cpp: the kernels above, csrc/layernorm_cpu.cpp's
             bias-dropout-add-LayerNorm, torch's own sgemm) beside the module path
embeddings_cpu.py  the input embeddings (positions, gathers, LayerNorm) as one node, beside the module
mlm_head_cpu.py  the masked-LM head + chunked loss over the masked rows as one node, beside the module
             path (MLMHead.transform + parallel/vocab.py's chunked loss)
cpu_fast_path.py  what those nodes share: torch's sgemm_ (MKL in the x86 wheels, checked on a small
             product), tensor addresses, the dropout mask, the fp32/contiguous check
mlm_xent.py  references of the fused masked-LM rows (used inside parallel/vocab.py's loss)
dispatch.py  XLMR_MP_KERNELS=auto|fused|reference and the measured FASTER_ON table
fused.py     the registered ops, whose CUDA keys are the extension xlmr_mp._cuda (csrc/cuda), by file
"""
from xlmr_mp.kernels import fused  # noqa: E402,F401  (registers every torch.ops.xlmr_mp op)
from xlmr_mp.kernels.fast_paths import AppliedKernels, apply, fast_paths  # noqa: E402,F401  (re-export)
