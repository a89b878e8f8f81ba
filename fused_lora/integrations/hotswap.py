"""Hot-swapping adapters in a (compiled) model without recompiling, as PEFT's
peft.utils.hotswap does for PEFT models:

    hotswap_adapter(model, path)              the adapter in `path` (save_adapter's or PEFT's files)
                                              replaces the LoRALinear layers' adapter, in place
    prepare_for_hotswap(model, max_rank=...)  before compiling: zero-pads every layer's A / B to
                                              max_rank, so that adapters of rank up to max_rank fit

A compiled graph reads the adapters' Parameters and the scalings buffer as
data, and the swap only writes into them (copy_, fill_): the same graph runs
the new adapter. Rank r, lora_alpha and scaling may change (the scaling is
written into the buffer in place); lora_dropout, use_rslora and the targeted
layers may not.
"""

import os

import torch
from torch import nn

from ..layers import check_rank
from .adapter_files import adapter_keys, check_shapes, copy_into, layer_settings, read_adapter
from .model import lora_layers


def _uncompiled(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper keeps the model there


def _layers(model: nn.Module, caller: str) -> dict:
    layers = lora_layers(_uncompiled(model))
    if not layers:
        raise ValueError(
            f"{caller} needs a model with LoRALinear layers: load the first adapter (load_adapter, apply_lora "
            "or from_peft) first"
        )
    return layers


def prepare_for_hotswap(model: nn.Module, *, max_rank: int) -> nn.Module:
    """Zero-pad every LoRALinear layer's lora_A to (max_rank, in) and lora_B
    to (out, max_rank) (LoRALinear.pad_rank), in place, so that
    hotswap_adapter can later load adapters of any rank up to max_rank
    without recompiling. The outputs do not change. Each layer's r stays the
    rank of the adapter it holds (save_adapter writes that rank); max_rank
    is the tensors' rank. Call it after loading the first adapter and before
    torch.compile and before building an optimizer (the padded tensors are
    new Parameters). Adapters of the same or a smaller rank need no
    preparation. Returns the model."""
    # torch.compile(model) wraps it (_orig_mod); model.compile() compiles it in place (_compiled_call_impl).
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
        raise ValueError(
            "prepare_for_hotswap must run before torch.compile: padding makes new Parameters, "
            "which a compiled graph would have to be traced again for"
        )
    check_rank(max_rank, "max_rank")
    layers = _layers(model, "prepare_for_hotswap")
    larger = {name: layer.r for name, layer in layers.items() if layer.r > max_rank}
    if larger:
        raise ValueError(f"max_rank={max_rank} is smaller than the rank of layers {dict(list(larger.items())[:5])}")
    for layer in layers.values():
        layer.pad_rank(max_rank)
    return model


def _check_fits(path, layers: dict, config: dict, tensors: dict) -> dict[str, tuple[int, float, float]]:
    """(r, lora_alpha, scaling) of each layer the adapter targets, after every check that the
    swap can be done in place, in the graph compiled for the current adapter."""
    where = os.fspath(path)
    init = config.get("init_lora_weights", True)
    if any(str(i).startswith("pissa") for i in (init, *(layer.init_lora_weights for layer in layers.values()))):
        raise NotImplementedError(
            "hot-swapping PiSSA adapters is not supported: a PiSSA adapter belongs to its own residual base "
            "weights (load it with load_adapter onto the original base model)"
        )
    if config.get("use_dora") or any(layer.use_dora for layer in layers.values()):
        raise NotImplementedError("hot-swapping DoRA adapters is not supported (load_adapter loads one)")
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"layers {merged[:5]} are merged: unmerge() them before hot-swapping")
    targets = sorted({key.rsplit(".", 2)[0] for key in tensors})
    new = [name for name in targets if name not in layers]
    if new:
        raise ValueError(
            f"adapter {where!r} targets modules that have no LoRALinear layer: {new[:5]}; hot-swapping cannot "
            "add layers (load_adapter onto a fresh model instead)"
        )
    # A target's lora_A and lora_B must be there; its lora_B.bias may be missing (then zeroed, as in PEFT).
    allowed = {key for name in targets for key in adapter_keys(name, layers[name])}
    unexpected = sorted(set(tensors) - allowed)
    missing = sorted({f"{name}.lora_{ab}.weight" for name in targets for ab in "AB"} - set(tensors))
    if unexpected or missing:
        raise ValueError(
            f"adapter {where!r} does not fit the model's LoRA layers: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]} (a lora_B.bias needs layers made with lora_bias=True)"
        )
    settings = {}
    for name in targets:
        layer = layers[name]
        for field, default in (("lora_dropout", 0.0), ("use_rslora", False)):
            if config.get(field, default) != getattr(layer, field):
                raise ValueError(
                    f"adapter {where!r} has {field}={config.get(field, default)!r}, layer {name!r} "
                    f"{getattr(layer, field)!r}: hot-swapping cannot change {field}"
                )
        settings[name] = layer_settings(config, name)
        r = settings[name][0]
        if r > layer.max_rank:
            raise ValueError(
                f"layer {name!r}: the adapter has rank {r}, its tensors hold rank {layer.max_rank}: call "
                f"fused_lora.prepare_for_hotswap(model, max_rank={r}) (or more) before compiling"
            )
        check_shapes(name, layer, tensors, r)
    return settings


@torch.no_grad()
def hotswap_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Replace the adapter of the model's LoRALinear layers by the one in the
    directory `path` (save_adapter's or PEFT's save_pretrained files), in
    place: the tensors are copied into the existing Parameters (zero-padded
    when the new rank is smaller than the tensors'), and each layer's r,
    lora_alpha and scaling become the new adapter's (the scaling buffer is
    filled in place). `model` may be the torch.compile'd model or the model
    it wraps; its compiled graph runs the new adapter without recompiling.

    As in PEFT: layers the new adapter does not target are zeroed (they add
    nothing, and save_adapter writes them with zeros); so is a lora_B.bias
    the file lacks. Raises, before changing anything, for an adapter that
    targets a module without a LoRALinear layer, has a rank larger than a
    layer's tensors (see prepare_for_hotswap), another lora_dropout or
    use_rslora, a lora_B.bias for a layer without lora_bias, or PiSSA; and
    for merged layers. Returns `model`."""
    config, tensors = read_adapter(path)
    layers = _layers(model, "hotswap_adapter")
    settings = _check_fits(path, layers, config, tensors)
    for name, layer in layers.items():
        copy_into(name, layer, tensors)  # a layer the file lacks: zeroed
        if name in settings:
            layer.r, layer.lora_alpha, layer.scaling = settings[name]
    return model
