"""QLoRA: LoRA layers over NF4 bases, as bitsandbytes stores them (Linear4bit,
plain and nested statistics, any quant_storage) and as quantize_base makes
them: y and the LoRA gradients against float64 computed from the
dequantized weights on both backends and interpreter configs, K not a
multiple of the block; the layer's view equals bitsandbytes' own dequantize;
state_dicts under bitsandbytes' keys; merge as PEFT's Linear4bit merges
(bit for bit), unmerge bit for bit, merge_and_unload / unload giving back
Linear4bit; PEFT QLoRA models both ways (outputs and LoRA gradients equal to
PEFT's); and the refusals, each naming the layer and what it refuses.

bitsandbytes 0.50.2 on the CPU dequantizes NF4 wrongly when K % 16 == 0 and
K % 64 != 0: comparisons that run bitsandbytes' own decode (its dequantize,
its Linear4bit forward, PEFT's 4-bit layers) use K % 64 == 0 or K % 16 != 0.
"""

import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes", reason="the QLoRA tests need bitsandbytes: pip install -e '.[test]'")
peft = pytest.importorskip("peft", reason="the QLoRA tests need peft: pip install -e '.[test]'")
pytest.importorskip("transformers", reason="the QLoRA tests need transformers: pip install -e '.[test]'")

from conftest import DEVICE  # noqa: E402
from helpers import assert_matches_reference, f64, randn  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit  # noqa: E402
from quantized_models import (  # noqa: E402
    VOCAB,
    check_layer,
    dense_llama,
    linear4bit,
    load_4bit_llama,
    nonzero_adapters,
)
from tiny_models import (  # noqa: E402
    _torch_backend_unless_parametrized,  # noqa: F401 (an autouse fixture)
    assert_outputs_and_gradients_equal_peft,
    assert_same_logits,
    logits,
    randomize_adapters,
    token_ids,
)
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

import fused_lora  # noqa: E402
from fused_lora import (  # noqa: E402
    LoRALinear,
    MultiLoRALinear,
    apply_lora,
    from_peft,
    load_adapter,
    merge_and_unload,
    quantize_base,
    save_adapter,
    to_peft,
    unload,
)
from fused_lora.integrations.model import lora_layers, multi_lora_layers  # noqa: E402
from fused_lora.quantized import quantize_nf4  # noqa: E402

REQUANTIZE = "quantizes the merged weight again"


def qlora_layer(n, k, **kwargs):
    """A LoRALinear (r = 4, random A and B) over a fresh bitsandbytes Linear4bit."""
    return LoRALinear.from_linear(linear4bit(n, k, **kwargs), r=4, lora_alpha=8, init_lora_weights=False)


# ---- one layer over a bitsandbytes Linear4bit

# (N, K, dtype, nested): blocks of 64 spanning rows (K = 100, 38), every dtype, both statistics.
LAYER_CASES = [(33, 100, torch.bfloat16, True), (20, 64, torch.float32, False), (7, 38, torch.float16, True)]


@pytest.mark.parametrize(("n", "k", "dtype", "nested"), LAYER_CASES, ids=["33x100-bf16", "20x64-fp32", "7x38-fp16"])
def test_linear4bit_layer(n, k, dtype, nested, backend, config):
    """from_linear keeps the Linear4bit's packed Params4bit (shared, frozen),
    takes in / out from its logical shape, gives fp32 adapters (PEFT's QLoRA
    default), and computes y and the LoRA gradients of the float64 reference."""
    module = linear4bit(n, k, dtype=dtype, nested=nested)
    layer = LoRALinear.from_linear(module, r=4, lora_alpha=8, init_lora_weights=False)
    assert layer.weight is module.weight and not layer.weight.requires_grad and layer.base_format == "nf4"
    assert (layer.in_features, layer.out_features) == (k, n) and layer.lora_A.weight.dtype == torch.float32
    assert layer.weight_absmax is module.weight.quant_state.absmax  # the statistics are shared too
    check_layer(layer)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16-storage"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_view_is_bitsandbytes_dequantize(nested, storage):
    """The QuantizedWeight the layer hands the kernels decodes to exactly
    what bitsandbytes' dequantize_4bit gives, also for packed bytes stored in
    bf16 elements (quant_storage, FSDP-QLoRA's setting)."""
    module = linear4bit(48, 128, dtype=torch.float32, nested=nested, storage=storage)
    expected = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    layer = LoRALinear.from_linear(module)
    torch.testing.assert_close(layer.linear_weight.dequantize(), expected, rtol=0, atol=0)


