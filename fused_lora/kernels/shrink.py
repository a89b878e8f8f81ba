"""The LoRA shrink on its own: H = dropout(x) A^T, or G = s * dY B, once per row.

    forward:  H (M, R) = dropout(x) (M, K) @ A^T (K, R)        unscaled
    dX:       G (M, R) = s * dY (M, N) @ B (N, R)              scaled

The pre-pass of the GEMM's "given" strategy ((b) in docs/design.md): the
shrink runs once per row instead of once per column tile of the GEMM, so the
dropout mask (Philox) and fp32 adapters cost once per element of x, and the
GEMM's K loop is the plain GEMM's. The price is one more read of x, a
memory-bound pass. It is a skinny GEMM: each program owns BLOCK_M rows and
the whole rank, small tiles that stay in registers even for fp32 adapters
under IEEE precision (no tensor cores there: FMA, and no spills).

Many adapters (MULTI): rows are read through `order`; a tile reduces each
of its adapters over that adapter's rows (sorted rows: usually one).
"""

import triton
import triton.language as tl

from . import configs
from .adapters import padded_rows
from .common import INTERPRETED, TL_DTYPES, accumulator_dtype, next_adapter, row_values, tile_rows
from .gemm import down_matrix, shrink_rows
from .launch import launch


@triton.jit
def lora_shrink_kernel(
    x_ptr, down_ptr, h_ptr, scales_ptr, order_ptr, ids_ptr, table_ptr, dropout_ptr,
    M, K, R, NUM_ADAPTERS, M_BUCKET, seed, dropout_p,
    stride_xm, stride_xk, stride_dk, stride_dr, stride_hm, stride_hr,
    DX: tl.constexpr,  # G = s * dY B (scaled, no dropout); else H = dropout(x) A^T
    MULTI: tl.constexpr,
    SORTED: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    ADAPTER_DTYPE: tl.constexpr,
    R_PAD: tl.constexpr,
    RANK_MULTIPLE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    slots = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    slot_ok = slots < M
    rows, ids = tile_rows(slots, slot_ok, order_ptr, ids_ptr, MULTI, SORTED)
    shrink_dropout: tl.constexpr = DROPOUT and not DX
    h = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    if MULTI:
        row_p = row_values(dropout_ptr, ids)[:, None]
        a = next_adapter(ids, -1, NUM_ADAPTERS)
        while a < NUM_ADAPTERS:
            d_a, s_dk, s_dr, rank_a = down_matrix(table_ptr, a, NUM_ADAPTERS, K, ADAPTER_DTYPE, DX, RANK_MULTIPLE)
            h = shrink_rows(
                h, x_ptr, rows, slot_ok & (ids == a), stride_xm, stride_xk, 0, K, d_a, s_dk, s_dr, rank_a,
                seed, row_p, shrink_dropout, PRECISION, UPCAST, R_PAD, BLOCK_K, None,
            )  # fmt: skip
            a = next_adapter(ids, a, NUM_ADAPTERS)
        if DX:
            h = h * row_values(scales_ptr, ids)[:, None]
    else:
        h = shrink_rows(
            h, x_ptr, rows, slot_ok, stride_xm, stride_xk, 0, K, down_ptr, stride_dk, stride_dr, R,
            seed, dropout_p, shrink_dropout, PRECISION, UPCAST, R_PAD, BLOCK_K, None,
        )  # fmt: skip
        if DX:
            h = h * tl.load(scales_ptr)
    h_ptrs = h_ptr + rows[:, None] * stride_hm + ranks[None, :] * stride_hr
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=slot_ok[:, None] & (ranks < R)[None, :])


def _prune(configs_, named_args, **kwargs):
    return configs.prune_shrink(
        configs_,
        r_pad=kwargs["R_PAD"],
        wide_dtype=named_args["x_ptr"].dtype,
        adapter_dtype=named_args["h_ptr"].dtype,
        **configs.launch_details(kwargs),
    )


lora_shrink_tuned = triton.autotune(
    configs=configs.SHRINK_CONFIGS,
    key=["M_BUCKET", "K", "R_PAD", "DX", "MULTI", "SORTED", "DROPOUT", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune},
    cache_results=True,
)(lora_shrink_kernel)


def lora_shrink(x, adapters, *, dx, precision, seed=0, order=None, ids=None, out=None):
    """Launch the shrink on checked 2-D inputs. x: (M, K) (dY (M, N) for
    dX); adapters: a LaunchAdapters; order / ids: the rows of a multi-adapter
    batch (None for one adapter). Returns H or G: (M, R) in the adapters'
    dtype, zeros past each row's rank and on rows without an adapter."""
    m, k = x.shape
    h = padded_rows(m, adapters.width, adapters.dtype, x.device) if out is None else out
    if m == 0:
        return h
    if k == 0:
        return h.zero_()
    multi = ids is not None
    down = adapters.down(dx) if not multi else x
    stand_in = x
    args = (
        x, down, h, adapters.scales, stand_in if order is None else order, stand_in if ids is None else ids,
        *(adapters.table_args() if multi else (stand_in, stand_in)),
        m, k, adapters.width, adapters.count, configs.m_bucket(m), seed, adapters.dropout_p if not multi else 0.0,
        *x.stride(), *(down.stride() if not multi else (0, 0)), *h.stride(),
    )  # fmt: skip
    flags = dict(
        DX=dx,
        MULTI=multi,
        SORTED=order is not None,
        DROPOUT=adapters.has_dropout,
        PRECISION=precision,
        UPCAST=INTERPRETED,
        ACC_DTYPE=accumulator_dtype(x.dtype),
        ADAPTER_DTYPE=TL_DTYPES[adapters.dtype],
        R_PAD=configs.pad_rank(adapters.width),
        RANK_MULTIPLE=adapters.rank_multiple,
    )

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]),)

    launch(lora_shrink_kernel, lora_shrink_tuned, grid, args, flags, "shrink")
    return h
