"""LoRALinear: a drop-in nn.Linear with PEFT's parameters, training, merge."""

import pytest
import torch
from conftest import DEVICE
from helpers import TOLERANCES, assert_matches_reference
from torch import nn

from fused_lora import LoRALinear, lora_scaling
from fused_lora.reference import lora_linear_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_parameters_named_and_shaped_like_peft():
    layer = LoRALinear(20, 12, r=4, lora_alpha=8, device=DEVICE)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"weight": (12, 20), "bias": (12,), "lora_A.weight": (4, 20), "lora_B.weight": (12, 4)}
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}
    assert layer.scaling == 2.0
    assert not layer.lora_B.weight.any(), "B starts at zero"
    assert layer.lora_A.weight.abs().sum() > 0


def test_positional_arguments_are_nn_linears():
    layer = LoRALinear(20, 12, False, DEVICE, torch.float16, r=2)
    assert layer.bias is None
    assert layer.weight.dtype == torch.float16 and layer.weight.device.type == DEVICE
    with pytest.raises(TypeError):
        LoRALinear(20, 12, True, None, None, 4)  # r is keyword-only


def test_rslora_and_gaussian_init():
    layer = LoRALinear(64, 32, r=16, lora_alpha=8, use_rslora=True, init_lora_weights="gaussian")
    assert layer.scaling == pytest.approx(8 / 4) == lora_scaling(16, 8, use_rslora=True)
    assert layer.lora_A.weight.std().item() == pytest.approx(1 / 16, rel=0.2)
    assert not layer.lora_B.weight.any()


@pytest.mark.parametrize("r", [0, -1, 2.0])
def test_rank_must_be_positive_integer(r):
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoRALinear(8, 8, r=r)


def test_unknown_init_is_rejected():
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoRALinear(8, 8, init_lora_weights="olora")


def test_from_linear_shares_weights_and_starts_equal():
    linear = nn.Linear(48, 33, device=DEVICE)
    x = torch.randn(5, 7, 48, device=DEVICE)
    expected = linear(x)
    layer = LoRALinear.from_linear(linear, r=4, lora_alpha=16)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not linear.weight.requires_grad
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match=r"linear must be an nn\.Linear"):
        LoRALinear.from_linear(nn.Conv1d(3, 3, 1))


def test_fp32_adapters_on_bf16_layer_match_reference(backend):
    linear = nn.Linear(40, 24, device=DEVICE, dtype=torch.bfloat16)
    layer = LoRALinear.from_linear(linear, r=3, lora_alpha=6, lora_dtype=torch.float32)
    nn.init.normal_(layer.lora_B.weight)
    assert layer.lora_A.weight.dtype == torch.float32
    x = torch.randn(9, 40, device=DEVICE, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = lora_linear_reference(x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight, 2.0)
    assert_matches_reference(y, ref, torch.bfloat16)


def test_training_changes_only_a_and_b(backend):
    layer = LoRALinear(32, 16, r=4, lora_alpha=4, device=DEVICE)
    frozen = {name: p.detach().clone() for name, p in layer.named_parameters()}
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x, target = torch.randn(64, 32, device=DEVICE), torch.randn(64, 16, device=DEVICE)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(layer(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in layer.named_parameters():
        changed = not torch.equal(p, frozen[name])
        assert changed == name.startswith("lora_"), name
        assert (p.grad is not None) == name.startswith("lora_"), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_then_forward_equals_unmerged(backend, dtype):
    layer = LoRALinear(48, 40, r=8, lora_alpha=16, device=DEVICE, dtype=dtype, init_lora_weights=False)
    x = torch.randn(2, 11, 48, device=DEVICE, dtype=dtype)
    original = layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged and not torch.equal(layer.weight, original)
        merged = layer(x)
        layer.merge()  # a second merge must not add the update twice
        merged_again = layer(x)
    tol = TOLERANCES[dtype][0] * 2  # two roundings of W' and y apart
    scale = unmerged.abs().max()
    torch.testing.assert_close(merged, unmerged, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(merged_again, merged, rtol=0, atol=0)
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.weight, original), "unmerge must restore W bit for bit"


def test_merge_changes_the_shared_weight_in_place():
    linear = nn.Linear(16, 8)
    layer = LoRALinear.from_linear(linear, r=2, init_lora_weights=False)
    before = linear.weight.detach().clone()
    layer.merge()
    expected = (before.double() + layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()).float()
    torch.testing.assert_close(linear.weight.detach(), expected)
    layer.unmerge()
    assert torch.equal(linear.weight, before)


def test_unmerge_without_merge_is_a_no_op():
    layer = LoRALinear(8, 8)
    before = layer.weight.detach().clone()
    layer.unmerge()
    assert torch.equal(layer.weight, before)


def test_extra_repr():
    text = repr(LoRALinear(8, 4, r=2, lora_alpha=4))
    assert "in_features=8, out_features=4, bias=True, r=2, lora_alpha=4, scaling=2, merged=False" in text
