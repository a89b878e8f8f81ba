"""What every kernel file shares: whether Triton interprets, and the
interpreter's bf16 workaround."""

import functools

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether @triton.jit functions run
# interpreted (TRITON_INTERPRET=1 when the kernels were imported).
INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def dot_operand(t, UPCAST: tl.constexpr):
    """A tile as `tl.dot` should see it. The interpreter multiplies bf16 bit
    patterns as integers (triton-lang/triton#11584), so when interpreted the
    16-bit operands go to fp32; compiled kernels keep their native MMA dtype."""
    if UPCAST and t.dtype.primitive_bitwidth == 16:
        return t.to(tl.float32)
    else:
        return t


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in grouped order: GROUP_M row-blocks
    run side by side over the column-blocks, so each weight column-block is
    reused from L2 by GROUP_M programs (Triton's matmul tutorial)."""
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def dropout_scale(seed, rows, cols, p, scale):
    """(len(rows), len(cols)) factors of inverted dropout: `scale` = 1/(1-p)
    where an element is kept, 0 where it is dropped. The mask is a pure
    function of (seed, row, col), the element's logical index, so the
    forward, the backward and `dropout_mask` regenerate the same one whatever
    the strides of x. Philox counters (col, row, 0, 0) in 32 bits: no
    M * K overflow, and a quarter of the 64-bit variant's work."""
    zero = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.uint32)
    c0 = cols[None, :].to(tl.uint32) + zero
    c1 = rows[:, None].to(tl.uint32) + zero
    bits, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
    keep = tl.uint_to_uniform_float(bits) >= p
    return tl.where(keep, scale, 0.0)


@triton.jit
def dropout_mask_kernel(keep_ptr, M, K, seed, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """keep[m, k] = 1 where dropout keeps x[m, k] (tests and debugging)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_scale(seed, rows, cols, p, 1.0) > 0
    tl.store(
        keep_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8), mask=(rows[:, None] < M) & (cols[None, :] < K)
    )


def accumulator_dtype(dtype: torch.dtype):
    """fp32 accumulation, except float64 (interpreter only), whose dot needs
    a float64 accumulator: the interpreter returns garbage for fp64 operands
    into an fp32 one."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device: how many programs fill it."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(device_index: int) -> int:
    # Cached: querying the properties costs host time on every backward.
    return torch.cuda.get_device_properties(device_index).multi_processor_count
