"""Fused multi-adapter LoRA backward kernels.

dY: (M, N)   W: (N, K)   x: (M, K)   row i uses adapter a = adapter_ids[i]
adapter a: A_a (r_a, K), B_a (N, r_a), s_a;   H, G: (M, R), R = max r_a

G_i  = s_a dY_i B_a          (M, R)  zeros past r_a and on base-only rows
dX_i = dY_i W + G_i A_a      (M, K)  one launch, as the forward: the N loop
                                     accumulates dY W and the first adapter's
                                     dY B; the other adapters of a tile get
                                     their own N loop over their rows first
dA_a = G_a^T x_a             (r_a, K)  per adapter, over its rows only: one
dB_a = s_a dY_a^T H_a        (N, r_a)  launch for dA and one for dB, every
                                       program reducing one chunk of one
                                       adapter's rows (sorted positions);
                                       chunks meet by fp32 atomics

Rows are read through the sorted order of `multi_rows` (see multi_forward);
the adapter table is multi_forward's.
"""

import torch
import triton
import triton.language as tl

from . import configs
from .common import INTERPRETED, accumulator_dtype, dot_operand, grouped_tile, num_sms
from .multi_forward import (
    LORA_A,
    LORA_B,
    MULTI_GEMM_CONFIGS,
    TABLE_WIDTH,
    adapter_matrix,
    adapter_table,
    kernel_rows,
    next_adapter,
    prune_configs,
    rows_times_adapter,
    tile_rows,
)


@triton.jit
def multi_lora_dx_kernel(
    dy_ptr, w_ptr, dx_ptr, g_ptr, order_ptr, ids_ptr, table_ptr, scaling_ptr,
    M, N, K, R, NUM_ADAPTERS, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dxm, stride_dxk, stride_gm, stride_gr,
    COMPUTE_DX: tl.constexpr,  # False: only G (x needs no grad)
    SORTED: tl.constexpr,
    BASE_PRECISION: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    R_PAD: tl.constexpr,
    RANK_MULTIPLE: tl.constexpr,  # every adapter's rank is a multiple of it
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # As in the forward, (BLOCK_M x BLOCK_N) is the output tile and BLOCK_K
    # the reduction step; the output columns run along K, the reduction
    # along N.
    num_pid_k = 1
    if COMPUTE_DX:
        num_pid_k = tl.cdiv(K, BLOCK_N)
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_pid_k, GROUP_M)

    slots = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    ns = tl.arange(0, BLOCK_K)
    slot_ok = slots < M
    col_ok = cols < K
    rows, ids = tile_rows(order_ptr, ids_ptr, slots, slot_ok, SORTED)

    # dY B_a of every adapter of the tile but the first, each on its own
    # rows, before the base GEMM (as in the forward). Not pipelined: in a
    # training batch few tiles hold several adapters, and the pipeline's
    # registers made sm_80 spill.
    first = next_adapter(ids, -1, NUM_ADAPTERS)
    g_rest = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    a = next_adapter(ids, first, NUM_ADAPTERS)
    while a < NUM_ADAPTERS:
        b_lora, rank = adapter_matrix(table_ptr, a, NUM_ADAPTERS, g_ptr, LORA_B, RANK_MULTIPLE)
        g_rest = rows_times_adapter(
            g_rest, dy_ptr, rows, slot_ok & (ids == a), stride_dym, stride_dyn, N,
            b_lora, rank, 1, rank, LORA_PRECISION, UPCAST, R_PAD, BLOCK_K, 1,
        )  # fmt: skip
        a = next_adapter(ids, a, NUM_ADAPTERS)

    # dY W, with the first adapter's dY B folded into its N loop.
    b_lora, rank = adapter_matrix(table_ptr, first, NUM_ADAPTERS, g_ptr, LORA_B, RANK_MULTIPLE)
    dy_ptrs = dy_ptr + rows[:, None] * stride_dym + ns[None, :] * stride_dyn  # (BM, BK)
    w_ptrs = w_ptr + ns[:, None] * stride_wn + cols[None, :] * stride_wk  # (BK, BN)
    b_ptrs = b_lora + ns[:, None] * rank + ranks[None, :]  # (BK, R_PAD), B contiguous
    rank_ok = ranks < rank
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    g = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    for n0 in range(0, N, BLOCK_K):
        n_ok = ns < N - n0
        dy = tl.load(dy_ptrs, mask=slot_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[:, None] & rank_ok[None, :], other=0.0)
        if COMPUTE_DX:
            w = tl.load(w_ptrs, mask=n_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(dot_operand(dy, UPCAST), dot_operand(w, UPCAST), acc, input_precision=BASE_PRECISION)
        g = tl.dot(dot_operand(dy.to(b.dtype), UPCAST), dot_operand(b, UPCAST), g, input_precision=LORA_PRECISION)
        dy_ptrs += BLOCK_K * stride_dyn
        w_ptrs += BLOCK_K * stride_wn
        b_ptrs += BLOCK_K * rank
    # Every row went through the first adapter's B: keep its rows, the others
    # from g_rest. G carries each row's s_a and is rounded to the adapters'
    # dtype once; dA reads it back.
    row_scaling = tl.load(scaling_ptr + ids, mask=ids >= 0, other=0.0)
    g = tl.where((ids == first)[:, None], g, g_rest) * row_scaling[:, None]
    g = g.to(g_ptr.dtype.element_ty)
    if pid_k == 0:
        g_ptrs = g_ptr + rows[:, None] * stride_gm + ranks[None, :] * stride_gr
        tl.store(g_ptrs, g, mask=slot_ok[:, None] & (ranks < R)[None, :])

    if COMPUTE_DX:
        # Epilogue, per adapter of the tile: acc += G A_a on its rows.
        a = first
        while a < NUM_ADAPTERS:
            a_lora, rank = adapter_matrix(table_ptr, a, NUM_ADAPTERS, g_ptr, LORA_A, RANK_MULTIPLE)
            a_ptrs = a_lora + ranks[:, None] * K + cols[None, :]  # (R_PAD, BN), A contiguous
            a_tile = tl.load(a_ptrs, mask=(ranks < rank)[:, None] & col_ok[None, :], other=0.0)
            g_a = tl.where((ids == a)[:, None], g, 0.0)
            acc += tl.dot(dot_operand(g_a, UPCAST), dot_operand(a_tile, UPCAST), input_precision=LORA_PRECISION)
            a = next_adapter(ids, a, NUM_ADAPTERS)
        dx_ptrs = dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=slot_ok[:, None] & col_ok[None, :])


