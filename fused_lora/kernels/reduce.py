"""dA and dB: skinny outputs reduced over a long M, for one adapter or many.

    dA^T = G^T-reduce:  out[p, j] = sum_m d[m, p] G[m, j]        d = dropout(x), P = K
    dB:                 out[p, j] = s * sum_m dY[m, p] H[m, j]              P = N

wide: (M, P) (x or dY), skinny: (M, R) (G or H). Program (i, c) owns the
(BLOCK_P x R_PAD) output tile i over chunk c of the rows, so that a large M
fills the GPU. Many adapters: rows are grouped by adapter (`order`, with
each adapter's first sorted position in `starts`), and a chunk reduces the
piece of every adapter it overlaps into that adapter's output, with the
adapter's own scaling and dropout p. How the pieces meet:

- one chunk: each adapter's piece is stored directly;
- atomics: every piece is added into an fp32 output (fast; the order of the
  additions varies from run to run);
- deterministic (`torch.use_deterministic_algorithms(True)`): piece (c, a)
  is stored at slot c + a of a workspace (unique: along the sorted rows
  both c and a only grow), and a second kernel sums each adapter's pieces
  in chunk order: bitwise repeatable.
"""

import torch
import triton
import triton.language as tl

from . import configs
from .common import INTERPRETED, accumulator_dtype, dot_operand, dropout_scale, num_sms
from .launch import launch

# How a program's sum reaches the output (see the module docstring).
STORE = tl.constexpr(0)
ATOMIC = tl.constexpr(1)
PIECES = tl.constexpr(2)


