"""DoRA as a layer: LoRALinear(use_dora=True) against a float64 reference
(y and the gradients of x, A, B and the magnitude m), its init (equal to the
base layer), merge / unmerge, the weight-norm cache and the refusals. The
fused op: test_dora.py; parity with PEFT's use_dora: test_dora_peft.py."""

import copy

import pytest
import torch
from conftest import DEVICE
from helpers import assert_matches_reference, randn
from torch import nn

from fused_lora import LoRALinear, prepare_for_hotswap

CASES = [  # (dtype, adapter dtype, base bias)
    (torch.float32, torch.float32, True),
    (torch.bfloat16, torch.bfloat16, False),
    (torch.bfloat16, torch.float32, True),
]


def dora_layer(k, n, r, dtype, lora_dtype, bias, conv1d=False):
    """A DoRA layer with trained-looking adapters and a magnitude away from ||W + s B A||."""
    base = nn.Linear(k, n, bias=bias, device=DEVICE, dtype=dtype)
    layer = LoRALinear.from_linear(base, r=r, lora_alpha=2 * r, use_dora=True, lora_dtype=lora_dtype)
    with torch.no_grad():
        layer.lora_B.weight.copy_(randn(n, r, scale=r**-0.5, dtype=lora_dtype, device=DEVICE))
        layer.lora_magnitude_vector.weight.mul_(0.5 + torch.rand(n, device=DEVICE))
    return layer


def reference(layer, x):
    """(m / n) (x W^T + s (x A^T) B^T) + b in float64, n = ||W + s B A|| row-wise."""
    w, a, b = layer.linear_weight.detach().double(), layer.lora_A.weight.double(), layer.lora_B.weight.double()
    m, s = layer.lora_magnitude_vector.weight.double(), layer.scaling
    norm = (w + s * b @ a).norm(dim=1).detach()  # a constant of the backward, as in PEFT
    y = (m / norm) * (x @ w.T + s * (x @ a.T) @ b.T)
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize(("dtype", "lora_dtype", "bias"), CASES, ids=["fp32", "bf16", "bf16-fp32A"])
def test_forward_and_gradients_match_float64(dtype, lora_dtype, bias, backend):
    k, n, r = 45, 37, 5  # nothing a multiple of a block size
    layer = dora_layer(k, n, r, dtype, lora_dtype, bias)
    x = randn(3, 7, k, dtype=dtype, device=DEVICE).requires_grad_()
    dy = randn(3, 7, n, dtype=dtype, device=DEVICE)
    twin = copy.deepcopy(layer).double()  # the same values, in float64
    layer(x).backward(dy)
    params = [layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector.weight]
    p64 = [twin.lora_A.weight, twin.lora_B.weight, twin.lora_magnitude_vector.weight]
    x64 = x.detach().double().requires_grad_()
    ref = reference(twin, x64)
    ref.backward(dy.double())
    assert_matches_reference(layer(x), ref, dtype, name="y")
    assert_matches_reference(x.grad, x64.grad, dtype, "gradients", name="dx")
    # dm = sum_i dY * z reads z (x W^T + s (x A^T) B^T) kept in x's dtype: x's gate, whatever m's dtype.
    for name, p, p_ref, gate in zip(["dA", "dB", "dm"], params, p64, [lora_dtype, lora_dtype, dtype], strict=True):
        assert_matches_reference(p.grad, p_ref.grad, gate, "gradients", name=name)
    assert layer.weight.grad is None  # the base stays frozen


def test_starts_equal_to_the_base_layer_and_names_the_magnitude_as_peft():
    base = nn.Linear(40, 24, device=DEVICE)
    layer = LoRALinear.from_linear(copy.deepcopy(base), r=4, use_dora=True)
    assert "lora_magnitude_vector.weight" in dict(layer.named_parameters())
    torch.testing.assert_close(layer.lora_magnitude_vector.weight, base.weight.norm(dim=1))
    x = randn(6, 40, device=DEVICE)
    torch.testing.assert_close(layer(x), base(x))
    assert "use_dora=True" in repr(layer) and layer.use_dora
    assert not LoRALinear(40, 24).use_dora


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_folds_the_magnitude_and_unmerge_restores_exactly(dtype):
    layer = dora_layer(45, 37, 5, dtype, dtype, True)
    weight, x = layer.weight.detach().clone(), randn(9, 45, dtype=dtype, device=DEVICE)
    expected = reference(layer, x.double())
    layer.merge()
    assert layer.merged
    assert_matches_reference(layer(x), expected, dtype, name="merged y")
    layer.unmerge()
    assert torch.equal(layer.weight, weight)
    assert_matches_reference(layer(x), expected, dtype, name="unmerged y")


def test_weight_norm_cache_follows_the_weight():
    layer = dora_layer(30, 20, 4, torch.float32, torch.float32, True)
    first = layer.weight_norm_sq()
    assert layer.weight_norm_sq() is first  # cached while W is unchanged
    with torch.no_grad():
        layer.weight.mul_(2)
    torch.testing.assert_close(layer.weight_norm_sq(), 4 * first)


def test_norm_is_cached_until_an_adapter_changes():
    layer = dora_layer(30, 20, 4, torch.float32, torch.float32, True)
    first = layer.weight_norm()
    assert layer.weight_norm() is first  # W, A, B and the scaling unchanged: n is reused
    with torch.no_grad():
        layer.lora_B.weight.mul_(3)  # what an optimizer step does, in place
    second = layer.weight_norm()
    assert second is not first and not torch.equal(second, first)
    layer.scaling = 2 * layer.scaling
    assert layer.weight_norm() is not second
    x = randn(5, 30, device=DEVICE)
    assert_matches_reference(layer(x), reference(layer, x.double()), torch.float32)


def test_refusals():
    with pytest.raises(ValueError, match="lora_bias"):
        LoRALinear(16, 8, use_dora=True, lora_bias=True)
    with pytest.raises(TypeError, match="use_dora"):
        LoRALinear(16, 8, use_dora="yes")
    layer = LoRALinear(16, 8, use_dora=True)
    with pytest.raises(NotImplementedError, match="DoRA"):
        layer.pad_rank(16)
    model = nn.Sequential(layer)
    with pytest.raises(NotImplementedError, match="DoRA"):
        prepare_for_hotswap(model, max_rank=16)
