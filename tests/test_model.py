"""apply_lora, count_parameters, merge_and_unload, unload: LoRA on a whole model."""

import copy

import pytest
import torch
from conftest import DEVICE
from helpers import assert_matches_reference
from torch import nn

from fused_lora import LoRALinear, apply_lora, count_parameters, merge_and_unload, unload
from fused_lora.model import lora_layers, set_submodule


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.proj(torch.relu(self.q_proj(x) + self.v_proj(x))))


class Net(nn.Module):
    """Names as in a transformer: layers.0.q_proj, ..., and an output layer lm_head."""

    def __init__(self, d=24, n_out=10):
        super().__init__()
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.lm_head = nn.Linear(d, n_out)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def net(dtype=torch.float32):
    return Net().to(device=DEVICE, dtype=dtype)


def randomize_adapters(model):
    """A trained-looking adapter: B is random, not the zero of a fresh layer."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(std=layer.r**-0.5)


@pytest.mark.parametrize(
    "targets, expected",
    [
        (["q_proj"], {"layers.0.q_proj", "layers.1.q_proj"}),
        (["proj"], {"layers.0.proj", "layers.1.proj"}),  # a suffix on a "." boundary only: not q_proj
        (["layers.1.v_proj", "lm_head"], {"layers.1.v_proj", "lm_head"}),
        (r"layers\.0\..*_proj", {"layers.0.q_proj", "layers.0.v_proj"}),  # regex, fullmatch
        (r".*q_proj", {"layers.0.q_proj", "layers.1.q_proj"}),
        ("all-linear", {f"layers.{i}.{n}" for i in range(2) for n in ("q_proj", "v_proj", "proj")}),
    ],
)
def test_target_modules_select_as_in_peft(targets, expected):
    model = net()
    originals = dict(model.named_modules())
    assert apply_lora(model, targets, r=2) is model
    layers = lora_layers(model)
    assert set(layers) == expected
    for name, layer in layers.items():
        assert layer.weight is originals[name].weight, "the base weight is shared, not copied"
        assert layer.bias is originals[name].bias


def test_regex_must_match_the_whole_name():
    with pytest.raises(ValueError, match="matched no module"):
        apply_lora(net(), "q_proj")  # re.fullmatch: "layers.0.q_proj" is not "q_proj"


def test_only_adapters_train_and_count_parameters():
    model = net()
    total_before = sum(p.numel() for p in model.parameters())
    apply_lora(model, ["q_proj", "lm_head"], r=3)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"{name}.lora_{ab}.weight" for name in ("layers.0.q_proj", "layers.1.q_proj", "lm_head") for ab in "AB"
    }
    d, n_out, r = 24, 10, 3
    n_lora = 2 * (r * d + d * r) + (r * d + n_out * r)
    assert count_parameters(model) == (n_lora, total_before + n_lora)


def test_rank_and_alpha_patterns():
    model = apply_lora(
        net(),
        "all-linear",
        r=4,
        lora_alpha=8,
        rank_pattern={r"layers\.1\.proj": 2, "v_proj": 6},
        alpha_pattern={"q_proj": 1},
        use_rslora=True,
    )
    layers = lora_layers(model)
    assert layers["layers.1.proj"].r == 2 and layers["layers.0.proj"].r == 4
    assert layers["layers.0.v_proj"].r == layers["layers.1.v_proj"].r == 6
    assert layers["layers.0.q_proj"].scaling == pytest.approx(1 / 2)  # rsLoRA: alpha / sqrt(r)
    assert layers["layers.1.proj"].scaling == pytest.approx(8 / 2**0.5)


class Float64LoRA(nn.Module):
    """x W^T + b + s (x A^T) B^T in plain torch: a LoRALinear's reference."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        layer = self.layer
        lora = x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
        return nn.functional.linear(x, layer.weight, layer.bias) + layer.scaling * lora


def float64_reference(model):
    """A float64 CPU copy of the model whose LoRA layers compute in plain torch."""
    reference = copy.deepcopy(model).cpu()
    for name, layer in lora_layers(reference).items():
        set_submodule(reference, name, Float64LoRA(layer))
    return reference.double()


