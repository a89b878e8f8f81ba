"""Tile configurations: the autotune spaces for real GPUs, their pruning, and
the fixed configs the interpreter runs.

Shapes used throughout the kernels:
    M tokens, K in_features, N out_features, R the LoRA rank,
    R_PAD = max(16, next_power_of_2(R)): `tl.dot` needs every dimension >= 16.
"""

import contextlib
import functools
import os

import torch
import triton

# Shared memory per block that the compiler may use.
SHARED_MEMORY_LIMIT = {80: 166_912, 90: 232_448}


def pad_rank(r: int) -> int:
    """The rank as the kernels tile it: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(r))


def m_bucket(m: int) -> int:
    """Autotune key for M: a new sequence length in the same power-of-two
    bucket reuses the tuned config instead of tuning again."""
    return min(triton.next_power_of_2(max(m, 1)), 8192)


def _configs(num_warps, num_stages, *tiles, group_m=8):
    return [
        triton.Config(
            dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=group_m), num_warps=num_warps, num_stages=num_stages
        )
        for m, n, k in tiles
    ]


# The GEMM kernel (forward and dX) tiles (BLOCK_M x BLOCK_N) with a reduction
# step BLOCK_K. Large tiles for prefill / training, BLOCK_M = 16 for decode.
# 128 x 256 with 8 warps and 128 x 128 with 4 warps spill registers on sm_80
# and sm_90 (python -m bench.compile_report): left out.
GEMM_CONFIGS = [
    *_configs(8, 4, (128, 128, 64)),
    *_configs(4, 4, (64, 128, 64), (128, 64, 64)),
    *_configs(4, 3, (64, 64, 128)),
    # fp32 operands: half the K depth, so three stages fit in shared memory
    *_configs(8, 3, (128, 128, 32)),
    *_configs(4, 3, (64, 128, 32)),
    # large ranks: the R_PAD-wide h accumulator needs 8 warps' registers
    *_configs(8, 3, (64, 128, 64), (64, 64, 64), (64, 64, 32)),
    # decode
    *_configs(4, 4, (16, 64, 128), (16, 128, 128), group_m=1),
    *_configs(4, 3, (16, 64, 64), group_m=1),
]
# Many adapters, large ranks: the first adapter's H and the others', two
# (BLOCK_M x R_PAD) fp32 tiles, fit in registers beside the output tile
# (r = 256) only in 16-row tiles spread over 8 warps.
MULTI_GEMM_CONFIGS = [*GEMM_CONFIGS, *_configs(8, 2, (16, 128, 32), (16, 64, 32))]

# The split-K sum: one (BLOCK_M x BLOCK_N) tile of y per program.
FINISH_TILE = dict(BLOCK_M=16, BLOCK_N=64)

# dA / dB kernel: (BLOCK_P x R_PAD) outputs reduced over M in BLOCK_M steps.
# Every BLOCK_M divides SPLIT_M_QUANTUM so a split boundary is a tile boundary.
SPLIT_M_QUANTUM = 256
REDUCE_CONFIGS = [
    triton.Config(dict(BLOCK_P=p, BLOCK_M=m), num_warps=w, num_stages=s)
    for p, m, w, s in [(64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (64, 64, 8, 3), (64, 64, 8, 2)]
]

# The shrink pre-pass: BLOCK_M rows x the whole rank per program, reduced over
# K in BLOCK_K steps; short row blocks so that a prefill batch has programs
# for every SM (M = 4096 in 16-row blocks: 256 programs).
SHRINK_CONFIGS = [
    triton.Config(dict(BLOCK_M=m, BLOCK_K=k), num_warps=w, num_stages=s)
    for m, k, w, s in [(16, 128, 4, 4), (32, 128, 4, 4), (64, 64, 4, 4), (16, 256, 4, 3), (32, 64, 4, 3)]
]

# fp32 accumulator registers per thread above which ptxas starts to spill
# (seen in the compile report; the rest of the 255 hold operands, addresses
# and the MMA fragments).
ACCUMULATOR_REGISTERS = {"gemm": 80, "reduce": 64}


@functools.cache
def _current_arch() -> int | None:
    """The current CUDA device as an architecture number (sm_90: 90), or None
    without one."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def estimate_gemm_shared(config, r_pad: int, wide_dtype=torch.bfloat16, adapter_dtype=torch.bfloat16) -> int:
    """Bytes of shared memory a GEMM config needs: each pipeline stage holds
    one tile of the left operand, of the weight and of the adapter."""
    m = config.kwargs
    wide, adapter = wide_dtype.itemsize, adapter_dtype.itemsize
    tile = (m["BLOCK_M"] + m["BLOCK_N"]) * m["BLOCK_K"] * wide + r_pad * m["BLOCK_K"] * adapter
    return config.num_stages * tile


