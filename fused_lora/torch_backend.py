"""The fused primitives in plain torch, for CPU tensors (and any device where
the Triton kernels cannot run). Same interface as `triton_backend`.

The base GEMM writes y once and the LoRA update is added into it in place
(`addmm_`), so no M x N temporary exists when the adapters share x's dtype.
With fp32 adapters on bf16 / fp16 x, the update is formed in fp32 (an M x N
fp32 temporary) and added with one rounding, as PEFT does.
"""

import torch


def forward(x, weight, bias, lora_a, lora_b, scaling):
    """y = x W^T + bias + s * H B^T and H = x A^T. x: (M, K) -> (y: (M, N), H: (M, R))."""
    h = torch.mm(x.to(lora_a.dtype), lora_a.t())
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    if lora_b.dtype == y.dtype:
        y.addmm_(h, lora_b.t(), alpha=scaling)
    else:
        y.add_(torch.mm(h, lora_b.t()).mul_(scaling))
    return y, h


def backward_dx(grad_y, weight, lora_a, lora_b, scaling, *, compute_dx):
    """G = s * dY B (M, R), and dX = dY W + G A (M, K) when compute_dx."""
    g = torch.mm(grad_y.to(lora_b.dtype), lora_b).mul_(scaling)
    if not compute_dx:
        return None, g
    dx = torch.mm(grad_y, weight)
    if lora_a.dtype == dx.dtype:
        dx.addmm_(g, lora_a)
    else:
        dx.add_(torch.mm(g, lora_a))
    return dx, g


def grad_a(x, g):
    """dA = G^T x: (R, K), reduced over M in the adapters' dtype."""
    return torch.mm(g.t(), x.to(g.dtype))


def grad_b(grad_y, h, scaling):
    """dB = s * dY^T H: (N, R), reduced over M in the adapters' dtype."""
    return torch.mm(grad_y.to(h.dtype).t(), h).mul_(scaling)
