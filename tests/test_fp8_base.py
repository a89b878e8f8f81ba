"""LoRA over FP8 bases: transformers' fine-grained FP8Linear (e4m3 weight,
fp32 weight_scale_inv per 128 x 128 block or per tensor) and quantize_base
("fp8"). y and the LoRA gradients against float64 computed from the weights
as transformers itself dequantizes them, on both backends and interpreter
configs, odd shapes (partial scale blocks); a whole tiny FP8 Llama against a
float64 dense twin; merge refused, unload / to_peft / from_peft sharing the
tensors; and the refusals (UE8M0 scales, FP4, other block sizes), each
naming the layer.

transformers' own FP8Linear forward needs its GPU kernels (and quantizes x
per token, which fused-lora does not): it is not run here.
"""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the FP8 tests need transformers: pip install -e '.[test]'")

from conftest import DEVICE  # noqa: E402
from helpers import assert_matches_reference, f64, randn  # noqa: E402
from quantized_models import (  # noqa: E402
    check_layer,
    dequantize_fp8,
    fp8_linear,
    fp8_llama,
    nonzero_adapters,
)
from tiny_models import (  # noqa: E402
    _torch_backend_unless_parametrized,  # noqa: F401 (an autouse fixture)
    assert_same_logits,
    logits,
    randomize_adapters,
    token_ids,
)
from transformers.integrations.finegrained_fp8 import FP8Linear  # noqa: E402

import fused_lora  # noqa: E402
from fused_lora import LoRALinear, apply_lora, from_peft, merge_and_unload, quantize_base, to_peft, unload  # noqa: E402
from fused_lora.integrations.model import lora_layers  # noqa: E402

# (N, K, dtype, per_tensor): scale blocks cut short in both dimensions (130 x 200), a per-tensor scale.
LAYER_CASES = [(130, 200, torch.bfloat16, False), (33, 100, torch.float32, True), (20, 64, torch.float16, False)]


@pytest.mark.parametrize(
    ("n", "k", "dtype", "per_tensor"), LAYER_CASES, ids=["130x200-bf16-block", "33x100-fp32-tensor", "20x64-fp16"]
)
def test_fp8_linear_layer(n, k, dtype, per_tensor, backend, config):
    """from_linear keeps the FP8Linear's weight and weight_scale_inv
    Parameters (shared, frozen) and computes y and the LoRA gradients of the
    float64 reference, with x in the bias's dtype."""
    module = fp8_linear(n, k, dtype=dtype, per_tensor=per_tensor)
    layer = LoRALinear.from_linear(module, r=4, lora_alpha=8, init_lora_weights=False)
    assert layer.weight is module.weight and layer.weight_scale_inv is module.weight_scale_inv
    assert not layer.weight_scale_inv.requires_grad and layer.base_format == "fp8"
    assert (layer.in_features, layer.out_features) == (k, n)
    check_layer(layer)


@pytest.mark.parametrize("per_tensor", [False, True], ids=["block", "tensor"])
def test_view_is_transformers_dequantize(per_tensor):
    """The weight the kernels decode is W = weight * scale exactly as
    transformers dequantizes it, and a base without a bias runs in x's
    dtype, whatever it is: a quantized base has no dense dtype of its own."""
    module = fp8_linear(130, 70, bias=False, per_tensor=per_tensor)
    layer = LoRALinear.from_linear(module, r=2, init_lora_weights=False)
    torch.testing.assert_close(layer.linear_weight.dequantize(torch.float32), dequantize_fp8(module), rtol=0, atol=0)
    for dtype in (torch.float32, torch.bfloat16):
        check_layer(layer, m=3, dtype=dtype)
        layer.zero_grad(set_to_none=True)


def test_fp8_llama_against_a_float64_twin():
    """A tiny Llama whose Linear layers are FP8Linear, with LoRA on all of
    them, against the same model in float64 holding the dequantized weights
    as nn.Linear and the same adapters: logits and every LoRA gradient."""
    model, reference = fp8_llama()
    apply_lora(model, "all-linear", r=4, lora_alpha=8)
    apply_lora(reference, "all-linear", r=4, lora_alpha=8, lora_dtype=torch.float64)
    randomize_adapters(model)
    for name, layer in lora_layers(model).items():
        assert layer.base_format == "fp8"
        twin = reference.get_submodule(name)
        twin.lora_A.weight.data.copy_(layer.lora_A.weight)
        twin.lora_B.weight.data.copy_(layer.lora_B.weight)
    ids = token_ids()
    grad = torch.randn(2, 9, 128, device=DEVICE)
    out, ref = model(ids).logits, reference(ids).logits
    (out * grad).sum().backward()
    (ref * f64(grad)).sum().backward()
    assert_matches_reference(out, ref, torch.float32, name="logits")
    for name, layer in lora_layers(model).items():
        twin = reference.get_submodule(name)
        for ab in "AB":
            ours, theirs = getattr(layer, f"lora_{ab}").weight.grad, getattr(twin, f"lora_{ab}").weight.grad
            assert_matches_reference(ours, theirs, torch.float32, "gradients", name=f"{name}.lora_{ab}")