@triton.jit
def reduce_rows(
    acc, p_ptr, q_ptr, order_ptr, lo, hi, ps, p_ok, stride_pm, stride_pp, stride_qm, stride_qr, R,
    seed, dropout_p,
    MULTI: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """acc (BLOCK_P, R_PAD) + wide[rows]^T @ skinny[rows] over the sorted
    positions [lo, hi), in the skinny operand's dtype."""
    ranks = tl.arange(0, R_PAD)
    for m0 in range(lo, hi, BLOCK_M):
        positions = m0 + tl.arange(0, BLOCK_M)
        row_ok = positions < hi
        if MULTI:
            rows = tl.load(order_ptr + positions, mask=row_ok, other=0).to(tl.int64)
        else:
            rows = positions.to(tl.int64)
        p_tile = tl.load(
            p_ptr + rows[:, None] * stride_pm + ps[None, :] * stride_pp, mask=row_ok[:, None] & p_ok[None, :], other=0.0
        )
        q_tile = tl.load(
            q_ptr + rows[:, None] * stride_qm + ranks[None, :] * stride_qr,
            mask=row_ok[:, None] & (ranks < R)[None, :],
            other=0.0,
        )
        p_tile = p_tile.to(q_tile.dtype)
        if DROPOUT:
            p_tile = (p_tile * dropout_scale(seed, rows, ps, dropout_p)).to(q_tile.dtype)
        p_tile = dot_operand(p_tile, UPCAST)
        acc = tl.dot(tl.trans(p_tile), dot_operand(q_tile, UPCAST), acc, input_precision=PRECISION)
    return acc


@triton.jit
def lora_reduce_kernel(
    p_ptr, q_ptr, out_ptr, scales_ptr, order_ptr, ids_ptr, starts_ptr, dropout_ptr,
    M, P, R, ROWS_PER_CHUNK, M_BUCKET, seed, dropout_p,
    stride_pm, stride_pp, stride_qm, stride_qr, stride_os, stride_op, stride_or,
    MULTI: tl.constexpr,  # rows grouped by adapter: order, sorted ids, starts
    SCALED: tl.constexpr,  # multiply by the adapter's scaling (dB)
    DROPOUT: tl.constexpr,  # the wide operand is x, dropped as in the forward (dA)
    MODE: tl.constexpr,  # STORE, ATOMIC or PIECES
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(1)
    ps = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    ranks = tl.arange(0, R_PAD)
    p_ok = ps < P
    out_ok = p_ok[:, None] & (ranks < R)[None, :]
    out_ptrs = out_ptr + ps[:, None] * stride_op + ranks[None, :] * stride_or
    first = c * ROWS_PER_CHUNK
    end = tl.minimum(first + ROWS_PER_CHUNK, M)
    if MULTI:
        a_first = tl.maximum(tl.load(ids_ptr + first), 0)
        a_last = tl.load(ids_ptr + end - 1)
    else:
        a_first = 0
        a_last = 0
    for a in range(a_first, a_last + 1):
        if MULTI:
            lo = tl.maximum(tl.load(starts_ptr + a), first)
            hi = tl.minimum(tl.load(starts_ptr + a + 1), end)
            p = tl.load(dropout_ptr + a)
        else:
            lo = first
            hi = end
            p = dropout_p
        if lo < hi:
            acc = tl.zeros((BLOCK_P, R_PAD), dtype=ACC_DTYPE)
            acc = reduce_rows(
                acc, p_ptr, q_ptr, order_ptr, lo, hi, ps, p_ok, stride_pm, stride_pp, stride_qm, stride_qr, R,
                seed, p, MULTI, DROPOUT, PRECISION, UPCAST, R_PAD, BLOCK_M,
            )  # fmt: skip
            if SCALED:
                acc *= tl.load(scales_ptr + a)
            if MODE == PIECES:
                slot = c + a
            else:
                slot = a
            target = out_ptrs + slot.to(tl.int64) * stride_os
            if MODE == ATOMIC:
                tl.atomic_add(target, acc, mask=out_ok)
            else:
                tl.store(target, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def sum_pieces_kernel(
    pieces_ptr, out_ptr, starts_ptr, P, R, ROWS_PER_CHUNK, M,
    stride_ws, stride_wp, stride_wr, stride_os, stride_op, stride_or,
    MULTI: tl.constexpr, R_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """out[a] = the sum of adapter a's pieces (slots c + a) in chunk order;
    zero for an adapter without rows."""
    a = tl.program_id(1)
    ps = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    ranks = tl.arange(0, R_PAD)
    ok = (ps < P)[:, None] & (ranks < R)[None, :]
    if MULTI:
        lo = tl.load(starts_ptr + a)
        hi = tl.load(starts_ptr + a + 1)
    else:
        lo = 0
        hi = M
    acc = tl.zeros((BLOCK_P, R_PAD), dtype=pieces_ptr.dtype.element_ty)
    if lo < hi:
        for c in range(lo // ROWS_PER_CHUNK, (hi - 1) // ROWS_PER_CHUNK + 1):
            slot = (c + a).to(tl.int64)
            acc += tl.load(
                pieces_ptr + slot * stride_ws + ps[:, None] * stride_wp + ranks[None, :] * stride_wr, mask=ok
            )
    out_ptrs = out_ptr + a.to(tl.int64) * stride_os + ps[:, None] * stride_op + ranks[None, :] * stride_or
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _prune(configs_, named_args, **kwargs):
    return configs.prune_reduce(
        configs_,
        r_pad=kwargs["R_PAD"],
        wide_dtype=named_args["p_ptr"].dtype,
        skinny_dtype=named_args["q_ptr"].dtype,
        **configs.launch_details(kwargs),
    )


# Atomic runs accumulate into out_ptr, so every autotune trial starts from zero.
lora_reduce_tuned = triton.autotune(
    configs=configs.REDUCE_CONFIGS,
    key=["M_BUCKET", "P", "R_PAD", "MULTI", "SCALED", "DROPOUT", "MODE", "PRECISION"],
    reset_to_zero=["out_ptr"],
    prune_configs_by={"early_config_prune": _prune},
    cache_results=True,
)(lora_reduce_kernel)


def lora_reduce(wide, skinny, adapters, *, scaled, dropout, precision, seed=0, order=None, ids=None, starts=None, out):
    """Launch the reduction on checked 2-D inputs: for each adapter a,
    out[a] (P, R) = scale_a * dropout(wide)[rows of a]^T @ skinny[rows of a],
    scale_a = the adapter's scaling when `scaled`, else 1; dropout of the
    wide operand (x) with the adapter's p when `dropout`.

    wide: (M, P), skinny: (M, R) in the adapters' dtype; adapters: a
    LaunchAdapters; order / ids / starts: the sorted rows of a multi-adapter
    batch (None for one adapter). out: (number of adapters, P, R), any
    strides and float dtype (e.g. dA^T through a transposed view): written
    whole, zeros for an adapter without rows. Returns out.
    """
    m, p = wide.shape
    r = skinny.shape[1]
    if p == 0 or r == 0:
        return out
    if m == 0:
        return out.zero_()
    multi = ids is not None
    if INTERPRETED:
        rows_per_chunk = configs.interpreter_config()["split_m"]
    else:
        rows_per_chunk = configs.split_m(m, triton.cdiv(p, 64), num_sms(wide.device))
    chunks = triton.cdiv(m, rows_per_chunk)
    deterministic = torch.are_deterministic_algorithms_enabled()
    # Sums meet in fp32 (or wider): in `out` itself when it is that wide and
    # may be added into, else in a buffer rounded once at the end.
    sum_dtype = torch.promote_types(out.dtype, torch.float32)
    if chunks == 1:
        mode, target = STORE, out
        if multi:
            out.zero_()  # adapters without rows are never written
    elif deterministic:
        mode = PIECES
        target = torch.empty((chunks + out.shape[0] - 1, p, r), device=wide.device, dtype=sum_dtype)
    else:
        mode = ATOMIC
        target = out.zero_() if out.dtype == sum_dtype else torch.zeros(out.shape, device=out.device, dtype=sum_dtype)
    stand_in = wide
    args = (
        wide, skinny, target, adapters.scales, *(stand_in if t is None else t for t in (order, ids, starts)),
        adapters.table_args()[1] if multi else stand_in,
        m, p, r, rows_per_chunk, configs.m_bucket(rows_per_chunk), seed, adapters.dropout_p if not multi else 0.0,
        *wide.stride(), *skinny.stride(), *target.stride(),
    )  # fmt: skip
    flags = dict(
        MULTI=multi,
        SCALED=scaled,
        DROPOUT=dropout and adapters.has_dropout,
        MODE=mode,
        PRECISION=precision,
        UPCAST=INTERPRETED,
        ACC_DTYPE=accumulator_dtype(skinny.dtype),
        R_PAD=configs.pad_rank(r),
    )

    def grid(meta):
        return (triton.cdiv(p, meta["BLOCK_P"]), chunks)

    launch(lora_reduce_kernel, lora_reduce_tuned, grid, args, flags, "reduce")
    if mode == PIECES:
        # (BLOCK_P x R_PAD) tiles of 512 values (64 x 16 spilled on sm_90, in the
        # compile report); a loop of a few chunks needs no software pipeline.
        block = max(8, 512 // configs.pad_rank(r))
        sum_pieces_kernel[(triton.cdiv(p, block), out.shape[0])](
            target, out, stand_in if starts is None else starts, p, r, rows_per_chunk, m,
            *target.stride(), *out.stride(), MULTI=multi, R_PAD=configs.pad_rank(r), BLOCK_P=block,
            num_warps=4, num_stages=1,
        )  # fmt: skip
    elif target is not out:
        out.copy_(target)
    return out
