"""Quantized frozen base weights in the LoRA layers: bitsandbytes' NF4
Linear4bit (QLoRA), transformers' fine-grained FP8Linear, and
quantize_base() for a model that starts from dense weights.

A layer over a quantized base holds, instead of a dense `weight`:

    nf4   weight            the packed 4-bit codes, (ceil(N*K/2), 1) bytes (uint8, or another quant_storage
                            dtype read as bytes): a Linear4bit's own Params4bit, shared with it
          weight_absmax, weight_quant_map and, nested, weight_nested_absmax, weight_nested_quant_map,
          weight_nested_offset: buffers; the state_dict has them under bitsandbytes' keys
          (weight.absmax, weight.quant_map, ..., weight.quant_state.bitsandbytes__nf4)
    fp8   weight            float8_e4m3fn (N, K)
          weight_scale_inv  fp32 (ceil(N/128), ceil(K/128)) or 0-d: W = weight * scale (transformers' name)

and `_quant`, a QuantizedBase: the format, the logical shape (N, K), the
dtype the weights were quantized from, the block sizes. The forward hands the
kernels a QuantizedWeight viewing these tensors (no copy), decoded into x's
dtype: a quantized base has no dense dtype of its own. Nothing here imports
bitsandbytes or transformers unless the model already uses them, or a base
quantized by quantize_base is given back as their module type (unload).
"""

import dataclasses
import json
import math
import sys
import warnings

import torch
from torch import nn

from ..checks import FLOAT_DTYPES
from ..quantized import FORMATS, QuantizedWeight, quantize_fp8, quantize_nf4

FP8_BLOCK_SIZES = (None, (128, 128))  # per tensor, or 128 x 128 blocks: what the kernels decode
NF4_BUFFERS = ("weight_absmax", "weight_quant_map")
NESTED_BUFFERS = ("weight_nested_absmax", "weight_nested_quant_map", "weight_nested_offset")
# The layer's NF4 buffers under bitsandbytes' state_dict keys (what a Linear4bit saves).
BNB_KEYS = {
    "weight_absmax": "weight.absmax",
    "weight_quant_map": "weight.quant_map",
    "weight_nested_absmax": "weight.nested_absmax",
    "weight_nested_quant_map": "weight.nested_quant_map",
}
BNB_PACKED_KEY = "weight.quant_state.bitsandbytes__nf4"


def _loaded(module_name: str):
    """A library's module if the program imported it already (else no layer of it can exist)."""
    return sys.modules.get(module_name)


def _import(package: str, what: str):
    try:
        return __import__(package, fromlist=["_"])
    except ImportError as error:
        raise ImportError(f"{what} needs {package.split('.')[0]} (pip install {package.split('.')[0]})") from error