def test_merge_is_refused_and_unload_gives_back_fp8_linear():
    """merge() on an FP8 base raises, and merge_and_unload raises naming the
    layer before any layer changes; unload puts back FP8Linear modules
    holding the very Parameters, and the layer's state_dict has the
    FP8Linear's keys (a static activation scale too)."""
    module = fp8_linear(40, 64)
    module.activation_scheme, module.activation_scale = "static", nn.Parameter(torch.tensor(0.5))
    model = apply_lora(nn.Sequential(module, nn.ReLU(), fp8_linear(8, 40)), ["0", "2"], r=4)
    assert {k for k in model[0].state_dict() if not k.startswith("lora_")} == set(module.state_dict())
    with pytest.raises(NotImplementedError, match="cannot merge into an fp8 base"):
        model[0].merge()
    with pytest.raises(NotImplementedError, match="layer '0': cannot merge into an fp8 base"):
        merge_and_unload(model)
    assert all(isinstance(model[i], LoRALinear) and not model[i].merged for i in (0, 2))
    weight, scale = model[0].weight, model[0].weight_scale_inv
    model = unload(model)
    assert type(model[0]) is FP8Linear and model[0].weight is weight and model[0].weight_scale_inv is scale
    assert model[0].activation_scheme == "static" and model[0].activation_scale is module.activation_scale


def test_to_peft_and_back():
    """to_peft wraps the FP8Linear bases in PEFT's lora.Linear sharing every
    tensor; from_peft gives LoRALinear layers over the same FP8 Parameters
    computing the logits the model computed before."""
    model, _ = fp8_llama()
    apply_lora(model, "all-linear", r=4, lora_alpha=8)  # every FP8Linear: theirs needs a GPU kernel
    randomize_adapters(model)
    ids = token_ids()
    expected = logits(model, ids)
    weight = model.model.layers[0].mlp.down_proj.weight
    peft_model = to_peft(model)
    base = peft_model.get_base_model().model.layers[0].mlp.down_proj.get_base_layer()
    assert type(base) is FP8Linear and base.weight is weight
    back = from_peft(peft_model)
    layer = back.model.layers[0].mlp.down_proj
    assert isinstance(layer, LoRALinear) and layer.base_format == "fp8" and layer.weight is weight
    assert_same_logits(logits(back, ids), expected, torch.float32)


def test_quantize_base_fp8(backend):
    """quantize_base("fp8") gives each LoRA layer an e4m3 weight with a
    128 x 128 block scale (transformers' names, weight and weight_scale_inv,
    in the state_dict), returns the bytes freed, and the layers compute the
    float64 reference of their dequantized weights; unload gives back
    transformers' FP8Linear, which dequantizes it the same way."""
    model = nn.Sequential(LoRALinear(200, 130, r=4), nn.GELU(), LoRALinear(130, 37, r=2, bias=False))
    for layer in model[0], model[2]:
        nonzero_adapters(layer)
    freed = quantize_base(model, "fp8")
    expected = sum(n * k * 4 - (n * k + -(-n // 128) * -(-k // 128) * 4) for n, k in ((130, 200), (37, 130)))
    assert freed == expected
    for layer in model[0], model[2]:
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale_inv.dtype == torch.float32
        assert {"weight", "weight_scale_inv"} <= set(layer.state_dict())
        check_layer(layer, m=3, dtype=torch.float32)
    decoded = model[0].linear_weight.dequantize(torch.float32)
    module = unload(model)[0]
    assert type(module) is FP8Linear and module.block_size == (128, 128)
    torch.testing.assert_close(dequantize_fp8(module), decoded, rtol=0, atol=0)


def test_refusals_name_the_layer():
    """UE8M0 scales, FP4 (int8-packed) weights and block sizes other than 128
    x 128 are refused by name, from from_linear and (naming the module) from
    apply_lora; a weight cast away from e4m3 (.half()) is caught at forward."""
    ue8m0 = FP8Linear(64, 32, block_size=(128, 128), scale_fmt="ue8m0")
    with pytest.raises(NotImplementedError, match="UE8M0"):
        LoRALinear.from_linear(ue8m0)
    fp4 = FP8Linear(64, 32, block_size=(128, 128))
    fp4.weight = nn.Parameter(torch.zeros(32, 32, dtype=torch.int8), requires_grad=False)
    with pytest.raises(NotImplementedError, match=r"module '1': an FP8Linear with a torch.int8 weight \(FP4"):
        apply_lora(nn.Sequential(fp8_linear(64, 64), fp4), ["0", "1"])
    blocks = FP8Linear(64, 32, block_size=(64, 64))
    with pytest.raises(NotImplementedError, match=r"block_size \[64, 64\] is not supported"):
        LoRALinear.from_linear(blocks)
    layer = LoRALinear.from_linear(fp8_linear(8, 64, bias=False)).half()
    with pytest.raises(TypeError, match="was cast"):
        layer(randn(2, 64, dtype=torch.float16, device=DEVICE))
    assert fused_lora.LoRALinear.from_linear(fp8_linear(8, 64)).base_format == "fp8"
