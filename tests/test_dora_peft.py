"""DoRA parity with PEFT's use_dora on tiny Llama and GPT-2 (Conv1D) models
built from configs: outputs and gradients (A, B, m) on both backends, dropout
in training, from_peft / to_peft sharing the magnitude Parameter, adapter
files both ways, merge_and_unload, and the refusal of DoRA among several
adapters."""

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft", reason="the PEFT parity tests need peft: pip install -e '.[test]'")
transformers = pytest.importorskip("transformers", reason="the PEFT parity tests need transformers")

from conftest import DEVICE  # noqa: E402
from helpers import assert_matches_reference, randn  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import Linear as PeftLinear  # noqa: E402
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
from torch import nn  # noqa: E402

from fused_lora import LoRALinear, apply_lora, from_peft, load_adapter, merge_and_unload, save_adapter, to_peft  # noqa: E402

MODELS = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 3}), VOCAB),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"]), GPT2_VOCAB),
}


def peft_and_ours(case):
    """The same base with the same random DoRA adapters (A, B, m), as PEFT's model and as ours."""

    make, targets, vocab = MODELS[case]
    config = dict(r=4, lora_alpha=8, use_dora=True, **targets)
    base = make()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    randomize_adapters(peft_model)
    ours = apply_lora(copy.deepcopy(base), **config)
    copy_adapters(peft_model, ours)
    return base, peft_model, ours, vocab


@pytest.mark.parametrize("case", MODELS)
def test_outputs_and_gradients_equal_peft(case, backend):

    _, peft_model, ours, vocab = peft_and_ours(case)
    assert_outputs_and_gradients_equal_peft(ours, peft_model, vocab)


def test_dropout_in_training_matches_peft():
    """PEFT's DoRA with dropout reads dropout(x) for both the LoRA branch and
    the (m/n - 1) x W^T term; ours draws the same mask from the same seed."""

    base = nn.Linear(40, 24, device=DEVICE)
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, lora_dropout=0.3, init_lora_weights=False)
    theirs = PeftLinear(copy.deepcopy(base), "default", config=config, r=4, lora_alpha=8, lora_dropout=0.3).train()
    ours = LoRALinear.from_linear(base, r=4, lora_alpha=8, lora_dropout=0.3, use_dora=True).train()
    with torch.no_grad():
        theirs.lora_magnitude_vector["default"].weight.mul_(0.5 + torch.rand(24, device=DEVICE))
        ours.lora_A.weight.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.weight.copy_(theirs.lora_B["default"].weight)
        ours.lora_magnitude_vector.weight.copy_(theirs.lora_magnitude_vector["default"].weight)
    x = randn(5, 40, device=DEVICE)
    torch.manual_seed(7)
    want = theirs(x)
    torch.manual_seed(7)
    got = ours(x)
    assert_matches_reference(got, want.double(), torch.float32, name="y with dropout")
    assert not torch.allclose(got, ours.eval()(x))  # the mask did drop something


@pytest.mark.parametrize("case", MODELS)
def test_from_peft_to_peft_share_the_magnitude(case):

    _, peft_model, _, vocab = peft_and_ours(case)
    ids = token_ids(vocab)
    expected = logits(peft_model, ids)
    name = peft_model.targeted_module_names[0]
    magnitude = peft_model.get_base_model().get_submodule(name).lora_magnitude_vector["default"].weight
    model = from_peft(peft_model)
    layer = model.get_submodule(name)
    assert layer.use_dora and layer.lora_magnitude_vector.weight is magnitude
    assert_same_logits(logits(model, ids), expected, torch.float32)
    back = to_peft(model)
    assert back.peft_config["default"].use_dora
    assert back.get_base_model().get_submodule(name).lora_magnitude_vector["default"].weight is magnitude
    assert_same_logits(logits(back, ids), expected, torch.float32)


@pytest.mark.parametrize("case", MODELS)
def test_adapter_files_both_ways(case, tmp_path):

    base, peft_model, ours, vocab = peft_and_ours(case)
    ids = token_ids(vocab)
    expected = logits(peft_model, ids)
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    assert_same_logits(
        logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours"), ids), expected, torch.float32
    )
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert all(layer.use_dora for layer in loaded.modules() if isinstance(layer, LoRALinear))
    assert_same_logits(logits(loaded, ids), expected, torch.float32)


@pytest.mark.parametrize("case", MODELS)
def test_merge_and_unload_equals_peft(case):

    _, peft_model, ours, vocab = peft_and_ours(case)
    theirs = peft_model.merge_and_unload()
    ours = merge_and_unload(ours)
    for (name, p), (their_name, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert name == their_name
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    ids = token_ids(vocab)
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids))


def test_several_dora_adapters_are_refused():

    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    peft_model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(NotImplementedError, match="DoRA with several adapters"):
        from_peft(peft_model)