def test_forward_and_gradients_against_a_float64_reference(backend):
    """A whole network in fp32: fp16 / bf16 rounding would compound through the layers,
    so lower precisions are checked layer by layer (test_layer.py, test_peft_interop.py)."""
    dtype = torch.float32
    model = apply_lora(net(dtype), ["q_proj", "v_proj", "lm_head"], r=4, lora_alpha=8)
    randomize_adapters(model)
    reference = float64_reference(model)
    x = torch.randn(3, 5, 24, device=DEVICE, dtype=dtype)
    grad = torch.randn(3, 5, 10, dtype=torch.float64)

    out = model(x)
    (out.double().cpu() * grad).sum().backward()
    ref = reference(x.double().cpu())
    (ref * grad).sum().backward()

    assert out.dtype == dtype
    assert_matches_reference(out, ref, dtype, name="logits")
    for name, layer in lora_layers(model).items():
        ref_layer = reference.get_submodule(name).layer
        for ab in ("lora_A", "lora_B"):
            got, want = getattr(layer, ab).weight.grad, getattr(ref_layer, ab).weight.grad
            assert_matches_reference(got, want, dtype, "gradients", name=f"{name}.{ab} grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_unload_gives_plain_linears_with_the_same_outputs(dtype):
    model = apply_lora(net(dtype), "all-linear", r=4, lora_alpha=16)
    randomize_adapters(model)
    expected = {
        name: (layer.weight.float() + layer.get_delta_weight()).to(dtype) for name, layer in lora_layers(model).items()
    }
    x = torch.randn(7, 24, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        before = model(x)
        assert merge_and_unload(model) is model
        after = model(x)
    assert not lora_layers(model)
    assert all(type(model.get_submodule(name)) is nn.Linear for name in expected)
    for name, weight in expected.items():  # W + s B A in fp32, rounded once
        assert torch.equal(model.get_submodule(name).weight, weight), f"{name}: merged weight"
    if dtype == torch.float32:  # in bf16 the per-layer rounding compounds through the network
        assert_matches_reference(after, before.double(), dtype, name="merged output")


def test_unload_restores_the_base_model_exactly():
    model = net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 24, device=DEVICE)
    with torch.no_grad():
        base_out = model(x)
        apply_lora(model, ["q_proj", "proj"], r=2)
        randomize_adapters(model)
        next(iter(lora_layers(model).values())).merge()  # unload unmerges first
        assert not torch.equal(model(x), base_out)
        unload(model)
        assert torch.equal(model(x), base_out)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_keeps_the_output_and_leaves_the_residual_in_the_weight(init):
    model = net()
    originals = {name: model.get_submodule(name).weight.detach().clone() for name in ("layers.0.q_proj", "lm_head")}
    x = torch.randn(6, 24, device=DEVICE)
    with torch.no_grad():
        before = model(x)
        apply_lora(model, ["layers.0.q_proj", "lm_head"], r=4, lora_alpha=8, init_lora_weights=init)
        after = model(x)
    assert_matches_reference(after, before.double(), torch.float32, name="output after PiSSA init")
    for name, w in originals.items():
        layer = lora_layers(model)[name]
        assert layer.init_lora_weights == init
        assert layer.lora_B.weight.abs().sum() > 0, "PiSSA starts with a non-zero B"
        rebuilt = layer.weight.double() + layer.get_delta_weight().double()
        assert_matches_reference(rebuilt, w.double(), torch.float32, name=f"{name}: residual + s B A")
        # The adapter holds W's top-r singular part, the residual the rest.
        sigma = torch.linalg.svdvals(w.double().cpu())
        residual = torch.linalg.svdvals(layer.weight.double().cpu())
        if init == "pissa":
            assert torch.allclose(residual[: len(sigma) - 4], sigma[4:], rtol=1e-4, atol=1e-5)
        assert residual[0] < sigma[0]


def test_pissa_in_bfloat16_rounds_the_residual_once():
    model = net(torch.bfloat16)
    w = model.layers[0].q_proj.weight.detach().clone()
    apply_lora(model, ["layers.0.q_proj"], r=4, init_lora_weights="pissa", lora_dtype=torch.float32)
    layer = model.layers[0].q_proj
    # Computed in fp32 from the bf16 weight, rounded to bf16 once at the end.
    w32 = w.float()
    u, s, vh = torch.linalg.svd(w32, full_matrices=False)
    expected = (w32 - (u[:, :4] * s[:4]) @ vh[:4]).to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    assert (layer.weight.float() - expected.float()).abs().max() <= 1e-2 * w32.abs().max()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="model"):
        apply_lora("not a model", ["q_proj"])
    with pytest.raises(TypeError, match="target_modules"):
        apply_lora(net(), 3)
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(net(), [])
    with pytest.raises(ValueError, match=r"matched no module.*layers\.0\.q_proj"):
        apply_lora(net(), ["k_proj"])
    with pytest.raises(ValueError, match="LayerNorm"):
        apply_lora(net(), ["norm"])
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj.*already has a LoRA adapter"):
        apply_lora(apply_lora(net(), ["q_proj"]), ["layers.0.q_proj"])
    with pytest.raises(ValueError, match="r must be a positive integer"):
        apply_lora(net(), ["q_proj"], r=0)
    with pytest.raises(ValueError, match="init_lora_weights"):
        apply_lora(net(), ["q_proj"], init_lora_weights="pissa_niter_x")
    with pytest.raises(ValueError, match="r <= min"):
        apply_lora(net(), ["lm_head"], r=11, init_lora_weights="pissa")


def test_a_failed_apply_changes_nothing():
    model = net()
    with pytest.raises(ValueError):
        apply_lora(model, ["q_proj", "norm"])  # q_proj would match, norm cannot take an adapter
    assert not lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())
