"""Fused LoRA backward kernels.

dY: (M, N)   W: (N, K)   A: (R, K)   B: (N, R)   x: (M, K)   H: (M, R)

G  = s * dY B          (M, R)  in the adapters' dtype
dX = dY W + G A        (M, K)  one launch: the N loop accumulates dY W and
                               dY B from the same dY tile, the epilogue
                               adds G A
dA = G^T x             (R, K)  skinny outputs reduced over a long M: the
dB = s * dY^T H        (N, R)  reduction is split over M so that large M
                               fills the GPU, partial sums meet by atomics
"""

import torch
import triton
import triton.language as tl

from . import configs
from .common import INTERPRETED, accumulator_dtype, dot_operand, dropout_scale, grouped_tile, num_sms


@triton.jit
def lora_dx_kernel(
    dy_ptr, w_ptr, a_ptr, b_ptr, dx_ptr, g_ptr,
    M, N, K, R, M_BUCKET, scaling, seed, dropout_p,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_bn, stride_br, stride_dxm, stride_dxk, stride_gm, stride_gr,
    COMPUTE_DX: tl.constexpr,  # False: only G = s * dY B (x needs no grad)
    DROPOUT: tl.constexpr,  # the forward dropped x on the LoRA branch: mask G A
    BASE_PRECISION: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # As in the forward, (BLOCK_M x BLOCK_N) is the output tile and BLOCK_K
    # the reduction step; here the output columns run along K and the
    # reduction along N.
    num_pid_k = 1
    if COMPUTE_DX:
        num_pid_k = tl.cdiv(K, BLOCK_N)
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_pid_k, GROUP_M)

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    ns = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < K
    rank_ok = ranks < R

    dy_ptrs = dy_ptr + rows[:, None] * stride_dym + ns[None, :] * stride_dyn  # (BM, BK)
    w_ptrs = w_ptr + ns[:, None] * stride_wn + cols[None, :] * stride_wk  # (BK, BN)
    b_ptrs = b_ptr + ns[:, None] * stride_bn + ranks[None, :] * stride_br  # (BK, R_PAD)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    g = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    for n0 in range(0, N, BLOCK_K):
        n_ok = ns < N - n0
        dy = tl.load(dy_ptrs, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[:, None] & rank_ok[None, :], other=0.0)
        if COMPUTE_DX:
            w = tl.load(w_ptrs, mask=n_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(dot_operand(dy, UPCAST), dot_operand(w, UPCAST), acc, input_precision=BASE_PRECISION)
        dy_lora = dot_operand(dy.to(b.dtype), UPCAST)
        g = tl.dot(dy_lora, dot_operand(b, UPCAST), g, input_precision=LORA_PRECISION)
        dy_ptrs += BLOCK_K * stride_dyn
        w_ptrs += BLOCK_K * stride_wn
        b_ptrs += BLOCK_K * stride_bn

    # G carries s and is rounded to the adapters' dtype once; dA reads it back.
    g = (g * scaling).to(g_ptr.dtype.element_ty)
    if pid_k == 0:
        g_ptrs = g_ptr + rows[:, None] * stride_gm + ranks[None, :] * stride_gr
        tl.store(g_ptrs, g, mask=row_ok[:, None] & rank_ok[None, :])

    if COMPUTE_DX:
        a_ptrs = a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ak  # (R_PAD, BN)
        a = tl.load(a_ptrs, mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        ga = tl.dot(dot_operand(g, UPCAST), dot_operand(a, UPCAST), input_precision=LORA_PRECISION)
        if DROPOUT:  # dL/dx through d = mask * x / (1 - p)
            ga *= dropout_scale(seed, rows, cols, dropout_p, 1.0 / (1.0 - dropout_p))
        acc += ga
        dx_ptrs = dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def lora_grad_ab_kernel(
    p_ptr, q_ptr, out_ptr,
    M, P, R, M_PER_SPLIT, scaling, seed, dropout_p,
    stride_pm, stride_pp, stride_qm, stride_qr, stride_op, stride_or,
    ATOMIC: tl.constexpr,  # several programs share an output tile
    DROPOUT: tl.constexpr,  # Pm is x, dropped as in the forward (dA = G^T d)
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """out[p, j] = scaling * sum_m Pm[m, p] * Q[m, j], with Pm: (M, P) wide
    (x or dY) and Q: (M, R) skinny (G or H); the sum runs in Q's dtype.
    Program (i, s) owns rows p of block i and the M rows of split s."""
    pid_p = tl.program_id(0)
    pid_s = tl.program_id(1)
    ps = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    ranks = tl.arange(0, R_PAD)
    p_ok = ps < P
    rank_ok = ranks < R
    first_row = pid_s.to(tl.int64) * M_PER_SPLIT

    acc = tl.zeros((BLOCK_P, R_PAD), dtype=ACC_DTYPE)
    for m0 in range(0, M_PER_SPLIT, BLOCK_M):
        rows = first_row + m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
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
        p_tile = p_tile.to(q_tile.dtype)
        if DROPOUT:
            p_tile = (p_tile * dropout_scale(seed, rows, ps, dropout_p, 1.0 / (1.0 - dropout_p))).to(q_tile.dtype)
        p_tile = dot_operand(p_tile, UPCAST)
        acc = tl.dot(tl.trans(p_tile), dot_operand(q_tile, UPCAST), acc, input_precision=PRECISION)

    acc *= scaling
    out_ptrs = out_ptr + ps[:, None] * stride_op + ranks[None, :] * stride_or
    out_ok = p_ok[:, None] & rank_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=out_ok)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


lora_dx_tuned = triton.autotune(
    configs=configs.GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "R_PAD", "COMPUTE_DX", "DROPOUT", "BASE_PRECISION", "LORA_PRECISION"],
    prune_configs_by={"early_config_prune": configs.prune_gemm_configs},
)(lora_dx_kernel)

# Atomic runs accumulate into out_ptr, so every autotune trial starts from zero.
lora_grad_ab_tuned = triton.autotune(
    configs=configs.GRAD_AB_CONFIGS,
    key=["M_PER_SPLIT", "P", "R_PAD", "ATOMIC", "DROPOUT", "PRECISION"],
    reset_to_zero=["out_ptr"],
    prune_configs_by={"early_config_prune": configs.prune_grad_ab_configs},
)(lora_grad_ab_kernel)


def lora_dx(
    grad_y, weight, lora_a, lora_b, scaling, *, compute_dx, base_precision, lora_precision, dropout_p=0.0, seed=0,
    out=None, g_out=None,
):  # fmt: skip
    """Launch the dX kernel on checked 2-D inputs.

    grad_y: (M, N), weight: (N, K), lora_a: (R, K), lora_b: (N, R).
    Returns (dX: (M, K) in grad_y's dtype, or None when not compute_dx;
    G = s * dY B: (M, R) in the adapters' dtype). With dropout_p > 0 the
    G A term of dX is masked as the forward masked x (same seed).
    """
    m, n = grad_y.shape
    r, k = lora_a.shape
    g = torch.empty((m, r), device=grad_y.device, dtype=lora_b.dtype) if g_out is None else g_out
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
        grad_y, weight, lora_a, lora_b, dx_arg, g,
        m, n, k, r, configs.m_bucket(m), float(scaling), seed, float(dropout_p),
        *grad_y.stride(), *weight.stride(), *lora_a.stride(), *lora_b.stride(), *dx_strides, *g.stride(),
    )  # fmt: skip
    flags = dict(
        COMPUTE_DX=kernel_dx,
        DROPOUT=dropout_p > 0,
        BASE_PRECISION=base_precision,
        LORA_PRECISION=lora_precision,
        UPCAST=INTERPRETED,
        ACC_DTYPE=accumulator_dtype(grad_y.dtype),
        R_PAD=configs.pad_rank(r),
    )

    def grid(meta):
        col_blocks = triton.cdiv(k, meta["BLOCK_N"]) if flags["COMPUTE_DX"] else 1
        return (triton.cdiv(m, meta["BLOCK_M"]) * col_blocks,)

    if INTERPRETED:
        meta = configs.interpreter_config()["gemm"]
        lora_dx_kernel[grid(meta)](*args, **flags, **meta)
    else:
        lora_dx_tuned[grid](*args, **flags)
    return dx, g