def test_state_dict_is_bitsandbytes():
    """The layer's state_dict holds the Linear4bit's own entries (keys, order
    and values: weight, bias, weight.absmax, ..., weight.quant_state.
    bitsandbytes__nf4) beside the adapters; load_state_dict restores them into
    a layer over another Linear4bit, and refuses statistics of another format."""
    module = linear4bit(33, 100)
    layer = nonzero_adapters(LoRALinear.from_linear(module, r=4))
    theirs, ours = module.state_dict(), layer.state_dict()
    assert [k for k in ours if not k.startswith("lora_")] == list(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    other = LoRALinear.from_linear(linear4bit(33, 100), r=4)
    x = randn(5, 100, dtype=torch.bfloat16, device=DEVICE)
    assert not torch.equal(other(x), layer(x))
    other.load_state_dict(ours)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    plain = LoRALinear.from_linear(linear4bit(33, 100, nested=False), r=4)
    with pytest.raises(RuntimeError, match="NF4 base"):
        plain.load_state_dict(ours)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_merge_is_peft_merge_and_unmerge_is_exact(nested):
    """merge() does what PEFT's Linear4bit merge does (dequantize, add s B A
    in fp32, quantize again with the same block size and nesting): the same
    packed bytes and statistics, bit for bit, and a warning. The merged
    forward computes that weight; unmerge() restores the original bit for bit."""
    module = linear4bit(40, 128, dtype=torch.float32, nested=nested, bias=True)
    peft_layer = PeftLinear4bit(copy.deepcopy(module), "default", LoraConfig(r=4), r=4, lora_alpha=8)
    layer = nonzero_adapters(LoRALinear.from_linear(module, r=4, lora_alpha=8))
    peft_layer.lora_A["default"].weight.data.copy_(layer.lora_A.weight)
    peft_layer.lora_B["default"].weight.data.copy_(layer.lora_B.weight)
    original = [layer.weight.clone(), *(getattr(layer, name).clone() for name in layer._quant.buffers)]
    x = randn(6, 128, device=DEVICE)
    with pytest.warns(UserWarning, match=REQUANTIZE):
        layer.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own rounding warning
        peft_layer.merge()
    state = peft_layer.get_base_layer().weight.quant_state
    torch.testing.assert_close(layer.weight, peft_layer.get_base_layer().weight.data, rtol=0, atol=0)
    theirs = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code, state.offset] if nested else [])
    for name, value in zip(layer._quant.buffers, theirs, strict=True):
        torch.testing.assert_close(getattr(layer, name), value.reshape(getattr(layer, name).shape), rtol=0, atol=0)
    merged_w = f64(layer.linear_weight.dequantize(torch.float32))
    assert_matches_reference(layer(x), f64(x) @ merged_w.t() + f64(layer.bias), torch.float32)
    layer.unmerge()
    for before, after in zip(original, [layer.weight, *(getattr(layer, n) for n in layer._quant.buffers)], strict=True):
        assert torch.equal(before, after)


def test_merge_and_unload_and_unload_give_back_linear4bit():
    """merge_and_unload and unload put back bitsandbytes Linear4bit modules
    holding the layers' packed weights: bitsandbytes' own forward then
    computes the merged weight (merge_and_unload) or the original one (unload,
    the very Params4bit)."""
    model = nn.Sequential(linear4bit(64, 128, dtype=torch.float32), nn.ReLU(), linear4bit(16, 64, dtype=torch.float32))
    merged = apply_lora(copy.deepcopy(model), "all-linear", r=4, lora_alpha=8, init_lora_weights=False)
    x = randn(5, 128, device=DEVICE)
    with pytest.warns(UserWarning, match=REQUANTIZE):
        for layer in lora_layers(merged).values():
            layer.merge()
    expected = merged(x)
    merged = merge_and_unload(merged)
    assert all(type(merged[i]) is bnb.nn.Linear4bit for i in (0, 2))
    assert_matches_reference(merged(x), f64(expected), torch.float32)
    plain = apply_lora(model, "all-linear", r=4)
    packed = plain[0].weight
    plain = unload(plain)
    assert type(plain[0]) is bnb.nn.Linear4bit and plain[0].weight is packed
    assert_matches_reference(plain(x), f64(model(x)), torch.float32)


