"""PEFT models converted both ways, in place, sharing every tensor.

    from_peft(peft_model) -> model   one adapter: LoRALinear layers; several:
                                     MultiLoRALinear layers holding all of them,
                                     active_adapter set from PEFT's
    to_peft(model) -> PeftModel      the reverse, one PEFT adapter per adapter

The fused layers hold the PEFT layers' own base weight and bias Parameters
and lora_A / lora_B modules: nothing is copied, and training either model
trains both. Needs peft (`pip install 'fused-lora[interop]'`).
"""

from torch import nn

from ..layers import BASE_ONLY, DoRAMagnitude, LoRALinear, MultiLoRALinear, is_conv1d
from .adapter_files import adapter_config, check_config
from .model import base_linear, lora_layers, multi_lora_layers, set_submodule
from .quantized import check_lora_options, quantized_base


def _import_peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError("from_peft / to_peft need peft: pip install 'fused-lora[interop]'") from error
    return peft


def _check_peft_layer(module, name: str, adapters: list[str], several: bool) -> nn.Module:
    """The PEFT layer's base nn.Linear (or, converting one adapter, Conv1D),
    or an error naming what fused-lora does not do."""
    if module.merged:
        raise ValueError(f"{name}: the PEFT layer is merged; call unmerge_adapter() first")
    if module.disable_adapters:
        raise ValueError(f"{name}: the PEFT layer's adapters are disabled; enable them first")
    for adapter in adapters:
        variant = getattr(module, "lora_variant", {}).get(adapter)
        if variant is not None and type(variant).__name__ != "DoraLinearVariant":
            raise NotImplementedError(f"{name}: the LoRA variant {type(variant).__name__} is not supported")
        if several and _uses_dora(module, adapter):
            raise NotImplementedError(
                f"{name}: DoRA with several adapters is not supported (MultiLoRALinear has no DoRA)"
            )
        if several and getattr(module, "lora_bias", {}).get(adapter):  # PEFT < 0.14 has no lora_bias
            raise NotImplementedError(
                f"{name}: lora_bias with several adapters is not supported (MultiLoRALinear has no lora_bias)"
            )
    base = module.get_base_layer()
    if several and is_conv1d(base):
        raise NotImplementedError(
            f"{name}: a Conv1D base (fan_in_fan_out) with several adapters is not supported "
            "(MultiLoRALinear takes nn.Linear only)"
        )
    # Quantized bases (a bitsandbytes NF4 Linear4bit, a transformers FP8Linear) subclass nn.Linear.
    quantized = quantized_base(base, name) if isinstance(base, nn.Linear) else None
    if type(base) is not nn.Linear and not is_conv1d(base) and quantized is None:
        raise NotImplementedError(
            f"{name}: the base layer is a {type(base).__name__}; only nn.Linear, transformers' Conv1D and "
            "quantized bases (bitsandbytes' NF4 Linear4bit, transformers' FP8Linear) are supported"
        )
    if quantized is not None:
        check_lora_options(quantized, name, True)
    return base


def _peft_4bit_layer() -> tuple:
    """PEFT's QLoRA layer class, lora.Linear4bit: defined only where bitsandbytes is installed."""
    from peft.tuners.lora import bnb

    return (bnb.Linear4bit,) if hasattr(bnb, "Linear4bit") else ()


def _uses_dora(module, adapter) -> bool:
    return bool(getattr(module, "use_dora", {}).get(adapter))


def _dropout_p(module, adapter) -> float:
    dropout = module.lora_dropout[adapter]
    return dropout.p if isinstance(dropout, nn.Dropout) else 0.0


