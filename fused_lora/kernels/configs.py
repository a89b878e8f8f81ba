"""Tile configurations: the autotune spaces for real GPUs, their pruning, and
the fixed configs the interpreter runs.

Shapes used throughout the kernels:
    M tokens, K in_features, N out_features, R the LoRA rank,
    R_PAD = max(16, next_power_of_2(R)): `tl.dot` needs every dimension >= 16.
"""

import contextlib
import functools
import json
import os
import pathlib

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
# fp32 adapters under IEEE precision: FMA dots hold their operand tiles in
# registers, and from r = 64 on only short tiles keep them there.
MULTI_GEMM_CONFIGS += [*_configs(8, 3, (32, 64, 32)), *_configs(4, 2, (16, 32, 32), group_m=1)]
# The last config of each space is its safe one: the smallest footprint per
# thread, without spills in every launch of the compile report (fp32 adapters
# under IEEE at r = 256, many adapters and dropout, NF4 / FP8 decode). It runs
# when the pruning keeps nothing else.
MULTI_GEMM_CONFIGS += _configs(8, 2, (16, 32, 32), group_m=1)

# The split-K sum: one (BLOCK_M x BLOCK_N) tile of y per program.
FINISH_TILE = dict(BLOCK_M=16, BLOCK_N=64)