@dataclasses.dataclass
class QuantizedBase:
    """What a LoRA layer knows of its quantized base: format ("nf4" | "fp8"),
    the logical weight shape (N, K) = (out, in), `dtype` the weights were
    quantized from (what merge and linear_weight decode into), the NF4 block
    sizes (nested_blocksize None: plain statistics), and what unload needs to
    rebuild the module type it came from (`module_kwargs`)."""

    format: str
    shape: tuple[int, int]
    dtype: torch.dtype
    blocksize: int = 64
    nested_blocksize: int | None = None
    module_kwargs: dict = dataclasses.field(default_factory=dict)

    @property
    def buffers(self) -> tuple[str, ...]:
        """The layer's statistics tensors, by attribute name."""
        if self.format == "fp8":
            return ("weight_scale_inv",)
        return NF4_BUFFERS + (NESTED_BUFFERS if self.nested_blocksize else ())

    def view(self, layer: nn.Module, dtype: torch.dtype | None = None) -> QuantizedWeight:
        """The layer's base as a QuantizedWeight decoded into `dtype` (the
        default: self.dtype), viewing the layer's tensors: no copy. Under FSDP2
        `layer.weight` is whatever the forward sees (the unsharded parameter)."""
        dtype = dtype if dtype in FLOAT_DTYPES else self.dtype
        data = layer.weight
        if self.format == "fp8":
            if data.dtype != torch.float8_e4m3fn:
                raise TypeError(
                    f"the fp8 base weight is {data.dtype}, not float8_e4m3fn: it was cast (model.to(dtype) or "
                    ".half() converts float8 tensors too); reload the model"
                )
            return QuantizedWeight("fp8", data, self.shape, dtype, scale=layer.weight_scale_inv)
        data = (data if data.dtype == torch.uint8 else data.view(torch.uint8)).reshape(-1)
        weight = QuantizedWeight(
            "nf4", data, self.shape, dtype, absmax=layer.weight_absmax, code=layer.weight_quant_map,
            blocksize=self.blocksize,
        )  # fmt: skip
        if self.nested_blocksize:
            weight.nested_absmax, weight.nested_code = layer.weight_nested_absmax, layer.weight_nested_quant_map
            weight.nested_offset, weight.nested_blocksize = layer.weight_nested_offset, self.nested_blocksize
        return weight

    def nbytes(self, layer: nn.Module) -> int:
        """Bytes the layer holds for its base: the packed weight and the statistics."""
        tensors = [layer.weight, *(getattr(layer, name) for name in self.buffers)]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- merge: dequantize, add, quantize again

    def check_mergeable(self, where: str) -> None:
        """Raise where merge cannot fold an update into this base: FP8."""
        if self.format == "fp8":
            raise NotImplementedError(
                f"{where}: cannot merge into an fp8 base (the merged weight would need new FP8 scales, "
                "a second quantization that transformers' FP8 models do not do); use unload() and keep the "
                "adapter, or merge into a dense copy of the model"
            )

    def merge(self, layer: nn.Module, delta: torch.Tensor, bias_delta: torch.Tensor | None) -> None:
        """NF4: W <- quantize(dequantize(W) + delta) with the same block sizes
        and nesting, as PEFT's Linear4bit merge does (lossy: warns), in place
        on the (possibly shared) packed weight. The packed weight and its
        statistics are kept (copies, 4-bit) so that unmerge restores them bit
        for bit; `delta` is (out, in), fp32 or wider. Called by the layer's
        _merge_delta, under its no_grad."""
        self.check_mergeable("merge")
        warnings.warn(
            "merging into an NF4 base quantizes the merged weight again: the result differs from "
            "W + scaling * B A by up to one NF4 step per element (as PEFT's 4-bit merge)",
            stacklevel=5,  # layer.merge()'s caller: past _merge_delta and its no_grad wrapper
        )
        wide = self.view(layer, torch.float32).dequantize(torch.float32)
        merged = wide + delta.to(torch.float32)
        layer._unmerged_weight = layer.weight.detach().clone()
        layer._unmerged_statistics = [getattr(layer, name).clone() for name in self.buffers]
        self._store_nf4(layer, merged)
        if bias_delta is not None:
            layer._unmerged_bias = layer.bias.detach().clone()
            bias_wide = torch.promote_types(layer.bias.dtype, torch.float32)
            layer.bias.copy_(layer.bias.to(bias_wide) + bias_delta.to(bias_wide))

    def _store_nf4(self, layer: nn.Module, weight: torch.Tensor) -> None:
        """Quantize `weight` (N, K) into the layer's own tensors, in place."""
        q = quantize_nf4(weight, self.blocksize)
        packed = layer.weight.detach()
        (packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)).reshape(-1).copy_(q.data)
        absmax = q.absmax
        if self.nested_blocksize:
            # bitsandbytes' compress_statistics: absmax - mean, 8-bit blockwise with the layer's table.
            functional = _import("bitsandbytes.functional", "merging into a nested NF4 base")
            offset = absmax.mean()
            absmax, state2 = functional.quantize_blockwise(
                absmax - offset, code=layer.weight_nested_quant_map, blocksize=self.nested_blocksize
            )
            layer.weight_nested_absmax.copy_(state2.absmax)
            layer.weight_nested_offset.copy_(offset)
        layer.weight_absmax.copy_(absmax)
        sync_bitsandbytes_state(layer)

    @torch.no_grad()
    def restore(self, layer: nn.Module) -> None:
        """Undo merge: the statistics saved by merge (the caller restores the packed weight)."""
        for name, saved in zip(self.buffers, layer._unmerged_statistics, strict=True):
            getattr(layer, name).copy_(saved)
        layer._unmerged_statistics = None
        sync_bitsandbytes_state(layer)

    # ---- the state_dict, under bitsandbytes' keys

    def _packed_config(self, layer: nn.Module) -> dict:
        """The non-tensor items bitsandbytes packs into weight.quant_state.bitsandbytes__nf4."""
        config = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype)}
        config["shape"] = list(self.shape)
        if self.nested_blocksize:
            config["nested_blocksize"] = self.nested_blocksize
            config["nested_dtype"] = "float32"
            config["nested_offset"] = layer.weight_nested_offset.item()
        return config

    def save_state(self, layer: nn.Module, destination: dict, prefix: str, keep_vars: bool) -> None:
        """Add the NF4 statistics to a state_dict as a Linear4bit does (FP8's are registered tensors)."""
        if self.format != "nf4":
            return
        for name in self.buffers:
            if name in BNB_KEYS:
                tensor = getattr(layer, name)
                # bitsandbytes un-shares the nested table (safetensors refuses tensors shared between keys).
                tensor = tensor.clone() if name == "weight_nested_quant_map" else tensor
                destination[prefix + BNB_KEYS[name]] = tensor if keep_vars else tensor.detach()
        packed = json.dumps(self._packed_config(layer)).encode("utf-8")
        destination[prefix + BNB_PACKED_KEY] = torch.tensor(list(packed), dtype=torch.uint8)

    @torch.no_grad()
    def load_state(self, layer, state_dict: dict, prefix: str, missing: list, unexpected: list, errors: list) -> None:
        """Copy NF4 statistics saved under bitsandbytes' keys into the layer's
        buffers, in place (and take those keys off `unexpected`: nn.Module
        expects no dotted key below a Parameter); a format that does not fit
        is reported in `errors`."""
        if self.format != "nf4":
            return
        own = {prefix + BNB_PACKED_KEY, *(prefix + key for key in BNB_KEYS.values())}
        unexpected[:] = [key for key in unexpected if key not in own]
        packed = state_dict.get(prefix + BNB_PACKED_KEY)
        if packed is None:
            missing.append(prefix + BNB_PACKED_KEY)
            return
        config = json.loads(bytes(packed.tolist()).decode("utf-8"))
        expected = self._packed_config(layer)
        offset = config.pop("nested_offset", None)
        expected.pop("nested_offset", None)
        if config != expected:
            errors.append(f"{prefix}weight: the state_dict's NF4 base is {config}, the layer's {expected}")
            return
        for name, key in BNB_KEYS.items():
            if name not in self.buffers:
                continue
            tensor, buffer = state_dict.get(prefix + key), getattr(layer, name)
            if tensor is None:
                missing.append(prefix + key)
            elif tensor.shape != buffer.shape:
                shapes = f"{tuple(tensor.shape)} in the state_dict, {tuple(buffer.shape)} in the layer"
                errors.append(f"{prefix}{key}: shape {shapes}")
            else:
                buffer.copy_(tensor)
        if offset is not None:
            layer.weight_nested_offset.fill_(offset)
        sync_bitsandbytes_state(layer)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sync_bitsandbytes_state(layer: nn.Module) -> None:
    """Point a bitsandbytes Params4bit's quant_state at the layer's buffers
    (after merge, unmerge or a load changed them), so that the Linear4bit the
    weight is shared with computes the same weight."""
    state = getattr(layer.weight, "quant_state", None)
    if state is None:
        return
    state.absmax, state.code = layer.weight_absmax, layer.weight_quant_map
    if state.nested:
        state.offset = layer.weight_nested_offset
        state.state2.absmax, state.state2.code = layer.weight_nested_absmax, layer.weight_nested_quant_map


