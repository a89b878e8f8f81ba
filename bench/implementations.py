"""The four ways to run a LoRA layer that the benchmark compares.

    merged    one GEMM with W' = W + s B A (the speed of light; cannot train)
    naive     PEFT's path: three GEMMs and an M x N temporary
    composed  Unsloth's path: addmm + addmm_ in place (cuBLAS), hand-written backward
    fused     fused_lora.lora_linear

Each is a function (x, p) -> y over the same tensors p = Params; for forward
+ backward the benchmark differentiates with respect to x, A and B (W
frozen); `merged` only has x (its backward is the dX GEMM). With dropout,
`naive` uses torch's dropout and `fused` its own; `composed` has none
(Unsloth's fast path needs p = 0) and `merged` cannot have any.
"""

import dataclasses

import torch

import fused_lora
from fused_lora import reference
from fused_lora.backends import triton_backend
from fused_lora.kernels.gemm import lora_gemm


@dataclasses.dataclass
class Params:
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    merged_weight: torch.Tensor
    dropout_p: float = 0.0
    seed: int = 1234

    @classmethod
    def random(cls, k, n, r, dtype, device, bias=True, dropout_p=0.0):
        def randn(*shape, scale):
            return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)

        weight = randn(n, k, scale=k**-0.5)
        lora_a = randn(r, k, scale=k**-0.5).requires_grad_()
        lora_b = randn(n, r, scale=r**-0.5).requires_grad_()  # never zero: a trained adapter
        scaling = 2.0
        return cls(
            weight=weight,
            bias=randn(n, scale=1.0) if bias else None,
            lora_a=lora_a,
            lora_b=lora_b,
            scaling=scaling,
            merged_weight=reference.merged_weight(weight, lora_a.detach(), lora_b.detach(), scaling),
            dropout_p=dropout_p,
        )


class ComposedLoRA(torch.autograd.Function):
    """Unsloth's fast LoRA path: cuBLAS GEMMs accumulating in place.

    forward:  y = addmm(b, x, W^T);  y.addmm_(x A^T, B^T, alpha=s)
    backward: dX = dY W;  dX.addmm_(dY B, A, alpha=s)
              dA = s (dY B)^T x,  dB = s dY^T (x A^T)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        x2d = x.reshape(-1, x.shape[-1])
        y = torch.mm(x2d, weight.t()) if bias is None else torch.addmm(bias, x2d, weight.t())
        xa = torch.mm(x2d, lora_a.t())
        y.addmm_(xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x2d, weight, lora_a, lora_b, xa)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        x2d, weight, lora_a, lora_b, xa = ctx.saved_tensors
        s = ctx.scaling
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        dyb = torch.mm(dy, lora_b)
        dx = torch.mm(dy, weight)
        dx.addmm_(dyb, lora_a, alpha=s)
        da = torch.mm(dyb.t(), x2d).mul_(s)
        db = torch.mm(dy.t(), xa).mul_(s)
        return dx.view(ctx.x_shape), None, None, da, db, None


def merged(x, p: Params):
    return reference.merged(x, p.merged_weight, p.bias)


def naive(x, p: Params):
    return reference.naive(x, p.weight, p.bias, p.lora_a, p.lora_b, p.scaling, p.dropout_p)


def composed(x, p: Params):
    return ComposedLoRA.apply(x, p.weight, p.bias, p.lora_a, p.lora_b, p.scaling)


def fused(x, p: Params):
    return fused_lora.lora_linear(
        x, p.weight, p.bias, p.lora_a, p.lora_b, p.scaling, dropout_p=p.dropout_p, seed=p.seed
    )


IMPLEMENTATIONS = {"merged": merged, "naive": naive, "composed": composed, "fused": fused}


def triton_base(x, p: Params):
    """The fused kernel's own GEMM with the LoRA part switched off (GPU,
    forward only): x W^T + bias, to compare our GEMM with cuBLAS's."""
    precision = triton_backend.kernel_precision(x.dtype)
    y, _ = lora_gemm(
        x, p.weight, p.bias, None, dx=False, compute_y=True, base_precision=precision, lora_precision=precision
    )
    return y


def applicable(name, p: Params) -> bool:
    return not (name == "composed" and p.dropout_p > 0)


def dropout_factors(name, x, p: Params, rng_seed: int):
    """The (M, K) factors mask / (1 - p) that implementation `name` applies to
    x when torch's generator is seeded with rng_seed (None: no dropout)."""
    if p.dropout_p == 0 or name == "merged":
        return None
    if name == "fused":
        mask = fused_lora.dropout_mask(x.shape, p.dropout_p, p.seed, x.device)
        return mask.double() / (1 - p.dropout_p)
    torch.manual_seed(rng_seed)  # naive: replay nn.Dropout's draw on a tensor of ones
    return torch.nn.functional.dropout(torch.ones_like(x, dtype=p.lora_a.dtype), p.dropout_p).double()


def grad_inputs(name, x, p: Params):
    """What forward + backward differentiates: x always, A and B unless merged."""
    return [x] if name == "merged" else [x, p.lora_a, p.lora_b]


def forward_backward(name, x, p: Params, grad_y):
    """One training step's layer work: forward, then the gradients (no
    accumulation into .grad, so repeated calls do the same work)."""
    y = IMPLEMENTATIONS[name](x, p)
    return torch.autograd.grad(y, grad_inputs(name, x, p), grad_y)
