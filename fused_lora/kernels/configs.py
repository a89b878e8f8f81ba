"""Tile configurations: the autotune spaces for real GPUs, their pruning, and
the fixed configs the Triton interpreter runs with.

Shapes used throughout the kernels:
    M tokens, K in_features, N out_features, R the LoRA rank,
    R_PAD = max(16, next_power_of_2(R)): `tl.dot` needs every dimension >= 16.
"""

import contextlib
import os

import triton

# Shared memory per block that the compiler may use (TESTING.md).
SHARED_MEMORY_LIMIT = {80: 166_912, 90: 232_448}


def pad_rank(r: int) -> int:
    """The rank as the kernels tile it: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(r))


def m_bucket(m: int) -> int:
    """Autotune key for M: a new sequence length in the same power-of-two
    bucket reuses the tuned config instead of tuning again."""
    return min(triton.next_power_of_2(max(m, 1)), 8192)


def _config(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# Forward and dX kernels tile (BLOCK_M x BLOCK_N) with a reduction step
# BLOCK_K. Large tiles for prefill/training, BLOCK_M = 16 tiles for decode.
# 128 x 256 with 8 warps and 128 x 128 with 4 warps spill registers on sm_80
# and sm_90 (python -m fused_lora.kernels.compile_check): left out.
GEMM_CONFIGS = [
    _config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _config(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    _config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
    # fp32 operands: half the K depth, so three stages fit in shared memory
    _config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    _config(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    # large ranks: the R_PAD-wide h accumulator needs 8 warps' registers
    _config(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _config(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    _config(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
    # decode
    _config(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1),
    _config(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1),
    _config(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1),
]

# dA / dB kernel: (BLOCK_P x R_PAD) outputs reduced over M in BLOCK_M steps.
# Every BLOCK_M divides SPLIT_M_QUANTUM so a split boundary is a tile boundary.
SPLIT_M_QUANTUM = 256
GRAD_AB_CONFIGS = [
    _config(4, 3, BLOCK_P=64, BLOCK_M=128),
    _config(8, 3, BLOCK_P=128, BLOCK_M=128),
    _config(4, 4, BLOCK_P=64, BLOCK_M=64),
    _config(8, 3, BLOCK_P=64, BLOCK_M=64),
    _config(8, 2, BLOCK_P=64, BLOCK_M=64),  # fp32 at large ranks
]

# fp32 accumulator registers per thread above which ptxas starts to spill
# (seen in the compile report; the rest of the 255 hold operands, addresses
# and the MMA fragments).
ACCUMULATOR_REGISTERS = {"gemm": 80, "grad_ab": 64}


def _element_size(dtype) -> int:
    return 4 if "32" in str(dtype) else 2


def _arg(name, named_args, kwargs):
    return kwargs[name] if name in kwargs else named_args[name]


def _sizes(named_args):
    """Bytes per element of the wide operand (x or dY) and of the adapters."""
    wide = named_args["x_ptr"] if "x_ptr" in named_args else named_args.get("dy_ptr", named_args.get("p_ptr"))
    adapter = named_args["a_ptr"] if "a_ptr" in named_args else named_args["q_ptr"]
    return _element_size(wide.dtype), _element_size(adapter.dtype)


def estimate_gemm_shared(config, r_pad: int, wide_size: int = 2, adapter_size: int = 2) -> int:
    """Bytes of shared memory a forward / dX config needs: each pipeline stage
    holds one tile of the left operand, of the weight and of the adapter."""
    m = config.kwargs
    tile = (m["BLOCK_M"] + m["BLOCK_N"]) * m["BLOCK_K"] * wide_size + r_pad * m["BLOCK_K"] * adapter_size
    return config.num_stages * tile


def estimate_gemm_registers(config, r_pad: int) -> int:
    """fp32 registers per thread for the (BLOCK_M x BLOCK_N) and
    (BLOCK_M x R_PAD) accumulators."""
    m = config.kwargs
    return m["BLOCK_M"] * (m["BLOCK_N"] + r_pad) // (32 * config.num_warps)


def prune_gemm_configs(configs, named_args, **kwargs):
    """Keep the forward / dX configs that fit: shared memory for every stage
    (a large rank adds an R_PAD x BLOCK_K adapter tile), registers for the
    accumulators (ptxas spills past about ACCUMULATOR_REGISTERS), and tiles
    no taller than a decode batch needs."""
    r_pad = _arg("R_PAD", named_args, kwargs)
    m = _arg("M", named_args, kwargs)
    sizes = _sizes(named_args)
    limit = min(SHARED_MEMORY_LIMIT.values())

    def fits(c):
        return (
            estimate_gemm_shared(c, r_pad, *sizes) <= limit
            and estimate_gemm_registers(c, r_pad) <= ACCUMULATOR_REGISTERS["gemm"]
        )

    fitting = [c for c in configs if fits(c)]
    decode = m <= 64
    kept = [c for c in fitting if (c.kwargs["BLOCK_M"] == 16) == decode]
    return kept or fitting or [min(configs, key=lambda c: estimate_gemm_registers(c, r_pad))]


def prune_grad_ab_configs(configs, named_args, **kwargs):
    """Keep the dA / dB configs whose (BLOCK_P x R_PAD) accumulator fits in
    registers and whose stages fit in shared memory."""
    r_pad = _arg("R_PAD", named_args, kwargs)
    wide_size, skinny_size = _sizes(named_args)
    limit = min(SHARED_MEMORY_LIMIT.values())

    def fits(c):
        k = c.kwargs
        shared = c.num_stages * k["BLOCK_M"] * (k["BLOCK_P"] * wide_size + r_pad * skinny_size)
        registers = k["BLOCK_P"] * r_pad // (32 * c.num_warps)
        return shared <= limit and registers <= ACCUMULATOR_REGISTERS["grad_ab"]

    return [c for c in configs if fits(c)] or [min(configs, key=lambda c: c.kwargs["BLOCK_P"] * c.num_stages)]


# The interpreter cannot autotune (it has no GPU driver): it runs one of these.
# "large" is fast to interpret; "small" makes every loop run several
# iterations, every edge mask bite and the dA / dB reduction split over M.
INTERPRETER_CONFIGS = {
    "large": {
        "gemm": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=4),
        "grad_ab": dict(BLOCK_P=64, BLOCK_M=64),
        "split_m": 256,
    },
    "small": {
        "gemm": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2),
        "grad_ab": dict(BLOCK_P=16, BLOCK_M=16),
        "split_m": 32,
    },
}
_interpreter_config = os.environ.get("FUSED_LORA_INTERPRETER_CONFIG", "large")


def interpreter_config() -> dict:
    return INTERPRETER_CONFIGS[_interpreter_config]


@contextlib.contextmanager
def use_interpreter_config(name: str):
    """Run the interpreted kernels with INTERPRETER_CONFIGS[name] (tests)."""
    global _interpreter_config
    if name not in INTERPRETER_CONFIGS:
        raise ValueError(f"interpreter config must be one of {sorted(INTERPRETER_CONFIGS)}, got {name!r}")
    previous, _interpreter_config = _interpreter_config, name
    try:
        yield
    finally:
        _interpreter_config = previous


def split_m(m: int, num_p_tiles: int, num_sms: int) -> int:
    """Rows of M per program of the dA / dB reduction: enough programs to fill
    about two waves of the GPU, each reducing a multiple of SPLIT_M_QUANTUM."""
    wanted_splits = max(1, (2 * num_sms) // max(num_p_tiles, 1))
    rows = triton.cdiv(max(m, 1), wanted_splits)
    return triton.cdiv(rows, SPLIT_M_QUANTUM) * SPLIT_M_QUANTUM