# ---- recognising a quantized base layer


def quantized_base(module: nn.Module, name: str = "linear") -> QuantizedBase | None:
    """A QuantizedBase describing `module`'s base (a bitsandbytes NF4
    Linear4bit, a transformers FP8Linear), None for a dense one (nn.Linear,
    Conv1D, an FP8Linear already dequantized), or an error naming `name` and
    what is not supported: Linear8bitLt, FP4, UE8M0 scales, other FP8 block
    sizes, a Linear4bit not quantized yet, other non-float weights."""
    bnb = _loaded("bitsandbytes.nn")
    if bnb is not None and isinstance(module, bnb.Linear8bitLt):
        raise NotImplementedError(
            f"{name}: bitsandbytes' Linear8bitLt (LLM.int8(), load_in_8bit) is not supported; quantized bases "
            "are NF4 (load_in_4bit, bnb_4bit_quant_type='nf4') and FP8 (transformers' fine-grained FP8)"
        )
    if bnb is not None and isinstance(module, bnb.Linear4bit):
        return _linear4bit_base(module, name)
    fp8 = _loaded("transformers.integrations.finegrained_fp8")
    if fp8 is not None and isinstance(module, fp8.FP8Linear) and module.weight.dtype not in FLOAT_DTYPES:
        return _fp8_linear_base(module, name)
    if module.weight.dtype not in FLOAT_DTYPES:
        raise NotImplementedError(
            f"{name}: a {type(module).__name__} with a {module.weight.dtype} weight is not supported; quantized "
            "bases are bitsandbytes' NF4 Linear4bit and transformers' FP8Linear (or see fused_lora.quantize_base)"
        )
    return None


