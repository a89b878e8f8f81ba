"""The LoRA GEMM: the forward and dX in one kernel, for one adapter or many.

    forward:  y = x W^T + bias + s * H B^T,   H = dropout(x) A^T   (H returned, unscaled)
    dX:       dX = dY W + D * (G A),          G = s * dY B         (G returned, scaled)

Both are one shape, written in the forward's terms: out (M, N) = x (M, K)
@ W^T (K, N) plus a rank-R update whose shrink `x @ down` (K x R) runs in
the same K loop as the GEMM, from the same x tile, and whose expand
`h @ up` (R x N) is added in the epilogue while the accumulator is fp32.
The dX launch passes dY as x, W (N_out x K_in) as W^T through its strides,
B as `down` and A as `up`; dropout masks the shrink's input in the forward
and the expand's output (D = mask / (1 - p)) in dX, and the scaling goes
with the expand in the forward and with G in dX.

One adapter (MULTI=False): A and B are arguments. Many (MULTI=True): row i
uses adapter ids[i] (-1: none), found through a table of the adapters'
addresses, ranks, scalings and dropout p (`adapters.py`); rows are read and
written through `order` (sorted by adapter before the launch), so the caller's
row order never changes. The shrink of the tile's first adapter runs in the
GEMM's K loop (most tiles of a prefill batch hold one adapter); every other
adapter of the tile gets a K loop of its own over its rows first, so that no
loop holds the output accumulator and a pipelined adapter tile at once.

Strategy (a): each (BLOCK_M x BLOCK_N) tile recomputes the shrink, an extra
R_PAD / BLOCK_N of MMA work; x is read once and no M x N temporary exists.
"""

import torch
import triton
import triton.language as tl

from . import configs, quant
from .adapters import padded_rows
from .common import (
    INTERPRETED,
    LORA_A,
    LORA_B,
    TL_DTYPES,
    TORCH_DTYPES,
    accumulator_dtype,
    adapter_matrix,
    dot_operand,
    dropout_scale,
    grouped_tile,
    next_adapter,
    row_values,
    tile_rows,
)
from .launch import launch
from .quant import DENSE, weight_tile


@triton.jit
def lora_matrix(
    table_ptr, a, NUM_ADAPTERS, length, DTYPE: tl.constexpr, WHICH: tl.constexpr, RANK_MULTIPLE: tl.constexpr
):
    """Adapter a's A (rank, length) or B (length, rank), both contiguous, as
    (pointer, stride along the rank, stride along `length`, rank)."""
    ptr, rank = adapter_matrix(table_ptr, a, NUM_ADAPTERS, DTYPE, WHICH, RANK_MULTIPLE)
    if WHICH == LORA_A:
        return ptr, length, 1, rank
    else:
        return ptr, 1, rank, rank


@triton.jit
def down_matrix(table_ptr, a, NUM_ADAPTERS, K, DTYPE: tl.constexpr, DX: tl.constexpr, RANK_MULTIPLE: tl.constexpr):
    """Adapter a's shrink matrix as (pointer, stride along K, stride along R,
    rank): A^T in the forward, B in dX."""
    if DX:
        ptr, stride_r, stride_k, rank = lora_matrix(table_ptr, a, NUM_ADAPTERS, K, DTYPE, LORA_B, RANK_MULTIPLE)
    else:
        ptr, stride_r, stride_k, rank = lora_matrix(table_ptr, a, NUM_ADAPTERS, K, DTYPE, LORA_A, RANK_MULTIPLE)
    return ptr, stride_k, stride_r, rank


@triton.jit
def up_matrix(table_ptr, a, NUM_ADAPTERS, N, DTYPE: tl.constexpr, DX: tl.constexpr, RANK_MULTIPLE: tl.constexpr):
    """Adapter a's expand matrix as (pointer, stride along R, stride along N,
    rank): B^T in the forward, A in dX."""
    if DX:
        return lora_matrix(table_ptr, a, NUM_ADAPTERS, N, DTYPE, LORA_A, RANK_MULTIPLE)
    else:
        return lora_matrix(table_ptr, a, NUM_ADAPTERS, N, DTYPE, LORA_B, RANK_MULTIPLE)