# dA / dB kernel: (BLOCK_P x R_PAD) outputs reduced over M in BLOCK_M steps.
# Every BLOCK_M divides SPLIT_M_QUANTUM so a split boundary is a tile boundary.
SPLIT_M_QUANTUM = 256
REDUCE_CONFIGS = [
    triton.Config(dict(BLOCK_P=p, BLOCK_M=m), num_warps=w, num_stages=s)
    for p, m, w, s in [(64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (64, 64, 8, 3), (64, 64, 8, 2)]
]
# fp32 adapters under IEEE precision (FMA): shallow M steps.
REDUCE_CONFIGS += [
    triton.Config(dict(BLOCK_P=p, BLOCK_M=m), num_warps=w, num_stages=s)
    for p, m, w, s in [(64, 16, 8, 2), (32, 16, 4, 2), (16, 32, 4, 2), (16, 16, 8, 2)]  # the last: the safe one
]

# The shrink pre-pass: BLOCK_M rows x the whole rank per program, reduced over
# K in BLOCK_K steps; short row blocks so that a prefill batch has programs
# for every SM (M = 4096 in 16-row blocks: 256 programs).
SHRINK_CONFIGS = [
    triton.Config(dict(BLOCK_M=m, BLOCK_K=k), num_warps=w, num_stages=s)
    for m, k, w, s in [(16, 128, 4, 4), (32, 128, 4, 4), (64, 64, 4, 4), (16, 256, 4, 3), (32, 64, 4, 3)]
]
# fp32 adapters under IEEE precision (FMA): shallow K steps.
SHRINK_CONFIGS += [
    triton.Config(dict(BLOCK_M=m, BLOCK_K=k), num_warps=w, num_stages=s)
    for m, k, w, s in [(16, 64, 4, 3), (16, 32, 4, 3), (16, 32, 8, 2), (16, 16, 4, 1)]  # the last: the safe one
]

# --- Which configs a launch keeps ----------------------------------------------------------------------------------
#
# A config must fit the GPU it runs on: shared memory (an estimate never below
# what the compiler allocated in the compile report) and registers. ptxas gives
# a thread at most 255 registers and spills to local memory past them. What a
# config needs depends on its tiles and on the launch: how tl.dot runs (tensor
# cores for 16-bit and TF32 operands; FMA for fp32 under IEEE, whose operand
# tiles are held in registers), many adapters (a second H accumulator, per-row
# scalings and dropout p) and dropout (the Philox mask of a tile). Each config
# gets a register pressure, its accumulators and half its operand tiles in fp32
# values per thread, and is kept when that is within the budget of its class:
# kernel, architecture, regime (how its dots run) and load (many adapters,
# dropout). A budget is the largest pressure at which the configs of the class
# compiled cleanly in the compile report (`python -m bench.compile_report`);
# SPILLING keeps out the configs that still went wrong under it. A launch that
# does not say its architecture, precision, adapters or dropout gets the
# strictest budget over what it left out. When nothing is left, a launch runs
# the safe config at the end of its space.

# Data read off the compile report. REGISTER_BUDGETS[kernel][arch][regime] =
# the budgets per load (LOADS), regime as regime() names it (3xTF32 takes the
# TF32 budgets). SPILLING[kernel][config_label(config)] = the classes (arch,
# regime, load, the R_PAD from which on) a config went wrong in although its
# budget admitted it (ptxas does not spill in order of pressure); written by
# `python -m bench.compile_report --exclude REPORT`.
LIMITS_FILE = pathlib.Path(__file__).with_name("config_limits.json")


def _read_limits(path: pathlib.Path) -> tuple[dict, dict]:
    """(REGISTER_BUDGETS, SPILLING) from the JSON file: budgets as tuples
    per load, each SPILLING class a tuple (arch, regime, load, from R_PAD)."""
    data = json.loads(path.read_text())
    budgets = {
        kernel: {int(arch): {regime: tuple(v) for regime, v in regimes.items()} for arch, regimes in archs.items()}
        for kernel, archs in data["REGISTER_BUDGETS"].items()
    }
    spilling = {
        kernel: {label: {tuple(w) for w in where} for label, where in labels.items()}
        for kernel, labels in data["SPILLING"].items()
    }
    return budgets, spilling


REGISTER_BUDGETS, SPILLING = _read_limits(LIMITS_FILE)

# The persistent TMA GEMM's simpler estimate (prune_tma): fp32 accumulator
# registers per thread past which ptxas starts to spill on sm_80.
ACCUMULATOR_REGISTERS = {"gemm": 80, "reduce": 64}

LOADS = ("plain", "dropout", "multi", "multi+dropout")
# At most this many configs per launch are kept (the first that fit).
MAX_KEPT = 3


@functools.cache
def _current_arch() -> int | None:
    """The current CUDA device as an architecture number (sm_90: 90), or None
    without one."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def _archs(arch: int | None) -> tuple[int, ...]:
    """The architectures to fit: the given one (or the current GPU's), every
    known one when neither is known; an unknown one as the strictest known."""
    arch = arch if arch is not None else _current_arch()
    return (arch,) if arch in SHARED_MEMORY_LIMIT else tuple(SHARED_MEMORY_LIMIT)


def _dot_kind(dtype, precision: str) -> str:
    if dtype.itemsize == 2:
        return "mma"
    return precision if precision in ("tf32", "tf32x3") else "fma"


def regime(wide_dtype, adapter_dtype, precision: str, base_precision: str | None = None, w_format: str = "") -> str:
    """How a launch's dots run: "<wide operand's>/<adapters'>", each "mma"
    (16-bit), "tf32", "tf32x3" (how a GPU runs fp32 under IEEE precision:
    fused_lora/backends/triton_backend.py) or "fma" (fp32 "ieee"); after the name of
    W's quantized format when it has one ("nf4 mma/mma"): SPILLING tells the
    formats apart, REGISTER_BUDGETS does not."""
    base = precision if base_precision is None else base_precision
    dots = f"{_dot_kind(wide_dtype, base)}/{_dot_kind(adapter_dtype, precision)}"
    return f"{w_format} {dots}" if w_format else dots


def load(multi: bool, dropout: bool) -> int:
    """The index in LOADS of a launch with or without many adapters and dropout."""
    return 2 * multi + dropout


def config_label(config) -> str:
    """A config as SPILLING names it, e.g. '64x64x32 w8 s3': the tile
    (BLOCK_M x BLOCK_N x BLOCK_K; BLOCK_M x BLOCK_K for the shrink; BLOCK_P x
    BLOCK_M for dA / dB), warps and stages."""
    k = config.kwargs
    names = ("BLOCK_P", "BLOCK_M") if "BLOCK_P" in k else ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    tile = "x".join(str(k[n]) for n in names if n in k)
    return f"{tile} w{config.num_warps} s{config.num_stages}"


def register_limits(kernel: str, arch, wide_dtype, adapter_dtype, precision=None, base_precision=None, multi=None,
                    dropout=None, r_pad: int = 256, w_format: str = "") -> tuple[int, set[str]]:  # fmt: skip
    """(the register pressure a launch of `kernel` ("gemm", "shrink",
    "reduce") at rank R_PAD `r_pad` may reach, the labels of the configs kept
    out of it): the strictest over every value of what it left as None."""
    classes = [
        (a, regime(wide_dtype, adapter_dtype, p, base_precision, w_format), load(m, d))
        for a in _archs(arch)
        for p in (("ieee", "tf32", "tf32x3") if precision is None else (precision,))
        for m in ((False, True) if multi is None else (multi,))
        for d in ((False, True) if dropout is None else (dropout,))
    ]
    # 3xTF32 has the TF32 budgets (its own SPILLING entries).
    budget = min(REGISTER_BUDGETS[kernel][a][r.split()[-1].replace("tf32x3", "tf32")][i] for a, r, i in classes)
    spilling = {
        label
        for label, where in SPILLING[kernel].items()
        if any((a, r, i) in classes and r_pad >= since for a, r, i, since in where)
    }
    return budget, spilling


def gemm_pressure(config, r_pad: int, *, multi: bool = True, shrink: bool = True, compute_y: bool = True) -> int:
    """fp32 values per thread of the GEMM's (BLOCK_M x BLOCK_N) output and
    (BLOCK_M x R_PAD) H accumulators (two with many adapters and the shrink
    in the loop) and half its operand tiles."""
    k = config.kwargs
    m, n, depth = k["BLOCK_M"], k["BLOCK_N"] * compute_y, k["BLOCK_K"]
    values = m * n + m * r_pad * (2 if multi and shrink else 1) + depth * (m + n) // 2
    return -(-values // (32 * config.num_warps))


def shrink_pressure(config, r_pad: int) -> int:
    """fp32 values per thread of the shrink's (BLOCK_M x R_PAD) accumulator
    and half its operand tiles."""
    k = config.kwargs
    values = k["BLOCK_M"] * r_pad + k["BLOCK_K"] * (k["BLOCK_M"] + r_pad) // 2
    return -(-values // (32 * config.num_warps))


def reduce_pressure(config, r_pad: int) -> int:
    """fp32 values per thread of the dA / dB (BLOCK_P x R_PAD) accumulator
    and half its operand tiles."""
    k = config.kwargs
    values = k["BLOCK_P"] * r_pad + k["BLOCK_M"] * (k["BLOCK_P"] + r_pad) // 2
    return -(-values // (32 * config.num_warps))


# Bytes per element of a W tile in a pipeline stage, quantized: the codes and
# the block scales the decode gathers per element (NF4: absmax, and the
# nested statistics; FP8: the 128 x 128 block scale), fitted above what the
# compile report shows.
W_TILE_BYTES = {"nf4": 6, "fp8": 4}


def gemm_shared(config, r_pad: int, wide_dtype, adapter_dtype, w_format: str = "") -> int:
    """Bytes of shared memory the GEMM needs: the pipeline's stages (a tile of
    x, of W and of the adapter each, and an eighth more for what the compiler
    adds), or the epilogue's (H and the expand's adapter tile as dot operands;
    the fp32 output tile on its way to the store), whichever is more."""
    k = config.kwargs
    m, n, depth = k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"]
    w_bytes = W_TILE_BYTES[w_format] if w_format else wide_dtype.itemsize
    stage = (m * wide_dtype.itemsize + n * w_bytes) * depth + r_pad * depth * adapter_dtype.itemsize
    epilogue = max((m + n) * r_pad * adapter_dtype.itemsize, m * n * 4)
    return max(config.num_stages * stage * 9 // 8, epilogue)


def shrink_shared(config, r_pad: int, wide_dtype, adapter_dtype) -> int:
    """Bytes of shared memory the shrink needs: its stages (x and adapter
    tiles) and the fp32 H tile on its way to the store."""
    k = config.kwargs
    stage = k["BLOCK_K"] * (k["BLOCK_M"] * wide_dtype.itemsize + r_pad * adapter_dtype.itemsize)
    return config.num_stages * stage + k["BLOCK_M"] * r_pad * 4


def reduce_shared(config, r_pad: int, wide_dtype, skinny_dtype) -> int:
    """Bytes of shared memory dA / dB need: its stages, the wide tile in the
    wider of the two dtypes (it is converted to the skinny one's)."""
    k = config.kwargs
    width = max(wide_dtype.itemsize, skinny_dtype.itemsize)
    return config.num_stages * k["BLOCK_M"] * (k["BLOCK_P"] * width + r_pad * skinny_dtype.itemsize)


def _keep(configs, pressure, shared, limits: tuple[int, set[str]], shared_limit: int) -> list:
    """The configs within the register limits and shared memory, in their
    order; else the space's last, its safe one (every launch keeps a config)."""
    budget, spilling = limits
    kept = [c for c in configs if pressure(c) <= budget and shared(c) <= shared_limit]
    kept = [c for c in kept if config_label(c) not in spilling]
    return kept or configs[-1:]


def _best(kept: list) -> list:
    """The first MAX_KEPT: the spaces are ordered best first, and each kept
    config costs FUSED_LORA_TUNE=1 a compile and a timing on a first call."""
    return kept[:MAX_KEPT]


def _shared_limit(arch) -> int:
    return min(SHARED_MEMORY_LIMIT[a] for a in _archs(arch))


def prune_gemm(configs, *, r_pad: int, m: int, wide_dtype, adapter_dtype, arch=None, precision=None,
               base_precision=None, multi=None, dropout=None, shrink=True, compute_y=True,
               w_format="") -> list:  # fmt: skip
    """The GEMM configs a launch keeps, best first, at most MAX_KEPT: within
    the register budget of its class and shared memory, and tiles no taller
    than a decode batch needs (16 rows for m <= 64, taller ones otherwise,
    while any fits).

    r_pad: the kernel's R_PAD; m: rows; wide_dtype / adapter_dtype: x's and
    the adapters'; arch: e.g. 90 (default: the current GPU's); precision /
    base_precision: the LoRA and base GEMM's fp32 precision ("ieee", "tf32", "tf32x3";
    the base's defaults to the LoRA's); multi, dropout, shrink, compute_y:
    the launch's MULTI, DROPOUT, SHRINK (the shrink in the K loop) and
    COMPUTE_Y; w_format: W's quantized format ("nf4", "fp8") or "" (dense).
    Left as None, arch, precision, multi and dropout count as every value
    they can take."""
    limits = register_limits(
        "gemm", arch, wide_dtype, adapter_dtype, precision, base_precision, multi, dropout, r_pad, w_format
    )
    shape = dict(multi=multi is not False, shrink=shrink, compute_y=compute_y)
    pressure, shared = (
        (lambda c: gemm_pressure(c, r_pad, **shape)),
        (lambda c: gemm_shared(c, r_pad, wide_dtype, adapter_dtype, w_format)),
    )
    kept = _keep(configs, pressure, shared, limits, _shared_limit(arch))
    decode = m <= 64
    return _best([c for c in kept if (c.kwargs["BLOCK_M"] == 16) == decode] or kept)


def launch_details(flags: dict) -> dict:
    """The shrink's and dA / dB's constexpr flags as the pruning takes them."""
    return dict(precision=flags["PRECISION"], multi=flags["MULTI"], dropout=flags["DROPOUT"])


def prune_shrink(configs, *, r_pad: int, wide_dtype, adapter_dtype, arch=None, precision=None, multi=None,
                 dropout=None) -> list:  # fmt: skip
    """The shrink configs a launch keeps, best first, at most MAX_KEPT (see
    prune_gemm for the arguments): within the register budget of its class
    and shared memory."""
    limits = register_limits("shrink", arch, wide_dtype, adapter_dtype, precision, None, multi, dropout, r_pad)
    pressure, shared = (
        (lambda c: shrink_pressure(c, r_pad)),
        (lambda c: shrink_shared(c, r_pad, wide_dtype, adapter_dtype)),
    )
    return _best(_keep(configs, pressure, shared, limits, _shared_limit(arch)))


def prune_reduce(configs, *, r_pad: int, wide_dtype, skinny_dtype, arch=None, precision=None, multi=None,
                 dropout=None) -> list:  # fmt: skip
    """The dA / dB configs a launch keeps, best first, at most MAX_KEPT (see
    prune_gemm for the arguments; skinny_dtype: G's or H's, the adapters'
    dtype): within the register budget of its class and shared memory."""
    limits = register_limits("reduce", arch, wide_dtype, skinny_dtype, precision, None, multi, dropout, r_pad)
    pressure, shared = (
        (lambda c: reduce_pressure(c, r_pad)),
        (lambda c: reduce_shared(c, r_pad, wide_dtype, skinny_dtype)),
    )
    return _best(_keep(configs, pressure, shared, limits, _shared_limit(arch)))


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


# The persistent TMA GEMM (Hopper): big tiles, deep pipelines; the last two
# for large ranks, whose epilogue tiles take most of the shared memory.
TMA_CONFIGS = [
    triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8), num_warps=w, num_stages=s)
    for m, n, k, w, s in [
        (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (64, 128, 64, 4, 4),
        (64, 128, 64, 4, 3), (64, 64, 64, 4, 2),
    ]
]  # fmt: skip


def tma_shared(config, r_pad: int, dtype) -> int:
    """Bytes of shared memory the TMA GEMM needs: every stage of the
    persistent loop buffers the K loop's x and W boxes and the epilogue's H
    and B tiles (the compiler pipelines the epilogue's loads across tiles)."""
    k = config.kwargs
    return config.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * (k["BLOCK_K"] + r_pad) * dtype.itemsize


def prune_tma(configs, *, r_pad: int, dtype) -> list:
    """Keep the TMA configs whose stages fit sm_90's shared memory and whose
    accumulator (plus the expand's H tile) fits in registers; at most
    MAX_KEPT, else the one needing the least shared memory."""

    def fits(c):
        k = c.kwargs
        registers = k["BLOCK_M"] * (k["BLOCK_N"] + r_pad) // (32 * c.num_warps)
        return tma_shared(c, r_pad, dtype) <= SHARED_MEMORY_LIMIT[90] and registers <= 2 * ACCUMULATOR_REGISTERS["gemm"]

    return _best([c for c in configs if fits(c)]) or [min(configs, key=lambda c: tma_shared(c, r_pad, dtype))]
