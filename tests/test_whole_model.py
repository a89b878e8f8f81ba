"""LoRA on a whole model: apply_lora's target matching (PEFT's rules), rank /
alpha patterns, count_parameters, a float64 reference of the whole network,
merge_and_unload and unload (on LoRALinear and on MultiLoRALinear layers),
PiSSA init, and the argument checks."""

import copy

import pytest
import torch
from conftest import DEVICE
from helpers import assert_matches_reference
from torch import nn

from fused_lora import LoRALinear, MultiLoRALinear, apply_lora, count_parameters, merge_and_unload, unload
from fused_lora.integrations.model import lora_layers, multi_lora_layers, set_submodule


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
    ("targets", "expected"),
    [
        (["q_proj"], {"layers.0.q_proj", "layers.1.q_proj"}),
        (["proj"], {"layers.0.proj", "layers.1.proj"}),  # a suffix on a "." boundary only: not q_proj
        (["layers.1.v_proj", "lm_head"], {"layers.1.v_proj", "lm_head"}),
        (r"layers\.0\..*_proj", {"layers.0.q_proj", "layers.0.v_proj"}),  # regex, fullmatch
        (r".*q_proj", {"layers.0.q_proj", "layers.1.q_proj"}),
        ("all-linear", {f"layers.{i}.{n}" for i in range(2) for n in ("q_proj", "v_proj", "proj")}),
        ({"q_proj"}, {"layers.0.q_proj", "layers.1.q_proj"}),  # any iterable of names
    ],
    ids=["name", "suffix", "full names", "regex", "regex prefix", "all-linear", "set"],
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
        assert layer.r == 2


def test_regex_must_match_the_whole_name():
    with pytest.raises(ValueError, match="matched no module"):
        apply_lora(net(), "q_proj")  # re.fullmatch: "layers.0.q_proj" is not "q_proj"


def test_only_adapters_train_and_count_parameters():
    model = net()
    total_before = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == (total_before, total_before)
    apply_lora(model, ["q_proj", "lm_head"], r=3)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"{name}.lora_{ab}.weight" for name in ("layers.0.q_proj", "layers.1.q_proj", "lm_head") for ab in "AB"
    }
    d, n_out, r = 24, 10, 3
    n_lora = 2 * (r * d + d * r) + (r * d + n_out * r)
    assert count_parameters(model) == (n_lora, total_before + n_lora)


def test_count_parameters_counts_a_shared_tensor_once():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    model[1].bias.requires_grad_(False)
    assert count_parameters(model) == (16 + 4, 16 + 4 + 4)


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
    assert layers["layers.0.q_proj"].scaling == 1 / 2  # rsLoRA: alpha / sqrt(r)
    assert layers["layers.1.proj"].scaling == pytest.approx(8 / 2**0.5, rel=1e-15)
    assert layers["layers.0.proj"].scaling == 8 / 2