def _one_adapter_layer(module, base: nn.Module, adapter: str, init_lora_weights) -> LoRALinear:
    """A LoRALinear sharing a PEFT lora.Linear's base layer and adapter modules."""
    lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
    layer = LoRALinear.from_linear(
        base,
        r=module.r[adapter],
        lora_alpha=module.lora_alpha[adapter],
        lora_dropout=_dropout_p(module, adapter),
        use_rslora=module.use_rslora[adapter],
        init_lora_weights=False,
        lora_dtype=lora_a.weight.dtype,
        lora_bias=lora_b.bias is not None,
    )
    layer.lora_A, layer.lora_B = lora_a, lora_b  # the very modules: their Parameters are shared
    if _uses_dora(module, adapter):  # PEFT's magnitude Parameter itself, in a module of ours
        layer.lora_magnitude_vector = DoRAMagnitude(module.lora_magnitude_vector[adapter].weight)
    layer.scaling = module.scaling[adapter]
    layer.init_lora_weights = init_lora_weights
    return layer


def _many_adapter_layer(module, base: nn.Linear, adapters: list[str], active: str | None) -> MultiLoRALinear:
    """A MultiLoRALinear sharing a PEFT lora.Linear's base layer and the
    modules of every adapter it has, in PEFT's adapter order."""
    adapters = [a for a in adapters if a in module.lora_A]
    layer = MultiLoRALinear.from_linear(base)
    for adapter in adapters:
        layer.attach_adapter(
            adapter,
            module.lora_A[adapter],
            module.lora_B[adapter],
            module.lora_alpha[adapter],
            lora_dropout=_dropout_p(module, adapter),
            use_rslora=module.use_rslora[adapter],
            scaling=module.scaling[adapter],
        )
    # A layer without the active adapter computes the base layer, as PEFT's does.
    layer.active_adapter = active if active in adapters else BASE_ONLY
    return layer


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Turn a PEFT LoRA model (a PeftModel or a LoraModel) into fused layers,
    in place, and return the underlying model.

    One adapter: each PEFT lora.Linear becomes a LoRALinear. Several: a
    MultiLoRALinear holding every adapter of that layer, whose
    active_adapter is PEFT's active adapter (so the model computes what
    PEFT's computes; layers without it compute the base layer); per-sample
    adapters go through `fused_lora.adapter_names(model, names)`, like PEFT's
    `adapter_names=`. Several active adapters at once raise, naming them.

    The fused layers hold the same base weight and bias Parameters and the
    same lora_A / lora_B modules: nothing is copied, and training either one
    trains both. The PEFT wrapper must not be used afterwards (its layers are
    gone). lora_bias, DoRA and Conv1D bases (GPT-2, fan_in_fan_out) convert
    with one adapter. Refuses, naming them and before changing anything:
    merged or disabled layers, other LoRA variants, other base layers, and
    lora_bias, DoRA or Conv1D with several adapters.
    """
    peft = _import_peft()
    from peft.tuners.lora import Linear as PeftLoraLinear
    from peft.tuners.lora import LoraModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuner = peft_model.base_model if isinstance(peft_model, peft.PeftModel) else peft_model
    if not isinstance(tuner, LoraModel):
        raise TypeError(f"peft_model must be a PEFT LoRA model (PeftModel or LoraModel), got {type(tuner).__name__}")
    adapters = list(tuner.peft_config)
    for adapter, config in tuner.peft_config.items():
        check_config(config.to_dict(), f"adapter {adapter!r}")
    active = list(tuner.active_adapters)
    if len(adapters) > 1 and len(active) > 1:
        raise NotImplementedError(
            f"several active adapters at once ({active}): activate one (peft_model.set_adapter) before from_peft"
        )
    model, several = tuner.model, len(adapters) > 1
    bases = {}
    for name, module in model.named_modules():  # every check before any change
        if not isinstance(module, BaseTunerLayer):
            continue
        if type(module) not in (PeftLoraLinear, *_peft_4bit_layer()):
            raise NotImplementedError(
                f"{name}: PEFT layer {type(module).__qualname__} is not supported, only lora.Linear "
                "(and lora.Linear4bit, QLoRA's)"
            )
        bases[name] = _check_peft_layer(module, name, [a for a in adapters if a in module.lora_A], several)
    for name, base in bases.items():
        module = model.get_submodule(name)
        if several:
            layer = _many_adapter_layer(module, base, adapters, active[0] if active else None)
        else:
            layer = _one_adapter_layer(module, base, adapters[0], tuner.peft_config[adapters[0]].init_lora_weights)
        set_submodule(model, name, layer.train(module.training))  # eval mode stays eval: no dropout
    if "peft_config" in vars(model):  # left by PEFT's injection; a later get_peft_model would take it for an adapter
        del model.peft_config
    return model


def _lora_config(peft, config: dict):
    return peft.LoraConfig(
        r=config["r"],
        lora_alpha=config["lora_alpha"],
        target_modules=config["target_modules"],
        lora_dropout=config["lora_dropout"],
        use_rslora=config["use_rslora"],
        rank_pattern=config["rank_pattern"],
        alpha_pattern=config["alpha_pattern"],
        lora_bias=config["lora_bias"],
        use_dora=config["use_dora"],
        fan_in_fan_out=config["fan_in_fan_out"],
        init_lora_weights=True,  # never redo a PiSSA SVD on the residual weights; the adapters are swapped in below
    )


def to_peft(model: nn.Module, adapter_name: str = "default"):
    """Turn the model's LoRA layers back into a PEFT model, in place, and
    return the PeftModel. LoRALinear layers become one PEFT adapter named
    `adapter_name`; MultiLoRALinear layers give one PEFT adapter per adapter
    name (each targeting the layers that have it), the active one being the
    layers' active_adapter. The PEFT layers hold the same weight, bias and
    lora_A / lora_B modules as the fused ones did: nothing is copied.
    Merged layers are refused (unmerge them first), as is a model mixing
    both kinds of layer."""
    peft = _import_peft()
    single, multi = lora_layers(model), multi_lora_layers(model)
    if single and multi:
        raise ValueError("the model mixes LoRALinear and MultiLoRALinear layers: to_peft converts one kind")
    layers = single or multi
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"layers {merged[:5]} are merged; unmerge() them before to_peft")
    if single:
        adapters = {adapter_name: (adapter_config(model), {n: (n, None) for n in single})}
    else:
        names = list(dict.fromkeys(a for layer in multi.values() for a in layer.adapter_names))
        adapters = {
            a: (adapter_config(model, a), {n: (n, a) for n, layer in multi.items() if a in layer.lora_A}) for a in names
        }
    active = {layer.active_adapter for layer in multi.values()} - {None, BASE_ONLY}
    if len(active) > 1:
        raise ValueError(f"the layers' active adapters differ ({sorted(active)}): a PEFT model activates one")
    for name, layer in layers.items():
        set_submodule(model, name, base_linear(layer))
    if any(layer.base_format == "nf4" for layer in layers.values()):
        model.is_loaded_in_4bit = True  # what makes PEFT wrap a Linear4bit in its lora.Linear4bit
    peft_model = None
    for adapter, (config, _) in adapters.items():
        if peft_model is None:
            peft_model = peft.get_peft_model(model, _lora_config(peft, config), adapter_name=adapter)
        else:
            peft_model.add_adapter(adapter, _lora_config(peft, config))
    for adapter, (config, targets) in adapters.items():
        for name, (layer_name, multi_name) in targets.items():
            layer, peft_layer = layers[layer_name], model.get_submodule(name)
            view = layer if multi_name is None else layer.adapter_view(multi_name)
            peft_layer.lora_A[adapter], peft_layer.lora_B[adapter] = view.lora_A, view.lora_B
            peft_layer.scaling[adapter] = view.scaling
            if view.use_dora:
                peft_layer.lora_magnitude_vector[adapter].weight = view.lora_magnitude_vector.weight
            peft_layer.train(layer.training)
        peft_model.peft_config[adapter].init_lora_weights = config["init_lora_weights"]
    if active:
        peft_model.set_adapter(active.pop())
    return peft_model