@triton.jit
def shrink_rows(
    h, x_ptr, rows, row_ok, stride_xm, stride_xk, k_lo, k_hi,
    down_ptr, stride_dk, stride_dr, rank, seed, row_p,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """h (BLOCK_M, R_PAD) + dropout(x[rows]) @ down[:, :rank], reduced over
    K in [k_lo, k_hi) in the adapter's dtype; rows with row_ok False add
    zero. STAGES: the loop's software pipelining depth (None: the config's)."""
    ranks = tl.arange(0, R_PAD)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + (k_lo + ks)[None, :] * stride_xk
    d_ptrs = down_ptr + (k_lo + ks)[:, None] * stride_dk + ranks[None, :] * stride_dr
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        k_ok = ks < k_hi - k0
        d = tl.load(d_ptrs, mask=k_ok[:, None] & (ranks < rank)[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(d.dtype)
        if DROPOUT:
            x = (x * dropout_scale(seed, rows, k0 + ks, row_p)).to(d.dtype)
        h = tl.dot(dot_operand(x, UPCAST), dot_operand(d, UPCAST), h, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        d_ptrs += BLOCK_K * stride_dk
    return h


@triton.jit
def expand_term(term, scale, seed, rows, cols, row_p, DX: tl.constexpr, DROPOUT: tl.constexpr):
    """An adapter's expand `h @ up` as added to the output: times its scaling
    in the forward (G carries it in dX), masked by dropout in dX (dL/dx
    through d = mask * x / (1 - p))."""
    if DX:
        if DROPOUT:
            term *= dropout_scale(seed, rows, cols, row_p)
    else:
        term *= scale
    return term


@triton.jit
def lora_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, h_ptr, down_ptr, up_ptr, scales_ptr,
    order_ptr, ids_ptr, table_ptr, dropout_ptr, wq1_ptr, wq2_ptr, wq3_ptr, wq4_ptr, wq5_ptr, col_scale_ptr, z_ptr,
    M, N, K, R, NUM_ADAPTERS, M_BUCKET, seed, dropout_p, w_scale_cols,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_bias, stride_ys, stride_ym, stride_yn,
    stride_hs, stride_hm, stride_hr, stride_dk, stride_dr, stride_ur, stride_un, stride_zm, stride_zn,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,  # False: the plain GEMM (the benchmark's triton-base row)
    SHRINK: tl.constexpr,  # True: the shrink in the K loop, H written; False: H given (the pre-pass's)
    COMPUTE_Y: tl.constexpr,  # False: only H (dX: only G, x needs no gradient)
    DX: tl.constexpr,  # the dX launch (see the module docstring)
    MULTI: tl.constexpr,  # one adapter per row through the table
    SORTED: tl.constexpr,  # MULTI: rows read through `order`
    DROPOUT: tl.constexpr,
    SPLIT_K: tl.constexpr,  # > 1: partial sums over K splits into y / h workspaces, summed by splitk_finish
    W_FORMAT: tl.constexpr,  # quant.DENSE, or the quantized format W is decoded from (quant.py)
    W_BLOCK: tl.constexpr,  # NF4: elements per absmax block
    W_BLOCK2: tl.constexpr,  # NF4 nested: absmax values per nested block
    NATIVE_FP8: tl.constexpr,  # FP8: the GPU converts e4m3 itself
    COL_SCALE: tl.constexpr,  # DoRA: y = c * (x W^T + s H B^T) + bias, c (N,) per output column
    Z_OUT: tl.constexpr,  # COL_SCALE: also store z = x W^T + s H B^T (the magnitude's gradient needs it)
    BASE_PRECISION: tl.constexpr,  # "ieee", "tf32" or "tf32x3", for fp32 operands
    LORA_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: its bf16 dot is wrong
    ACC_DTYPE: tl.constexpr,  # fp32; fp64 for float64 inputs (interpreter)
    ADAPTER_DTYPE: tl.constexpr,
    R_PAD: tl.constexpr,
    RANK_MULTIPLE: tl.constexpr,  # MULTI: every adapter's rank is a multiple of it
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    if COMPUTE_Y:
        num_pid_n = tl.cdiv(N, BLOCK_N)
    else:
        num_pid_n = 1
    # Grouped tile order: GROUP_M row-blocks share each W column-block in L2.
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_pid_n, GROUP_M)
    # Split-K: this program reduces K over [k_lo, k_hi) only.
    k_lo = 0
    k_hi = K
    split = 0
    if SPLIT_K > 1:
        split = tl.program_id(1)
        k_lo = split * (tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K)
        k_hi = tl.minimum(K, k_lo + tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K)
    fuse_shrink: tl.constexpr = HAS_LORA and SHRINK

    # int64 indices: M * K and M * N may pass 2^31.
    slots = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    ks = tl.arange(0, BLOCK_K)
    slot_ok = slots < M
    col_ok = cols < N
    rows, ids = tile_rows(slots, slot_ok, order_ptr, ids_ptr, MULTI, SORTED)
    if MULTI:
        row_p = row_values(dropout_ptr, ids)[:, None]
    else:
        row_p = dropout_p
    shrink_dropout: tl.constexpr = DROPOUT and not DX

    rank = R
    first = 0
    h_rest = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    if fuse_shrink and MULTI:
        # The shrink of every adapter of the tile but the first, each on its
        # own rows (disjoint: one accumulator holds them all), before the
        # main loop so that no K loop runs while acc is live. Not pipelined:
        # few tiles hold several adapters, and the pipeline's registers made
        # sm_80 spill.
        first = next_adapter(ids, -1, NUM_ADAPTERS)
        a = next_adapter(ids, first, NUM_ADAPTERS)
        while a < NUM_ADAPTERS:
            d_a, s_dk, s_dr, rank_a = down_matrix(table_ptr, a, NUM_ADAPTERS, K, ADAPTER_DTYPE, DX, RANK_MULTIPLE)
            h_rest = shrink_rows(
                h_rest, x_ptr, rows, slot_ok & (ids == a), stride_xm, stride_xk, k_lo, k_hi, d_a, s_dk, s_dr, rank_a,
                seed, row_p, shrink_dropout, LORA_PRECISION, UPCAST, R_PAD, BLOCK_K, 1,
            )  # fmt: skip
            a = next_adapter(ids, a, NUM_ADAPTERS)
        down_ptr, stride_dk, stride_dr, rank = down_matrix(
            table_ptr, first, NUM_ADAPTERS, K, ADAPTER_DTYPE, DX, RANK_MULTIPLE
        )

    # The main loop: the base GEMM and, with SHRINK (strategy (a)), the shrink
    # of the tile's (first) adapter from the same x tile.
    x_ptrs = x_ptr + rows[:, None] * stride_xm + (k_lo + ks)[None, :] * stride_xk  # (BM, BK)
    w_ptrs = w_ptr + (k_lo + ks)[:, None] * stride_wk + cols[None, :] * stride_wn  # (BK, BN)
    d_ptrs = down_ptr + (k_lo + ks)[:, None] * stride_dk + ranks[None, :] * stride_dr  # (BK, R_PAD)
    rank_ok = ranks < rank
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    h = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = ks < k_hi - k0
        x = tl.load(x_ptrs, mask=slot_ok[:, None] & k_ok[None, :], other=0.0)
        if COMPUTE_Y:
            if W_FORMAT == DENSE:
                w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            else:  # decoded in registers: W is never dense in memory
                w = weight_tile(
                    w_ptr, wq1_ptr, wq2_ptr, wq3_ptr, wq4_ptr, wq5_ptr, k0 + ks, cols, k_ok[:, None] & col_ok[None, :],
                    stride_wk, stride_wn, w_scale_cols, W_FORMAT, W_BLOCK, W_BLOCK2, DX, NATIVE_FP8, x.dtype,
                )  # fmt: skip
            acc = tl.dot(dot_operand(x, UPCAST), dot_operand(w, UPCAST), acc, input_precision=BASE_PRECISION)
        if fuse_shrink:
            d = tl.load(d_ptrs, mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
            # The LoRA branch computes in the adapters' dtype (PEFT): an fp32
            # adapter upcasts the x tile in registers, x itself stays as it is.
            x_lora = x.to(d.dtype)
            if shrink_dropout:
                x_lora = (x_lora * dropout_scale(seed, rows, k0 + ks, row_p)).to(d.dtype)
            h = tl.dot(dot_operand(x_lora, UPCAST), dot_operand(d, UPCAST), h, input_precision=LORA_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        d_ptrs += BLOCK_K * stride_dk

    h_ptrs = h_ptr + split * stride_hs + rows[:, None] * stride_hm + ranks[None, :] * stride_hr
    h_ok = slot_ok[:, None] & (ranks < R)[None, :]
    if fuse_shrink:
        if MULTI:
            # Every row went through the first adapter: keep its rows, the
            # others from h_rest (zero on rows without an adapter).
            h = tl.where((ids == first)[:, None], h, h_rest)
        if DX:  # G carries each row's scaling
            if MULTI:
                h = h * row_values(scales_ptr, ids)[:, None]
            else:
                h = h * tl.load(scales_ptr)
        if SPLIT_K == 1:
            # Rounded to the adapters' dtype once: the epilogue uses the
            # values the backward reads.
            h = h.to(ADAPTER_DTYPE)
        if pid_n == 0:  # a split's partial H stays in fp32 until splitk_finish sums them
            tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=h_ok)
        h = h.to(ADAPTER_DTYPE)
    elif HAS_LORA:
        h = tl.load(h_ptrs, mask=h_ok, other=0.0)

    if COMPUTE_Y:
        # The expand, per adapter of the tile on its own rows (a given H is
        # whole: the first split adds it).
        if HAS_LORA and (SHRINK or split == 0):
            if MULTI:
                # Added to acc adapter by adapter: a second (BM x BN) sum of
                # the terms would spill registers.
                a = next_adapter(ids, -1, NUM_ADAPTERS)
                while a < NUM_ADAPTERS:
                    u_a, s_ur, s_un, rank_a = up_matrix(table_ptr, a, NUM_ADAPTERS, N, ADAPTER_DTYPE, DX, RANK_MULTIPLE)
                    u_ptrs = u_a + ranks[:, None] * s_ur + cols[None, :] * s_un
                    u = tl.load(u_ptrs, mask=(ranks < rank_a)[:, None] & col_ok[None, :], other=0.0)
                    h_a = tl.where((ids == a)[:, None], h, 0.0)
                    term = tl.dot(dot_operand(h_a, UPCAST), dot_operand(u, UPCAST), input_precision=LORA_PRECISION)
                    acc += expand_term(term, tl.load(scales_ptr + a), seed, rows, cols, row_p, DX, DROPOUT)
                    a = next_adapter(ids, a, NUM_ADAPTERS)
            else:
                u_ptrs = up_ptr + ranks[:, None] * stride_ur + cols[None, :] * stride_un  # (R_PAD, BN)
                u = tl.load(u_ptrs, mask=(ranks < R)[:, None] & col_ok[None, :], other=0.0)
                term = tl.dot(dot_operand(h, UPCAST), dot_operand(u, UPCAST), input_precision=LORA_PRECISION)
                acc += expand_term(term, tl.load(scales_ptr), seed, rows, cols, row_p, DX, DROPOUT)
        if COL_SCALE:
            if Z_OUT:
                z_ptrs = z_ptr + rows[:, None] * stride_zm + cols[None, :] * stride_zn
                tl.store(z_ptrs, acc.to(z_ptr.dtype.element_ty), mask=slot_ok[:, None] & col_ok[None, :])
            acc *= tl.load(col_scale_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)[None, :]
        if HAS_BIAS and SPLIT_K == 1:  # splitk_finish adds it once
            acc += tl.load(bias_ptr + cols * stride_bias, mask=col_ok, other=0.0).to(ACC_DTYPE)[None, :]
        y_ptrs = y_ptr + split * stride_ys + rows[:, None] * stride_ym + cols[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=slot_ok[:, None] & col_ok[None, :])


@triton.jit
def splitk_finish_kernel(
    ys_ptr, hs_ptr, bias_ptr, y_ptr, h_ptr,
    M, N, R, stride_ys, stride_bias, stride_hs, stride_ym, stride_yn, stride_hm, stride_hr,
    HAS_BIAS: tl.constexpr, HAS_H: tl.constexpr, SPLIT_K: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y = the split-K partial sums, added in split order (deterministic),
    plus the bias, rounded once; H likewise. The workspaces are contiguous
    (SPLIT_K, M, N) / (SPLIT_K, M, R) fp32; y and H through their strides."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ys_ptr.dtype.element_ty)
    for s in range(SPLIT_K):
        acc += tl.load(ys_ptr + s * stride_ys + rows[:, None] * N + cols[None, :], mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias, mask=cols < N, other=0.0).to(acc.dtype)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ok)
    if HAS_H:
        if tl.program_id(1) == 0:
            ranks = tl.arange(0, R_PAD)
            h_ok = (rows < M)[:, None] & (ranks < R)[None, :]
            h = tl.zeros((BLOCK_M, R_PAD), dtype=hs_ptr.dtype.element_ty)
            for s in range(SPLIT_K):
                h += tl.load(hs_ptr + s * stride_hs + rows[:, None] * R + ranks[None, :], mask=h_ok, other=0.0)
            h_ptrs = h_ptr + rows[:, None] * stride_hm + ranks[None, :] * stride_hr
            tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=h_ok)


# W_FORMAT as the pruning names it.
_FORMAT_NAMES = {int(quant.DENSE): "", int(quant.NF4): "nf4", int(quant.NF4_NESTED): "nf4", int(quant.FP8): "fp8"}
_FORMAT_NAMES[int(quant.FP8_PER_TENSOR)] = "fp8"


def _prune(configs_, named_args, **kwargs):
    """configs.prune_gemm for this launch: its dtypes, precisions, adapters,
    dropout, shape flags and W's format (split-K runs the decode tiles)."""
    return configs.prune_gemm(
        configs_, r_pad=kwargs["R_PAD"], m=named_args["M"], wide_dtype=named_args["x_ptr"].dtype,
        adapter_dtype=TORCH_DTYPES[kwargs["ADAPTER_DTYPE"]], precision=kwargs["LORA_PRECISION"],
        base_precision=kwargs["BASE_PRECISION"], multi=kwargs["MULTI"], dropout=kwargs["DROPOUT"],
        shrink=kwargs["SHRINK"], compute_y=kwargs["COMPUTE_Y"], w_format=_FORMAT_NAMES[int(kwargs["W_FORMAT"])],
    )  # fmt: skip


lora_gemm_tuned = triton.autotune(
    configs=configs.MULTI_GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "R_PAD", "HAS_BIAS", "HAS_LORA", "SHRINK", "COMPUTE_Y", "DX", "MULTI", "SORTED",
         "DROPOUT", "SPLIT_K", "W_FORMAT", "COL_SCALE", "Z_OUT", "BASE_PRECISION", "LORA_PRECISION", "ADAPTER_DTYPE"],
    prune_configs_by={"early_config_prune": _prune},
    cache_results=True,
)(lora_gemm_kernel)  # fmt: skip


def _weight_args(weight, dx: bool):
    """(the tensor the kernel reads W from, its (K, N) strides in the GEMM's
    terms, the quantization tensors, w_scale_cols, format flags) for W
    (N_out, K_in): W^T in the forward, W in dX. A quantized W is addressed as
    its dense row-major layout (quant.py)."""
    k_in = weight.shape[1]
    if isinstance(weight, torch.Tensor):
        strides = weight.stride() if dx else weight.t().stride()
        return weight, strides, [], 0, dict(W_FORMAT=quant.DENSE, W_BLOCK=1, W_BLOCK2=1, NATIVE_FP8=False)
    strides = (k_in, 1) if dx else (1, k_in)
    parts = weight.parts()
    if weight.format == "fp8":
        per_tensor = weight.scale.dim() == 0
        fmt = quant.FP8_PER_TENSOR if per_tensor else quant.FP8
        native = not INTERPRETED and torch.cuda.get_device_capability(weight.device) >= (8, 9)
        flags = dict(W_FORMAT=fmt, W_BLOCK=1, W_BLOCK2=1, NATIVE_FP8=native)
        return weight.data.view(torch.uint8), strides, parts, triton.cdiv(k_in, 128), flags
    fmt = quant.NF4_NESTED if weight.nested else quant.NF4
    flags = dict(W_FORMAT=fmt, W_BLOCK=weight.blocksize, W_BLOCK2=weight.nested_blocksize, NATIVE_FP8=False)
    return weight.data, strides, parts, 0, flags


def lora_gemm(
    x, weight, bias, adapters, *, dx, compute_y, base_precision, lora_precision, seed=0, order=None, ids=None,
    h_given=None, split_k=1, col_scale=None, z_out=None, out=None, h_out=None,
):  # fmt: skip
    """Launch the LoRA GEMM on checked 2-D inputs.

    x: (M, K) (dY: (M, N_out) for dX); weight: the layer's W (N_out, K_in),
    a tensor of any strides or a QuantizedWeight (decoded in the K loop):
    the forward reads it as W^T, dX as W; bias: (N_out,) or None (forward
    only); adapters: a LaunchAdapters (`adapters.py`), None for the plain
    GEMM; order / ids: the rows of a multi-adapter batch (`order` None:
    unsorted), None for one adapter; h_given: H (G in dX) from the shrink
    pre-pass (`shrink.py`), else the shrink runs in the K loop; split_k > 1:
    K split over that many programs per output tile, their partial sums
    added in a fixed order by a second kernel (decode: small M leaves most
    SMs idle otherwise); col_scale: DoRA's (N,) fp32 column scale c, so that
    y = c * z + bias with z = x W^T + s H B^T, and z_out an (M, N) tensor
    that receives z (forward, one adapter, no split).

    Returns (y: (M, N) in x's dtype, or None when not compute_y; h: (M, R)
    in the adapters' dtype: H in the forward, G in dX (h_given itself when
    given), or None without adapters). `out` / `h_out`: optional outputs.
    """
    m, k = x.shape
    n = weight.shape[1] if dx else weight.shape[0]
    y = None
    if compute_y:
        y = torch.empty((m, n), device=x.device, dtype=x.dtype) if out is None else out
    h = h_given
    if adapters is not None and h is None:
        h = padded_rows(m, adapters.width, adapters.dtype, x.device) if h_out is None else h_out
    if m == 0 or (n == 0 and (h is None or h_given is not None)):
        return y, h
    if k == 0:  # no K loop: y = bias, H = 0
        if z_out is not None:
            z_out.zero_()
        if y is not None:
            y.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(y))
        if h is not None and h_given is None:
            h.zero_()
        return y, h
    has_lora = adapters is not None
    multi = has_lora and ids is not None
    fused = has_lora and h_given is None
    split_k = split_k if compute_y else 1
    y_target, h_target = y, h
    if split_k > 1:  # fp32 partial sums, one slice per split
        sum_dtype = torch.promote_types(x.dtype, torch.float32)
        y_target = torch.empty((split_k, m, n), device=x.device, dtype=sum_dtype)
        if fused:
            h_target = torch.empty((split_k, m, adapters.width), device=x.device, dtype=sum_dtype)
    stand_in = x  # any tensor: for pointers the kernel never reads under these flags
    a = adapters.down(dx) if has_lora and not multi else stand_in
    b = adapters.up(dx) if has_lora and not multi else stand_in
    w_data, w_strides, w_parts, w_scale_cols, w_flags = _weight_args(weight, dx)
    w_parts = [*w_parts, *[stand_in] * (5 - len(w_parts))]

    def strides(t, dims):
        return (0,) * dims if t is None else ((0,) * (dims - t.dim())) + t.stride()

    args = (
        x, w_data, bias if bias is not None else stand_in, y_target if y is not None else stand_in,
        h_target if h is not None else stand_in, a, b, adapters.scales if has_lora else stand_in,
        stand_in if order is None else order, stand_in if ids is None else ids,
        *(adapters.table_args() if multi else (stand_in, stand_in)), *w_parts,
        stand_in if col_scale is None else col_scale, stand_in if z_out is None else z_out,
        m, n, k, adapters.width if has_lora else 1, adapters.count if has_lora else 1, configs.m_bucket(m),
        seed, adapters.dropout_p if has_lora and not multi else 0.0, w_scale_cols,
        *x.stride(), *w_strides, bias.stride(0) if bias is not None else 0,
        *strides(y_target if y is not None else None, 3), *strides(h_target, 3),
        *(a.stride() if has_lora and not multi else (0, 0)), *(b.stride() if has_lora and not multi else (0, 0)),
        *(z_out.stride() if z_out is not None else (0, 0)),
    )  # fmt: skip
    flags = dict(
        HAS_BIAS=bias is not None,
        HAS_LORA=has_lora,
        SHRINK=fused,
        COMPUTE_Y=y is not None and n > 0,
        DX=dx,
        MULTI=multi,
        SORTED=order is not None,
        DROPOUT=has_lora and adapters.has_dropout,
        SPLIT_K=split_k,
        **w_flags,
        COL_SCALE=col_scale is not None,
        Z_OUT=z_out is not None,
        BASE_PRECISION=base_precision,
        LORA_PRECISION=lora_precision,
        UPCAST=INTERPRETED,
        ACC_DTYPE=accumulator_dtype(x.dtype),
        ADAPTER_DTYPE=TL_DTYPES[adapters.dtype if has_lora else x.dtype],
        R_PAD=configs.pad_rank(adapters.width if has_lora else 1),
        RANK_MULTIPLE=adapters.rank_multiple if has_lora else 1,
    )

    def grid(meta):
        col_blocks = triton.cdiv(n, meta["BLOCK_N"]) if flags["COMPUTE_Y"] else 1
        return (triton.cdiv(m, meta["BLOCK_M"]) * col_blocks, split_k)

    launch(lora_gemm_kernel, lora_gemm_tuned, grid, args, flags, "gemm")
    if split_k > 1:
        finish = configs.FINISH_TILE
        grid = (triton.cdiv(m, finish["BLOCK_M"]), triton.cdiv(n, finish["BLOCK_N"]))
        splitk_finish_kernel[grid](
            y_target, h_target if fused else stand_in, bias if bias is not None else stand_in, y,
            h if fused else stand_in, m, n, adapters.width if has_lora else 1, y_target.stride(0),
            bias.stride(0) if bias is not None else 0, h_target.stride(0) if fused else 0, *y.stride(),
            *(h.stride() if fused else (0, 0)),
            HAS_BIAS=bias is not None, HAS_H=fused, SPLIT_K=split_k, R_PAD=flags["R_PAD"], **finish,
        )  # fmt: skip
    return y, h
