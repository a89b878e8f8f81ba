"""PEFT parity for lora_bias and GPT-2's Conv1D (fan_in_fan_out), on whole tiny
models built from configs: the same outputs and gradients as PEFT (A, B and
lora_B.bias) on both backends, from_peft / to_peft sharing every Parameter,
adapter files both ways, merging, and PEFT's own refusal to merge a lora_bias
over a base without a bias. Layer-level references: test_lora_bias_and_conv1d.py."""

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft", reason="the PEFT parity tests need peft: pip install -e '.[test]'")
transformers = pytest.importorskip("transformers", reason="the PEFT parity tests need transformers")

from helpers import assert_matches_reference  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from tiny_models import (  # noqa: E402
    GPT2_VOCAB,
    VOCAB,
    _torch_backend_unless_parametrized,  # noqa: F401 (an autouse fixture)
    assert_outputs_and_gradients_equal_peft,
    assert_same_logits,
    copy_adapters,
    logits,
    randomize_adapters,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)

from fused_lora import apply_lora, from_peft, load_adapter, merge_and_unload, save_adapter, to_peft  # noqa: E402
from fused_lora.integrations.model import lora_layers  # noqa: E402

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # every Conv1D of GPT-2's blocks (c_proj: attention's and MLP's)
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def gpt2_case():
    """GPT-2 with LoRA on its Conv1D layers, lora_bias on too (Conv1D has a bias to merge into)."""
    config = dict(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, lora_bias=True)
    return tiny_gpt2(), config, GPT2_VOCAB


def llama_case():
    """Llama's projections have no bias: lora_bias adds one that the base lacks."""
    config = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, rank_pattern={"down_proj": 3}, lora_bias=True)
    return tiny_llama(), config, VOCAB


CASES = {"gpt2-conv1d": gpt2_case, "llama-lora_bias": llama_case}


def peft_and_ours(case):
    """The same base with the same random adapters (A, B and b_B), as PEFT's model and as ours."""
    base, config, vocab = CASES[case]()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    randomize_adapters(peft_model)
    ours = apply_lora(copy.deepcopy(base), **config)
    copy_adapters(peft_model, ours)
    assert set(lora_layers(ours)) == set(peft_model.targeted_module_names)
    return base, peft_model, ours, vocab


def peft_parameters(peft_model, name):
    module = peft_model.get_base_model().get_submodule(name)
    return module, {
        "lora_A.weight": module.lora_A["default"].weight,
        "lora_B.weight": module.lora_B["default"].weight,
        "lora_B.bias": module.lora_B["default"].bias,
    }


@pytest.mark.parametrize("case", CASES)
def test_outputs_and_gradients_equal_peft(backend, case):
    _, peft_model, ours, vocab = peft_and_ours(case)
    for name, layer in lora_layers(ours).items():
        module = peft_model.get_base_model().get_submodule(name)
        assert layer.lora_bias and layer.fan_in_fan_out == module.fan_in_fan_out == (case == "gpt2-conv1d")
    assert_outputs_and_gradients_equal_peft(ours, peft_model, vocab)
    assert all(layer.lora_B.bias.grad.abs().max() > 0 for layer in lora_layers(ours).values())


def test_all_linear_selects_the_conv1d_layers_peft_selects():
    base = tiny_gpt2()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules="all-linear"))
    ours = apply_lora(copy.deepcopy(base), "all-linear", r=2)
    assert set(lora_layers(ours)) == set(peft_model.targeted_module_names)
    assert len(lora_layers(ours)) == 8 and "lm_head" not in lora_layers(ours)


