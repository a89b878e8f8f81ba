"""PEFT interop: equal outputs and gradients to PEFT, adapters both ways, conversions sharing storage,
and PEFT models holding several adapters (MultiLoRALinear layers, per-sample adapter names).

A tiny Llama built from a config (hidden size 64, 2 layers): no download.
"Equal" means within tests/helpers.py's table against PEFT run on the same
inputs in the same dtype.
"""

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft", reason="the PEFT interop tests need peft: pip install -e '.[test]'")
transformers = pytest.importorskip(
    "transformers", reason="the PEFT interop tests need transformers: pip install -e '.[test]'"
)

from conftest import DEVICE  # noqa: E402
from helpers import assert_matches_reference  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from tiny_models import (  # noqa: E402
    _torch_backend_unless_parametrized,  # noqa: F401 (an autouse fixture)
    assert_outputs_and_gradients_equal_peft,
    assert_same_logits,
    copy_adapters,
    logits,
    peft_layer,
    randomize_adapters,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)

import fused_lora  # noqa: E402
from fused_lora import (  # noqa: E402
    LoRALinear,
    apply_lora,
    from_peft,
    load_adapter,
    save_adapter,
    to_peft,
)
from fused_lora.integrations.model import lora_layers, multi_lora_layers  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_and_ours(dtype, lora_dtype=torch.float32):
    """The same tiny Llama with the same random adapters, as PEFT's model and as ours.
    PEFT keeps adapters in fp32 on a bf16 / fp16 model (autocast_adapter_dtype): so do we here."""
    base = tiny_llama(dtype)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"down_proj": 3})
    peft_model = get_peft_model(copy.deepcopy(base), config)
    randomize_adapters(peft_model)
    ours = apply_lora(
        copy.deepcopy(base), TARGETS, r=4, lora_alpha=8, rank_pattern={"down_proj": 3}, lora_dtype=lora_dtype
    )
    copy_adapters(peft_model, ours)
    assert set(lora_layers(ours)) == set(peft_model.targeted_module_names)
    return peft_model, ours


def test_model_outputs_and_gradients_equal_peft(backend):
    peft_model, ours = peft_and_ours(torch.float32)
    assert {layer.r for layer in lora_layers(ours).values()} == {3, 4}
    assert_outputs_and_gradients_equal_peft(ours, peft_model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_each_layer_equals_peft_on_the_same_inputs(backend, dtype):
    """Layer by layer, on the inputs PEFT's layers saw in the model: in half precision the
    table gates one op; through a whole model rounding differences would compound."""
    peft_model, ours = peft_and_ours(dtype)
    inputs = {}
    hooks = [
        peft_layer(peft_model, name)[0].register_forward_hook(
            lambda module, args, out, name=name: inputs.__setitem__(name, args[0].detach())
        )
        for name in lora_layers(ours)
    ]
    peft_model(token_ids())
    for hook in hooks:
        hook.remove()

    for name, layer in lora_layers(ours).items():
        module, a, b = peft_layer(peft_model, name)
        x, x_ref = inputs[name].clone().requires_grad_(), inputs[name].clone().requires_grad_()
        out, ref = layer(x), module(x_ref)
        grad = torch.randn(out.shape, device=DEVICE)
        (out.float() * grad).sum().backward()
        (ref.float() * grad).sum().backward()
        assert out.dtype == ref.dtype == dtype
        assert_matches_reference(out, ref.double(), dtype, name=f"{name} output")
        for got, want, what in [(x.grad, x_ref.grad, "dX"), (layer.lora_A.weight.grad, a.grad, "dA")]:
            assert_matches_reference(got, want.double(), dtype, "gradients", name=f"{name} {what}")
        assert_matches_reference(layer.lora_B.weight.grad, b.grad.double(), dtype, "gradients", name=f"{name} dB")


def test_all_linear_selects_what_peft_selects():
    base = tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules="all-linear"))
    ours = apply_lora(copy.deepcopy(base), "all-linear", r=2)
    assert set(lora_layers(ours)) == set(peft_model.targeted_module_names)
    assert "lm_head" not in lora_layers(ours)


