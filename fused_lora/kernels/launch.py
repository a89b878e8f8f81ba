"""How every launcher starts its kernel: autotuned on a GPU; with a fixed
config where autotuning is not wanted: the interpreter (it has no GPU to
time on) runs its "large" or "small" config, and a GPU under
FUSED_LORA_FIXED_CONFIG=1 the first config that survives pruning (a short
GPU lease cannot autotune every key a test suite hits)."""

from . import configs
from .common import INTERPRETED


def launch(kernel, tuned, grid, args, flags, kind: str) -> None:
    """Run `kernel` over grid(meta): `kind` names its interpreter config
    ("gemm", "reduce"); `tuned` is the kernel under triton.autotune."""
    if INTERPRETED:
        meta = configs.interpreter_config()[kind]
    elif configs.FIXED_ON_GPU:
        config = tuned.early_config_prune(tuned.configs, dict(zip(tuned.arg_names, args, strict=False)), **flags)[0]
        meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        tuned[grid](*args, **flags)
        return
    kernel[grid(meta)](*args, **flags, **meta)
