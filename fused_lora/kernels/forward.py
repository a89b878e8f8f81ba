"""Fused LoRA forward: y = x W^T + bias + s * (x A^T) B^T in one launch.

    x: (M, K)   W: (N, K)   bias: (N,)   A: (R, K)   B: (N, R)
    y: (M, N)   H = x A^T: (M, R), returned for the backward (unscaled)

Strategy (a) of DESIGN.md: each (BLOCK_M x BLOCK_N) program runs the K loop
once, feeding the same x tile to the base GEMM and to the rank-R shrink, and
adds s * H B^T in the epilogue while the accumulator is still fp32. No M x N
temporary, x read once; the shrink is recomputed by every column tile, an
extra R_PAD / BLOCK_N of MMA work.
"""

import torch
import triton
import triton.language as tl

from . import configs
from .common import INTERPRETED, accumulator_dtype, dot_operand, dropout_scale, grouped_tile


@triton.jit
def lora_forward_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, h_ptr,
    M, N, K, R, M_BUCKET, scaling, seed, dropout_p,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_bn, stride_br, stride_ym, stride_yn, stride_hm, stride_hr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,  # False: the plain GEMM (the benchmark's triton-base row)
    DROPOUT: tl.constexpr,  # dropout on the LoRA branch's input, p = dropout_p
    BASE_PRECISION: tl.constexpr,  # "ieee" or "tf32", for fp32 operands
    LORA_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: its bf16 dot is wrong
    ACC_DTYPE: tl.constexpr,  # fp32; fp64 for float64 inputs (interpreter)
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # Grouped tile order: GROUP_M row-blocks share each W column-block while
    # it is in L2.
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    # int64 row and column indices: M * K and M * N may pass 2^31.
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    rank_ok = ranks < R

    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk  # (BM, BK)
    wt_ptrs = w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk  # (BK, BN) = W^T
    at_ptrs = a_ptr + ranks[None, :] * stride_ar + ks[:, None] * stride_ak  # (BK, R_PAD) = A^T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    h = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(wt_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(dot_operand(x, UPCAST), dot_operand(wt, UPCAST), acc, input_precision=BASE_PRECISION)
        if HAS_LORA:
            at = tl.load(at_ptrs, mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
            # The LoRA branch computes in the adapters' dtype (PEFT): an fp32
            # adapter upcasts the x tile in registers, x itself stays as it is.
            x_lora = x.to(at.dtype)
            if DROPOUT:
                x_lora = x_lora * dropout_scale(seed, rows, k0 + ks, dropout_p, 1.0 / (1.0 - dropout_p))
                x_lora = x_lora.to(at.dtype)
            h = tl.dot(dot_operand(x_lora, UPCAST), dot_operand(at, UPCAST), h, input_precision=LORA_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wt_ptrs += BLOCK_K * stride_wk
        at_ptrs += BLOCK_K * stride_ak

    if HAS_LORA:
        # H is rounded to the adapters' dtype once: the epilogue uses the same
        # values the backward will read.
        h = h.to(h_ptr.dtype.element_ty)
        if pid_n == 0:
            h_ptrs = h_ptr + rows[:, None] * stride_hm + ranks[None, :] * stride_hr
            tl.store(h_ptrs, h, mask=row_ok[:, None] & rank_ok[None, :])
        bt_ptrs = b_ptr + ranks[:, None] * stride_br + cols[None, :] * stride_bn  # (R_PAD, BN) = B^T
        bt = tl.load(bt_ptrs, mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        lora = tl.dot(dot_operand(h, UPCAST), dot_operand(bt, UPCAST), input_precision=LORA_PRECISION)
        acc += scaling * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)[None, :]

    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


lora_forward_tuned = triton.autotune(
    configs=configs.GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "R_PAD", "HAS_BIAS", "HAS_LORA", "DROPOUT", "BASE_PRECISION", "LORA_PRECISION"],
    prune_configs_by={"early_config_prune": configs.prune_gemm_configs},
)(lora_forward_kernel)


def lora_forward(
    x, weight, bias, lora_a, lora_b, scaling, *, base_precision, lora_precision, dropout_p=0.0, seed=0, out=None,
    h_out=None,
):  # fmt: skip
    """Launch the fused forward on checked 2-D inputs.

    x: (M, K), weight: (N, K), bias: (N,) or None, lora_a: (R, K),
    lora_b: (N, R). Returns (y: (M, N) in x's dtype, H: (M, R) in the
    adapters' dtype; H = dropout(x) A^T with the mask of (seed, index)).
    `out` / `h_out` are optional preallocated outputs. lora_a = lora_b =
    None runs the kernel's GEMM alone (y = x W^T + bias, H None): the
    benchmark's triton-base row.
    """
    m, k = x.shape
    n = weight.shape[0]
    has_lora = lora_a is not None
    r = lora_a.shape[0] if has_lora else 1
    y = torch.empty((m, n), device=x.device, dtype=x.dtype) if out is None else out
    h = None
    if has_lora:
        h = torch.empty((m, r), device=x.device, dtype=lora_a.dtype) if h_out is None else h_out
    if m == 0 or n == 0:
        return y, h
    if k == 0:  # no K loop: y = bias, H = 0
        y.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(y))
        if h is not None:
            h.zero_()
        return y, h
    # Without LoRA the kernel never touches A, B or H: x stands in for them.
    a, b, h_arg = (lora_a, lora_b, h) if has_lora else (x, x, x)
    args = (
        x, weight, bias if bias is not None else x, a, b, y, h_arg,
        m, n, k, r, configs.m_bucket(m), float(scaling), seed, float(dropout_p),
        *x.stride(), *weight.stride(), *a.stride(), *b.stride(), *y.stride(), *h_arg.stride(),
    )  # fmt: skip
    flags = dict(
        HAS_BIAS=bias is not None,
        HAS_LORA=has_lora,
        DROPOUT=dropout_p > 0,
        BASE_PRECISION=base_precision,
        LORA_PRECISION=lora_precision,
        UPCAST=INTERPRETED,
        ACC_DTYPE=accumulator_dtype(x.dtype),
        R_PAD=configs.pad_rank(r),
    )

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if INTERPRETED:
        meta = configs.interpreter_config()["gemm"]
        lora_forward_kernel[grid(meta)](*args, **flags, **meta)
    else:
        lora_forward_tuned[grid](*args, **flags)
    return y, h