@triton.jit
def multi_lora_grad_ab_kernel(
    p_ptr, q_ptr, out_ptr, order_ptr, work_ptr, table_ptr, scaling_ptr,
    P, M_BUCKET,
    stride_pm, stride_pp, stride_qm, stride_qr, stride_os, stride_op, stride_or,
    SCALED: tl.constexpr,  # multiply by the adapter's scaling (dB)
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """out[slot, p, j] += s * sum_m Pm[m, p] * Q[m, j] over one chunk of one
    adapter's rows, with Pm: (M, P) wide (x or dY), Q: (M, R) skinny (G or
    H); the sum runs in Q's dtype. Program (i, w) owns rows p of block i and
    work item w = (adapter, output slot, first, last + 1 sorted position)."""
    pid_p = tl.program_id(0)
    work = work_ptr + tl.program_id(1) * 4
    a = tl.load(work)
    slot = tl.load(work + 1).to(tl.int64)
    first = tl.load(work + 2)
    end = tl.load(work + 3)
    rank = tl.load(table_ptr + a * TABLE_WIDTH + 2)

    ps = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    ranks = tl.arange(0, R_PAD)
    p_ok = ps < P
    rank_ok = ranks < rank
    acc = tl.zeros((BLOCK_P, R_PAD), dtype=ACC_DTYPE)
    for m0 in range(first, end, BLOCK_M):
        positions = m0 + tl.arange(0, BLOCK_M)
        row_ok = positions < end
        rows = tl.load(order_ptr + positions, mask=row_ok, other=0).to(tl.int64)
        p_tile = tl.load(
            p_ptr + rows[:, None] * stride_pm + ps[None, :] * stride_pp,
            mask=row_ok[:, None] & p_ok[None, :],
            other=0.0,
        )
        q_tile = tl.load(
            q_ptr + rows[:, None] * stride_qm + ranks[None, :] * stride_qr,
            mask=row_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        p_tile = dot_operand(p_tile.to(q_tile.dtype), UPCAST)
        acc = tl.dot(tl.trans(p_tile), dot_operand(q_tile, UPCAST), acc, input_precision=PRECISION)

    if SCALED:
        acc *= tl.load(scaling_ptr + a)
    out_ptrs = out_ptr + slot * stride_os + ps[:, None] * stride_op + ranks[None, :] * stride_or
    tl.atomic_add(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & rank_ok[None, :])


multi_lora_dx_tuned = triton.autotune(
    configs=MULTI_GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "R_PAD", "COMPUTE_DX", "SORTED", "BASE_PRECISION", "LORA_PRECISION"],
    prune_configs_by={"early_config_prune": prune_configs},
)(multi_lora_dx_kernel)

# Atomic runs accumulate into out_ptr, so every autotune trial starts from zero.
multi_lora_grad_ab_tuned = triton.autotune(
    configs=configs.GRAD_AB_CONFIGS,
    key=["M_BUCKET", "P", "R_PAD", "SCALED", "PRECISION"],
    reset_to_zero=["out_ptr"],
    prune_configs_by={"early_config_prune": configs.prune_grad_ab_configs},
)(multi_lora_grad_ab_kernel)


def multi_lora_dx(
    grad_y,
    weight,
    lora_a,
    lora_b,
    scalings,
    groups,
    *,
    compute_dx,
    base_precision,
    lora_precision,
    out=None,
    g_out=None,
):
    """Launch the multi-adapter dX kernel on checked 2-D inputs.

    grad_y: (M, N), weight: (N, K), lora_a[i]: (r_i, K), lora_b[i]: (N, r_i),
    scalings[i]: float, groups: RowGroups of the M rows. Returns (dX: (M, K)
    in grad_y's dtype, or None when not compute_dx; G: (M, R) in the
    adapters' dtype, G[i, :r_a] = s_a dY_i B_a, zeros elsewhere).
    """
    m, n = grad_y.shape
    k = weight.shape[1]
    table = adapter_table(lora_a, lora_b, scalings, device=grad_y.device, fallback_dtype=grad_y.dtype)
    g = torch.empty((m, table.rank), device=grad_y.device, dtype=table.dtype) if g_out is None else g_out
    dx = None
    if compute_dx:
        dx = torch.empty((m, k), device=grad_y.device, dtype=grad_y.dtype) if out is None else out
    if m == 0:
        return dx, g
    if n == 0:  # empty reduction
        g.zero_()
        if dx is not None:
            dx.zero_()
        return dx, g
    kernel_dx = dx is not None and k > 0
    # Without COMPUTE_DX the kernel never touches dx_ptr: pass G as a stand-in.
    dx_arg, dx_strides = (dx, dx.stride()) if kernel_dx else (g, (0, 0))
    args = (
        grad_y, weight, dx_arg, g, *kernel_rows(groups), table.entries, table.scalings,
        m, n, k, table.rank, len(lora_a), configs.m_bucket(m),
        *grad_y.stride(), *weight.stride(), *dx_strides, *g.stride(),
    )  # fmt: skip
    flags = dict(
        COMPUTE_DX=kernel_dx,
        SORTED=groups.sorted,
        BASE_PRECISION=base_precision,
        LORA_PRECISION=lora_precision,
        UPCAST=INTERPRETED,
        ACC_DTYPE=accumulator_dtype(grad_y.dtype),
        R_PAD=configs.pad_rank(table.rank),
        RANK_MULTIPLE=table.rank_multiple,
    )

    def grid(meta):
        col_blocks = triton.cdiv(k, meta["BLOCK_N"]) if flags["COMPUTE_DX"] else 1
        return (triton.cdiv(m, meta["BLOCK_M"]) * col_blocks,)

    if INTERPRETED:
        meta = configs.interpreter_config()["gemm"]
        multi_lora_dx_kernel[grid(meta)](*args, **flags, **meta)
    else:
        multi_lora_dx_tuned[grid](*args, **flags)
    return dx, g


def multi_lora_grad_ab(wide, skinny, lora_a, lora_b, scalings, groups, *, scaled, precision):
    """Per adapter a with rows: scale * wide_a^T @ skinny_a[:, :r_a], reduced
    over that adapter's rows in the skinny operand's dtype (scale = s_a when
    `scaled`, else 1). wide: (M, P), skinny: (M, R).

    Returns (out, slots): out (number of adapters with rows, P, R) in fp32
    (fp64 for float64 operands), where adapter a's result is
    out[slots[a], :, :r_a]; adapters without rows are not in `slots`. Counts
    the adapters' rows on the host (a device sync unless adapter_ids came on
    the CPU).
    """
    m, p = wide.shape
    segments = groups.segments()
    slots = {adapter: slot for slot, (adapter, _, _) in enumerate(segments)}
    table = adapter_table(lora_a, lora_b, scalings, device=wide.device, fallback_dtype=skinny.dtype)
    # Chunks of one adapter meet by atomics in fp32, rounded once by the caller.
    out_dtype = torch.promote_types(skinny.dtype, torch.float32)
    out = torch.zeros((len(segments), p, table.rank), device=wide.device, dtype=out_dtype)
    if not segments or p == 0:
        return out, slots
    if INTERPRETED:
        meta = configs.interpreter_config()["grad_ab"]
        rows_per_chunk = configs.interpreter_config()["split_m"]
    else:
        meta = None
        rows_per_chunk = configs.split_m(m, triton.cdiv(p, 64), num_sms(wide.device))
    # Work items: chunks of at most rows_per_chunk positions of one adapter.
    work = [
        (adapter, slots[adapter], first, min(first + rows_per_chunk, end))
        for adapter, start, end in segments
        for first in range(start, end, rows_per_chunk)
    ]
    work = torch.tensor(work, dtype=torch.int32, device=wide.device)
    args = (
        wide, skinny, out, groups.order, work, table.entries, table.scalings,
        p, configs.m_bucket(rows_per_chunk),
        *wide.stride(), *skinny.stride(), *out.stride(),
    )  # fmt: skip
    flags = dict(
        SCALED=scaled,
        PRECISION=precision,
        UPCAST=INTERPRETED,
        ACC_DTYPE=accumulator_dtype(skinny.dtype),
        R_PAD=configs.pad_rank(table.rank),
    )

    def grid(meta):
        return (triton.cdiv(p, meta["BLOCK_P"]), len(work))

    if meta is not None:
        multi_lora_grad_ab_kernel[grid(meta)](*args, **flags, **meta)
    else:
        multi_lora_grad_ab_tuned[grid](*args, **flags)
    return out, slots
