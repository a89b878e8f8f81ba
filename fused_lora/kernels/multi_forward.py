"""Fused multi-adapter LoRA forward: every row its own adapter, one launch.

    x: (M, K)   W: (N, K)   bias: (N,)   adapter_ids: (M,), -1 = base only
    adapter a: A_a (r_a, K), B_a (N, r_a), scaling s_a; R = max r_a
    y_i = W x_i + bias + s_a B_a A_a x_i  with a = adapter_ids[i]   y: (M, N)
    H: (M, R), H[i, :r_a] = A_a x_i (unscaled), zeros elsewhere: for the backward

Design:

- Rows are grouped by adapter with a stable argsort (`multi_rows`); a program
  owns BLOCK_M consecutive *sorted* positions and reads x / writes y through
  `order`, so the caller's rows never move and no permuted copy exists.
- Each (BLOCK_M x BLOCK_N) program runs the base GEMM's K loop once and folds
  into it the shrink `x A_a^T` of the first adapter of its tile (strategy (a)
  of DESIGN.md: in a prefill batch most tiles hold one adapter, and x is read
  once). Every other adapter present in the tile gets a K loop of its own
  over its rows only, run before the base GEMM so that no loop holds the
  (BLOCK_M x BLOCK_N) accumulator and a pipelined adapter tile at once (that
  spilled registers on sm_80). Rows of different adapters are disjoint, so
  one (BLOCK_M x R_PAD) tile H holds them all. The epilogue adds, per adapter
  of the tile, `s_a H B_a^T` on that adapter's rows.
  Extra MMA work per tile: (adapters in the tile) x R_PAD / BLOCK_N. A decode
  tile (16 rows, up to 16 adapters) pays it for every column tile and reads
  each adapter's A from L2 for every column tile: computing H once per
  row-block (strategy (c)) would remove that.
- Adapters stay where they are: a small table holds each adapter's A and B
  addresses and rank (int64) and its scaling. Stacking them into one padded
  tensor would copy every adapter on every call (16 MiB for 64 adapters of
  r = 16 on a 4096 x 4096 layer), whatever the batch uses. The table is
  built once per set of adapters (cached on their addresses), so a serving
  loop pays nothing per call; A and B must be contiguous and 16-byte aligned
  (the launcher copies one that is not) so that A's tiles load as vectors.
- Ranks differ: tiles are R_PAD = pad_rank(R) wide and each adapter's loads
  are masked to its own rank.
"""

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import configs
from .common import INTERPRETED, accumulator_dtype, dot_operand, grouped_tile

# One table row per adapter: A's address, B's address, rank.
TABLE_WIDTH = tl.constexpr(3)
LORA_A = tl.constexpr(0)
LORA_B = tl.constexpr(1)


@triton.jit
def tile_rows(order_ptr, ids_ptr, slots, slot_ok, SORTED: tl.constexpr):
    """The caller's rows at these sorted positions and their adapters (-1,
    no adapter, past the last row)."""
    if SORTED:
        rows = tl.load(order_ptr + slots, mask=slot_ok, other=0).to(tl.int64)
    else:
        rows = slots
    ids = tl.load(ids_ptr + slots, mask=slot_ok, other=-1)
    return rows, ids


@triton.jit
def next_adapter(ids, after, NUM_ADAPTERS):
    """The smallest adapter index in ids above `after`; NUM_ADAPTERS when none
    is left (base-only rows, -1, are never chosen)."""
    return tl.min(tl.where(ids > after, ids, NUM_ADAPTERS))


@triton.jit
def adapter_matrix(table_ptr, a, NUM_ADAPTERS, like_ptr, WHICH: tl.constexpr, RANK_MULTIPLE: tl.constexpr):
    """(pointer to adapter a's A (WHICH = LORA_A) or B (LORA_B), typed like
    like_ptr, the adapters' dtype; its rank). For a == NUM_ADAPTERS (no
    adapter) the rank is 0, so every load through the pointer is masked off."""
    valid = a < NUM_ADAPTERS
    entry = table_ptr + a * TABLE_WIDTH
    matrix = tl.load(entry + WHICH, mask=valid, other=0).to(like_ptr.dtype)
    rank = tl.load(entry + 2, mask=valid, other=0).to(tl.int32)
    # What Triton's launcher would specialize on were these arguments: the
    # launcher aligns every adapter to 16 bytes, and every rank is a multiple
    # of RANK_MULTIPLE (B's row stride: aligned rows load as vectors, which
    # also keeps sm_80 from spilling registers on B's tile addresses).
    return tl.multiple_of(matrix, 16), tl.multiple_of(rank, RANK_MULTIPLE)


