"""lora_linear(): input checks, backend dispatch and the autograd Function."""

import math
import numbers

import torch

from . import dispatch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + bias + s * H B^T with H = d A^T, d = dropout(x), on 2-D x: (M, K).

    Backward (dY: (M, N)), as the backend primitives compute it:
        G  = s * dY B          (M, R)   formed with dX, in one launch
        dX = dY W + D (G A)    (M, K)   D = mask / (1 - p), or 1 without dropout
        dA = G^T d             (R, K)   dL/dA = s * B^T dY^T d
        dB = s * dY^T H        (N, R)   dL/dB = s * dY^T (x A^T)
        dW = dY^T x,  dbias = sum_m dY  (plain torch, only when required)
    Saved: x (only if A or W needs a gradient), W, A, B, the small H and
    the dropout seed; the mask is regenerated from it, never stored.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, backend, dropout_p, seed):
        y, h = backend.forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p=dropout_p, seed=seed)
        _, need_w, _, need_a, need_b = ctx.needs_input_grad[:5]
        ctx.save_for_backward(x if (need_a or need_w) else None, weight, lora_a, lora_b, h if need_b else None)
        ctx.scaling = scaling
        ctx.backend = backend
        ctx.dropout = dict(dropout_p=dropout_p, seed=seed)  # the mask is regenerated, never saved
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_a, lora_b, h = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        backend, s = ctx.backend, ctx.scaling
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x or need_a:
            grad_x, g = backend.backward_dx(grad_y, weight, lora_a, lora_b, s, compute_dx=need_x, **ctx.dropout)
            if need_a:
                grad_a = backend.grad_a(x, g, **ctx.dropout)
        if need_b:
            grad_b = backend.grad_b(grad_y, h, s)
        if need_w:
            grad_w = torch.mm(grad_y.t(), x)
        if need_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None


def _require_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _require_dim(name, tensor, dim, expected):
    if tensor.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {expected}, got shape {tuple(tensor.shape)}")


def check_dropout(dropout_p, seed):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31):
        raise ValueError(f"seed must be None or an int in [0, 2**31), got {seed!r}")


def check_inputs(x, weight, bias, lora_a, lora_b, scaling):
    """Raise a TypeError / ValueError naming the argument for anything the
    kernels do not take as it is. Nothing is converted."""
    for name, value in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        _require_tensor(name, value)
    if bias is not None:
        _require_tensor("bias", bias)
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a Python float, got {type(scaling).__name__}")

    _require_dim("weight", weight, 2, "(out_features, in_features)")
    n, k = weight.shape
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., in_features={k}), got a 0-d tensor")
    if x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., {k}) to match weight (N={n}, K={k}), got {tuple(x.shape)}")
    _require_dim("lora_a", lora_a, 2, f"(r, in_features={k})")
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError(f"lora_a must have rank r >= 1 rows, got shape {tuple(lora_a.shape)}")
    if lora_a.shape[1] != k:
        raise ValueError(f"lora_a must have shape (r, {k}) to match weight, got {tuple(lora_a.shape)}")
    _require_dim("lora_b", lora_b, 2, f"(out_features={n}, r={r})")
    if tuple(lora_b.shape) != (n, r):
        raise ValueError(f"lora_b must have shape ({n}, {r}) to match weight and lora_a, got {tuple(lora_b.shape)}")
    if bias is not None:
        _require_dim("bias", bias, 1, f"(out_features={n},)")
        if bias.shape[0] != n:
            raise ValueError(f"bias must have shape ({n},) to match weight, got {tuple(bias.shape)}")

    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and value.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {value.dtype}")
    if lora_b.dtype != lora_a.dtype:
        raise TypeError(f"lora_b must have lora_a's dtype {lora_a.dtype}, got {lora_b.dtype}")
    fp32_adapters = lora_a.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)
    if lora_a.dtype != x.dtype and not fp32_adapters:
        raise TypeError(
            f"lora_a and lora_b must have x's dtype {x.dtype} (or float32 with float16 / bfloat16 x), "
            f"got {lora_a.dtype}"
        )

    for name, value in (("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)):
        if value is not None and value.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {value.device}")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """The LoRA linear layer, fused: y = x W^T + bias + scaling * (d A^T) B^T,
    d = dropout(x, dropout_p) on the LoRA branch only (d = x when dropout_p = 0).

    x: (..., K); weight: (N, K); bias: (N,) or None; lora_a: (r, K);
    lora_b: (N, r); scaling: a float (lora_alpha / r in PEFT).
    Returns y: (..., N) in x's dtype. Differentiable in every tensor argument.

    weight and bias share x's dtype; lora_a and lora_b share x's dtype or are
    float32 (PEFT's default for bf16 / fp16 models), in which case the LoRA
    branch computes in float32. All tensors on one device.

    Dropout keeps each element of x with probability 1 - dropout_p and scales
    it by 1 / (1 - dropout_p); the mask is a function of (seed, element
    index), drawn from torch's default generator when seed is None, and
    `dropout_mask` returns it.
    """
    check_inputs(x, weight, bias, lora_a, lora_b, scaling)
    check_dropout(dropout_p, seed)
    backend = dispatch.select(x)
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())  # CPU generator: no device sync
    leading = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])  # a view where the strides allow one
    y = LoRALinearFunction.apply(
        x2d, weight, bias, lora_a, lora_b, float(scaling), backend, float(dropout_p), seed or 0
    )
    return y.reshape(*leading, weight.shape[0])


def dropout_mask(shape, dropout_p: float, seed: int, device="cpu") -> torch.Tensor:
    """The bool mask (True = kept) that lora_linear applies to an x of this
    shape (..., K) with this dropout_p and seed, on the backend that would run
    for a float32 x on `device`."""
    check_dropout(dropout_p, seed)
    *leading, k = shape
    m = math.prod(leading)
    backend = dispatch.select(torch.empty(0, device=device))
    return backend.dropout_mask(m, k, float(dropout_p), seed, torch.device(device)).reshape(shape)
