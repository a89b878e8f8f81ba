"""Quantized bases for the QLoRA and FP8 tests: bitsandbytes NF4 Linear4bit
layers and tiny 4-bit Llamas loaded with BitsAndBytesConfig (as users load
them), transformers FP8Linear layers and tiny FP8 Llamas (built on the CPU
from quantize_fp8: transformers' FP8 loader needs a GPU), and the float64
check of a LoRA layer over any of them. Import it after importorskip of
bitsandbytes / transformers as needed."""

import copy
import math

import torch
from conftest import DEVICE
from helpers import assert_matches_reference, f64, randn
from torch import nn

from fused_lora.quantized import quantize_fp8

VOCAB = 128
# K % 64 == 0 everywhere: bitsandbytes 0.50.2 on the CPU dequantizes NF4 wrongly when K % 16 == 0 and
# K % 64 != 0, and PEFT's 4-bit layers compute through that dequantize.
LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=32,
)


def dense_llama(dtype=torch.float32):
    """A 2-layer Llama (hidden 64, MLP 128), random, from a config: no download."""
    import transformers

    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(device=DEVICE, dtype=dtype)


def load_4bit_llama(path, dtype=torch.float32, nested=True):
    """The dense Llama saved at `path`, loaded with BitsAndBytesConfig(load_in_4bit=True, NF4,
    double quantization when nested), computing in `dtype`: every Linear but lm_head a Linear4bit."""
    import transformers

    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=nested,
        bnb_4bit_compute_dtype=dtype,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=dtype, device_map=DEVICE
    )
    return model.train()  # train mode: bitsandbytes repacks CPU weights on eval forwards


def linear4bit(n, k, *, bias=True, dtype=torch.bfloat16, nested=True, quant_type="nf4", storage=torch.uint8):
    """A bitsandbytes Linear4bit (k -> n) holding a random weight, quantized by bitsandbytes."""
    import bitsandbytes as bnb

    module = bnb.nn.Linear4bit(
        k, n, bias, compute_dtype=dtype, compress_statistics=nested, quant_type=quant_type, quant_storage=storage
    )
    module.weight = bnb.nn.Params4bit(
        randn(n, k, scale=k**-0.5, dtype=dtype),
        requires_grad=False,
        compress_statistics=nested,
        quant_type=quant_type,
        quant_storage=storage,
        module=module,
    )
    if bias:
        module.bias = nn.Parameter(randn(n, dtype=dtype), requires_grad=False)
    return module.to(DEVICE)  # bitsandbytes quantizes the weight when it moves


def fp8_linear(n, k, *, bias=True, dtype=torch.bfloat16, per_tensor=False):
    """A transformers FP8Linear (k -> n): weight e4m3 with 128 x 128 block scales (or one scale),
    the scales spread several-fold so that a scale read from the wrong block shows."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    module = FP8Linear(k, n, block_size=None if per_tensor else (128, 128), has_bias=bias)
    dense = randn(n, k, scale=k**-0.5, dtype=torch.float32)
    if per_tensor:
        scale = dense.abs().amax() / 448
        data = (dense / scale).to(torch.float8_e4m3fn)
    else:
        q = quantize_fp8(dense)
        data, scale = q.data, q.scale * (1 + 3 * torch.rand(q.scale.shape))
    module.weight = nn.Parameter(data, requires_grad=False)
    module.weight_scale_inv = nn.Parameter(scale.float().reshape(module.weight_scale_inv.shape))
    if bias:
        module.bias = nn.Parameter(randn(n, dtype=dtype))
    return module.to(DEVICE)


def fp8_llama(dtype=torch.float32, per_tensor=False):
    """A random tiny Llama whose Linear layers but lm_head are FP8Linear (as transformers'
    fine-grained FP8 loader builds them), and the reference: the same model in float64 with
    those weights dequantized into its nn.Linear layers."""
    model = dense_llama(dtype)
    reference = copy.deepcopy(model).to(torch.float64)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name == "lm_head":
            continue
        fp8 = fp8_linear(module.out_features, module.in_features, bias=False, dtype=dtype, per_tensor=per_tensor)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, fp8)
        reference.get_submodule(name).weight.data = dequantize_fp8(fp8).double()
    return model, reference


def dequantize_fp8(module) -> torch.Tensor:
    """An FP8Linear's W in float32, as transformers itself dequantizes it (its backward's own decode)."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    return _dequantize_fp8_weight(module.weight, module.weight_scale_inv, module.block_size, torch.float32)


def check_layer(layer, m=7, dtype=None):
    """A LoRA layer over a quantized base against float64 computed from its
    dequantized weight: y, and the gradients of x, lora_A, lora_B (the base
    and its statistics get none). x (m, in) in `dtype` (default: the dtype
    the base was quantized from)."""
    weight = layer.linear_weight
    dtype = dtype or weight.dtype
    x = randn(m, layer.in_features, dtype=dtype, device=DEVICE).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype and y.shape == (m, layer.out_features)
    dy = randn(*y.shape, dtype=dtype, device=DEVICE)
    y.backward(dy)
    leaves = [f64(t).requires_grad_() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]
    ref_x, ref_a, ref_b = leaves
    ref = ref_x @ f64(weight.dequantize(torch.float32)).t() + layer.scaling * (ref_x @ ref_a.t()) @ ref_b.t()
    if layer.bias is not None:
        ref = ref + f64(layer.bias)
    ref.backward(f64(dy))
    assert_matches_reference(y, ref, dtype, name="y")
    ours = (x, layer.lora_A.weight, layer.lora_B.weight)
    for name, mine, theirs in zip(("x", "lora_A", "lora_B"), ours, leaves, strict=True):
        assert theirs.grad.abs().max() > 0
        assert_matches_reference(mine.grad, theirs.grad, dtype, "gradients", name=f"d{name}")
    assert all(t.grad is None for t in (layer.weight, *(getattr(layer, n) for n in layer._quant.buffers)))


def nonzero_adapters(layer):
    """Random A and B (a fresh adapter's B is zero, which would hide the LoRA branch)."""
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn_like(layer.lora_A.weight) / math.sqrt(layer.in_features))
        layer.lora_B.weight.copy_(torch.randn_like(layer.lora_B.weight) / math.sqrt(layer.r))
    return layer