def estimate_gemm_registers(config, r_pad: int) -> int:
    """fp32 registers per thread for the (BLOCK_M x BLOCK_N) and
    (BLOCK_M x R_PAD) accumulators."""
    m = config.kwargs
    return m["BLOCK_M"] * (m["BLOCK_N"] + r_pad) // (32 * config.num_warps)


def prune_gemm(configs, *, r_pad: int, m: int, wide_dtype, adapter_dtype) -> list:
    """Keep the GEMM configs that fit: shared memory for every stage (a large
    rank adds an R_PAD x BLOCK_K adapter tile), registers for the
    accumulators (ptxas spills past about ACCUMULATOR_REGISTERS), and tiles
    no taller than a decode batch needs."""
    limit = min(SHARED_MEMORY_LIMIT.values())

    def fits(c):
        return (
            estimate_gemm_shared(c, r_pad, wide_dtype, adapter_dtype) <= limit
            and estimate_gemm_registers(c, r_pad) <= ACCUMULATOR_REGISTERS["gemm"]
        )

    fitting = [c for c in configs if fits(c)]
    decode = m <= 64
    kept = [c for c in fitting if (c.kwargs["BLOCK_M"] == 16) == decode]
    return kept or fitting or [min(configs, key=lambda c: estimate_gemm_registers(c, r_pad))]


def prune_shrink(configs, *, r_pad: int, wide_dtype, adapter_dtype) -> list:
    """Keep the shrink configs whose (BLOCK_M x R_PAD) accumulator fits in
    registers and whose stages fit in shared memory."""
    limit = min(SHARED_MEMORY_LIMIT.values())

    def fits(c):
        k = c.kwargs
        shared = c.num_stages * k["BLOCK_K"] * (k["BLOCK_M"] * wide_dtype.itemsize + r_pad * adapter_dtype.itemsize)
        return shared <= limit and k["BLOCK_M"] * r_pad // (32 * c.num_warps) <= ACCUMULATOR_REGISTERS["reduce"]

    return [c for c in configs if fits(c)] or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.num_stages)]


def prune_reduce(configs, *, r_pad: int, wide_dtype, skinny_dtype) -> list:
    """Keep the dA / dB configs whose (BLOCK_P x R_PAD) accumulator fits in
    registers and whose stages fit in shared memory."""
    limit = min(SHARED_MEMORY_LIMIT.values())

    def fits(c):
        k = c.kwargs
        shared = c.num_stages * k["BLOCK_M"] * (k["BLOCK_P"] * wide_dtype.itemsize + r_pad * skinny_dtype.itemsize)
        registers = k["BLOCK_P"] * r_pad // (32 * c.num_warps)
        return shared <= limit and registers <= ACCUMULATOR_REGISTERS["reduce"]

    return [c for c in configs if fits(c)] or [min(configs, key=lambda c: c.kwargs["BLOCK_P"] * c.num_stages)]


# The interpreter cannot autotune (it has no GPU driver): it runs one of
# these. "large" is fast to interpret; "small" makes every loop run several
# iterations, every edge mask bite and the dA / dB reduction split over M.
INTERPRETER_CONFIGS = {
    "large": {
        "gemm": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=4),
        "shrink": dict(BLOCK_M=64, BLOCK_K=64),
        "reduce": dict(BLOCK_P=64, BLOCK_M=64),
        "split_m": 256,
    },
    "small": {
        "gemm": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2),
        "shrink": dict(BLOCK_M=16, BLOCK_K=16),
        "reduce": dict(BLOCK_P=16, BLOCK_M=16),
        "split_m": 32,
    },
}
_interpreter_config = os.environ.get("FUSED_LORA_INTERPRETER_CONFIG", "large")
# On a GPU: time the configs (and the backend's candidates) instead of taking
# the first that fits; results cached on disk.
TUNE = os.environ.get("FUSED_LORA_TUNE", "0") not in ("", "0")


def interpreter_config() -> dict:
    """The interpreter's config in use: "large" by default, or as
    FUSED_LORA_INTERPRETER_CONFIG / use_interpreter_config say."""
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


# The persistent TMA GEMM (Hopper): big tiles, deep pipelines.
TMA_CONFIGS = [
    triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8), num_warps=w, num_stages=s)
    for m, n, k, w, s in [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (64, 128, 64, 4, 4)]
]


def prune_tma(configs, *, r_pad: int, dtype) -> list:
    """Keep the TMA configs whose stages fit sm_90's shared memory and whose
    accumulator (plus the expand's H tile) fits in registers."""

    def fits(c):
        k = c.kwargs
        shared = c.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * dtype.itemsize
        registers = k["BLOCK_M"] * (k["BLOCK_N"] + r_pad) // (32 * c.num_warps)
        return shared <= SHARED_MEMORY_LIMIT[90] and registers <= 2 * ACCUMULATOR_REGISTERS["gemm"]

    return [c for c in configs if fits(c)] or [configs[-1]]
