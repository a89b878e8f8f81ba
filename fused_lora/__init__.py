"""fused-lora: Triton kernels for LoRA linear layers, fused forward and backward."""

from .dispatch import set_backend
from .functional import dropout_mask, lora_linear
from .layer import LoRALinear, lora_scaling
from .model import apply_lora, count_parameters, merge_and_unload, unload
from .multi_functional import multi_lora_linear
from .multi_layer import MultiLoRALinear
from .peft_interop import from_peft, load_adapter, save_adapter, to_peft

__all__ = [
    "LoRALinear",
    "MultiLoRALinear",
    "apply_lora",
    "count_parameters",
    "dropout_mask",
    "from_peft",
    "load_adapter",
    "lora_linear",
    "lora_scaling",
    "merge_and_unload",
    "multi_lora_linear",
    "save_adapter",
    "set_backend",
    "to_peft",
    "unload",
]
__version__ = "0.1.0"
