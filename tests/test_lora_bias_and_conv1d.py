"""LoRALinear with PEFT's lora_bias (a bias b_B on lora_B: y gains scaling * b_B)
and over transformers' Conv1D (GPT-2: W stored (in, out), fan_in_fan_out):
outputs and gradients against float64 references on both backends and every
dtype pair, merge / unmerge, torch.compile, and the refusals
(MultiLoRALinear has neither). Whole models against PEFT: test_peft_parity.py."""

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import DTYPE_PAIRS, PAIR_IDS, assert_matches_reference, f64, randn, tolerance
from torch import nn

import fused_lora
from fused_lora import LoRALinear, MultiLoRALinear

requires_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="Conv1D is transformers': pip install -e '.[test]'"
)


def conv1d(in_features, out_features, dtype=torch.float32):
    """GPT-2's layer: y = x W + b with W (in, out), random (not its 0.02-std init)."""
    from transformers.pytorch_utils import Conv1D

    module = Conv1D(out_features, in_features).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(randn(in_features, out_features, scale=in_features**-0.5, dtype=dtype))
        module.bias.copy_(randn(out_features, dtype=dtype))
    return module


def make_layer(base, bias, lora_bias, in_features, out_features, dtype, lora_dtype=None, r=3):
    """A LoRALinear with random A, B (never B = 0) and b_B, over an nn.Linear or a Conv1D."""
    if base == "conv1d":
        module = conv1d(in_features, out_features, dtype)
    else:
        module = nn.Linear(in_features, out_features, bias, device=DEVICE, dtype=dtype)
    layer = LoRALinear.from_linear(module, r=r, lora_alpha=5, lora_bias=lora_bias, lora_dtype=lora_dtype)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("lora_"):
                p.copy_(randn(*p.shape, scale=p.shape[-1] ** -0.5 if p.dim() == 2 else 1.0, dtype=p.dtype))
    return module, layer


def reference(layer, x64):
    """y = x W^T + b + s ((x A^T) B^T + b_B) in float64 on the CPU (x64: x in float64 on the CPU),
    W (out, in) read from the module the layer wraps as that module reads it; differentiable in
    x64, A, B and b_B, whose float64 leaves it returns."""
    lora_a, lora_b = (f64(p).requires_grad_() for p in (layer.lora_A.weight, layer.lora_B.weight))
    lora_bias = f64(layer.lora_B.bias).requires_grad_() if layer.lora_bias else None
    weight = f64(layer.weight).t() if layer.fan_in_fan_out else f64(layer.weight)
    update = F.linear(F.linear(x64, lora_a), lora_b, lora_bias)
    return F.linear(x64, weight, f64(layer.bias)) + layer.scaling * update, (lora_a, lora_b, lora_bias)


CASES = [
    pytest.param("linear", True, True, id="linear-lora_bias"),
    pytest.param("linear", False, True, id="linear-no-base-bias-lora_bias"),
    pytest.param("conv1d", True, False, id="conv1d", marks=requires_transformers),
    pytest.param("conv1d", True, True, id="conv1d-lora_bias", marks=requires_transformers),
]


@pytest.mark.parametrize(("base", "bias", "lora_bias"), CASES)
@pytest.mark.parametrize(("dtype", "lora_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
def test_outputs_and_gradients_match_reference(backend, base, bias, lora_bias, dtype, lora_dtype):
    """Odd shapes (K=37, N=29, r=3, 2 x 5 rows); dX, dA, dB and d b_B (= s * sum of dY's rows)."""
    _, layer = make_layer(base, bias, lora_bias, 37, 29, dtype, lora_dtype)
    x = randn(2, 5, 37, dtype=dtype, device=DEVICE).requires_grad_()
    grad = randn(2, 5, 29, dtype=dtype, device=DEVICE)
    out = layer(x)
    out.backward(grad)
    ref_x = f64(x).requires_grad_()
    ref, (ref_a, ref_b, ref_bias) = reference(layer, ref_x)
    ref.backward(f64(grad))
    assert out.dtype == dtype
    assert_matches_reference(out, ref, dtype)
    assert_matches_reference(x.grad, ref_x.grad, dtype, "gradients", name="dX")
    assert_matches_reference(layer.lora_A.weight.grad, ref_a.grad, dtype, "gradients", name="dA")
    assert_matches_reference(layer.lora_B.weight.grad, ref_b.grad, dtype, "gradients", name="dB")
    if lora_bias:
        assert_matches_reference(layer.lora_B.bias.grad, ref_bias.grad, dtype, "gradients", name="d lora_B.bias")
        assert layer.lora_B.bias.grad.dtype == layer.lora_B.weight.dtype
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None), "the base stays frozen"


def test_lora_bias_parameters_named_and_initialised_like_peft():
    layer = LoRALinear(20, 12, r=4, lora_bias=True, device=DEVICE)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {
        "weight": (12, 20),
        "bias": (12,),
        "lora_A.weight": (4, 20),
        "lora_B.weight": (12, 4),
        "lora_B.bias": (12,),
    }
    assert {name for name, p in layer.named_parameters() if p.requires_grad} == {n for n in shapes if "lora_" in n}
    assert layer.lora_bias and not layer.lora_B.bias.any(), "b_B starts at zero, like B"
    assert LoRALinear(20, 12, r=4, lora_bias=True, init_lora_weights=False).lora_B.bias.abs().min() > 0
    assert not LoRALinear(20, 12).lora_bias and "lora_bias" not in repr(LoRALinear(20, 12))
    assert "lora_bias=True" in repr(layer)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(lora_bias=1), TypeError, "lora_bias must be a bool"),
        (dict(lora_bias=True, init_lora_weights="gaussian"), ValueError, "lora_bias=True needs init_lora_weights"),
        (dict(lora_bias=True, init_lora_weights="pissa"), ValueError, "lora_bias=True needs init_lora_weights"),
    ],
)
def test_bad_lora_bias(kwargs, error, message):
    with pytest.raises(error, match=message):
        LoRALinear(16, 8, r=2, **kwargs)