@pytest.mark.parametrize("case", CASES)
def test_from_peft_and_to_peft_share_every_parameter(case):
    """Both conversions hold PEFT's own Parameter objects (the Conv1D's (in, out) weight, b_B):
    a step on our model is a step on PEFT's."""
    _, peft_model, _, vocab = peft_and_ours(case)
    ids = token_ids(vocab)
    expected = logits(peft_model, ids)
    names = list(peft_model.targeted_module_names)
    params = {name: peft_parameters(peft_model, name) for name in names}
    model = from_peft(peft_model)
    for name, layer in lora_layers(model).items():
        module, theirs = params[name]
        assert layer.weight is module.base_layer.weight and layer.bias is module.base_layer.bias
        for key, param in layer.named_parameters():
            if key in theirs:
                assert param is theirs[key], f"{name}.{key} is PEFT's Parameter"
    assert_same_logits(logits(model, ids), expected, torch.float32)
    model(ids).logits.sum().backward()
    assert all(p.grad is not None for _, theirs in params.values() for p in theirs.values())

    back = to_peft(model)
    config = back.peft_config["default"]
    assert config.lora_bias and config.fan_in_fan_out == (case == "gpt2-conv1d")
    for name in names:
        module, theirs = peft_parameters(back, name)
        assert module.base_layer.weight is params[name][0].base_layer.weight
        assert type(module.base_layer) is type(params[name][0].base_layer), "a Conv1D comes back as a Conv1D"
        assert all(theirs[key] is p for key, p in params[name][1].items())
    assert_same_logits(logits(back, ids), expected, torch.float32)


@pytest.mark.parametrize("case", CASES)
def test_adapter_files_both_ways(tmp_path, case):
    base, peft_model, ours, vocab = peft_and_ours(case)
    ids = token_ids(vocab)
    expected = logits(peft_model, ids)

    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["lora_bias"] and config["fan_in_fan_out"] == (case == "gpt2-conv1d")
    assert_same_logits(
        logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours"), ids), expected, torch.float32
    )

    peft_model.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "peft")  # a plain model: prepared from the config
    assert all(layer.lora_bias for layer in lora_layers(loaded).values())
    assert_same_logits(logits(loaded, ids), expected, torch.float32)
    with pytest.raises(ValueError, match=r"unexpected \[.*lora_B\.bias"):
        load_adapter(apply_lora(copy.deepcopy(base), **{**CASES[case]()[1], "lora_bias": False}), tmp_path / "peft")


def test_merge_and_unload_equals_peft_and_gives_back_conv1d():
    _, peft_model, ours, vocab = peft_and_ours("gpt2-conv1d")
    ids = token_ids(vocab)
    merged = merge_and_unload(ours)
    peft_merged = peft_model.merge_and_unload()
    for name in GPT2_TARGETS:
        module = merged.transformer.h[0].get_submodule("attn" if name == "c_attn" else "mlp").get_submodule(name)
        assert type(module).__name__ == "Conv1D"
    for (name, got), want in zip(merged.named_parameters(), peft_merged.parameters(), strict=True):
        assert_matches_reference(got, want.double(), torch.float32, name=name)
    assert_same_logits(logits(merged, ids), logits(peft_merged, ids), torch.float32)


def test_lora_bias_over_a_base_without_bias_cannot_merge_as_in_peft():
    _, peft_model, ours, _ = peft_and_ours("llama-lora_bias")
    with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`"):
        peft_model.merge_and_unload()
    weights = {name: layer.weight.detach().clone() for name, layer in lora_layers(ours).items()}
    with pytest.raises(RuntimeError, match="lora_bias=True adds scaling"):
        merge_and_unload(ours)
    for name, layer in lora_layers(ours).items():  # refused before any layer changed
        assert not layer.merged and torch.equal(layer.weight, weights[name])


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2"])
def test_pissa_on_conv1d_equals_peft(init):
    base = tiny_gpt2()
    torch.manual_seed(1)  # pissa_niter_ is randomised: both draw from the same generator state
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=init)
    )
    torch.manual_seed(1)
    ours = apply_lora(copy.deepcopy(base), ["c_attn"], r=4, lora_alpha=8, init_lora_weights=init)
    for name, layer in lora_layers(ours).items():
        module, theirs = peft_parameters(peft_model, name)
        assert_matches_reference(layer.weight, module.base_layer.weight.double(), torch.float32, name="residual")
        for key in ("lora_A.weight", "lora_B.weight"):
            assert_matches_reference(layer.get_parameter(key), theirs[key].double(), torch.float32, name=key)
    ids = token_ids(GPT2_VOCAB)
    assert_same_logits(logits(ours, ids), logits(peft_model, ids), torch.float32)
