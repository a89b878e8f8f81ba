"""Tiny transformers models built from configs (no download) and the adapter
helpers that the PEFT, PEFT-parity and hot-swap tests share. Import it after
`pytest.importorskip("transformers")`."""

import pytest
import torch
import transformers
from conftest import DEVICE
from helpers import assert_matches_reference

import fused_lora
from fused_lora.integrations.model import lora_layers

VOCAB = 128
GPT2_VOCAB = 64


@pytest.fixture(autouse=True)
def _torch_backend_unless_parametrized(request):
    """Tests that take the `backend` fixture run on both backends; the others test
    conversions and files, not kernels, and run on the torch backend on a CPU
    (the interpreter is slow) and on the Triton kernels on a GPU. A test module
    imports this fixture to have it."""
    if "backend" in request.fixturenames:
        yield
        return
    with fused_lora.set_backend("auto" if torch.cuda.is_available() else "torch"):
        yield


def tiny_llama(dtype=torch.float32):
    """A 2-layer Llama (hidden 64): nn.Linear projections without biases."""
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).to(device=DEVICE, dtype=dtype).eval()


def tiny_gpt2(dtype=torch.float32):
    """A 2-layer GPT-2 (hidden 32): c_attn, c_proj and c_fc are transformers
    Conv1D modules (weight (in, out), with biases)."""
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=GPT2_VOCAB, n_positions=32)
    return transformers.GPT2LMHeadModel(config).to(device=DEVICE, dtype=dtype).eval()


def token_ids(vocab=VOCAB):
    return torch.randint(0, vocab, (2, 9), device=DEVICE)


@torch.no_grad()
def randomize_adapters(model):
    """Trained-looking adapters (never B = 0), PEFT's or ours: A (r, in), B (out, r),
    with lora_bias b_B (out,), with DoRA a magnitude m (out,) away from its initial ||W + s B A||."""
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.copy_(torch.randn_like(p) * (p.shape[1] ** -0.5 if p.dim() == 2 else 0.5))
        elif ".lora_magnitude_vector." in name:
            p.mul_(torch.rand_like(p) + 0.5)


def peft_layer(peft_model, name, adapter="default"):
    module = peft_model.get_base_model().get_submodule(name)
    return module, module.lora_A[adapter].weight, module.lora_B[adapter].weight


@torch.no_grad()
def copy_adapters(peft_model, model, adapter="default"):
    """PEFT's adapter tensors (A, B, b_B and DoRA's m) copied into our LoRALinear layers of the same names."""
    for name, layer in lora_layers(model).items():
        module = peft_model.get_base_model().get_submodule(name)
        layer.lora_A.load_state_dict(module.lora_A[adapter].state_dict())
        layer.lora_B.load_state_dict(module.lora_B[adapter].state_dict())
        if layer.use_dora:
            layer.lora_magnitude_vector.weight.copy_(module.lora_magnitude_vector[adapter].weight)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def assert_same_logits(out, ref, dtype):
    assert_matches_reference(out, ref.double(), dtype, name="logits")


def assert_outputs_and_gradients_equal_peft(ours, peft_model, vocab=VOCAB):
    """Our model and PEFT's on the same tokens, with the same random output gradient: equal logits,
    and equal gradients for every adapter Parameter of our LoRALinear layers (A, B, b_B, DoRA's m)."""
    ids = token_ids(vocab)
    grad = torch.randn(2, 9, vocab, device=DEVICE)
    out, ref = ours(ids).logits, peft_model(ids).logits
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    assert_same_logits(out, ref, torch.float32)
    for name, layer in lora_layers(ours).items():
        module = peft_model.get_base_model().get_submodule(name)
        for key, param in layer.named_parameters():
            if key.startswith("lora_"):
                theirs = module.get_parameter(key.replace(".", ".default.", 1))  # lora_A.weight: lora_A.default.weight
                assert_matches_reference(
                    param.grad, theirs.grad.double(), torch.float32, "gradients", name=f"{name}.{key}"
                )
