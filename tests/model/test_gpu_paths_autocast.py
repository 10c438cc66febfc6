"""Under bf16 autocast the activations stay in the compute dtype (issue 26, defect 3). The TP layers
return their bias apart (megatron's skip_bias_add); an fp32 bias added to a bf16 product promoted
the QKV output, the FFN intermediate and the residual sum to fp32, so the fused kernels (one dtype
each) were never offered a bf16 input. Checked on a CPU under torch.autocast("cpu", bf16), at TP 1
and TP 2 (megatron-core's layers, gloo): every module's floating outputs, every aten op inside the
encoder layers, and what each fused op's dispatch check is offered."""
import pytest
import torch

from tests.support.harness import run_distributed
from tests.support.model_case import padded_batch, tiny_model

# where autocast keeps fp32: the embedding lookups of fp32 tables, a LayerNorm of an fp32 input
# (the embeddings'; on a GPU autocast runs every LayerNorm in fp32), the embeddings' output, and
# the loss (a 0-d fp32 sum)
KEPT_FP32 = {"Embedding", "VocabParallelEmbedding", "LayerNorm", "Embeddings", "XLMRModel"}


def _record_module_outputs(model):
    seen = []

    def hook(mod, inp, out):
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor) and o.is_floating_point():
                seen.append((type(mod).__name__, o.dtype, tuple(o.shape)))
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    return seen, handles


def _fp32_outputs(model, ids, mask, labels):
    seen, handles = _record_module_outputs(model)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, attention_mask=mask, labels=labels).backward()
    finally:
        for h in handles:
            h.remove()
    assert any(name == "SelfAttention" for name, _, _ in seen)
    return [s for s in seen if s[1] == torch.float32 and s[0] not in KEPT_FP32]


def test_module_outputs_stay_bf16_under_autocast():
    """Every module of the whole model (train mode, dropout on, padded batch, the loss): no fp32
    output but the embeddings' and the loss. The TP layers' skipped bias comes back in bf16 too."""
    model = tiny_model(dropout=0.1).train()
    ids, mask, labels = padded_batch()
    assert _fp32_outputs(model, ids, mask, labels) == []


def test_no_fp32_op_inside_the_encoder_layers():
    """Every aten op the encoder layers run in the forward (below autocast: what a device would
    run) returns bf16: no fp32 QKV + bias, no fp32 GELU input, no fp32 residual sum."""
    from tests.support.host_syncs import OpCounter
    model = tiny_model(dropout=0.1).train()
    ids, mask, labels = padded_batch()
    counters = []
    layers = list(model.layers.values())
    first, last = layers[0], layers[-1]

    def enter(mod, args):
        c = OpCounter()
        c.__enter__()
        counters.append(c)
    hs = [first.register_forward_pre_hook(enter),
          last.register_forward_hook(lambda mod, args, out: counters[-1].__exit__(None, None, None))]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, attention_mask=mask, labels=labels)
    finally:
        for h in hs:
            h.remove()
    ops = counters[0].ops
    assert any(name == "aten.gelu" for name, _, _ in ops) and any(name == "aten.native_layer_norm" for name, _, _ in ops)
    # an op's result is its first output; fp32 only among the others: the softmax statistics of the
    # attention (logsumexp) and LayerNorm's mean / rstd
    fp32 = [(name, shapes) for name, shapes, dtypes in ops if dtypes and dtypes[0] == torch.float32]
    assert fp32 == [], fp32
    stats = {name for name, _, dtypes in ops if torch.float32 in dtypes[1:]}
    assert stats <= {"aten.native_layer_norm", "aten._scaled_dot_product_flash_attention_for_cpu"}, stats


def test_each_fused_op_is_offered_bf16(monkeypatch):
    """A spy on the dispatch checks: bias_gelu (FFN and head), bias-dropout-add-LayerNorm (both
    epilogues of each layer) and, with attention forced onto the masked-softmax path (what sm_70
    takes), scaled_masked_softmax are all offered bf16 tensors."""
    from xlmr_mp.kernels import dispatch, ops
    offered = []
    monkeypatch.setattr(dispatch, "use_fused", lambda t, op: offered.append((op, t.dtype)) and False)
    attention_q = []
    monkeypatch.setattr(ops, "attention_uses_masked_softmax", lambda q: attention_q.append(q.dtype) or True)
    model = tiny_model(dropout=0.1).train()
    ids, mask, labels = padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, attention_mask=mask, labels=labels).backward()
    n = len(model.layers)
    for op, count in (("bias_gelu", n + 1), ("bias_dropout_add_layernorm", 2 * n), ("scaled_masked_softmax", n)):
        got = [dt for o, dt in offered if o == op]
        assert got == [torch.bfloat16] * count, (op, got)
    assert attention_q == [torch.bfloat16] * n


def test_fp32_bias_is_passed_through_untouched():
    """Without autocast the layers hand back the bias parameter itself (no cast, no new node): the
    fp32 path is what it was."""
    model = tiny_model()
    layer = next(iter(model.layers.values()))
    x = torch.randn(2, 5, 48)
    out, bias = layer.attention.qkv(x)
    assert bias is layer.attention.qkv.bias and out.dtype == torch.float32


def _tp2_body(rank, world_size):
    import torch.distributed as dist
    from xlmr_mp.model.config import ModelConfig
    from xlmr_mp.model.xlmr import XLMRModel
    group = dist.new_group([0, 1])
    cfg = ModelConfig(vocab_size=200, hidden_size=48, num_layers=2, num_heads=4, ffn_size=96, max_positions=40,
                      dropout=0.1, attention_dropout=0.0, make_vocab_size_divisible_by=8)
    model = XLMRModel(cfg, tp_group=group, init_seed=0).train()
    ids, mask, labels = padded_batch()
    classes = {type(m).__name__ for m in model.modules()}
    return classes, _fp32_outputs(model, ids, mask, labels)


@pytest.mark.slow
def test_module_outputs_stay_bf16_at_tp2():
    for classes, fp32 in run_distributed(_tp2_body, 2, timeout=180):
        assert {"ColumnParallelLinear", "RowParallelLinear"} <= classes     # megatron-core's layers ran
        assert fp32 == [], fp32
