"""The primitives on the Triton kernels (compiled on CUDA, interpreted on CPU
with TRITON_INTERPRET=1). Same interface as `torch_backend`:

    forward(x, weight, bias, adapters, rows, seed)          -> (y, H)
    grad_x(dy, weight, adapters, rows, seed, compute_dx)    -> (dX or None, G)
    grad_a(x, g, adapters, rows, seed)                      -> [dA_a]
    grad_b(dy, h, adapters, rows)                           -> [dB_a]
    dropout_mask(m, k, p, seed, device)                     -> (M, K) bool

x: (M, K), weight: (N, K), adapters: batch.Adapters, rows: batch.Rows of a
multi-adapter call or None. H, G: (M, width) in the adapters' dtype, zero
past each row's rank and on rows without an adapter. An adapter without rows
gets a zero gradient. Each primitive runs one of its candidates
(`candidates.py`), as `tuning.choose` decides for the shape.
"""

import torch
import triton

from ..kernels.adapters import LaunchAdapters, padded_rows
from ..kernels.common import INTERPRETED, dropout_mask_kernel
from . import tuning
from .candidates import CANDIDATES, Call

# The kernels keep a (BLOCK_M x R_PAD) accumulator in registers; past 256 it
# cannot fit in any tile the autotuner has.
MAX_RANK = 256


def fp32_precision() -> str:
    """ "tf32" exactly when torch's own fp32 matmuls would use TF32, else "ieee".

    torch.backends.cuda.matmul.fp32_precision is the new setting; on "none"
    the legacy allow_tf32 decides (reading both raises in some torch versions
    when the other was set, so the legacy flag is read only as a fallback)."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def kernel_precision(dtype: torch.dtype) -> str:
    """The kernels' `tl.dot` precision for operands of `dtype`: only fp32 has
    a choice. TF32 where torch's setting allows it; else 3xTF32 ("tf32x3":
    each operand split into two TF32 parts, three tensor-core products),
    within the fp32 tolerance, where a true fp32 dot would run on FMA units
    with its operand tiles in registers (which spilled in every tile of the
    compile report at large ranks). The interpreter computes fp32 exactly."""
    if dtype != torch.float32 or INTERPRETED:
        return "ieee"
    return "tf32" if fp32_precision() == "tf32" else "tf32x3"


def _call(x, weight, bias, adapters, rows, seed, out=None, h_out=None, column_scale=None) -> Call:
    launch = None
    if adapters.count:
        if adapters.width > MAX_RANK:
            raise ValueError(
                f"an adapter has rank r = {adapters.width}: the Triton kernels take r <= {MAX_RANK}; "
                "use fused_lora.set_backend('torch') for larger ranks"
            )
        launch = LaunchAdapters(*adapters, multi=rows is not None)
    lora_dtype = launch.dtype if launch else x.dtype
    precisions = kernel_precision(x.dtype), kernel_precision(lora_dtype)
    return Call(x, weight, bias, adapters, launch, rows, seed, *precisions, out, h_out, column_scale)


def _run(kind, call, m, *args, **kwargs):
    def run(name):
        return CANDIDATES[kind][name](call, *args, **kwargs)

    return run(tuning.choose(kind, call, m, run))


def forward(x, weight, bias, adapters, rows, seed=0, *, column_scale=None, keep_z=False, out=None, h_out=None):
    call = _call(x, weight, bias, adapters, rows, seed, out, h_out, column_scale)
    if keep_z:
        call.z_out = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    y, h = _run("forward", call, x.shape[0])
    h = padded_rows(x.shape[0], 0, x.dtype, x.device) if h is None else h
    return (y, h, call.z_out) if keep_z else (y, h)


def grad_x(grad_y, weight, adapters, rows, seed=0, *, compute_dx=True, out=None, g_out=None):
    # dX = dY W is the forward's GEMM with W (N, K) as its "W^T".
    call = _call(grad_y, weight, None, adapters, rows, seed, out, g_out)
    dx, g = _run("grad_x", call, grad_y.shape[0], compute_dx)
    return dx, padded_rows(grad_y.shape[0], 0, grad_y.dtype, grad_y.device) if g is None else g


def _reduce(wide, skinny, adapters, rows, *, scaled, transpose, seed=0, out=None):
    """Per adapter, scale * dropout(wide)^T @ skinny as (P, r_a), or its
    transpose (r_a, P) (dA), in the adapters' dtype."""
    if rows is not None:
        rows = rows.grouped(adapters.count)
    call = _call(wide, wide, None, adapters, rows, seed)
    p, r = wide.shape[1], skinny.shape[1]
    if rows is None:  # one adapter: written in place, dA through a transposed view
        shape = (r, p) if transpose else (p, r)
        out = torch.empty(shape, device=wide.device, dtype=skinny.dtype) if out is None else out
        _run("reduce", call, wide.shape[0], wide, skinny, scaled=scaled, out=(out.t() if transpose else out)[None])
        return [out]
    sum_dtype = torch.promote_types(skinny.dtype, torch.float32)
    sums = torch.empty((adapters.count, p, r), device=wide.device, dtype=sum_dtype)
    _run("reduce", call, wide.shape[0], wide, skinny, scaled=scaled, out=sums)
    grads = []
    for a, lora_a in enumerate(adapters.lora_a):
        grad = sums[a, :, : lora_a.shape[0]]
        grad = grad.t() if transpose else grad
        grads.append(grad.to(skinny.dtype, memory_format=torch.contiguous_format, copy=True))  # own storage
    return grads


def grad_a(x, g, adapters, rows, seed=0, *, out=None):
    """dA_a = G_a^T dropout(x_a): (r_a, K) for every adapter."""
    return _reduce(x, g, adapters, rows, scaled=False, transpose=True, seed=seed, out=out)


def grad_b(grad_y, h, adapters, rows, *, out=None):
    """dB_a = s_a dY_a^T H_a: (N, r_a) for every adapter."""
    return _reduce(grad_y, h, adapters, rows, scaled=True, transpose=False, out=out)


def dropout_mask(m, k, dropout_p, seed, device):
    """The (M, K) bool mask the kernels regenerate from (seed, index): True = kept."""
    keep = torch.empty((m, k), device=device, dtype=torch.int8)
    if m and k:
        block = 32
        grid = (triton.cdiv(m, block), triton.cdiv(k, block))
        dropout_mask_kernel[grid](keep, m, k, seed, float(dropout_p), BLOCK_M=block, BLOCK_K=block)
    return keep.bool()