def test_rslora_equals_peft(backend):
    base = tiny_llama()
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["o_proj"])
    )
    randomize_adapters(peft_model)
    ours = apply_lora(copy.deepcopy(base), ["o_proj"], r=16, lora_alpha=8, use_rslora=True)
    copy_adapters(peft_model, ours)
    for name, layer in lora_layers(ours).items():
        assert layer.scaling == peft_layer(peft_model, name)[0].scaling["default"] == 2.0  # 8 / sqrt(16)
    ids = token_ids()
    assert_same_logits(logits(ours, ids), logits(peft_model, ids), torch.float32)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pissa_equals_peft(init, dtype):
    base = tiny_llama(dtype)
    torch.manual_seed(1)  # pissa_niter_ is randomised: both draw from the same generator state
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], init_lora_weights=init)
    )
    torch.manual_seed(1)
    ours = apply_lora(
        copy.deepcopy(base), ["q_proj", "up_proj"], r=4, lora_alpha=8, init_lora_weights=init, lora_dtype=dtype
    )
    for name, layer in lora_layers(ours).items():
        module, a, b = peft_layer(peft_model, name)
        # The residual weight is rounded once from the same fp32 SVD: equal; A and B as PEFT keeps them.
        assert torch.equal(layer.weight, module.base_layer.weight), f"{name}: residual weight"
        assert_matches_reference(layer.lora_A.weight, a.double(), dtype, name=f"{name} A")
        assert_matches_reference(layer.lora_B.weight, b.double(), dtype, name=f"{name} B")
        assert not torch.equal(layer.weight, base.get_submodule(name).weight), "PiSSA rewrites the base weight"
    if dtype == torch.float32:  # whole-model outputs: in bf16 the rounding would compound through the layers
        ids = token_ids()
        assert_same_logits(logits(ours, ids), logits(peft_model, ids), dtype)
        assert_same_logits(logits(ours, ids), logits(base, ids), dtype)  # PiSSA keeps the function at init


@pytest.mark.parametrize("patterns", [False, True])
def test_adapter_saved_here_loads_in_peft(tmp_path, patterns):
    base = tiny_llama()
    extra = (
        dict(rank_pattern={"layers.1.self_attn.v_proj": 2}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 4})
        if patterns
        else {}
    )
    ours = apply_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=8, lora_alpha=16, lora_dropout=0.1, **extra)
    randomize_adapters(ours)
    save_adapter(ours, tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["q_proj", "v_proj"]
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.1)
    assert bool(config["rank_pattern"]) == bool(config["alpha_pattern"]) == patterns

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    for name, layer in lora_layers(ours).items():
        module, a, b = peft_layer(loaded, name)
        assert (module.r["default"], module.scaling["default"]) == (layer.r, layer.scaling)
        assert torch.equal(a, layer.lora_A.weight) and torch.equal(b, layer.lora_B.weight)
    ours.eval()  # dropout off in both
    ids = token_ids()
    assert_same_logits(logits(ours, ids), logits(loaded, ids), torch.float32)


@pytest.mark.parametrize("into", ["plain model", "prepared model"])
def test_adapter_saved_by_peft_loads_here(tmp_path, into):
    base = tiny_llama()
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.05,
        target_modules=r".*\.(k_proj|gate_proj)",  # a regex, as PEFT allows
        rank_pattern={"gate_proj": 6},
        alpha_pattern={r"layers\.0\.self_attn\.k_proj": 2},
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    randomize_adapters(peft_model)
    peft_model.save_pretrained(tmp_path)

    model = copy.deepcopy(base)
    if into == "prepared model":
        apply_lora(
            model,
            r".*\.(k_proj|gate_proj)",
            r=4,
            lora_alpha=8,
            rank_pattern={"gate_proj": 6},
            alpha_pattern={r"layers\.0\.self_attn\.k_proj": 2},
        )
    assert load_adapter(model, tmp_path) is model
    assert set(lora_layers(model)) == set(peft_model.targeted_module_names)
    for name, layer in lora_layers(model).items():
        module, a, b = peft_layer(peft_model, name)
        assert (layer.r, layer.scaling) == (module.r["default"], module.scaling["default"])
        assert torch.equal(layer.lora_A.weight, a) and torch.equal(layer.lora_B.weight, b)
    if into == "plain model":
        assert {layer.lora_dropout for layer in lora_layers(model).values()} == {0.05}
    ids = token_ids()
    assert_same_logits(logits(model.eval(), ids), logits(peft_model.eval(), ids), torch.float32)


