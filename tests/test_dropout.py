"""Dropout on the LoRA branch: forward and gradients against the float64
reference given the mask `dropout_mask` regenerates; the mask's statistics;
seeds; training vs eval mode of the layer."""

import pytest
import torch
from conftest import DEVICE
from helpers import assert_matches_reference, lora_inputs
from test_forward import DTYPE_PAIRS, PAIR_IDS

import fused_lora
from fused_lora import LoRALinear, dropout_mask
from fused_lora.kernels import configs
from fused_lora.kernels.common import INTERPRETED


def reference_with_mask(x, weight, bias, lora_a, lora_b, scaling, mask, p):
    """x W^T + b + s (d A^T) B^T with d = mask * x / (1 - p), in float64."""
    d = x * mask.to(x.dtype) / (1 - p)
    return torch.nn.functional.linear(x, weight, bias) + scaling * (d @ lora_a.t()) @ lora_b.t()


def check_dropout_layer(inputs, dtype, adapter_dtype, p, seed=1234, x_view=None):
    leaves = {n: None if t is None else t.clone().requires_grad_(n != "bias") for n, t in inputs.items()}
    ref = {n: None if t is None else t.detach().double().cpu().requires_grad_(n != "bias") for n, t in inputs.items()}
    view = x_view or (lambda t: t)
    x = view(leaves["x"])
    y = fused_lora.lora_linear(x, *(leaves[n] for n in ("weight", "bias", "lora_a", "lora_b")), 0.5,
                               dropout_p=p, seed=seed)  # fmt: skip
    mask = dropout_mask(x.shape, p, seed, device=DEVICE).cpu()
    ref_y = reference_with_mask(view(ref["x"]), ref["weight"], ref["bias"], ref["lora_a"], ref["lora_b"], 0.5, mask, p)
    assert_matches_reference(y, ref_y, dtype, name="y")
    dy = torch.randn(y.shape, dtype=torch.float64).to(DEVICE, dtype)
    y.backward(dy)
    ref_y.backward(dy.double().cpu())
    for name in ("x", "weight", "lora_a", "lora_b"):
        grad_dtype = adapter_dtype if name.startswith("lora") else dtype
        assert_matches_reference(leaves[name].grad, ref[name].grad, grad_dtype, "gradients", name=f"d{name}")
    return mask


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
def test_dropout_matches_reference_with_the_same_mask(backend, dtype, adapter_dtype):
    """The forward, dX (masked G A) and dA (masked x) all use the mask that
    dropout_mask regenerates: a mask differing anywhere fails one of them."""
    inputs = lora_inputs(33, 100, 48, 5, dtype, adapter_dtype, device=DEVICE)
    mask = check_dropout_layer(inputs, dtype, adapter_dtype, p=0.3)
    assert 0 < mask.float().mean() < 1


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter configs only exist without a GPU")
def test_dropout_multi_tile():
    with fused_lora.set_backend("triton"), configs.use_interpreter_config("small"):
        inputs = lora_inputs(40, 37, 33, 3, torch.float32, device=DEVICE)
        check_dropout_layer(inputs, torch.float32, torch.float32, p=0.5)


def test_mask_follows_the_logical_index(backend):
    """A transposed view of x gets the mask of its logical (row, col) order."""
    inputs = lora_inputs(1, 24, 16, 2, torch.float32, device=DEVICE)
    inputs["x"] = torch.randn(5, 3, 24, device=DEVICE)
    check_dropout_layer(inputs, torch.float32, torch.float32, p=0.4, x_view=lambda t: t.transpose(0, 1))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction(backend, p):
    mask = dropout_mask((400, 300), p, 7, device=DEVICE)
    assert mask.dtype == torch.bool and mask.shape == (400, 300)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.01
    # neither rows nor columns repeat: a mask keyed on the wrong index would
    assert len({tuple(row.tolist()) for row in mask[:50]}) == 50
    assert len({tuple(col.tolist()) for col in mask.t()[:50]}) == 50


def test_seeds(backend):
    assert torch.equal(dropout_mask((64, 64), 0.5, 3, DEVICE), dropout_mask((64, 64), 0.5, 3, DEVICE))
    assert not torch.equal(dropout_mask((64, 64), 0.5, 3, DEVICE), dropout_mask((64, 64), 0.5, 4, DEVICE))
    inputs = lora_inputs(16, 32, 24, 4, torch.float32, device=DEVICE)
    torch.manual_seed(0)
    first = fused_lora.lora_linear(*inputs.values(), 1.0, dropout_p=0.5)
    second = fused_lora.lora_linear(*inputs.values(), 1.0, dropout_p=0.5)
    torch.manual_seed(0)
    again = fused_lora.lora_linear(*inputs.values(), 1.0, dropout_p=0.5)
    assert not torch.equal(first, second), "each call draws a new seed"
    assert torch.equal(first, again), "seeds come from torch's generator"


def test_layer_drops_in_training_only(backend):
    layer = LoRALinear(32, 24, r=4, lora_dropout=0.5, init_lora_weights=False, device=DEVICE)
    x = torch.randn(16, 32, device=DEVICE)
    plain = fused_lora.lora_linear(x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    layer.eval()
    torch.testing.assert_close(layer(x), plain, rtol=0, atol=0)
    layer.train()
    assert not torch.allclose(layer(x), plain)


@pytest.mark.parametrize("p", [-0.1, 1.0, True, "0.1"])
def test_bad_dropout(p):
    inputs = lora_inputs(2, 8, 4, 2, torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="dropout_p must be a float in"):
        fused_lora.lora_linear(*inputs.values(), 1.0, dropout_p=p)
    with pytest.raises(ValueError, match="dropout_p must be a float in"):
        LoRALinear(8, 4, lora_dropout=p)


def test_bad_seed():
    inputs = lora_inputs(2, 8, 4, 2, torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="seed must be None or an int"):
        fused_lora.lora_linear(*inputs.values(), 1.0, dropout_p=0.1, seed=-1)
