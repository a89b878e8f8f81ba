"""What every kernel shares: whether Triton interprets, the interpreter's bf16
workaround, the grouped tile order, dropout, and how a kernel finds its rows
and adapters (one adapter, or a table of many)."""

import functools

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether @triton.jit functions run
# interpreted (TRITON_INTERPRET=1 when the kernels were imported).
INTERPRETED = bool(triton.knobs.runtime.interpret)

# The adapter table of a multi-adapter launch: one int64 row per adapter
# (A's address, B's address, rank).
TABLE_WIDTH = tl.constexpr(3)
LORA_A = tl.constexpr(0)
LORA_B = tl.constexpr(1)
RANK = tl.constexpr(2)


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
def dropout_scale(seed, rows, cols, p):
    """(len(rows), len(cols)) factors of inverted dropout: 1 / (1 - p) where
    an element is kept, 0 where it is dropped; p is a scalar or one value per
    row ((len(rows), 1): each row its adapter's p). The mask is a pure
    function of (seed, row, col), the element's logical index, so the
    forward, the backward and `dropout_mask` regenerate the same one whatever
    the strides of x. Philox counters (col, row, 0, 0) in 32 bits: no M * K
    overflow, and a quarter of the 64-bit variant's work."""
    zero = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.uint32)
    c0 = cols[None, :].to(tl.uint32) + zero
    c1 = rows[:, None].to(tl.uint32) + zero
    bits, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
    keep = tl.uint_to_uniform_float(bits) >= p
    return tl.where(keep, 1.0 / (1.0 - p), 0.0)


@triton.jit
def dropout_mask_kernel(keep_ptr, M, K, seed, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """keep[m, k] = 1 where dropout keeps x[m, k] (tests and debugging)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_scale(seed, rows, cols, p) > 0
    tl.store(
        keep_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8), mask=(rows[:, None] < M) & (cols[None, :] < K)
    )


@triton.jit
def tile_rows(slots, slot_ok, order_ptr, ids_ptr, MULTI: tl.constexpr, SORTED: tl.constexpr):
    """(the caller's rows at these positions, each row's adapter). One
    adapter: positions are rows and every row has adapter 0. Many: rows are
    read through the sorted `order` when SORTED, and past the last row the
    adapter is -1 (none)."""
    if MULTI:
        if SORTED:
            rows = tl.load(order_ptr + slots, mask=slot_ok, other=0).to(tl.int64)
        else:
            rows = slots
        ids = tl.load(ids_ptr + slots, mask=slot_ok, other=-1)
    else:
        rows = slots
        ids = tl.where(slot_ok, 0, -1)
    return rows, ids


@triton.jit
def next_adapter(ids, after, NUM_ADAPTERS):
    """The smallest adapter index in ids above `after`; NUM_ADAPTERS when none
    is left (base-only rows, -1, are never chosen)."""
    return tl.min(tl.where(ids > after, ids, NUM_ADAPTERS))


@triton.jit
def adapter_matrix(table_ptr, a, NUM_ADAPTERS, DTYPE: tl.constexpr, WHICH: tl.constexpr, RANK_MULTIPLE: tl.constexpr):
    """(pointer to adapter a's A (WHICH = LORA_A) or B (LORA_B), of the
    adapters' DTYPE; its rank). For a == NUM_ADAPTERS (no adapter) the rank
    is 0, so every load through the pointer is masked off."""
    valid = a < NUM_ADAPTERS
    entry = table_ptr + a * TABLE_WIDTH
    matrix = tl.load(entry + WHICH, mask=valid, other=0).to(tl.pointer_type(DTYPE))
    rank = tl.load(entry + RANK, mask=valid, other=0).to(tl.int32)
    # What Triton's launcher would specialize on were these arguments: the
    # launcher aligns every adapter to 16 bytes, and every rank is a multiple
    # of RANK_MULTIPLE (B's row stride: aligned rows load as vectors, which
    # also keeps sm_80 from spilling registers on B's tile addresses).
    return tl.multiple_of(matrix, 16), tl.multiple_of(rank, RANK_MULTIPLE)


@triton.jit
def row_values(values_ptr, ids):
    """Each row's adapter's value (scaling or dropout p, one per adapter at
    values_ptr); 0 on rows without an adapter."""
    return tl.load(values_ptr + ids, mask=ids >= 0, other=0.0)


TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}
TORCH_DTYPES = {tl_dtype: torch_dtype for torch_dtype, tl_dtype in TL_DTYPES.items()}


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