def _linear4bit_base(module: nn.Module, name: str) -> QuantizedBase:
    weight = module.weight
    state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
    if state is None or not getattr(weight, "bnb_quantized", True):
        raise ValueError(
            f"{name}: the Linear4bit is not quantized yet (bitsandbytes quantizes it when it is moved to a "
            "device: .to(device))"
        )
    if state.quant_type != "nf4":
        raise NotImplementedError(
            f"{name}: bitsandbytes 4-bit quant_type {state.quant_type!r} (FP4) is not supported, only 'nf4'"
        )
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a Linear4bit for its CPU kernels on an eval forward without grad; its own
        # state_dict undoes that the same way (its absmax stays rounded to bf16).
        functional = _loaded("bitsandbytes.functional")
        weight.data, state = functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
    weight.quant_state = state
    n, k = state.shape
    nested = state.state2.blocksize if state.nested else None
    return QuantizedBase("nf4", (n, k), state.dtype, state.blocksize, nested, {"compute_dtype": module.compute_dtype})


def _fp8_linear_base(module: nn.Module, name: str) -> QuantizedBase:
    weight, scale = module.weight, module.weight_scale_inv
    block_size = None if module.block_size is None else tuple(module.block_size)
    if weight.dtype != torch.float8_e4m3fn:
        raise NotImplementedError(
            f"{name}: an FP8Linear with a {weight.dtype} weight (FP4, packed in int8) is not supported, only "
            "float8_e4m3fn"
        )
    if scale.dtype != torch.float32:
        raise NotImplementedError(
            f"{name}: FP8 scales in {scale.dtype} (UE8M0, scale_fmt='ue8m0') are not supported, only float32"
        )
    if block_size not in FP8_BLOCK_SIZES:
        raise NotImplementedError(
            f"{name}: FP8 block_size {list(block_size)} is not supported, only [128, 128] or per tensor (None)"
        )
    n, k = weight.shape
    expected = () if block_size is None else (math.ceil(n / 128), math.ceil(k / 128))
    if tuple(scale.shape) != expected:
        raise ValueError(f"{name}: weight_scale_inv has shape {tuple(scale.shape)}, expected {expected}")
    dtype = module.bias.dtype if module.bias is not None else torch.get_default_dtype()
    kwargs = {"block_size": block_size, "activation_scheme": module.activation_scheme}
    return QuantizedBase("fp8", (n, k), dtype, module_kwargs=kwargs)


