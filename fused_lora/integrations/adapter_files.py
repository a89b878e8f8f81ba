"""Adapters in PEFT's on-disk format, both ways, without needing peft.

On disk (what `PeftModel.save_pretrained` writes and `PeftModel.from_pretrained` reads):

    <path>/adapter_config.json          LoraConfig's fields: peft_type "LORA", r, lora_alpha,
                                        target_modules, lora_dropout, use_rslora,
                                        init_lora_weights, rank_pattern / alpha_pattern, ...
    <path>/adapter_model.safetensors    base_model.model.<module name>.lora_A.weight  (r, in)
                                        base_model.model.<module name>.lora_B.weight  (out, r)
                                        base_model.model.<module name>.lora_B.bias    (out,)
                                            (only with lora_bias)
                                        base_model.model.<module name>.lora_magnitude_vector  (out,)
                                            (only with use_dora: DoRA's m)

One adapter per directory, on nn.Linear or transformers Conv1D layers
(fan_in_fan_out: A and B have the same shapes as for nn.Linear), with or
without lora_bias or DoRA, without modules_to_save or layers_to_transform:
anything else is refused with an error that names it. A model of
MultiLoRALinear layers saves one named adapter at a time. The file never
holds the base: an adapter trained over a quantized base (QLoRA, FP8) saves
and loads as any other, and load_adapter keeps a 4-bit or FP8 model's
bases quantized (see layers' from_linear).
"""

import json
import math
import os
import re
from collections import Counter

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..layers import copy_padded, lora_scaling
from .model import apply_lora, lora_layers, multi_lora_layers, pattern_value, select_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the model: the prefix of every saved key
# What a saved key may end with: A, B, lora_bias's b_B, DoRA's magnitude (PEFT drops its ".weight").
KEY_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector")

# LoraConfig fields that change what a layer computes and that fused-lora does not do:
# any true value is refused (their defaults are all false).
UNSUPPORTED_FIELDS = (
    "modules_to_save",
    "layers_to_transform",
    "exclude_modules",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "use_qalora",
    "alora_invocation_tokens",
    "arrow_config",
)
# init_lora_weights values that load_adapter can rebuild: the others (olora, corda, loftq, ...) are refused.
SUPPORTED_INITS = (True, False, "gaussian", "pissa")


def check_config(config: dict, where: str) -> None:
    """Refuse, naming the field, a LoRA config that fused-lora cannot reproduce exactly."""
    if str(config.get("peft_type")).upper().removeprefix("PEFTTYPE.") != "LORA":
        raise NotImplementedError(f"{where}: peft_type {config.get('peft_type')!r} is not supported, only LORA")
    for field in UNSUPPORTED_FIELDS:
        if config.get(field):
            raise NotImplementedError(f"{where}: {field}={config[field]!r} is not supported by fused-lora")
    if config.get("bias", "none") != "none":
        raise NotImplementedError(f"{where}: bias={config['bias']!r} is not supported (only 'none')")
    if not config.get("target_modules"):
        raise NotImplementedError(f"{where}: target_modules is empty (target_parameters is not supported)")


def adapter_views(model: nn.Module, adapter: str | None = None) -> dict:
    """The model's LoRA layers as a PEFT config sees them, by module name:
    its LoRALinear layers (adapter None), or one named adapter of its
    MultiLoRALinear layers (the layers that have it). Each has r,
    lora_alpha, lora_dropout, use_rslora, scaling, init_lora_weights,
    lora_bias, use_dora, fan_in_fan_out, lora_A and lora_B (and with DoRA
    lora_magnitude_vector)."""
    if adapter is None:
        return lora_layers(model)
    return {
        name: layer.adapter_view(adapter) for name, layer in multi_lora_layers(model).items() if adapter in layer.lora_A
    }


def _one_value(layers: dict, attribute: str):
    values = {getattr(layer, attribute) for layer in layers.values()}
    if len(values) > 1:
        raise ValueError(f"the LoRA layers differ in {attribute} ({sorted(values)}); a PEFT config holds one value")
    return values.pop()


def _compact_targets(model: nn.Module, names: list[str]) -> list[str]:
    """target_modules for exactly these modules: their last names (["q_proj", "v_proj"]) when
    those select nothing else, else the full names."""
    leaves = sorted({name.rpartition(".")[2] for name in names})
    if {name for name, _ in select_modules(model, leaves)} == set(names):
        return leaves
    return sorted(names)


def _pattern(layers: dict, attribute: str, default) -> dict:
    """PEFT's rank_pattern / alpha_pattern for the layers whose value is not `default`: keyed by
    last name ("o_proj") where all layers of that name agree, else by exact full name."""
    by_leaf: dict[str, set] = {}
    for name, layer in layers.items():
        by_leaf.setdefault(name.rpartition(".")[2], set()).add(getattr(layer, attribute))
    pattern = {}
    for name, layer in layers.items():
        leaf, value = name.rpartition(".")[2], getattr(layer, attribute)
        if value != default:
            pattern[re.escape(leaf if len(by_leaf[leaf]) == 1 else name)] = value
    return pattern