@triton.jit
def rows_times_adapter(
    acc, wide_ptr, rows, row_ok, stride_wm, stride_wl, L,
    skinny_ptr, stride_sl, stride_sr, rank,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_L: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """acc (BLOCK_M, R_PAD) + wide[rows, :] @ skinny[:, :rank], reduced over L
    in the skinny operand's dtype; rows with row_ok False and columns past
    rank add zero. skinny: (L, rank) through its strides (A^T or B). STAGES:
    the loop's software pipelining depth (None: the config's)."""
    ranks = tl.arange(0, R_PAD)
    ls = tl.arange(0, BLOCK_L)
    rank_ok = ranks < rank
    wide_ptrs = wide_ptr + rows[:, None] * stride_wm + ls[None, :] * stride_wl
    skinny_ptrs = skinny_ptr + ls[:, None] * stride_sl + ranks[None, :] * stride_sr
    for l0 in tl.range(0, L, BLOCK_L, num_stages=STAGES):
        l_ok = ls < L - l0
        skinny = tl.load(skinny_ptrs, mask=l_ok[:, None] & rank_ok[None, :], other=0.0)
        wide = tl.load(wide_ptrs, mask=row_ok[:, None] & l_ok[None, :], other=0.0)
        wide = dot_operand(wide.to(skinny.dtype), UPCAST)
        acc = tl.dot(wide, dot_operand(skinny, UPCAST), acc, input_precision=PRECISION)
        wide_ptrs += BLOCK_L * stride_wl
        skinny_ptrs += BLOCK_L * stride_sl
    return acc


@triton.jit
def multi_lora_forward_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, h_ptr, order_ptr, ids_ptr, table_ptr, scaling_ptr,
    M, N, K, R, NUM_ADAPTERS, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_hm, stride_hr,
    HAS_BIAS: tl.constexpr,
    SORTED: tl.constexpr,  # False: rows taken in the caller's order (one tile)
    BASE_PRECISION: tl.constexpr,  # "ieee" or "tf32", for fp32 operands
    LORA_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: its bf16 dot is wrong
    ACC_DTYPE: tl.constexpr,  # fp32; fp64 for float64 inputs (interpreter)
    R_PAD: tl.constexpr,
    RANK_MULTIPLE: tl.constexpr,  # every adapter's rank is a multiple of it
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # Grouped tile order: GROUP_M row-blocks share each W column-block while
    # it is in L2.
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    # int64 indices: M * K and M * N may pass 2^31.
    slots = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    ks = tl.arange(0, BLOCK_K)
    slot_ok = slots < M
    col_ok = cols < N
    rows, ids = tile_rows(order_ptr, ids_ptr, slots, slot_ok, SORTED)

    # The shrink H = x A^T of every adapter of the tile but the first, each
    # on its own rows (disjoint: one accumulator holds them all). It runs
    # before the base GEMM so that no K loop runs while acc is live.
    first = next_adapter(ids, -1, NUM_ADAPTERS)
    h_rest = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    a = next_adapter(ids, first, NUM_ADAPTERS)
    while a < NUM_ADAPTERS:
        a_lora, rank = adapter_matrix(table_ptr, a, NUM_ADAPTERS, h_ptr, LORA_A, RANK_MULTIPLE)
        h_rest = rows_times_adapter(
            h_rest, x_ptr, rows, slot_ok & (ids == a), stride_xm, stride_xk, K,
            a_lora, 1, K, rank, LORA_PRECISION, UPCAST, R_PAD, BLOCK_K, None,
        )  # fmt: skip
        a = next_adapter(ids, a, NUM_ADAPTERS)

    # The base GEMM, with the first adapter's shrink folded into its K loop
    # (strategy (a) of DESIGN.md): in a prefill batch most tiles hold that
    # adapter only, and x is then read once.
    a_lora, rank = adapter_matrix(table_ptr, first, NUM_ADAPTERS, h_ptr, LORA_A, RANK_MULTIPLE)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk  # (BM, BK)
    wt_ptrs = w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk  # (BK, BN) = W^T
    at_ptrs = a_lora + ranks[None, :] * K + ks[:, None]  # (BK, R_PAD) = A^T, A contiguous
    rank_ok = ranks < rank
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    h = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        x = tl.load(x_ptrs, mask=slot_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(wt_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        at = tl.load(at_ptrs, mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = tl.dot(dot_operand(x, UPCAST), dot_operand(wt, UPCAST), acc, input_precision=BASE_PRECISION)
        # The LoRA branch computes in the adapters' dtype (PEFT).
        h = tl.dot(dot_operand(x.to(at.dtype), UPCAST), dot_operand(at, UPCAST), h, input_precision=LORA_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wt_ptrs += BLOCK_K * stride_wk
        at_ptrs += BLOCK_K
    # Every row went through the first adapter (masking x inside the loop
    # instead would hold a second x tile in registers): keep its rows, the
    # others from h_rest, zero on base-only rows. H is rounded to the
    # adapters' dtype once: the epilogue uses the values the backward reads.
    h = tl.where((ids == first)[:, None], h, h_rest).to(h_ptr.dtype.element_ty)
    if pid_n == 0:
        h_ptrs = h_ptr + rows[:, None] * stride_hm + ranks[None, :] * stride_hr
        tl.store(h_ptrs, h, mask=slot_ok[:, None] & (ranks < R)[None, :])

    # Epilogue, per adapter of the tile: acc += s_a h B_a^T on its rows.
    a = first
    while a < NUM_ADAPTERS:
        b_lora, rank = adapter_matrix(table_ptr, a, NUM_ADAPTERS, h_ptr, LORA_B, RANK_MULTIPLE)
        bt_ptrs = b_lora + ranks[:, None] + cols[None, :] * rank  # (R_PAD, BN) = B^T, B contiguous
        bt = tl.load(bt_ptrs, mask=(ranks < rank)[:, None] & col_ok[None, :], other=0.0)
        h_a = tl.where((ids == a)[:, None], h, 0.0)
        lora = tl.dot(dot_operand(h_a, UPCAST), dot_operand(bt, UPCAST), input_precision=LORA_PRECISION)
        acc += tl.load(scaling_ptr + a) * lora
        a = next_adapter(ids, a, NUM_ADAPTERS)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=slot_ok[:, None] & col_ok[None, :])


def prune_configs(configs_, named_args, **kwargs):
    """configs.prune_gemm_configs as for twice the rank: two (BLOCK_M x R_PAD)
    accumulators live across the K loop (the first adapter's and the
    others'). It sizes the adapter tiles from an `a_ptr` argument: here the
    adapters' dtype is H's (forward) or G's (dX)."""
    skinny = named_args["h_ptr"] if "h_ptr" in named_args else named_args["g_ptr"]
    r_pad = kwargs["R_PAD"] if "R_PAD" in kwargs else named_args["R_PAD"]
    return configs.prune_gemm_configs(configs_, {**named_args, "a_ptr": skinny}, **{**kwargs, "R_PAD": 2 * r_pad})


# Large ranks: the first adapter's H and the others', two (BLOCK_M x R_PAD)
# fp32 tiles, fit in registers beside the output tile (r = 256) only in
# 16-row tiles spread over 8 warps (4 warps spill; 32-row tiles fit too, but
# no Hopper wgmma is under 64 rows).
MULTI_GEMM_CONFIGS = [
    *configs.GEMM_CONFIGS,
    triton.Config(dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=32, GROUP_M=8), num_warps=8, num_stages=2),
    triton.Config(dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=8), num_warps=8, num_stages=2),
]

multi_lora_forward_tuned = triton.autotune(
    configs=MULTI_GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "R_PAD", "HAS_BIAS", "SORTED", "BASE_PRECISION", "LORA_PRECISION"],
    prune_configs_by={"early_config_prune": prune_configs},
)(multi_lora_forward_kernel)


class AdapterTable(NamedTuple):
    """What the kernels know of the adapters: `entries` (n, TABLE_WIDTH)
    int64 rows (A address, B address, rank), `scalings` (n,), the widest
    rank, the largest power of two up to 16 dividing every rank, the
    adapters' dtype, and the tensors the addresses point into."""

    entries: torch.Tensor
    scalings: torch.Tensor
    rank: int
    rank_multiple: int
    dtype: torch.dtype
    tensors: list


def _aligned(t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


@functools.lru_cache(maxsize=256)
def _device_table(entries, scalings, device, scaling_dtype):
    # A batch with no adapters still gets one (unread) row: no empty tensors
    # reach the kernels.
    entries = torch.tensor(entries or ((0, 0, 0),), dtype=torch.int64, device=device)
    return entries, torch.tensor(scalings or (0.0,), dtype=scaling_dtype, device=device)


def adapter_table(lora_a, lora_b, scalings, *, device, fallback_dtype) -> AdapterTable:
    """The table for adapters lora_a[i]: (r_i, K), lora_b[i]: (N, r_i), all of
    one dtype, scalings[i] (fp64 in a float64 layer, else fp32). Cached on
    the adapters' addresses: building it is a host-to-device copy."""
    lora_a = [_aligned(a) for a in lora_a]
    lora_b = [_aligned(b) for b in lora_b]
    entries = tuple((a.data_ptr(), b.data_ptr(), a.shape[0]) for a, b in zip(lora_a, lora_b, strict=True))
    dtype = lora_a[0].dtype if lora_a else fallback_dtype
    scaling_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    table, scales = _device_table(entries, tuple(float(s) for s in scalings), device, scaling_dtype)
    ranks = [a.shape[0] for a in lora_a]
    return AdapterTable(table, scales, max(ranks, default=0), math.gcd(16, *ranks), dtype, lora_a + lora_b)


def kernel_rows(groups):
    """(order, adapter id per position) as the kernels read them: sorted, or
    the caller's rows as they are (order unread)."""
    if groups.sorted:
        return groups.order, groups.sorted_ids
    return groups.adapter_ids, groups.adapter_ids


def multi_lora_forward(
    x, weight, bias, lora_a, lora_b, scalings, groups, *, base_precision, lora_precision, out=None, h_out=None
):
    """Launch the fused multi-adapter forward on checked 2-D inputs.

    x: (M, K), weight: (N, K), bias: (N,) or None, lora_a[i]: (r_i, K),
    lora_b[i]: (N, r_i) in one dtype, scalings[i]: float, groups: the
    RowGroups of adapter_ids (M,). Returns (y: (M, N) in x's dtype,
    H: (M, R) in the adapters' dtype, R = max r_i). `out` / `h_out` are
    optional preallocated outputs.
    """
    m, k = x.shape
    n = weight.shape[0]
    table = adapter_table(lora_a, lora_b, scalings, device=x.device, fallback_dtype=x.dtype)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype) if out is None else out
    h = torch.empty((m, table.rank), device=x.device, dtype=table.dtype) if h_out is None else h_out
    if m == 0 or n == 0:
        return y, h
    if k == 0:  # no K loop: y = bias, H = 0
        y.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(y))
        h.zero_()
        return y, h
    args = (
        x, weight, bias if bias is not None else x, y, h, *kernel_rows(groups), table.entries, table.scalings,
        m, n, k, table.rank, len(lora_a), configs.m_bucket(m),
        *x.stride(), *weight.stride(), *y.stride(), *h.stride(),
    )  # fmt: skip
    flags = dict(
        HAS_BIAS=bias is not None,
        SORTED=groups.sorted,
        BASE_PRECISION=base_precision,
        LORA_PRECISION=lora_precision,
        UPCAST=INTERPRETED,
        ACC_DTYPE=accumulator_dtype(x.dtype),
        R_PAD=configs.pad_rank(table.rank),
        RANK_MULTIPLE=table.rank_multiple,
    )

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if INTERPRETED:
        meta = configs.interpreter_config()["gemm"]
        multi_lora_forward_kernel[grid(meta)](*args, **flags, **meta)
    else:
        multi_lora_forward_tuned[grid](*args, **flags)
    return y, h