@pytest.mark.parametrize(("base", "bias", "lora_bias"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_and_unmerge(base, bias, lora_bias, dtype):
    """W (in `weight`'s own layout) and b gain the update, each computed in fp32 and rounded once;
    unmerge restores both bit for bit. A lora_bias over a base without a bias cannot merge (PEFT
    refuses too)."""
    module, layer = make_layer(base, bias, lora_bias, 24, 16, dtype)
    weight, base_bias = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    x = randn(3, 24, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        unmerged = layer(x)
    if base_bias is None:
        with pytest.raises(RuntimeError, match=r"lora_bias=True .* the base layer has no bias"):
            layer.merge()
        assert not layer.merged and torch.equal(layer.weight, weight)
        return
    delta = layer.get_delta_weight()
    assert delta.shape == weight.shape == ((24, 16) if base == "conv1d" else (16, 24))
    layer.merge()
    assert torch.equal(module.weight, (weight.float() + delta).to(dtype)), "merged into the module's own weight"
    shift = layer.scaling * layer.lora_B.bias.float() if lora_bias else 0
    assert torch.equal(module.bias, (base_bias.float() + shift).to(dtype))
    with torch.no_grad():
        merged = layer(x)
    tol = tolerance(dtype) * 2  # two roundings of W' and y apart
    torch.testing.assert_close(merged, unmerged, rtol=tol, atol=tol * unmerged.abs().max().item())
    layer.unmerge()
    assert torch.equal(module.weight, weight) and torch.equal(module.bias, base_bias), "restored bit for bit"


@requires_transformers
def test_conv1d_is_wrapped_without_a_copy():
    module = conv1d(20, 12)
    layer = LoRALinear.from_linear(module, r=2)
    assert layer.weight is module.weight and layer.bias is module.bias
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (20, 12)
    assert tuple(layer.weight.shape) == (20, 12) and layer.linear_weight.data_ptr() == module.weight.data_ptr()
    assert not module.weight.requires_grad and "fan_in_fan_out=True" in repr(layer)
    x = randn(4, 20, device=DEVICE)
    lora = (layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    with torch.no_grad():
        assert torch.equal(layer(x), fused_lora.lora_linear(x, module.weight.t(), module.bias, *lora))
        torch.testing.assert_close(layer(x), module(x))  # B = 0 at init: the Conv1D's output
    assert not LoRALinear.from_linear(nn.Linear(20, 12), r=2).fan_in_fan_out


@requires_transformers
def test_pissa_on_a_conv1d_rewrites_the_stored_weight():
    """PiSSA's residual lands in the Conv1D's (in, out) weight; the function is kept."""
    module = conv1d(20, 12)
    x = randn(4, 20, device=DEVICE)
    with torch.no_grad():
        before = module(x)
    layer = LoRALinear.from_linear(module, r=3, init_lora_weights="pissa")
    with torch.no_grad():
        assert_matches_reference(layer(x), f64(before), torch.float32)
    assert torch.linalg.matrix_rank(layer.get_delta_weight()) == 3


def test_multi_lora_linear_refuses_lora_bias_and_conv1d():
    layer = MultiLoRALinear(16, 8)
    with pytest.raises(NotImplementedError, match="adapter 'b': lora_B has a bias"):
        layer.attach_adapter("b", nn.Linear(16, 2, bias=False), nn.Linear(2, 8), lora_alpha=2)
    assert layer.adapter_names == []
    if importlib.util.find_spec("transformers") is not None:
        with pytest.raises(TypeError, match=r"linear must be an nn\.Linear, got Conv1D"):
            MultiLoRALinear.from_linear(conv1d(16, 8))
    with pytest.raises(TypeError, match=r"linear must be an nn\.Linear or a transformers Conv1D, got Embedding"):
        LoRALinear.from_linear(nn.Embedding(4, 8))


@pytest.mark.parametrize(("base", "bias", "lora_bias"), [CASES[1], CASES[3]])
def test_compiled_training_matches_eager_and_reads_the_scaling_as_data(backend, base, bias, lora_bias):
    """fullgraph torch.compile: the effective bias is a graph node on the scaling buffer, so a new
    scaling (which scales b_B too) needs no recompile."""
    torch._dynamo.reset()
    _, layer = make_layer(base, bias, lora_bias, 24, 16, torch.float32)
    compiled_layer = copy.deepcopy(layer)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    x, grad = randn(2, 3, 24, device=DEVICE), randn(2, 3, 16, device=DEVICE)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x).backward(grad)
        layer(x).backward(grad)
        for (name, got), want in zip(compiled_layer.named_parameters(), layer.parameters(), strict=True):
            if want.requires_grad:
                assert_matches_reference(got.grad, f64(want.grad), torch.float32, "gradients", name=name)
        compiled_layer.scaling = layer.scaling = 0.25
        out = compiled(x).detach()  # with grad enabled, as traced: grad mode is part of the guards
        assert_matches_reference(out, f64(layer(x)), torch.float32)
        assert_matches_reference(out, reference(layer, f64(x))[0], torch.float32)
    torch._dynamo.reset()