def adapter_config(model: nn.Module, adapter: str | None = None) -> dict:
    """The PEFT LoraConfig (as a dict, the content of adapter_config.json)
    that rebuilds the model's LoRA layers (adapter None: its LoRALinear
    layers; a name: that adapter of its MultiLoRALinear layers): r and
    lora_alpha are the most common values, rank_pattern / alpha_pattern list
    the exceptions by exact module name (or last name, when all layers of
    that name agree). Raises ValueError where one config cannot describe the
    layers."""
    layers = adapter_views(model, adapter)
    if not layers:
        what = "LoRALinear layers" if adapter is None else f"layers with adapter {adapter!r}"
        raise ValueError(f"the model has no {what}: call apply_lora (or load_adapter) first")
    for name, layer in layers.items():
        if not math.isclose(layer.scaling, lora_scaling(layer.r, layer.lora_alpha, layer.use_rslora), rel_tol=1e-12):
            raise ValueError(
                f"layer {name!r}: scaling was changed from its r / lora_alpha; a PEFT config cannot say so"
            )
    inits = {getattr(layer, "init_lora_weights", True) for layer in layers.values()}
    if len(inits) > 1 and any(isinstance(i, str) and i.startswith("pissa") for i in inits):
        raise ValueError(f"the LoRA layers mix PiSSA and other initialisations ({inits}); a PEFT config holds one")
    r = Counter(layer.r for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(layer.lora_alpha for layer in layers.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": _compact_targets(model, list(layers)),
        "lora_dropout": _one_value(layers, "lora_dropout"),
        "use_rslora": _one_value(layers, "use_rslora"),
        "bias": "none",
        # One value for the model; PEFT corrects it per layer from the module's type. True when any is a Conv1D.
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        # A PiSSA adapter says so, as PEFT's own files do: loading it onto the original base weights
        # redoes the SVD and so rebuilds the residual the adapter was trained against.
        "init_lora_weights": inits.pop() if len(inits) == 1 else True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": _pattern(layers, "r", r),
        "alpha_pattern": _pattern(layers, "lora_alpha", alpha),
        "use_dora": _one_value(layers, "use_dora"),
        "lora_bias": _one_value(layers, "lora_bias"),
    }


def layer_settings(config: dict, name: str) -> tuple[int, float, float]:
    """(r, lora_alpha, scaling) that the adapter config gives the module `name` (its patterns, else r / lora_alpha)."""
    r = pattern_value(config.get("rank_pattern") or {}, name, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
    return r, alpha, lora_scaling(r, alpha, config.get("use_rslora", False))


def _parameters(layer) -> list[tuple[str, torch.Tensor]]:
    """The adapter's Parameters by PEFT's key suffix: lora_A.weight, lora_B.weight, with lora_bias
    lora_B.bias, with DoRA lora_magnitude_vector (PEFT's file drops that module's ".weight")."""
    params = [("lora_A.weight", layer.lora_A.weight), ("lora_B.weight", layer.lora_B.weight)]
    params += [("lora_B.bias", layer.lora_B.bias)] if layer.lora_bias else []
    return params + ([("lora_magnitude_vector", layer.lora_magnitude_vector.weight)] if layer.use_dora else [])


def adapter_keys(name: str, layer) -> list[str]:
    """The keys (as read_adapter returns them) that hold layer `name`'s adapter."""
    return [f"{name}.{suffix}" for suffix, _ in _parameters(layer)]


def _saved_tensors(name: str, layer) -> dict[str, torch.Tensor]:
    """Layer `name`'s adapter as the file holds it: rank r, also when prepare_for_hotswap padded its tensors."""
    r, lora_a, lora_b = layer.r, layer.lora_A.weight, layer.lora_B.weight
    if lora_a.shape[0] > r and (lora_a[r:].any() or lora_b[:, r:].any()):
        raise ValueError(
            f"layer {name!r}: lora_A / lora_B are padded to rank {lora_a.shape[0]} (prepare_for_hotswap) and hold "
            f"non-zero values past the adapter's rank r={r}: they are not an adapter of rank {r}"
        )
    ranked = {"lora_A.weight": lora_a[:r], "lora_B.weight": lora_b[:, :r]}
    return {
        f"{PREFIX}{name}.{suffix}": ranked.get(suffix, param).detach().cpu().contiguous()
        for suffix, param in _parameters(layer)
    }


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter: str | None = None) -> None:
    """Write the model's LoRA adapter to the directory `path` (created if
    needed) in PEFT's format: `PeftModel.from_pretrained(base_model, path)`
    loads it. Only the adapters are written (r x in + out x r per layer,
    plus b_B (out,) with lora_bias), at the adapters' rank r also where
    prepare_for_hotswap padded the tensors. A model of MultiLoRALinear
    layers names the adapter to write.

    A PiSSA adapter is saved with init_lora_weights="pissa", as PEFT saves
    one: load it onto the original base model (the SVD is redone on load),
    not onto the residual weights this model now holds."""
    config = adapter_config(model, adapter)
    tensors = {}
    for name, layer in adapter_views(model, adapter).items():
        tensors.update(_saved_tensors(name, layer))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of the adapter in the directory `path`, checked.
    Tensors are keyed by module name + ".lora_A.weight", ".lora_B.weight",
    ".lora_B.bias" or ".lora_magnitude_vector" (PEFT's key without its prefix)."""
    config_file, weights_file = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for file in (config_file, weights_file):
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"no {os.path.basename(file)} in {os.fspath(path)!r} (PEFT's .bin files are not read)"
            )
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    check_config(config, config_file)
    # Loading redoes the init, as PEFT does: only those that fused-lora has (PiSSA's SVD rebuilds the residual).
    init = config.get("init_lora_weights", True)
    if init not in SUPPORTED_INITS and not (isinstance(init, str) and init.startswith("pissa_niter_")):
        raise NotImplementedError(f"{config_file}: init_lora_weights={init!r} is not supported")
    tensors = {}
    for key, tensor in load_file(weights_file).items():
        match = re.fullmatch(rf"{re.escape(PREFIX)}(.+\.(?:{'|'.join(re.escape(k) for k in KEY_SUFFIXES)}))", key)
        if match is None:
            raise NotImplementedError(
                f"{weights_file}: key {key!r} is not a LoRA A / B weight, B bias or DoRA magnitude"
            )
        tensors[match.group(1)] = tensor
    return config, tensors


def check_keys(path, layers: dict, tensors: dict) -> None:
    """Raise unless the file's keys are those of `layers`, naming a few that are missing or unexpected."""
    expected = {key for name, layer in layers.items() for key in adapter_keys(name, layer)}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(
            f"adapter {os.fspath(path)!r} does not fit the model's LoRA layers: "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
        )


def check_shapes(name: str, layer, tensors: dict, r: int) -> None:
    """Raise unless the file's tensors of layer `name` are an adapter of rank r for its shape."""
    shapes = {
        "lora_A.weight": (r, layer.in_features),
        "lora_B.weight": (layer.out_features, r),
        "lora_B.bias": (layer.out_features,),
        "lora_magnitude_vector": (layer.out_features,),
    }
    for suffix, shape in shapes.items():
        tensor = tensors.get(f"{name}.{suffix}")
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name}.{suffix}: shape {tuple(tensor.shape)} in the file, expected {shape} (r={r})")