def test_pissa_adapter_saved_here_loads_onto_the_original_base(tmp_path):
    """As in PEFT, a PiSSA adapter file says "pissa": loading it onto the original
    weights redoes the SVD, so the trained adapter meets the residual it was trained with."""
    base = tiny_llama()
    ours = apply_lora(copy.deepcopy(base), ["q_proj", "o_proj"], r=4, lora_alpha=4, init_lora_weights="pissa")
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # "training"
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    ids = token_ids()
    expected = logits(ours, ids)
    assert_same_logits(logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path), ids), expected, torch.float32)
    assert_same_logits(logits(load_adapter(copy.deepcopy(base), tmp_path), ids), expected, torch.float32)


def test_from_peft_and_to_peft_share_storage(backend):
    base = tiny_llama()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(peft_model)
    ids = token_ids()
    expected = logits(peft_model, ids)
    names = list(peft_model.targeted_module_names)
    params = {name: (m.base_layer.weight, a, b) for name in names for m, a, b in [peft_layer(peft_model, name)]}
    pointers = {name: [p.data_ptr() for p in ps] for name, ps in params.items()}

    model = from_peft(peft_model)
    assert model is base
    layers = lora_layers(model)
    assert set(layers) == set(names)
    for name, layer in layers.items():
        weight, a, b = params[name]
        assert layer.weight is weight and layer.lora_A.weight is a and layer.lora_B.weight is b
        assert [layer.weight.data_ptr(), a.data_ptr(), b.data_ptr()] == pointers[name]
        assert a.requires_grad and not layer.weight.requires_grad
    assert_same_logits(logits(model, ids), expected, torch.float32)

    back = to_peft(model)
    assert isinstance(back, PeftModel) and back.get_base_model() is base
    assert not any(isinstance(m, LoRALinear) for m in base.modules())
    for name in names:
        module, a, b = peft_layer(back, name)
        assert [module.base_layer.weight.data_ptr(), a.data_ptr(), b.data_ptr()] == pointers[name]
        assert a is params[name][1] and b is params[name][2]
    assert {n for n, p in back.named_parameters() if p.requires_grad} == {
        n for n, p in back.named_parameters() if ".lora_" in n
    }
    assert_same_logits(logits(back, ids), expected, torch.float32)


def test_to_peft_from_apply_lora_keeps_patterns_and_pissa(tmp_path):
    base = tiny_llama()
    ours = apply_lora(
        copy.deepcopy(base), ["q_proj", "v_proj"], r=4, rank_pattern={"v_proj": 2}, init_lora_weights="pissa"
    )
    randomize_adapters(ours)
    ids = token_ids()
    expected = logits(ours, ids)
    residual = ours.model.layers[0].self_attn.q_proj.weight.detach().clone()
    back = to_peft(ours)
    config = back.peft_config["default"]
    assert (config.r, config.rank_pattern, config.init_lora_weights) == (4, {"v_proj": 2}, "pissa")
    assert torch.equal(back.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, residual)
    assert_same_logits(logits(back, ids), expected, torch.float32)


