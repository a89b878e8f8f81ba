"""The multi-adapter primitives in plain torch, for CPU tensors (and any
device where the Triton kernels cannot run). Same interface as
`multi_triton_backend`.

A loop over the adapters that have rows, each on its own rows gathered by
index: the base GEMM writes y once, each adapter's update is added to its
rows in place (`addmm_`), computed in the adapters' dtype (fp32 adapters on
bf16 / fp16 x: formed in fp32 and added with one rounding, as PEFT does).
"""

import torch

from .multi_rows import RowGroups
from .multi_rows import group_rows as _group_rows


def group_rows(adapter_ids, num_adapters, device) -> RowGroups:
    return _group_rows(adapter_ids, num_adapters, device)


def _adapter_rows(groups):
    """(adapter, the caller's rows of that adapter) for every adapter with rows."""
    for adapter, first, end in groups.segments():
        yield adapter, groups.order[first:end].long()


def _add_rows_(out, rows, left, right, alpha):
    """out[rows] += alpha * left @ right, with one rounding to out's dtype."""
    block = out[rows]
    if right.dtype == out.dtype:
        block.addmm_(left, right, alpha=alpha)
    else:
        block.add_(torch.mm(left, right).mul_(alpha))
    out[rows] = block


def forward(x, weight, bias, lora_a, lora_b, scalings, groups):
    """y = x W^T + bias + s_a H_a B_a^T per row; H[i, :r_a] = A_a x_i.
    x: (M, K) -> (y: (M, N), H: (M, R))."""
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    dtype = lora_a[0].dtype if lora_a else x.dtype
    h = torch.zeros((x.shape[0], max((a.shape[0] for a in lora_a), default=0)), dtype=dtype, device=x.device)
    for adapter, rows in _adapter_rows(groups):
        a, b = lora_a[adapter], lora_b[adapter]
        h_a = torch.mm(x[rows].to(dtype), a.t())
        h[rows, : a.shape[0]] = h_a
        _add_rows_(y, rows, h_a, b.t(), scalings[adapter])
    return y, h


def backward_dx(grad_y, weight, lora_a, lora_b, scalings, groups, *, compute_dx):
    """G[i, :r_a] = s_a dY_i B_a (M, R), and dX = dY W + G_i A_a per row
    (M, K) when compute_dx."""
    dtype = lora_a[0].dtype if lora_a else grad_y.dtype
    g = torch.zeros((grad_y.shape[0], max((a.shape[0] for a in lora_a), default=0)), dtype=dtype, device=grad_y.device)
    dx = torch.mm(grad_y, weight) if compute_dx else None
    for adapter, rows in _adapter_rows(groups):
        a, b = lora_a[adapter], lora_b[adapter]
        g_a = torch.mm(grad_y[rows].to(dtype), b).mul_(scalings[adapter])
        g[rows, : a.shape[0]] = g_a
        if compute_dx:
            _add_rows_(dx, rows, g_a, a, 1.0)
    return dx, g


def grad_a(x, g, lora_a, lora_b, scalings, groups):
    """dA_a = G_a^T x_a: (r_a, K) for every adapter with rows, else None."""
    grads = [None] * len(lora_a)
    for adapter, rows in _adapter_rows(groups):
        r = lora_a[adapter].shape[0]
        grads[adapter] = torch.mm(g[rows, :r].t(), x[rows].to(g.dtype))
    return grads


def grad_b(grad_y, h, lora_a, lora_b, scalings, groups):
    """dB_a = s_a dY_a^T H_a: (N, r_a) for every adapter with rows, else None."""
    grads = [None] * len(lora_b)
    for adapter, rows in _adapter_rows(groups):
        r = lora_b[adapter].shape[1]
        grads[adapter] = torch.mm(grad_y[rows].to(h.dtype).t(), h[rows, :r]).mul_(scalings[adapter])
    return grads
