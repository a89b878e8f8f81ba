"""PEFT interop: adapters in PEFT's on-disk format, and PEFT models converted both ways.

On disk (what `PeftModel.save_pretrained` writes and `PeftModel.from_pretrained` reads):

    <path>/adapter_config.json          LoraConfig's fields: peft_type "LORA", r, lora_alpha,
                                        target_modules, lora_dropout, use_rslora,
                                        init_lora_weights, rank_pattern / alpha_pattern, ...
    <path>/adapter_model.safetensors    base_model.model.<module name>.lora_A.weight  (r, in)
                                        base_model.model.<module name>.lora_B.weight  (out, r)

One adapter per model, on nn.Linear layers, without DoRA, lora_bias,
fan_in_fan_out (GPT-2's Conv1D), modules_to_save or layers_to_transform:
anything else is refused with an error that names it. peft itself is only
needed by from_peft / to_peft; save_adapter / load_adapter need safetensors.
"""

import json
import math
import os
import re
from collections import Counter

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .layer import LoRALinear, lora_scaling
from .model import apply_lora, base_linear, lora_layers, pattern_value, select_modules, set_submodule

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the model: the prefix of every saved key

# LoraConfig fields that change what a layer computes and that fused-lora does not do:
# any true value is refused (their defaults are all false).
UNSUPPORTED_FIELDS = (
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
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


def _check_config(config: dict, where: str) -> None:
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


def _one_value(layers: dict[str, LoRALinear], attribute: str):
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


def _pattern(layers: dict[str, LoRALinear], attribute: str, default) -> dict:
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


def adapter_config(model: nn.Module) -> dict:
    """The PEFT LoraConfig (as a dict, the content of adapter_config.json)
    that rebuilds the model's LoRA layers: r and lora_alpha are the most
    common values, rank_pattern / alpha_pattern list the exceptions by exact
    module name (or last name, when all layers of that name agree). Raises
    ValueError where one config cannot describe the layers."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRALinear layers: call apply_lora (or load_adapter) first")
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
        "fan_in_fan_out": False,
        # A PiSSA adapter says so, as PEFT's own files do: loading it onto the original base weights
        # redoes the SVD and so rebuilds the residual the adapter was trained against.
        "init_lora_weights": inits.pop() if len(inits) == 1 else True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": _pattern(layers, "r", r),
        "alpha_pattern": _pattern(layers, "lora_alpha", alpha),
        "use_dora": False,
        "lora_bias": False,
    }


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's LoRA adapter to the directory `path` (created if
    needed) in PEFT's format: `PeftModel.from_pretrained(base_model, path)`
    loads it. Only the adapters are written (r x in + out x r per layer).

    A PiSSA adapter is saved with init_lora_weights="pissa", as PEFT saves
    one: load it onto the original base model (the SVD is redone on load),
    not onto the residual weights this model now holds."""
    config = adapter_config(model)
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of the adapter in the directory `path`, checked.
    Tensors are keyed by module name + ".lora_A" / ".lora_B"."""
    config_file, weights_file = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for file in (config_file, weights_file):
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"no {os.path.basename(file)} in {os.fspath(path)!r} (PEFT's .bin files are not read)"
            )
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    _check_config(config, config_file)
    # Loading redoes the init, as PEFT does: only those that fused-lora has (PiSSA's SVD rebuilds the residual).
    init = config.get("init_lora_weights", True)
    if init not in SUPPORTED_INITS and not (isinstance(init, str) and init.startswith("pissa_niter_")):
        raise NotImplementedError(f"{config_file}: init_lora_weights={init!r} is not supported")
    tensors = {}
    for key, tensor in load_file(weights_file).items():
        match = re.fullmatch(rf"{re.escape(PREFIX)}(.+\.lora_[AB])\.weight", key)
        if match is None:
            raise NotImplementedError(f"{weights_file}: key {key!r} is not a LoRA A / B weight (lora_bias, DoRA, ...)")
        tensors[match.group(1)] = tensor
    return config, tensors


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike, *, lora_dtype: torch.dtype | None = None) -> nn.Module:
    """Load a PEFT-format adapter (from save_adapter or PEFT's save_pretrained) into the model, in place.

    A model without LoRA layers is first prepared from the file's config
    (apply_lora with its target_modules, r, lora_alpha, patterns, ...;
    lora_dtype as given, default the layers' dtype). A model prepared already
    must have exactly the file's layers with the file's r and scaling.
    The tensors are copied into the adapters' Parameters. Returns the model.

    As in PEFT, a file saying init_lora_weights="pissa" redoes the SVD when it
    prepares a plain model: give it the original base weights.
    """
    config, tensors = read_adapter(path)
    r, alpha, use_rslora = config.get("r", 8), config.get("lora_alpha", 8), config.get("use_rslora", False)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if not lora_layers(model):
        apply_lora(
            model,
            config["target_modules"],
            r=r,
            lora_alpha=alpha,
            lora_dropout=config.get("lora_dropout", 0.0),
            use_rslora=use_rslora,
            init_lora_weights=config.get("init_lora_weights", True),
            lora_dtype=lora_dtype,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
        )
    layers = lora_layers(model)
    expected = {f"{name}.lora_{ab}" for name in layers for ab in "AB"}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(
            f"adapter {os.fspath(path)!r} does not fit the model's LoRA layers: "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, layer in layers.items():
        layer_r, layer_alpha = pattern_value(rank_pattern, name, r), pattern_value(alpha_pattern, name, alpha)
        scaling = lora_scaling(layer_r, layer_alpha, use_rslora)
        if layer.r != layer_r or not math.isclose(layer.scaling, scaling, rel_tol=1e-12):
            raise ValueError(
                f"layer {name!r} has r={layer.r}, scaling={layer.scaling:g}; "
                f"the adapter has r={layer_r}, scaling={scaling:g}"
            )
        for ab, param in (("A", layer.lora_A.weight), ("B", layer.lora_B.weight)):
            tensor = tensors[f"{name}.lora_{ab}"]
            if tensor.shape != param.shape:
                raise ValueError(
                    f"{name}.lora_{ab}: shape {tuple(tensor.shape)} in the file, {tuple(param.shape)} in the model"
                )
            param.copy_(tensor)
    return model


def _import_peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError("from_peft / to_peft need peft: pip install 'fused-lora[interop]'") from error
    return peft


def _from_peft_layer(module, name: str, adapter: str, init_lora_weights) -> LoRALinear:
    """A LoRALinear sharing a PEFT lora.Linear's base layer and adapter modules."""
    if module.merged:
        raise ValueError(f"{name}: the PEFT layer is merged; call unmerge_adapter() first")
    if module.disable_adapters:
        raise ValueError(f"{name}: the PEFT layer's adapters are disabled; enable them first")
    if module.fan_in_fan_out:
        raise NotImplementedError(f"{name}: fan_in_fan_out (Conv1D weights) is not supported")
    if getattr(module, "use_dora", {}).get(adapter) or getattr(module, "lora_variant", None):
        raise NotImplementedError(f"{name}: LoRA variants (DoRA, ...) are not supported")
    if getattr(module, "lora_bias", {}).get(adapter):
        raise NotImplementedError(f"{name}: lora_bias is not supported")
    base = module.get_base_layer()
    if type(base) is not nn.Linear:
        raise NotImplementedError(f"{name}: the base layer is a {type(base).__name__}; only nn.Linear is supported")
    dropout = module.lora_dropout[adapter]
    lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
    layer = LoRALinear.from_linear(
        base,
        r=module.r[adapter],
        lora_alpha=module.lora_alpha[adapter],
        lora_dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
        use_rslora=module.use_rslora[adapter],
        init_lora_weights=False,
        lora_dtype=lora_a.weight.dtype,
    )
    layer.lora_A, layer.lora_B = lora_a, lora_b  # the very modules: their Parameters are shared
    layer.scaling = module.scaling[adapter]
    layer.init_lora_weights = init_lora_weights
    return layer


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Turn a PEFT LoRA model (a PeftModel or a LoraModel with one adapter)
    into fused layers, in place, and return the underlying model.

    Each PEFT lora.Linear becomes a LoRALinear holding the same base weight
    and bias Parameters and the same lora_A / lora_B modules: nothing is
    copied, and training either one trains both. The PEFT wrapper must not be
    used afterwards (its layers are gone). Refuses several adapters, merged
    or disabled layers, DoRA, lora_bias, fan_in_fan_out, non-Linear layers.
    """
    peft = _import_peft()
    from peft.tuners.lora import Linear as PeftLoraLinear
    from peft.tuners.lora import LoraModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuner = peft_model.base_model if isinstance(peft_model, peft.PeftModel) else peft_model
    if not isinstance(tuner, LoraModel):
        raise TypeError(f"peft_model must be a PEFT LoRA model (PeftModel or LoraModel), got {type(tuner).__name__}")
    if len(tuner.peft_config) != 1:
        raise NotImplementedError(f"several adapters ({sorted(tuner.peft_config)}): fused-lora holds one per layer")
    ((adapter, config),) = tuner.peft_config.items()
    _check_config(config.to_dict(), f"adapter {adapter!r}")
    model = tuner.model
    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        if type(module) is not PeftLoraLinear:
            raise NotImplementedError(
                f"{name}: PEFT layer {type(module).__qualname__} is not supported, only lora.Linear"
            )
        set_submodule(model, name, _from_peft_layer(module, name, adapter, config.init_lora_weights))
    if "peft_config" in vars(model):  # left by PEFT's injection; a later get_peft_model would take it for an adapter
        del model.peft_config
    return model


def to_peft(model: nn.Module, adapter_name: str = "default"):
    """Turn the model's LoRALinear layers back into a PEFT model, in place,
    and return the PeftModel (`peft.get_peft_model` with the matching
    LoraConfig). The PEFT layers hold the same weight, bias and lora_A /
    lora_B modules as the fused ones did: nothing is copied. Merged layers
    are refused (unmerge them first)."""
    peft = _import_peft()
    config = adapter_config(model)
    layers = lora_layers(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"layers {merged[:5]} are merged; unmerge() them before to_peft")
    lora_config = peft.LoraConfig(
        r=config["r"],
        lora_alpha=config["lora_alpha"],
        target_modules=config["target_modules"],
        lora_dropout=config["lora_dropout"],
        use_rslora=config["use_rslora"],
        rank_pattern=config["rank_pattern"],
        alpha_pattern=config["alpha_pattern"],
        init_lora_weights=True,  # never redo a PiSSA SVD on the residual weights; the adapters are swapped in below
    )
    for name, layer in layers.items():
        set_submodule(model, name, base_linear(layer))
    peft_model = peft.get_peft_model(model, lora_config, adapter_name=adapter_name)
    for name, layer in layers.items():
        peft_layer = model.get_submodule(name)
        peft_layer.lora_A[adapter_name] = layer.lora_A
        peft_layer.lora_B[adapter_name] = layer.lora_B
        peft_layer.scaling[adapter_name] = layer.scaling
    peft_model.peft_config[adapter_name].init_lora_weights = config["init_lora_weights"]
    return peft_model
