"""The multi-adapter primitives on the Triton kernels (compiled on CUDA,
interpreted on CPU with TRITON_INTERPRET=1). Same interface as
`multi_torch_backend`.

    x: (M, K)   weight: (N, K)   lora_a[i]: (r_i, K)   lora_b[i]: (N, r_i)
    scalings[i]: float   groups: RowGroups of adapter_ids (M,)
"""

import torch

from .kernels import multi_backward, multi_forward
from .kernels.common import INTERPRETED
from .multi_rows import UNSORTED_MAX_ROWS, RowGroups
from .multi_rows import group_rows as _group_rows
from .triton_backend import fp32_precision


def _precision(dtype: torch.dtype) -> str:
    # Only fp32 operands have a choice; the interpreter ignores it anyway.
    return fp32_precision() if dtype == torch.float32 and not INTERPRETED else "ieee"


def group_rows(adapter_ids, num_adapters, device) -> RowGroups:
    # A batch that fits in one row tile runs unsorted: no argsort for decode.
    return _group_rows(adapter_ids, num_adapters, device, sort=adapter_ids.numel() > UNSORTED_MAX_ROWS)


def forward(x, weight, bias, lora_a, lora_b, scalings, groups, *, out=None, h_out=None):
    """(y: (M, N), H: (M, R)); see multi_forward.multi_lora_forward."""
    lora_dtype = lora_a[0].dtype if lora_a else x.dtype
    return multi_forward.multi_lora_forward(
        x, weight, bias, lora_a, lora_b, scalings, groups,
        base_precision=_precision(x.dtype), lora_precision=_precision(lora_dtype), out=out, h_out=h_out,
    )  # fmt: skip


def backward_dx(grad_y, weight, lora_a, lora_b, scalings, groups, *, compute_dx, out=None, g_out=None):
    """(dX: (M, K) or None, G: (M, R)); see multi_backward.multi_lora_dx."""
    lora_dtype = lora_a[0].dtype if lora_a else grad_y.dtype
    return multi_backward.multi_lora_dx(
        grad_y, weight, lora_a, lora_b, scalings, groups, compute_dx=compute_dx,
        base_precision=_precision(grad_y.dtype), lora_precision=_precision(lora_dtype), out=out, g_out=g_out,
    )  # fmt: skip


def grad_a(x, g, lora_a, lora_b, scalings, groups):
    """dA_a = G_a^T x_a: (r_a, K) in the adapters' dtype for every adapter
    with rows in the batch, None for the others."""
    out, slots = multi_backward.multi_lora_grad_ab(
        x, g, lora_a, lora_b, scalings, groups, scaled=False, precision=_precision(g.dtype)
    )
    # The kernel writes (K, r) tiles: dA^T.
    return [
        out[slots[i], :, : a.shape[0]].t().to(a.dtype, memory_format=torch.contiguous_format) if i in slots else None
        for i, a in enumerate(lora_a)
    ]


def grad_b(grad_y, h, lora_a, lora_b, scalings, groups):
    """dB_a = s_a dY_a^T H_a: (N, r_a) in the adapters' dtype for every
    adapter with rows in the batch, None for the others."""
    out, slots = multi_backward.multi_lora_grad_ab(
        grad_y, h, lora_a, lora_b, scalings, groups, scaled=True, precision=_precision(h.dtype)
    )
    return [
        out[slots[i], :, : b.shape[1]].to(b.dtype, memory_format=torch.contiguous_format) if i in slots else None
        for i, b in enumerate(lora_b)
    ]
