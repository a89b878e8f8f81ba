"""The LoRA GEMM fed by TMA on a persistent grid (Hopper): the GEMM of the
pre-pass strategy, H (G in dX) given by the shrink kernel.

    forward:  y  = x W^T + bias + s * H B^T
    dX:       dX = dY W + G A                 (no dropout: G A unmasked)

A program per SM walks the output tiles (grouped order, GROUP_M row blocks
per W column block for L2 reuse); each tile's K loop loads x and W through
tensor descriptors (the copy engine moves whole boxes, zero-filled past the
edges: no masks, no address arithmetic in registers) into deep pipelines,
and the epilogue adds the rank-R expand with one more MMA into the same
accumulator (s folded into H's tile: no second M x N tile in registers),
then the bias. The pattern of Triton's persistent TMA matmul (tutorial 09),
which reached 92-105% of cuBLAS on an H100.

Eligible: one adapter of x's 16-bit dtype, a dense W, rows and W 16-byte
aligned with unit last stride (TMA's rule), sm_90 or newer (and the
interpreter, for tests); dX without dropout.
"""

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import configs
from .common import INTERPRETED, dot_operand, grouped_tile, num_sms


@triton.jit
def lora_gemm_tma_kernel(
    x_desc, w_desc, h_ptr, up_ptr, bias_ptr, y_ptr, scales_ptr,
    M, N, K, R, M_BUCKET, NUM_PROGRAMS,
    stride_hm, stride_hr, stride_ur, stride_un, stride_bias, stride_ym, stride_yn,
    DX: tl.constexpr,  # W read as (K, N) boxes (dX) or (N, K) boxes transposed (forward)
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    scale = tl.load(scales_ptr)
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([off_m, k0])
            if DX:
                w = w_desc.load([k0, off_n])
            else:
                w = w_desc.load([off_n, k0]).T
            acc = tl.dot(dot_operand(x, UPCAST), dot_operand(w, UPCAST), acc)

        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        h = tl.load(h_ptr + rows[:, None] * stride_hm + ranks[None, :] * stride_hr,
                    mask=row_ok[:, None] & (ranks < R)[None, :], other=0.0)  # fmt: skip
        if not DX:  # the forward's scaling rides on H's tile; G carries its own
            h = (h.to(tl.float32) * scale).to(h_ptr.dtype.element_ty)
        u = tl.load(up_ptr + ranks[:, None] * stride_ur + cols[None, :] * stride_un,
                    mask=(ranks < R)[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
        acc = tl.dot(dot_operand(h, UPCAST), dot_operand(u, UPCAST), acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols * stride_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _tma_ready(t: torch.Tensor) -> bool:
    """TMA's rule for a 2-D operand: unit last stride, 16-byte aligned base
    and row stride."""
    return (
        t.dim() == 2
        and t.stride(1) == 1
        and t.data_ptr() % 16 == 0
        and (t.stride(0) * t.element_size()) % 16 == 0
        and t.shape[0] > 0
        and t.shape[1] > 0
    )


def eligible(x: torch.Tensor, weight, h_dtype, *, dx: bool) -> bool:
    """Whether this GEMM can run on TMA: see the module docstring."""
    if not isinstance(weight, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16) or h_dtype != x.dtype:
        return False
    if not INTERPRETED and (not x.is_cuda or torch.cuda.get_device_capability(x.device) < (9, 0)):
        return False
    return _tma_ready(x) and _tma_ready(weight)


def _set_block_shapes(nargs):
    """Autotune's pre-hook: the descriptors' boxes follow the config's tiles."""
    m, n, k = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [m, k]
    nargs["w_desc"].block_shape = [k, n] if nargs["DX"] else [n, k]


def _prune(configs_, named_args, **kwargs):
    return configs.prune_tma(configs_, r_pad=kwargs["R_PAD"], dtype=named_args["h_ptr"].dtype)


lora_gemm_tma_tuned = triton.autotune(
    configs=[
        triton.Config(c.kwargs, c.num_warps, c.num_stages, pre_hook=_set_block_shapes) for c in configs.TMA_CONFIGS
    ],
    key=["M_BUCKET", "N", "K", "R_PAD", "DX", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune},
    cache_results=True,
)(lora_gemm_tma_kernel)


def lora_gemm_tma(x, weight, bias, h, up, scales, *, dx: bool, out=None):
    """Launch on checked, eligible inputs: x (M, K) (dY for dX), weight W
    (N_out, K_in) read as W^T (forward) or W (dX), bias (N,) or None
    (forward), h: H or G (M, R), up: B^T (R, N) or A (R, N), scales (1,).
    Returns y (M, N) in x's dtype."""
    m, k = x.shape
    n = weight.shape[1] if dx else weight.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype) if out is None else out
    if m == 0 or n == 0:
        return y
    r = h.shape[1]
    programs = 4 if INTERPRETED else num_sms(x.device)
    x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [16, 16])
    w_desc = TensorDescriptor(weight, list(weight.shape), list(weight.stride()), [16, 16])
    stand_in = x
    args = (
        x_desc, w_desc, h, up, bias if bias is not None else stand_in, y, scales,
        m, n, k, r, configs.m_bucket(m), programs,
        *h.stride(), *up.stride(), bias.stride(0) if bias is not None else 0, *y.stride(),
    )  # fmt: skip
    flags = dict(DX=dx, HAS_BIAS=bias is not None, UPCAST=INTERPRETED, R_PAD=configs.pad_rank(r))
    if INTERPRETED or not configs.TUNE:
        if INTERPRETED:
            meta = configs.interpreter_config()["gemm"]
            meta = {key: meta[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        else:
            first = _prune(configs.TMA_CONFIGS, {"h_ptr": h}, R_PAD=flags["R_PAD"])[0]
            meta = dict(first.kwargs, num_warps=first.num_warps, num_stages=first.num_stages)
        _set_block_shapes({"x_desc": x_desc, "w_desc": w_desc, **meta, **flags})
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        lora_gemm_tma_kernel[(min(programs, tiles),)](*args, **flags, **meta)
    else:

        def grid(meta):
            return (min(programs, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)

        lora_gemm_tma_tuned[grid](*args, **flags)
    return y
