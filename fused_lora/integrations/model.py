"""LoRA on a whole model: apply_lora, count_parameters, merge_and_unload,
unload, and adapter_names (per-sample adapters for every MultiLoRALinear).

Module names are matched as PEFT matches `target_modules`:

    a list of names   a module whose full name equals an entry, or ends with "." + entry
                      (["q_proj", "v_proj"] hits "model.layers.0.self_attn.q_proj")
    a string          a regular expression, re.fullmatch'ed against the full name
    "all-linear"      every nn.Linear (and transformers Conv1D) except the model's output layer
                      (get_output_embeddings())

and `rank_pattern` / `alpha_pattern` as PEFT does: the first key k (a regex) for
which re.match(rf"(.*\\.)?({k})$", name) holds gives that module's r / lora_alpha.
"""

import contextlib
import re
import sys
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..layers import LoRALinear, MultiLoRALinear, base_features, is_conv1d
from .quantized import base_module, check_lora_options, quantized_base

ALL_LINEAR = "all-linear"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear modules by full name, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def multi_lora_layers(model: nn.Module) -> dict[str, MultiLoRALinear]:
    """The model's MultiLoRALinear modules by full name, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MultiLoRALinear)}


def _any_lora_layers(model: nn.Module) -> dict[str, LoRALinear | MultiLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear | MultiLoRALinear)}


def matches_target(name: str, target_modules: str | Iterable[str]) -> bool:
    """True when the module name `name` is selected by `target_modules` (PEFT's rule, above)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def pattern_value(pattern: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the value of the first key
    matching the end of `name` on a "." boundary, else `default`."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _checked_target_modules(target_modules) -> str | list[str]:
    """target_modules as a regex string or a list of names (a set or a generator becomes a list)."""
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError("target_modules must not be empty")
        return target_modules
    if not isinstance(target_modules, Iterable) or isinstance(target_modules, bytes):
        raise TypeError(
            f"target_modules must be a list of names or a regex string, got {type(target_modules).__name__}"
        )
    target_modules = list(target_modules)
    if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
        raise ValueError(f"target_modules must be a non-empty list of non-empty names, got {target_modules!r}")
    return target_modules


def _output_layer_name(model: nn.Module) -> str | None:
    """The name of a transformers model's output layer (lm_head), which "all-linear" leaves out, as PEFT does."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    output = get_output_embeddings() if callable(get_output_embeddings) else None
    return next((name for name, module in model.named_modules() if module is output), None)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called `name` (a full dotted name) by `module`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def select_modules(model: nn.Module, target_modules) -> list[tuple[str, nn.Module]]:
    """(name, module) for every module target_modules selects, never the root nor a LoRA layer's own A / B."""
    inside_lora = tuple(name + "." for name in _any_lora_layers(model))
    candidates = [(n, m) for n, m in model.named_modules() if n and not n.startswith(inside_lora)]
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        output = _output_layer_name(model)
        linear = nn.Linear | LoRALinear | MultiLoRALinear
        return [(n, m) for n, m in candidates if (isinstance(m, linear) or is_conv1d(m)) and n != output]
    return [(n, m) for n, m in candidates if matches_target(n, target_modules)]


def apply_lora(
    model: nn.Module,
    target_modules: str | list[str],
    *,
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    init_lora_weights: bool | str = True,
    lora_dtype: torch.dtype | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    lora_bias: bool = False,
    use_dora: bool = False,
) -> nn.Module:
    """Put a LoRA adapter on every nn.Linear (or transformers Conv1D, as in
    GPT-2: PEFT's fan_in_fan_out) that `target_modules` selects, in place.

    Each selected module is replaced by `LoRALinear.from_linear(module, ...)`,
    which shares its weight and bias (no copy). Afterwards only LoRA
    parameters (lora_A / lora_B, and DoRA's lora_magnitude_vector, of every
    LoRA layer in the model) require
    grad; every other parameter is frozen. Arguments are PEFT's LoraConfig
    fields (see the module docstring for the matching rules); rank_pattern /
    alpha_pattern override r / lora_alpha per module. init_lora_weights="pissa"
    rewrites each selected base weight (see LoRALinear).

    Returns the model. Raises ValueError when nothing matches, when a
    selected module is not an nn.Linear or Conv1D, or when it already has an
    adapter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    target_modules = _checked_target_modules(target_modules)
    selected = select_modules(model, target_modules)
    if not selected:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:10]
        raise ValueError(f"target_modules={target_modules!r} matched no module; nn.Linear modules include {linears}")
    arguments = {}
    for name, module in selected:  # every check before any change: a failed call changes nothing
        if isinstance(module, LoRALinear | MultiLoRALinear):
            raise ValueError(f"module {name!r} already has a LoRA adapter (one adapter per layer)")
        if not isinstance(module, nn.Linear) and not is_conv1d(module):
            raise ValueError(
                f"target_modules={target_modules!r} selects {name!r}, a {type(module).__name__}; "
                "only nn.Linear (and transformers Conv1D) modules can take a LoRA adapter"
            )
        arguments[name] = dict(
            r=pattern_value(rank_pattern or {}, name, r),
            lora_alpha=pattern_value(alpha_pattern or {}, name, lora_alpha),
            lora_dropout=lora_dropout,
            use_rslora=use_rslora,
            init_lora_weights=init_lora_weights,
            lora_bias=lora_bias,
            use_dora=use_dora,
        )
        LoRALinear.check_arguments(*base_features(module), **arguments[name])
        base = quantized_base(module, f"module {name!r}")  # Linear8bitLt, FP4, ... raise, naming the module
        if base is not None:
            check_lora_options(base, f"module {name!r}", init_lora_weights)

    for name, linear in selected:
        set_submodule(model, name, LoRALinear.from_linear(linear, lora_dtype=lora_dtype, **arguments[name]))

    adapters = {id(p) for layer in _any_lora_layers(model).values() for p in _adapter_parameters(layer)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)
    return model


def _adapter_parameters(layer: LoRALinear | MultiLoRALinear):
    prefixes = ("lora_A.", "lora_B.", "lora_magnitude_vector.")
    return [p for name, p in layer.named_parameters() if name.startswith(prefixes)]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total): the number of parameter elements that require grad,
    and of all parameters (a tensor shared by several modules counts once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def base_linear(layer: LoRALinear | MultiLoRALinear) -> nn.Module:
    """A plain nn.Linear (a transformers Conv1D for a fan_in_fan_out layer)
    sharing `layer`'s weight and bias Parameters (no copy); for a quantized
    base, a bitsandbytes Linear4bit or transformers FP8Linear sharing them."""
    if layer._quant is not None:
        return base_module(layer)
    with torch.device("meta"):  # parameters replaced below: allocate nothing
        if layer.fan_in_fan_out:  # transformers is imported: the layer came from one of its Conv1D
            linear = sys.modules["transformers.pytorch_utils"].Conv1D(layer.out_features, layer.in_features)
        else:
            linear = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
    linear.weight, linear.bias = layer.weight, layer.bias
    return linear


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer (W += scaling * B A, in place, fp32, rounded
    once; with lora_bias also bias += scaling * b_B; DoRA: W <- (m / n)
    (W + scaling B A)) and put back plain
    nn.Linear (or Conv1D) modules holding the merged weights, as PEFT's
    merge_and_unload does; a MultiLoRALinear merges its active adapter (a
    layer without one keeps its base weight). The weights are shared with
    the LoRA layers they came from, so those layers are consumed. Returns
    the model. A lora_bias layer over a base without a bias raises
    RuntimeError (as PEFT), before any layer changes. An NF4 base is
    merged as PEFT merges one (dequantized, updated, quantized again: lossy,
    warns) and given back as a bitsandbytes Linear4bit; an FP8 base raises
    NotImplementedError, naming the layer, before any layer changes."""
    for layer in lora_layers(model).values():
        layer.check_mergeable()
    for name, layer in _any_lora_layers(model).items():
        merging = isinstance(layer, LoRALinear) or layer.active_adapter in layer.lora_A
        if layer._quant is not None and merging:  # FP8 cannot merge
            layer._quant.check_mergeable(f"layer {name!r}")
    for name, layer in _any_lora_layers(model).items():
        if isinstance(layer, LoRALinear):
            layer.merge()
        elif layer.active_adapter in layer.lora_A:
            if layer.merged_adapter != layer.active_adapter:
                layer.unmerge()  # another adapter was merged: the active one replaces it
            layer.merge(layer.active_adapter)
        set_submodule(model, name, base_linear(layer))
    return model


def unload(model: nn.Module) -> nn.Module:
    """Drop the adapters without merging: plain nn.Linear (or Conv1D) modules with the
    current base weights (a merged layer is unmerged first; a PiSSA layer
    keeps its residual weight, as in PEFT). A quantized base comes back as
    a bitsandbytes Linear4bit (nf4) or transformers FP8Linear (fp8).
    Returns the model."""
    for name, layer in _any_lora_layers(model).items():
        layer.unmerge()
        set_submodule(model, name, base_linear(layer))
    return model


@contextlib.contextmanager
def adapter_names(model: nn.Module, names: Sequence[str]):
    """Per-sample adapters for a whole model, like PEFT's `adapter_names=`
    argument, in training too (PEFT allows it in eval only): inside the
    block, every MultiLoRALinear of the model called without adapter_ids /
    adapter_names gives batch entry i the adapter names[i] ("__base__": the
    base layer). A layer that lacks an adapter the model has computes the
    base layer for its rows, as in PEFT; a name no layer has raises."""
    layers = list(multi_lora_layers(model).values())
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"names must be a list of str, one per batch entry, got {type(names).__name__}")
    known = {"__base__"}.union(*(layer.adapter_names for layer in layers))
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"adapter names {unknown} are not adapters of the model (adapters: {sorted(known)})")
    previous = [(layer._batch_names, layer._batch_ids) for layer in layers]
    for layer in layers:
        layer._batch_names, layer._batch_ids = list(names), None
    try:
        yield model
    finally:
        for layer, (batch_names, batch_ids) in zip(layers, previous, strict=True):
            layer._batch_names, layer._batch_ids = batch_names, batch_ids