def attach(layer: nn.Module, module: nn.Module, base: QuantizedBase) -> None:
    """Give `layer` the quantized base of `module` (recognised as `base`):
    its weight Parameter and statistics, shared, not copied, and frozen."""
    layer.weight = module.weight
    if base.format == "fp8":
        layer.weight_scale_inv = module.weight_scale_inv
        layer.weight_scale_inv.requires_grad_(False)
        if module.activation_scale is not None:  # kept for the state_dict; x stays 16-bit here
            layer.activation_scale = module.activation_scale
            layer.activation_scale.requires_grad_(False)
        return
    state = module.weight.quant_state
    statistics = [state.absmax, state.code]
    if state.nested:
        statistics += [state.state2.absmax, state.state2.code, torch.as_tensor(state.offset).reshape(())]
    for buffer, tensor in zip(base.buffers, statistics, strict=True):
        layer.register_buffer(buffer, tensor, persistent=False)  # saved under bitsandbytes' keys instead


def check_lora_options(base: QuantizedBase, where: str, init_lora_weights) -> None:
    """Refuse LoRA options that need a dense base: PiSSA (an SVD of W, and W
    rewritten). (DoRA works over both formats.)"""
    if isinstance(init_lora_weights, str) and init_lora_weights.startswith("pissa"):
        raise NotImplementedError(
            f"{where}: init_lora_weights={init_lora_weights!r} needs a dense base weight (it rewrites W), "
            f"and this base is {base.format}"
        )


# ---- giving the base back as the module type it came from


def base_module(layer: nn.Module) -> nn.Module:
    """A bitsandbytes Linear4bit (nf4) or a transformers FP8Linear (fp8)
    holding the layer's packed weight, statistics and bias (shared, no copy):
    what unload / merge_and_unload / to_peft put back. A base quantized by
    quantize_base needs that library installed for this."""
    base = layer._quant
    n, k = base.shape
    bias = layer.bias
    if base.format == "fp8":
        fp8 = _import("transformers.integrations.finegrained_fp8", "giving back an fp8 base (unload)")
        block_size = base.module_kwargs.get("block_size", (128, 128) if layer.weight_scale_inv.dim() else None)
        with torch.device("meta"):  # every tensor is replaced below: allocate nothing
            module = fp8.FP8Linear(
                k, n, block_size=block_size, activation_scheme=base.module_kwargs.get("activation_scheme", "dynamic"),
                has_bias=bias is not None,
            )  # fmt: skip
        module.weight, module.bias = layer.weight, bias
        scale = layer.weight_scale_inv
        module.weight_scale_inv = scale if isinstance(scale, nn.Parameter) else nn.Parameter(scale, requires_grad=False)
        if "activation_scale" in layer._parameters:
            module.activation_scale = layer.activation_scale
        return module
    bnb = _import("bitsandbytes", "giving back an nf4 base (unload)")
    weight = layer.weight
    with torch.device("meta"):
        module = bnb.nn.Linear4bit(
            k, n, bias is not None, compute_dtype=base.module_kwargs.get("compute_dtype", base.dtype),
            compress_statistics=base.nested_blocksize is not None, quant_type="nf4", quant_storage=weight.dtype,
        )  # fmt: skip
    if not isinstance(weight, bnb.nn.Params4bit):
        weight = bnb.nn.Params4bit(
            weight.data, requires_grad=False, blocksize=base.blocksize, compress_statistics=False, quant_type="nf4",
            quant_storage=weight.dtype, bnb_quantized=True,
        )  # fmt: skip
    nested = None
    if base.nested_blocksize:
        nested = bnb.functional.QuantState(
            absmax=layer.weight_nested_absmax, code=layer.weight_nested_quant_map,
            blocksize=base.nested_blocksize, dtype=torch.float32,
        )  # fmt: skip
    weight.quant_state = bnb.functional.QuantState(
        absmax=layer.weight_absmax, shape=torch.Size(base.shape), code=layer.weight_quant_map,
        blocksize=base.blocksize, quant_type="nf4", dtype=base.dtype,
        offset=layer.weight_nested_offset if nested is not None else None, state2=nested,
    )  # fmt: skip
    weight.module = module
    module.weight, module.bias, module.quant_state = weight, bias, weight.quant_state
    return module


