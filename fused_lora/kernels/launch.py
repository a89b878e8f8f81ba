"""How every launcher starts its kernel. By default on a GPU: the first
config of the autotune space that survives pruning (the spaces are ordered
best-first for their shapes), so a first call compiles one config and never
stalls to tune. Under FUSED_LORA_TUNE=1: Triton's autotuner, its timings
cached on disk across processes. The interpreter (no GPU to time on) runs
its "large" or "small" config."""

from . import configs
from .common import INTERPRETED


def launch(kernel, tuned, grid, args, flags, kind: str) -> None:
    """Run `kernel` over grid(meta): `kind` names its interpreter config
    ("gemm", "shrink", "reduce"); `tuned` is the kernel under triton.autotune."""
    if INTERPRETED:
        meta = configs.interpreter_config()[kind]
    elif configs.TUNE:
        tuned[grid](*args, **flags)
        return
    else:
        config = tuned.early_config_prune(tuned.configs, dict(zip(tuned.arg_names, args, strict=False)), **flags)[0]
        meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    kernel[grid(meta)](*args, **flags, **meta)
