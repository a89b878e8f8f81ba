"""The fused primitives on the Triton kernels (compiled on CUDA, interpreted
on CPU with TRITON_INTERPRET=1). Same interface as `torch_backend`."""

import torch
import triton

from .kernels import backward
from .kernels import forward as forward_kernels
from .kernels.common import INTERPRETED, dropout_mask_kernel


def fp32_precision() -> str:
    """ "tf32" exactly when torch's own fp32 matmuls would use TF32, else "ieee".

    torch.backends.cuda.matmul.fp32_precision is the new setting; on "none"
    the legacy allow_tf32 decides (reading both raises in some torch versions
    when the other was set, so the legacy flag is read only as a fallback)."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _precision(dtype: torch.dtype) -> str:
    # Only fp32 operands have a choice; the interpreter ignores it anyway.
    return fp32_precision() if dtype == torch.float32 and not INTERPRETED else "ieee"


# The kernels keep a (BLOCK_M x R_PAD) accumulator in registers; past 256 it
# cannot fit in any tile the autotuner has.
MAX_RANK = 256


def forward(x, weight, bias, lora_a, lora_b, scaling, *, dropout_p=0.0, seed=0, out=None, h_out=None):
    if lora_a.shape[0] > MAX_RANK:
        raise ValueError(
            f"lora_a has rank r = {lora_a.shape[0]}: the Triton kernels take r <= {MAX_RANK}; "
            "use fused_lora.set_backend('torch') for larger ranks"
        )
    return forward_kernels.lora_forward(
        x, weight, bias, lora_a, lora_b, scaling,
        base_precision=_precision(x.dtype), lora_precision=_precision(lora_a.dtype),
        dropout_p=dropout_p, seed=seed, out=out, h_out=h_out,
    )  # fmt: skip


def backward_dx(grad_y, weight, lora_a, lora_b, scaling, *, compute_dx, dropout_p=0.0, seed=0, out=None, g_out=None):
    return backward.lora_dx(
        grad_y, weight, lora_a, lora_b, scaling, compute_dx=compute_dx,
        base_precision=_precision(grad_y.dtype), lora_precision=_precision(lora_a.dtype),
        dropout_p=dropout_p, seed=seed, out=out, g_out=g_out,
    )  # fmt: skip


def grad_a(x, g, *, dropout_p=0.0, seed=0, out=None):
    r, k = g.shape[1], x.shape[1]
    out = torch.empty((r, k), device=g.device, dtype=g.dtype) if out is None else out
    # The kernel writes (P, R) tiles: dA^T, through a transposed view.
    backward.lora_grad_ab(x, g, 1.0, precision=_precision(g.dtype), out=out.t(), dropout_p=dropout_p, seed=seed)
    return out


def grad_b(grad_y, h, scaling, *, out=None):
    n, r = grad_y.shape[1], h.shape[1]
    out = torch.empty((n, r), device=h.device, dtype=h.dtype) if out is None else out
    return backward.lora_grad_ab(grad_y, h, scaling, precision=_precision(h.dtype), out=out)


def dropout_mask(m, k, dropout_p, seed, device):
    """The (M, K) bool mask the kernels regenerate from (seed, index): True = kept."""
    keep = torch.empty((m, k), device=device, dtype=torch.int8)
    if m and k:
        block = 32
        grid = (triton.cdiv(m, block), triton.cdiv(k, block))
        dropout_mask_kernel[grid](keep, m, k, seed, float(dropout_p), BLOCK_M=block, BLOCK_K=block)
    return keep.bool()
