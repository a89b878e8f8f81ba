"""DoRA over quantized bases: LoRALinear(use_dora=True) over a bitsandbytes
NF4 Linear4bit, a transformers FP8Linear and quantize_base's formats, against
float64 computed from the dequantized weight (y and the gradients of x, A, B
and the magnitude) on both backends; PEFT's DoRA over a 4-bit base through
from_peft (outputs and gradients equal to PEFT's); merging into NF4 (lossy,
warns) and unmerging exactly."""

import copy
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes", reason="the QLoRA tests need bitsandbytes: pip install -e '.[test]'")
peft = pytest.importorskip("peft", reason="the QLoRA tests need peft: pip install -e '.[test]'")
pytest.importorskip("transformers", reason="the QLoRA tests need transformers: pip install -e '.[test]'")

from conftest import DEVICE  # noqa: E402
from helpers import assert_matches_reference, f64, randn  # noqa: E402
from quantized_models import fp8_linear, linear4bit  # noqa: E402

from fused_lora import LoRALinear, from_peft, quantize_base  # noqa: E402


def dora_over(base):
    """A DoRA layer (r = 4) over `base`, with random A, B and a magnitude away from ||W + s B A||."""
    layer = LoRALinear.from_linear(base, r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_magnitude_vector.weight.mul_(0.5 + torch.rand(layer.out_features, device=DEVICE))
    return layer


def bases():
    dense = LoRALinear(100, 33, device=DEVICE, dtype=torch.bfloat16)
    quantized = {"nf4-quantize_base": dense, "fp8-quantize_base": copy.deepcopy(dense)}
    quantize_base(quantized["nf4-quantize_base"], "nf4")
    quantize_base(quantized["fp8-quantize_base"], "fp8")
    return {
        "linear4bit": lambda: dora_over(linear4bit(33, 100)),
        "fp8linear": lambda: dora_over(fp8_linear(33, 200)),
        "nf4-quantize_base": lambda: dora_over(_linear_of(quantized["nf4-quantize_base"])),
    }


def _linear_of(layer):
    """The quantized base of a LoRALinear as the module it came from (Linear4bit)."""
    from fused_lora.integrations.model import base_linear

    return base_linear(layer)


@pytest.mark.parametrize("case", ["linear4bit", "fp8linear", "nf4-quantize_base"])
def test_matches_float64_on_the_dequantized_weight(case, backend):
    layer = bases()[case]()
    weight = f64(layer.linear_weight.dequantize(torch.float32))
    x = randn(7, layer.in_features, dtype=torch.bfloat16, device=DEVICE).requires_grad_()
    dy = randn(7, layer.out_features, dtype=torch.bfloat16, device=DEVICE)
    y = layer(x)
    y.backward(dy)
    params = (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector.weight)
    ref_x, ref_a, ref_b, ref_m = (f64(t).requires_grad_() for t in (x, *params))
    norm = (weight + layer.scaling * ref_b @ ref_a).norm(dim=1).detach()
    ref = (ref_m / norm) * (ref_x @ weight.t() + layer.scaling * (ref_x @ ref_a.t()) @ ref_b.t())
    if layer.bias is not None:
        ref = ref + f64(layer.bias)
    ref.backward(f64(dy))
    assert_matches_reference(y, ref, torch.bfloat16, name="y")
    assert_matches_reference(x.grad, ref_x.grad, torch.bfloat16, "gradients", name="dx")
    # fp32 adapters (QLoRA's default); dm reads z in x's dtype (bf16): x's gate for it.
    for name, p, r, gate in zip(
        ["dA", "dB", "dm"], params, (ref_a, ref_b, ref_m), [torch.float32, torch.float32, torch.bfloat16], strict=True
    ):
        assert_matches_reference(p.grad, r.grad, gate, "gradients", name=name)


def test_starts_equal_to_its_base():
    base = linear4bit(33, 128)
    expected_x = randn(5, 128, dtype=torch.bfloat16, device=DEVICE)
    expected = base(expected_x)
    layer = LoRALinear.from_linear(base, r=4, use_dora=True)
    assert layer.lora_magnitude_vector.weight.dtype == torch.float32  # QLoRA's adapters: fp32
    assert_matches_reference(layer(expected_x), f64(expected), torch.bfloat16)


def test_merge_into_nf4_warns_and_unmerge_is_exact():
    layer = dora_over(linear4bit(33, 128))
    packed = layer.weight.detach().clone()
    x = randn(5, 128, dtype=torch.bfloat16, device=DEVICE)
    before = layer(x)
    w = f64(layer.linear_weight.dequantize(torch.float32))
    a, b, m = (f64(t) for t in (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector.weight))
    merged = w + layer.scaling * b @ a
    expected = (m / merged.norm(dim=1))[:, None] * merged  # W' = (m / n) (W + s B A), as PEFT merges DoRA
    with pytest.warns(UserWarning, match="quantizes the merged weight again"):
        layer.merge()
    # W' is quantized again: within half of NF4's largest step (0.28 of a block's absmax) of W'.
    error = (f64(layer.linear_weight.dequantize(torch.float32)) - expected).abs().max()
    assert error <= 0.15 * expected.abs().max(), error
    layer.unmerge()
    assert torch.equal(layer.weight, packed)
    assert torch.equal(layer(x), before)


def test_peft_dora_over_a_4bit_base_converts():
    """PEFT's DoRA on a Linear4bit (lora.Linear4bit with use_dora) and from_peft's layer over the
    same Params4bit: the same outputs and gradients of A, B and the magnitude (fp32)."""
    model = nn.Sequential(linear4bit(33, 128, dtype=torch.float32))
    model.is_loaded_in_4bit = True  # what makes PEFT wrap a Linear4bit in its lora.Linear4bit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(
            model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True, init_lora_weights=False)
        )
    module = peft_model.get_base_model()[0]
    with torch.no_grad():
        module.lora_magnitude_vector["default"].weight.mul_(0.5 + torch.rand(33, device=DEVICE))
    x = randn(6, 128, device=DEVICE)
    theirs = module(x)
    theirs.sum().backward()
    their_grads = [t.grad.clone() for t in (module.lora_A["default"].weight, module.lora_B["default"].weight)]
    their_grads.append(module.lora_magnitude_vector["default"].weight.grad.clone())
    for p in peft_model.parameters():
        p.grad = None
    layer = from_peft(peft_model)[0]
    assert layer.use_dora and layer.base_format == "nf4"
    ours = layer(x)
    ours.sum().backward()
    assert_matches_reference(ours, f64(theirs), torch.float32, name="y")
    mine = (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector.weight)
    for name, p, g in zip(["dA", "dB", "dm"], mine, their_grads, strict=True):
        assert_matches_reference(p.grad, f64(g), torch.float32, "gradients", name=name)
