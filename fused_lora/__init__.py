"""fused-lora: Triton kernels for LoRA linear layers, fused forward and backward."""

from .dispatch import set_backend
from .functional import lora_linear
from .layer import LoRALinear, lora_scaling

__all__ = ["LoRALinear", "lora_linear", "lora_scaling", "set_backend"]
__version__ = "0.1.0"
