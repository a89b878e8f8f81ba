"""fused-lora: Triton kernels for LoRA linear layers, fused forward and backward."""

from .backends import set_backend
from .functional import dora_linear, dora_weight_norm, dropout_mask, lora_linear, multi_lora_linear
from .integrations.adapter_files import load_adapter, save_adapter
from .integrations.hotswap import hotswap_adapter, prepare_for_hotswap
from .integrations.model import adapter_names, apply_lora, count_parameters, merge_and_unload, unload
from .integrations.peft import from_peft, to_peft
from .integrations.quantized import quantize_base
from .layers import LoRALinear, MultiLoRALinear, lora_scaling
from .quantized import QuantizedWeight, quantize_fp8, quantize_nf4

__all__ = [
    "LoRALinear",
    "MultiLoRALinear",
    "QuantizedWeight",
    "adapter_names",
    "apply_lora",
    "count_parameters",
    "dora_linear",
    "dora_weight_norm",
    "dropout_mask",
    "from_peft",
    "hotswap_adapter",
    "load_adapter",
    "lora_linear",
    "lora_scaling",
    "merge_and_unload",
    "multi_lora_linear",
    "prepare_for_hotswap",
    "quantize_base",
    "quantize_fp8",
    "quantize_nf4",
    "save_adapter",
    "set_backend",
    "to_peft",
    "unload",
]
__version__ = "0.1.0"