@pytest.mark.skipif(
    DEVICE != "cpu" or not bnb.functional.has_avx512bf16(),
    reason="bitsandbytes repacks Linear4bit weights on CPUs with AVX512-BF16 only",
)
def test_bitsandbytes_cpu_packing_is_undone():
    """On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight
    for its own kernels on an eval forward without grad; from_linear undoes
    it (as bitsandbytes' state_dict does) and computes what that layer did."""
    module = linear4bit(64, 128).eval()
    x = randn(3, 128, dtype=torch.bfloat16, device=DEVICE)
    with torch.no_grad():
        expected = module(x)
    assert module.weight.quant_state.packing_format_for_cpu
    layer = LoRALinear.from_linear(module, r=4)
    assert layer.weight.shape == (64 * 128 // 2, 1)
    assert_matches_reference(layer(x), f64(expected), torch.bfloat16)


def test_torch_compile(backend):
    """A LoRALinear over a nested NF4 base compiles to one graph
    (fullgraph): y and the LoRA gradients equal eager."""
    torch._dynamo.reset()
    layer = qlora_layer(33, 100)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    x = randn(9, 100, dtype=torch.bfloat16, device=DEVICE)
    results = []
    for fn in (compiled, layer):
        y = fn(x)
        y.float().square().sum().backward()
        results.append([y, layer.lora_A.weight.grad, layer.lora_B.weight.grad])
        layer.zero_grad(set_to_none=True)
    assert counter.frame_count == 1
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)
    torch._dynamo.reset()


# ---- quantize_base("nf4"): a dense model quantized in place, without bitsandbytes