def test_what_is_not_supported_is_refused(tmp_path):
    base = tiny_llama()
    two = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"]))
    two.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    two.base_model.set_adapter(["default", "other"])
    with pytest.raises(NotImplementedError, match=r"several active adapters at once \(\['default', 'other'\]\)"):
        from_peft(two)
    with pytest.raises(NotImplementedError, match="Embedding"):
        from_peft(get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["embed_tokens"])))
    merged = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"]))
    merged.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        from_peft(merged)
    with pytest.raises(TypeError, match="peft_model"):
        from_peft(base)

    ours = apply_lora(copy.deepcopy(base), ["q_proj"], r=2)
    lora_layers(ours)["model.layers.0.self_attn.q_proj"].merge()
    with pytest.raises(ValueError, match="merged"):
        to_peft(ours)
    mixed = apply_lora(apply_lora(copy.deepcopy(base), ["q_proj"], lora_dropout=0.1), ["v_proj"])
    with pytest.raises(ValueError, match="lora_dropout"):
        save_adapter(mixed, tmp_path / "mixed")
    with pytest.raises(ValueError, match="no LoRALinear layers"):
        save_adapter(copy.deepcopy(base), tmp_path / "none")

    save_adapter(apply_lora(copy.deepcopy(base), ["q_proj"], r=2), tmp_path)
    with pytest.raises(ValueError, match="r=4"):
        load_adapter(apply_lora(copy.deepcopy(base), ["q_proj"], r=4), tmp_path)
    with pytest.raises(ValueError, match="missing"):
        load_adapter(apply_lora(copy.deepcopy(base), ["q_proj", "k_proj"], r=2), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        load_adapter(copy.deepcopy(base), tmp_path / "nowhere")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for field, value in [
        ("use_qalora", True),
        ("modules_to_save", ["lm_head"]),
        ("layers_to_transform", [0]),
        ("bias", "all"),
        ("init_lora_weights", "olora"),
        ("peft_type", "IA3"),
    ]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(NotImplementedError, match=field):
            load_adapter(copy.deepcopy(base), tmp_path)


def test_lora_bias_and_conv1d_with_several_adapters_are_refused():
    """MultiLoRALinear has neither lora_bias nor Conv1D bases (one adapter converts to LoRALinear,
    which has both: tests/test_peft_parity.py). from_peft refuses, naming the layer, before
    converting any: q_proj (checked first, fine) stays PEFT's when v_proj is refused."""
    from peft.tuners.lora import Linear as PeftLoraLinear

    biased = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    biased.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"], lora_bias=True))
    with pytest.raises(NotImplementedError, match=r"layers\.0\.self_attn\.v_proj: lora_bias with several adapters"):
        from_peft(biased)
    assert isinstance(biased.get_base_model().model.layers[0].self_attn.q_proj, PeftLoraLinear)

    gpt2 = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]), adapter_name="one")
    gpt2.add_adapter("two", LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(NotImplementedError, match=r"c_attn: a Conv1D base \(fan_in_fan_out\) with several adapters"):
        from_peft(gpt2)


# ---- several adapters -----------------------------------------------------------


def peft_with_two_adapters(dtype=torch.float32):
    """A PEFT model with adapters "one" (q_proj, v_proj) and "two" (v_proj, o_proj; dropout, rsLoRA),
    random (trained-looking) weights, "two" active."""
    base = tiny_llama(dtype)
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="one"
    )
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"], lora_dropout=0.1, use_rslora=True)
    peft_model.add_adapter("two", config)
    randomize_adapters(peft_model)
    peft_model.set_adapter("two")
    return base, peft_model.eval()