@torch.no_grad()
def copy_into(name: str, layer, tensors: dict) -> None:
    """Copy the file's tensors of layer `name` into its Parameters in place,
    zero-padded where the layer's tensors have a larger rank (max_rank); a
    Parameter the file lacks is zeroed (the layer then adds nothing)."""
    for suffix, param in _parameters(layer):
        tensor = tensors.get(f"{name}.{suffix}")
        if tensor is None:
            param.zero_()
        else:
            copy_padded(param, tensor)


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike, *, lora_dtype: torch.dtype | None = None) -> nn.Module:
    """Load a PEFT-format adapter (from save_adapter or PEFT's save_pretrained) into the model, in place.

    A model without LoRA layers is first prepared from the file's config
    (apply_lora with its target_modules, r, lora_alpha, patterns, lora_bias,
    ...; lora_dtype as given, default the layers' dtype). A model prepared
    already must have exactly the file's layers with the file's r, scaling,
    lora_bias and use_dora. The tensors are copied into the adapters' Parameters.
    Returns the model. (To replace one adapter by another of any rank and
    alpha in a compiled model, see hotswap_adapter.)

    As in PEFT, a file saying init_lora_weights="pissa" redoes the SVD when it
    prepares a plain model: give it the original base weights.
    """
    config, tensors = read_adapter(path)
    if not lora_layers(model):
        apply_lora(
            model,
            config["target_modules"],
            r=config.get("r", 8),
            lora_alpha=config.get("lora_alpha", 8),
            lora_dropout=config.get("lora_dropout", 0.0),
            use_rslora=config.get("use_rslora", False),
            init_lora_weights=config.get("init_lora_weights", True),
            lora_dtype=lora_dtype,
            rank_pattern=config.get("rank_pattern") or {},
            alpha_pattern=config.get("alpha_pattern") or {},
            lora_bias=config.get("lora_bias", False),
            use_dora=config.get("use_dora", False),
        )
    layers = lora_layers(model)
    check_keys(path, layers, tensors)
    for name, layer in layers.items():  # every check before any change
        r, _, scaling = layer_settings(config, name)
        if layer.r != r or not math.isclose(layer.scaling, scaling, rel_tol=1e-12):
            raise ValueError(
                f"layer {name!r} has r={layer.r}, scaling={layer.scaling:g}; the adapter has r={r}, scaling={scaling:g}"
            )
        check_shapes(name, layer, tensors, r)
    for name, layer in layers.items():
        copy_into(name, layer, tensors)
    return model