def lora_grad_ab(wide, skinny, scaling, *, precision, out, dropout_p=0.0, seed=0):
    """out (P, R) = scaling * wide^T @ skinny, reduced over M in the skinny
    operand's dtype. wide: (M, P), skinny: (M, R); `out` may be a transposed
    view (dA^T). With dropout_p > 0 the wide operand is x, dropped with the
    forward's mask. Splits M over programs when one tile per P block would
    leave the GPU idle."""
    m, p = wide.shape
    r = skinny.shape[1]
    if p == 0 or r == 0:
        return out
    if m == 0:
        return out.zero_()
    if INTERPRETED:
        rows_per_split = configs.interpreter_config()["split_m"]
        meta = configs.interpreter_config()["grad_ab"]
        p_tiles = triton.cdiv(p, meta["BLOCK_P"])
    else:
        meta = None
        p_tiles = triton.cdiv(p, 64)
        rows_per_split = configs.split_m(m, p_tiles, num_sms(wide.device))
    splits = triton.cdiv(m, rows_per_split)
    atomic = splits > 1
    # Atomic partial sums meet in fp32 (or wider): in `out` itself when it is
    # that wide (fp32 adapters, PEFT's default), else in a buffer rounded once
    # at the end.
    sum_dtype = torch.promote_types(out.dtype, torch.float32)
    if not atomic:
        target = out
    elif out.dtype == sum_dtype:
        target = out.zero_()
    else:
        target = torch.zeros((p, r), device=wide.device, dtype=sum_dtype)
    args = (
        wide, skinny, target, m, p, r, rows_per_split, float(scaling), seed, float(dropout_p),
        *wide.stride(), *skinny.stride(), *target.stride(),
    )  # fmt: skip
    flags = dict(
        ATOMIC=atomic,
        DROPOUT=dropout_p > 0,
        PRECISION=precision,
        UPCAST=INTERPRETED,
        ACC_DTYPE=accumulator_dtype(skinny.dtype),
        R_PAD=configs.pad_rank(r),
    )

    def grid(meta):
        return (triton.cdiv(p, meta["BLOCK_P"]), splits)

    if meta is not None:
        lora_grad_ab_kernel[grid(meta)](*args, **flags, **meta)
    else:
        lora_grad_ab_tuned[grid](*args, **flags)
    if target is not out:
        out.copy_(target)
    return out