def test_quantize_base_nf4(backend):
    """quantize_base turns each LoRA layer's dense weight into NF4 in place:
    the dense Parameter is dropped (freed), the bytes freed are returned,
    the layers compute the float64 reference of their dequantized weights,
    and the result is bitsandbytes' layout (its dequantize decodes it)."""
    model = nn.Sequential(LoRALinear(128, 48, r=4), nn.GELU(), LoRALinear(48, 37, r=2, bias=False))
    for layer in model[0], model[2]:
        nonzero_adapters(layer)
    dense = weakref.ref(model[0].weight)
    freed = quantize_base(model, "nf4")
    gc.collect()
    assert dense() is None
    for layer, (n, k) in ((model[0], (48, 128)), (model[2], (37, 48))):
        assert layer.base_format == "nf4" and layer.weight.dtype == torch.uint8
        assert layer.weight.shape == (-(-n * k // 2), 1) and layer.weight_absmax.shape == (-(-n * k // 64),)
        check_layer(layer, dtype=torch.float32)
    expected = sum(n * k * 4 - (-(-n * k // 2) + -(-n * k // 64) * 4 + 16 * 4) for n, k in ((48, 128), (37, 48)))
    assert freed == expected
    assert quantize_base(model, "nf4") == 0  # already NF4: left as it is
    module = unload(model)[0]
    assert type(module) is bnb.nn.Linear4bit
    decoded = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)  # K = 128
    torch.testing.assert_close(decoded, quantize_nf4(decoded).dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("blocksize", [32, 256])
def test_quantize_base_multi_and_conv1d(blocksize):
    """quantize_base covers MultiLoRALinear layers (rows of different
    adapters, the base-only rows too; merge and unmerge) and Conv1D bases
    (quantized in their (out, in) layout, as bitsandbytes does:
    fan_in_fan_out goes), any block size."""
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 40)  # (in 40, out 24), weight (40, 24)
    nn.init.normal_(conv.weight, std=40**-0.5)
    single = nonzero_adapters(LoRALinear.from_linear(conv, r=3))
    many = MultiLoRALinear(40, 24)
    for name, r in (("a", 2), ("b", 5)):
        many.add_adapter(name, r=r, lora_alpha=4, init_lora_weights=False)
    x = randn(6, 40, device=DEVICE)
    ids = torch.tensor([0, 1, -1, 1, 0, -1])
    quantize_base(nn.ModuleList([single, many]), "nf4", blocksize=blocksize)
    assert not single.fan_in_fan_out and single._quant.blocksize == blocksize
    check_layer(single, dtype=torch.float32)
    w = f64(many.linear_weight.dequantize(torch.float32))
    expected = f64(x) @ w.t() + f64(many.bias)
    for i, name in enumerate(many.adapter_names):
        rows = (ids == i).double()[:, None]
        lora = (f64(x) @ f64(many.lora_A[name].weight).t()) @ f64(many.lora_B[name].weight).t()
        expected = expected + rows * many.scaling[name] * lora
    assert_matches_reference(many(x, ids), expected, torch.float32)
    packed = many.weight.clone()
    with pytest.warns(UserWarning, match=REQUANTIZE):
        many.merge("b")  # NF4 merged as LoRALinear merges; every row must then use "b"
    merged_w = f64(many.linear_weight.dequantize(torch.float32))
    b = torch.ones(6, dtype=torch.int64)
    assert_matches_reference(many(x, b), f64(x) @ merged_w.t() + f64(many.bias), torch.float32)
    many.unmerge()
    assert torch.equal(many.weight, packed)


# ---- PEFT QLoRA models


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    """A random tiny Llama saved once, for BitsAndBytesConfig loads."""
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    dense_llama().save_pretrained(path)
    return path


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_from_peft_and_to_peft_qlora(llama_path, nested):
    """A PEFT QLoRA model (BitsAndBytesConfig(load_in_4bit=True), lora.Linear4bit
    on every linear layer) converts to LoRALinear layers over the same
    Params4bit: PEFT's logits and LoRA gradients; to_peft gives lora.Linear4bit
    layers holding the same tensors back, computing the same logits."""
    config = LoraConfig(r=4, target_modules="all-linear")
    peft_model = get_peft_model(load_4bit_llama(llama_path, nested=nested), config)
    randomize_adapters(peft_model)
    ours = from_peft(copy.deepcopy(peft_model))
    layers = lora_layers(ours)
    assert len(layers) == 14 and all(layer.base_format == "nf4" for layer in layers.values())
    assert "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4" in ours.state_dict()
    assert_outputs_and_gradients_equal_peft(ours, peft_model)
    ids = token_ids()
    expected = logits(ours, ids)
    packed = ours.model.layers[0].self_attn.q_proj.weight
    back = to_peft(ours)
    q_proj = back.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj) is PeftLinear4bit and q_proj.get_base_layer().weight is packed
    assert_same_logits(logits(back, ids), expected, torch.float32)


def test_peft_qlora_layer_in_bf16(llama_path):
    """In bf16 (QLoRA's usual compute dtype), one layer of a PEFT QLoRA model
    and ours over the same Linear4bit: outputs and LoRA gradients within the
    bf16 tolerance of each other."""
    peft_model = get_peft_model(load_4bit_llama(llama_path, torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_adapters(peft_model)
    module = peft_model.get_base_model().model.layers[1].self_attn.q_proj
    layer = from_peft(copy.deepcopy(peft_model)).model.layers[1].self_attn.q_proj
    x = randn(2, 7, 64, dtype=torch.bfloat16, device=DEVICE)
    dy = randn(2, 7, 64, dtype=torch.bfloat16, device=DEVICE)
    ours, theirs = layer(x), module(x)
    (ours * dy).sum().backward()
    (theirs * dy).sum().backward()
    assert_matches_reference(ours, f64(theirs), torch.bfloat16)
    for ab in "AB":
        mine, peft_grad = getattr(layer, f"lora_{ab}").weight.grad, getattr(module, f"lora_{ab}")["default"].weight.grad
        assert_matches_reference(mine, f64(peft_grad), torch.bfloat16, "gradients", name=f"dlora_{ab}")


def test_apply_lora_and_adapter_files_on_a_4bit_model(llama_path, tmp_path):
    """apply_lora on a 4-bit model freezes everything but the adapters;
    its adapter, saved, loads into PEFT on a 4-bit model (PeftModel.
    from_pretrained) and into fused-lora (load_adapter), with equal logits."""
    model = apply_lora(load_4bit_llama(llama_path), "all-linear", r=4, lora_alpha=8)
    randomize_adapters(model)
    trainable, _ = fused_lora.count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    save_adapter(model, tmp_path)
    ids = token_ids()
    expected = logits(model, ids)
    # Train mode (dropout 0): in eval mode bitsandbytes would repack the CPU weights, rounding absmax to bf16.
    theirs = PeftModel.from_pretrained(load_4bit_llama(llama_path), tmp_path).train()
    assert_same_logits(logits(theirs, ids), expected, torch.float32)
    reloaded = load_adapter(load_4bit_llama(llama_path), tmp_path)
    assert_same_logits(logits(reloaded, ids), expected, torch.float32)


def test_from_peft_with_several_adapters(llama_path):
    """A PEFT QLoRA model with two adapters becomes MultiLoRALinear layers
    over the 4-bit bases; per-sample adapters give PEFT's logits."""
    two = get_peft_model(load_4bit_llama(llama_path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "sql")
    two.add_adapter("chat", LoraConfig(r=2, target_modules=["v_proj", "o_proj"]))
    randomize_adapters(two)
    ids = token_ids()
    names = ["chat", "sql"]
    # PEFT's adapter_names= needs eval mode, where bitsandbytes would repack the CPU weights (absmax rounded
    # to bf16): each sample instead runs in train mode (dropout 0) with its adapter active.
    expected = []
    for i, name in enumerate(names):
        two.set_adapter(name)
        expected.append(logits(two, ids[i : i + 1]))
    expected = torch.cat(expected)
    ours = from_peft(two)
    assert all(layer.base_format == "nf4" for layer in multi_lora_layers(ours).values())
    with fused_lora.adapter_names(ours, names):
        assert_same_logits(logits(ours, ids), expected, torch.float32)


# ---- what is refused


def test_refusals_name_the_layer():
    """bitsandbytes' Linear8bitLt, FP4, a Linear4bit not quantized yet, PiSSA
    and DoRA over a 4-bit base: errors that name what they refuse, from
    from_linear and (naming the module) from apply_lora, before any change."""
    eight = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
    with pytest.raises(NotImplementedError, match="Linear8bitLt"):
        LoRALinear.from_linear(eight)
    model = nn.Sequential(linear4bit(32, 64), eight)
    with pytest.raises(NotImplementedError, match="module '1': bitsandbytes' Linear8bitLt"):
        apply_lora(model, ["0", "1"])
    assert type(model[0]) is bnb.nn.Linear4bit  # unchanged
    with pytest.raises(NotImplementedError, match=r"'fp4' \(FP4\) is not supported"):
        LoRALinear.from_linear(linear4bit(32, 64, quant_type="fp4"))
    unquantized = bnb.nn.Linear4bit(64, 32, quant_type="nf4")
    with pytest.raises(ValueError, match="not quantized yet"):
        LoRALinear.from_linear(unquantized)
    with pytest.raises(NotImplementedError, match="'pissa' needs a dense base"):
        apply_lora(nn.Sequential(linear4bit(32, 64)), ["0"], init_lora_weights="pissa")


def test_quantize_base_refusals():
    """quantize_base refuses, naming the layer and the format, before changing
    any layer: another format, a merged layer, a base quantized
    otherwise, a weight on the meta device, tensors on several devices, and a
    model without LoRA layers."""
    with pytest.raises(ValueError, match="format must be one of"):
        quantize_base(LoRALinear(8, 8), "int4")
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        quantize_base(LoRALinear(8, 8), "nf4", blocksize=0)
    with pytest.raises(ValueError, match="no LoRA layers"):
        quantize_base(nn.Linear(8, 8), "nf4")
    merged = nn.Sequential(LoRALinear(8, 8), LoRALinear(8, 8))
    merged[1].merge()
    with pytest.raises(ValueError, match=r"layer '1' \(nf4\): the layer is merged"):
        quantize_base(merged, "nf4")
    assert merged[0].base_format is None  # nothing changed
    fp8 = LoRALinear(8, 8)
    quantize_base(fp8, "fp8")
    with pytest.raises(ValueError, match=r"\(nf4\): its base is quantized as fp8 already"):
        quantize_base(fp8, "nf4")
    with pytest.raises(ValueError, match="meta device"):
        quantize_base(LoRALinear(8, 8, device="meta"), "nf4")
    split = LoRALinear(8, 8)
    split.lora_A.to("meta")
    with pytest.raises(ValueError, match=r"\(nf4\): the layer's tensors are on several devices"):
        quantize_base(split, "nf4")


def test_quantize_base_then_merge_and_unload_a_model():
    """A dense Llama given LoRA and quantize_base("nf4") merges and unloads
    into bitsandbytes Linear4bit modules, whose own forwards compute the
    logits our merged layers computed."""
    model = apply_lora(dense_llama(), "all-linear", r=2, init_lora_weights=False)
    quantize_base(model, "nf4")
    with pytest.warns(UserWarning, match=REQUANTIZE):
        for layer in lora_layers(model).values():
            layer.merge()
    ids = token_ids()
    expected = logits(model, ids)
    assert expected.shape == (2, 9, VOCAB)
    merged = merge_and_unload(model)
    assert type(merged.model.layers[0].mlp.up_proj) is bnb.nn.Linear4bit
    assert_same_logits(logits(merged, ids), expected, torch.float32)