def test_from_peft_keeps_several_adapters_and_computes_what_peft_computes(backend):
    _, peft_model = peft_with_two_adapters()
    ids, names = token_ids(), ["one", "__base__"]
    expected = logits(peft_model, ids)
    with torch.no_grad():
        expected_mixed = peft_model(ids, adapter_names=names).logits
    modules = {
        name: {a: (m.lora_A[a], m.lora_B[a]) for a in m.lora_A}
        for name, m in peft_model.base_model.model.named_modules()
        if hasattr(m, "lora_A")
    }
    model = from_peft(peft_model)
    layers = multi_lora_layers(model)
    assert set(layers) == set(modules) and not lora_layers(model)
    for name, layer in layers.items():
        assert layer.adapter_names == list(modules[name]), "each layer keeps the adapters PEFT put on it, in order"
        for adapter, (lora_a, lora_b) in modules[name].items():
            assert layer.lora_A[adapter] is lora_a and layer.lora_B[adapter] is lora_b, "shared, not copied"
        assert layer.active_adapter == ("two" if "two" in layer.lora_A else "__base__")
        assert not layer.training, "PEFT's eval mode is kept (no dropout)"
    v_proj = layers["model.layers.0.self_attn.v_proj"]
    assert v_proj.lora_dropout == {"one": 0.0, "two": 0.1} and v_proj.scaling["two"] == pytest.approx(4 / 2**0.5)
    assert_same_logits(logits(model, ids), expected, torch.float32)
    with torch.no_grad(), fused_lora.adapter_names(model, names):  # PEFT's adapter_names=, model-wide
        assert_same_logits(model(ids).logits, expected_mixed, torch.float32)


def test_several_adapters_train_per_sample_like_peft_mixed_batches(backend):
    """Per-sample adapters in training mode (PEFT allows them in eval only): each adapter's
    gradients are those of PEFT's mixed batch on the same inputs (dropout off)."""
    _, peft_model = peft_with_two_adapters()
    for module in peft_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name, p in peft_model.named_parameters():  # set_adapter("two") froze "one": train both
        p.requires_grad_(".lora_" in name)
    ours = from_peft(copy.deepcopy(peft_model))
    ids, names = token_ids(), ["two", "one"]
    with torch.no_grad():
        expected = peft_model(ids, adapter_names=names).logits
    ours.train()
    with fused_lora.adapter_names(ours, names):
        out = ours(ids).logits
    assert_same_logits(out, expected, torch.float32)
    grad = torch.randn(out.shape, device=DEVICE)
    (out * grad).sum().backward()
    # PEFT refuses adapter_names in training: its gradient, by autograd through its eval-mode forward.
    (peft_model(ids, adapter_names=names).logits * grad).sum().backward()
    for name, layer in multi_lora_layers(ours).items():
        module = peft_model.base_model.model.get_submodule(name)
        for adapter in layer.adapter_names:
            for ab in ("lora_A", "lora_B"):
                got, want = getattr(layer, ab)[adapter].weight.grad, getattr(module, ab)[adapter].weight.grad
                assert got is not None and want is not None, f"{name} {ab}[{adapter}]"
                assert_matches_reference(got, want.double(), torch.float32, "gradients", name=f"{name} {ab}[{adapter}]")


def test_to_peft_gives_several_adapters_back():
    _, peft_model = peft_with_two_adapters()
    ids = token_ids()
    expected = logits(peft_model, ids)
    model = from_peft(peft_model)
    tensors = {n: p.data_ptr() for n, p in model.named_parameters()}
    back = to_peft(model)
    assert isinstance(back, PeftModel) and set(back.peft_config) == {"one", "two"}
    assert back.active_adapter == "two"
    assert back.peft_config["two"].lora_dropout == 0.1 and back.peft_config["two"].use_rslora
    assert set(back.targeted_module_names) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj", "o_proj")
    }
    pointers = {p.data_ptr() for p in back.parameters()}
    assert set(tensors.values()) <= pointers, "to_peft shares every tensor"
    assert_same_logits(logits(back, ids), expected, torch.float32)


def test_multi_adapter_layers_save_one_adapter_in_peft_format(tmp_path):
    base, peft_model = peft_with_two_adapters()
    model = from_peft(copy.deepcopy(peft_model))
    save_adapter(model, tmp_path, adapter="two")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (2, 4, True)
    assert config["target_modules"] == ["o_proj", "v_proj"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    peft_model.set_adapter("two")
    ids = token_ids()
    assert_same_logits(logits(loaded, ids), logits(peft_model, ids), torch.float32)
