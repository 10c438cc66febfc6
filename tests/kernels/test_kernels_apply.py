"""kernels.apply (kernels/fast_paths.py): what it installs is a function of the device type (a CPU
test calls it with "cuda"), the model itself stays the reference until applied, the applied model
runs the C++ nodes and equals the reference to rounding, and the schedule's micro-batch context
comes from the result."""
import contextlib

import torch

from xlmr_mp import kernels
from xlmr_mp.kernels import cpu_fast_path, dispatch, encoder_layer_cpu, ops
from tests.support.model_case import padded_batch


def _model():
    from xlmr_mp.model.config import ModelConfig
    from xlmr_mp.model.xlmr import XLMRModel
    cfg = ModelConfig(vocab_size=200, hidden_size=48, num_layers=2, num_heads=4, ffn_size=96, max_positions=40,
                      dropout=0.1, attention_dropout=0.0, make_vocab_size_divisible_by=8)
    return XLMRModel(cfg, init_seed=0)


def _installed(model) -> set:
    """(module class, name) of every attribute apply may set that is on an instance."""
    names = ("forward", "encode_layers", "context", "masked_loss_sum", "bias_gelu", "bias_dropout_add_layernorm",
             "attend")
    return {(type(m).__name__, n) for m in model.modules() for n in names if n in vars(m)}


def test_what_is_applied_is_a_function_of_the_device_type():
    cpu, cuda = kernels.fast_paths("cpu"), kernels.fast_paths("cuda")
    assert set(kernels.fast_paths("cuda")) == {"bias_gelu", "bias_dropout_add_layernorm", "attention"}
    assert set(cpu) - set(cuda) == {"encoder_stack_cpu", "encoder_layer_cpu", "attention_cpu", "embeddings_cpu",
                                    "mlm_head_cpu"}
    model = _model()
    assert _installed(model) == set()                       # the model as built: the reference
    on_cuda = kernels.apply(model, "cuda")                  # (decided by the device type alone)
    assert on_cuda.applied == cuda and isinstance(on_cuda.micro_batch(), contextlib.nullcontext)
    assert _installed(model) == {("FeedForward", "bias_gelu"), ("MLMHead", "bias_gelu"),
                                 ("EncoderLayer", "bias_dropout_add_layernorm"), ("SelfAttention", "attend")}
    assert model.layers["0"].ffn.bias_gelu is ops.bias_gelu
    on_cpu = kernels.apply(model, torch.device("cpu"))
    assert on_cpu.applied == cpu and on_cpu.modules == 9 and "encoder_stack_cpu" in str(on_cpu)
    assert {("XLMRModel", "encode_layers"), ("EncoderLayer", "forward"), ("SelfAttention", "context"),
            ("Embeddings", "forward"), ("MLMHead", "masked_loss_sum")} <= _installed(model)
    with on_cpu.micro_batch():                              # the C++ nodes' context: gradients_into_grad
        assert cpu_fast_path.edge_free_targets([]) == []
    assert kernels.apply(model, "cpu") == on_cpu            # idempotent


def test_applied_model_runs_the_nodes_and_equals_the_reference(monkeypatch):
    if dispatch._cpu_extension() is None or not cpu_fast_path.blas_sgemm():
        import pytest
        pytest.skip("xlmr_mp._C without the CPU kernels")
    ref, fast = _model(), _model()
    kernels.apply(fast, "cpu")
    calls = []
    real = encoder_layer_cpu.stack_forward
    monkeypatch.setattr(encoder_layer_cpu, "stack_forward", lambda *a: calls.append(1) or real(*a))
    ids, mask, labels = padded_batch()
    out = {}
    for name, m in (("ref", ref), ("fast", fast)):
        torch.manual_seed(3)
        loss = m(ids, attention_mask=mask, labels=labels)
        loss.backward()
        out[name] = (loss.detach(), {n: p.grad for n, p in m.named_parameters()})
    assert calls == [1]                                     # the applied model only
    torch.testing.assert_close(out["fast"][0], out["ref"][0], rtol=1e-5, atol=1e-6)
    for n, g in out["ref"][1].items():
        torch.testing.assert_close(out["fast"][1][n], g, rtol=1e-4, atol=2e-6, msg=n)


def test_compile_is_applied_in_the_same_call_when_asked():
    """apply(..., compile=True) (the run's train.compile) compiles each encoder layer and the head's
    transform after installing the fused paths (parallel/compile.py), says so, and stays idempotent;
    without it nothing is compiled. (The compiled trainer's values: tests/train/test_train_compile.py.)"""
    def compiled(model):
        layers = [getattr(l, "_compiled_call_impl", None) is not None for l in model.layers.values()]
        return layers + ["transform" in vars(model.lm_head)]
    model = _model()
    plain = kernels.apply(model, "cpu")
    assert plain.compiled == 0 and "compile" not in plain.applied and "torch.compile" not in str(plain)
    assert compiled(model) == [False, False, False]
    applied = kernels.apply(model, "cpu", compile=True)
    assert applied.applied == plain.applied + ("compile",) and applied.modules == plain.modules
    assert applied.compiled == 3 and "torch.compile on 3 modules" in str(applied)
    assert compiled(model) == [True, True, True]
    transform = model.lm_head.transform
    assert kernels.apply(model, "cpu", compile=True) == applied and model.lm_head.transform is transform
    assert model.layers["0"].ffn.bias_gelu is ops.bias_gelu              # the fused ops installed as well
