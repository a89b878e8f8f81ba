"""The fused primitives in plain torch, for CPU tensors (and any device where
the Triton kernels cannot run). Same interface as `triton_backend`.

The base GEMM writes y once and the LoRA update is added into it in place
(`addmm_`), so no M x N temporary exists when the adapters share x's dtype.
With fp32 adapters on bf16 / fp16 x, the update is formed in fp32 (an M x N
fp32 temporary) and added with one rounding, as PEFT does.

Dropout uses torch's own generator seeded with `seed` (not the kernels'
Philox stream): each backend regenerates its own mask in the backward.
"""

import torch


def dropout_mask(m, k, dropout_p, seed, device):
    """The (M, K) bool mask this backend uses for (seed, p): True = kept."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.rand((m, k), generator=generator, device=device) >= dropout_p


def _dropout_scale(x, dropout_p, seed, dtype):
    """mask / (1 - p) as x's (M, K) factors in `dtype`."""
    mask = dropout_mask(x.shape[0], x.shape[1], dropout_p, seed, x.device)
    return mask.to(dtype).mul_(1.0 / (1.0 - dropout_p))


def _lora_input(x, dropout_p, seed, dtype):
    """d = dropout(x) in the adapters' dtype."""
    d = x.to(dtype)
    return d * _dropout_scale(x, dropout_p, seed, dtype) if dropout_p > 0 else d


def forward(x, weight, bias, lora_a, lora_b, scaling, *, dropout_p=0.0, seed=0):
    """y = x W^T + bias + s * H B^T and H = d A^T, d = dropout(x).
    x: (M, K) -> (y: (M, N), H: (M, R))."""
    h = torch.mm(_lora_input(x, dropout_p, seed, lora_a.dtype), lora_a.t())
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    if lora_b.dtype == y.dtype:
        y.addmm_(h, lora_b.t(), alpha=scaling)
    else:
        y.add_(torch.mm(h, lora_b.t()).mul_(scaling))
    return y, h


def backward_dx(grad_y, weight, lora_a, lora_b, scaling, *, compute_dx, dropout_p=0.0, seed=0):
    """G = s * dY B (M, R), and dX = dY W + mask / (1 - p) * G A (M, K) when compute_dx."""
    g = torch.mm(grad_y.to(lora_b.dtype), lora_b).mul_(scaling)
    if not compute_dx:
        return None, g
    dx = torch.mm(grad_y, weight)
    if dropout_p > 0:
        ga = torch.mm(g, lora_a)
        dx.add_(ga.mul_(_dropout_scale(ga, dropout_p, seed, ga.dtype)))
    elif lora_a.dtype == dx.dtype:
        dx.addmm_(g, lora_a)
    else:
        dx.add_(torch.mm(g, lora_a))
    return dx, g


def grad_a(x, g, *, dropout_p=0.0, seed=0):
    """dA = G^T d: (R, K), d = dropout(x), reduced over M in the adapters' dtype."""
    return torch.mm(g.t(), _lora_input(x, dropout_p, seed, g.dtype))


def grad_b(grad_y, h, scaling):
    """dB = s * dY^T H: (N, R), reduced over M in the adapters' dtype."""
    return torch.mm(grad_y.to(h.dtype).t(), h).mul_(scaling)