# ---- quantize_base: a dense model's LoRA bases, quantized in place


def quantize_base(model_or_layer: nn.Module, format: str, *, blocksize: int = 64) -> int:
    """Quantize the frozen base weight of every LoRA layer (LoRALinear,
    MultiLoRALinear) in `model_or_layer` (a model, or one layer) in place,
    without bitsandbytes: "nf4" (bitsandbytes' layout, blocks of `blocksize`
    elements, no nested statistics) or "fp8" (e4m3 with one fp32 scale per
    128 x 128 block). The dense weight is dropped, not kept beside the
    packed one (memory comes back once nothing else holds it); adapters,
    biases and the rest of the model are unchanged. A Conv1D base (GPT-2)
    is quantized in its (out, in) layout, as bitsandbytes does.

    Returns the bytes freed: the dense weights' minus the quantized ones'.
    Layers already in this format are left as they are. Refuses, naming the
    layer and the format and before changing anything: another format, a
    base already quantized otherwise, merged layers, DoRA layers, weights on
    the meta device, and a layer whose tensors are on several devices.
    """
    from ..layers import LoRALinear, MultiLoRALinear  # the layers import this module

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if not isinstance(model_or_layer, nn.Module):
        raise TypeError(f"model_or_layer must be an nn.Module, got {type(model_or_layer).__name__}")
    layers = {n: m for n, m in model_or_layer.named_modules() if isinstance(m, LoRALinear | MultiLoRALinear)}
    if not layers:
        raise ValueError("model_or_layer has no LoRA layers (LoRALinear, MultiLoRALinear): apply_lora first")
    todo = []
    for name, layer in layers.items():  # every check before any change
        where = f"layer {name or type(layer).__name__!r} ({format})"
        if layer._quant is not None:
            if layer._quant.format != format:
                raise ValueError(f"{where}: its base is quantized as {layer._quant.format} already")
            continue
        if layer.merged:
            raise ValueError(f"{where}: the layer is merged; unmerge() it first")
        weight = layer.weight
        if weight.device.type == "meta":
            raise ValueError(f"{where}: the weight is on the meta device (no values to quantize)")
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{where}: the weight is {weight.dtype}, expected a float dtype")
        devices = {t.device for t in (*layer.parameters(), *layer.buffers())}
        if len(devices) > 1:
            raise ValueError(
                f"{where}: the layer's tensors are on several devices {sorted(map(str, devices))}; move it to one"
            )
        todo.append(layer)
    return sum(_quantize_layer(layer, format, blocksize) for layer in todo)


@torch.no_grad()
def _quantize_layer(layer: nn.Module, format: str, blocksize: int) -> int:
    dense = layer.linear_weight.detach()  # (out, in), a view of a Conv1D's (in, out) weight
    dense_bytes = dense.numel() * dense.element_size()
    n, k = dense.shape
    q = quantize_nf4(dense, blocksize) if format == "nf4" else quantize_fp8(dense)
    del layer.weight  # the layer's reference to the dense Parameter goes
    layer.fan_in_fan_out = False
    if format == "nf4":
        layer.weight = nn.Parameter(q.data.reshape(-1, 1), requires_grad=False)  # bitsandbytes' shape
        layer.register_buffer("weight_absmax", q.absmax, persistent=False)
        layer.register_buffer("weight_quant_map", q.code, persistent=False)
        layer._quant = QuantizedBase("nf4", (n, k), dense.dtype, blocksize)
    else:
        layer.weight = nn.Parameter(q.data, requires_grad=False)
        layer.register_buffer("weight_scale_inv", q.scale)
        layer._quant = QuantizedBase("fp8", (n, k), dense.dtype, module_kwargs={"block_size": (128, 128)})
    return dense_bytes - layer._quant.nbytes(layer)