def test_apply_lora_passes_every_option_to_the_layers():
    model = apply_lora(
        net(torch.bfloat16), ["v_proj"], r=2, lora_alpha=3, lora_dropout=0.25, init_lora_weights="gaussian",
        lora_dtype=torch.float32,
    )  # fmt: skip
    for layer in lora_layers(model).values():
        assert (layer.r, layer.lora_alpha, layer.lora_dropout, layer.init_lora_weights) == (2, 3, 0.25, "gaussian")
        assert layer.lora_A.weight.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
        assert layer.scaling == 1.5 and not layer.lora_B.weight.any()


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
    so lower precisions are checked layer by layer (test_layers.py)."""
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_and_unload_gives_plain_linears_with_the_same_outputs(dtype):
    model = apply_lora(net(dtype), "all-linear", r=4, lora_alpha=16)
    randomize_adapters(model)
    weights = {name: layer.weight for name, layer in lora_layers(model).items()}
    expected = {
        name: (layer.weight.float() + layer.get_delta_weight()).to(dtype) for name, layer in lora_layers(model).items()
    }
    x = torch.randn(7, 24, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        before = model(x)
        assert merge_and_unload(model) is model
        after = model(x)
    assert not lora_layers(model)
    for name, weight in expected.items():  # W + s B A in fp32, rounded once, in the same Parameter
        linear = model.get_submodule(name)
        assert type(linear) is nn.Linear and linear.weight is weights[name]
        assert torch.equal(linear.weight, weight), f"{name}: merged weight"
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
        assert unload(model) is model
        assert torch.equal(model(x), base_out)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


# ---- models holding MultiLoRALinear layers --------------------------------------


def multi_net(dtype=torch.float32):
    """net() with MultiLoRALinear layers set in by hand (adapters "a", "b",
    random B) on both q_proj and on lm_head, and a LoRALinear on layers.0.proj."""
    model = net(dtype)
    for name in ("layers.0.q_proj", "layers.1.q_proj", "lm_head"):
        layer = MultiLoRALinear.from_linear(model.get_submodule(name))
        layer.add_adapter("a", 4, 8, init_lora_weights=False)
        layer.add_adapter("b", 2, 6, init_lora_weights=False)
        set_submodule(model, name, layer)
    set_submodule(model, "layers.0.proj", LoRALinear.from_linear(model.layers[0].proj, r=3, init_lora_weights=False))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_and_unload_merges_each_multi_layers_active_adapter(dtype):
    """A MultiLoRALinear merges its active adapter; one without an active
    adapter ("__base__" or None) keeps its base weight. Plain nn.Linear
    modules sharing the original Parameters come out."""
    model = multi_net(dtype)
    active = {"layers.0.q_proj": "b", "layers.1.q_proj": "__base__", "lm_head": "a"}
    for name, adapter in active.items():
        model.get_submodule(name).active_adapter = adapter
    lora = {**multi_lora_layers(model), **lora_layers(model)}
    weights = {name: layer.weight for name, layer in lora.items()}
    expected = {
        "layers.0.q_proj": (lora["layers.0.q_proj"].weight.float() + lora["layers.0.q_proj"].get_delta_weight("b")),
        "layers.1.q_proj": lora["layers.1.q_proj"].weight.detach().clone(),
        "lm_head": (lora["lm_head"].weight.float() + lora["lm_head"].get_delta_weight("a")),
        "layers.0.proj": (lora["layers.0.proj"].weight.float() + lora["layers.0.proj"].get_delta_weight()),
    }
    x = torch.randn(2, 7, 24, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        before = model(x)
        model.layers[1].q_proj.active_adapter = None  # no active adapter: the base weight too
        assert merge_and_unload(model) is model
        after = model(x)
    assert not multi_lora_layers(model) and not lora_layers(model)
    for name, weight in expected.items():
        linear = model.get_submodule(name)
        assert type(linear) is nn.Linear and linear.weight is weights[name]
        assert torch.equal(linear.weight, weight.to(dtype)), f"{name}: merged weight"
    if dtype == torch.float32:
        assert_matches_reference(after, before.double(), dtype, name="merged output")
    assert count_parameters(model)[1] == sum(p.numel() for p in net().parameters()), "no adapter parameter left"


def test_unload_of_multi_layers_restores_the_base_model_exactly():
    base = net()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    x = torch.randn(5, 24, device=DEVICE)
    with torch.no_grad():
        base_out = base(x)
    model = multi_net()
    model.load_state_dict(state, strict=False)
    for layer in multi_lora_layers(model).values():
        layer.active_adapter = "a"
    model.lm_head.merge("b")  # unload unmerges first
    model.lm_head.active_adapter = "b"
    with torch.no_grad():
        assert not torch.equal(model(x), base_out)
        assert unload(model) is model
        assert torch.equal(model(x), base_out)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not multi_lora_layers(model) and not lora_layers(model)


def test_apply_lora_refuses_a_multi_layer_and_spares_its_adapters_from_selection():
    model = multi_net()
    with pytest.raises(ValueError, match=r"'layers\.0\.q_proj' already has a LoRA adapter"):
        apply_lora(model, ["q_proj"])
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, "all-linear")
    # A pattern that would reach inside a LoRA layer (its lora_A.a) selects only plain modules.
    apply_lora(model, r".*(v_proj|lora_A\.a)", r=2)
    assert set(lora_layers(model)) == {"layers.0.v_proj", "layers.1.v_proj", "layers.0.proj"}


# ---- PiSSA -----------------------------------------------------------------------


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


# ---- bad arguments -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: apply_lora("not a model", ["q_proj"]), TypeError, "model must be an nn.Module"),
        (lambda: apply_lora(net(), 3), TypeError, "target_modules must be a list of names or a regex string"),
        (lambda: apply_lora(net(), b"q_proj"), TypeError, "target_modules"),
        (lambda: apply_lora(net(), []), ValueError, "target_modules must be a non-empty list"),
        (lambda: apply_lora(net(), ["q_proj", ""]), ValueError, "target_modules must be a non-empty list"),
        (lambda: apply_lora(net(), ""), ValueError, "target_modules must not be empty"),
        (lambda: apply_lora(net(), ["k_proj"]), ValueError, r"matched no module.*layers\.0\.q_proj"),
        (lambda: apply_lora(net(), ["norm"]), ValueError, "LayerNorm"),
        (lambda: apply_lora(apply_lora(net(), ["q_proj"]), ["layers.0.q_proj"]), ValueError,
         r"layers\.0\.q_proj.*already has a LoRA adapter"),
        (lambda: apply_lora(net(), ["q_proj"], r=0), ValueError, "r must be a positive integer"),
        (lambda: apply_lora(net(), ["q_proj"], lora_alpha=float("nan")), ValueError, "lora_alpha must be finite"),
        (lambda: apply_lora(net(), ["q_proj"], init_lora_weights="pissa_niter_x"), ValueError, "init_lora_weights"),
        (lambda: apply_lora(net(), ["lm_head"], r=11, init_lora_weights="pissa"), ValueError, "r <= min"),
    ],
    ids=["model", "int targets", "bytes targets", "empty list", "empty name", "empty regex", "no match", "not linear",
         "twice", "r=0", "nan alpha", "init", "pissa rank"],
)  # fmt: skip
def test_bad_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(target_modules=["q_proj", "norm"]), "LayerNorm"),  # q_proj would match, norm cannot take an adapter
        (dict(target_modules=["q_proj"], rank_pattern={r"layers\.1\.q_proj": 0}), "r must be a positive integer"),
        (dict(target_modules=["q_proj"], alpha_pattern={r"layers\.1\.q_proj": float("inf")}), "lora_alpha"),
        (dict(target_modules=["q_proj", "lm_head"], r=11, init_lora_weights="pissa"), "r <= min"),
    ],
    ids=["not linear", "a later layer's rank", "a later layer's alpha", "a later layer's pissa rank"],
)
def test_a_failed_apply_changes_nothing(kwargs, message):
    """Every argument is checked before any module is replaced (or, with
    PiSSA, any base weight rewritten): an error leaves the model as it was."""
    model = net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        apply_lora(model, **kwargs)
    assert not lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
