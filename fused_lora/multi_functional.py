"""multi_lora_linear(): many adapters in one batch. Input checks, backend
dispatch and the autograd Function; the kernels are in
kernels/multi_forward.py and kernels/multi_backward.py (design notes there)."""

import numbers
from collections.abc import Sequence

import torch

from . import dispatch, multi_torch_backend, multi_triton_backend, torch_backend, triton_backend
from .functional import FLOAT_DTYPES

# dispatch.select picks the single-adapter backend; the multi-adapter one
# runs on the same engine.
MULTI_BACKENDS = {triton_backend: multi_triton_backend, torch_backend: multi_torch_backend}


class MultiLoRALinearFunction(torch.autograd.Function):
    """y_i = W x_i + bias + s_a B_a H_i with H_i = A_a x_i, a = adapter_ids[i]
    (no update where a = -1), on 2-D x: (M, K) and adapter_ids: (M,) on x's
    device or on the CPU.

    Backward (dY: (M, N)), as the backend primitives compute it; each
    adapter's terms sum over its own rows only:
        G_i  = s_a dY_i B_a          (M, R)  formed with dX, in one launch
        dX_i = dY_i W + G_i A_a      (M, K)
        dA_a = sum_{i in a} G_i^T x_i        (r_a, K)
        dB_a = s_a sum_{i in a} dY_i^T H_i   (N, r_a)
        dW = dY^T x,  dbias = sum_i dY_i     (plain torch, only when required)
    An adapter with no rows in the batch gets no gradient (None), as in
    PEFT's loop, so an optimizer leaves it alone; finding which adapters have
    rows counts them on the host once per backward (a device sync unless
    adapter_ids came on the CPU).
    Saved: x (if an A or W needs a gradient), W, the adapters, the small H
    and the row grouping.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, adapter_ids, scalings, backend, *adapters):
        n = len(scalings)
        lora_a, lora_b = adapters[:n], adapters[n:]
        groups = backend.group_rows(adapter_ids, n, x.device)
        y, h = backend.forward(x, weight, bias, lora_a, lora_b, scalings, groups)
        need_w = ctx.needs_input_grad[1]
        need_a, need_b = any(ctx.needs_input_grad[6 : 6 + n]), any(ctx.needs_input_grad[6 + n :])
        ctx.save_for_backward(x if (need_a or need_w) else None, weight, h if need_b else None, *adapters)
        ctx.groups, ctx.scalings, ctx.backend = groups, scalings, backend
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, h, *adapters = ctx.saved_tensors
        n = len(ctx.scalings)
        lora_a, lora_b = adapters[:n], adapters[n:]
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        need_adapter = ctx.needs_input_grad[6:]
        need_a, need_b = any(need_adapter[:n]), any(need_adapter[n:])
        args = (lora_a, lora_b, ctx.scalings, ctx.groups)
        grad_x = grad_w = grad_bias = None
        grads_a = grads_b = [None] * n
        if need_x or need_a:
            grad_x, g = ctx.backend.backward_dx(grad_y, weight, *args, compute_dx=need_x)
            if need_a:
                grads_a = ctx.backend.grad_a(x, g, *args)
        if need_b:
            grads_b = ctx.backend.grad_b(grad_y, h, *args)
        if need_w:
            grad_w = torch.mm(grad_y.t(), x)
        if need_bias:
            grad_bias = grad_y.sum(0)
        adapter_grads = [grad if need else None for grad, need in zip(grads_a + grads_b, need_adapter, strict=True)]
        return grad_x, grad_w, grad_bias, None, None, None, *adapter_grads


def _require_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _require_sequence(name, value, length=None):
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list or tuple (one entry per adapter), got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} must have one entry per adapter ({length}, as lora_a), got {len(value)}")


def check_multi_inputs(x, weight, bias, lora_a, lora_b, scalings, adapter_ids):
    """Raise a TypeError / ValueError naming the argument for anything the
    kernels do not take as it is. Nothing is converted. Checking the range of
    adapter_ids reads one value back from its device (free on the CPU)."""
    for name, value in (("x", x), ("weight", weight), ("adapter_ids", adapter_ids)):
        _require_tensor(name, value)
    if bias is not None:
        _require_tensor("bias", bias)
    _require_sequence("lora_a", lora_a)
    n = len(lora_a)
    _require_sequence("lora_b", lora_b, n)
    _require_sequence("scalings", scalings, n)
    for i in range(n):
        _require_tensor(f"lora_a[{i}]", lora_a[i])
        _require_tensor(f"lora_b[{i}]", lora_b[i])
        if isinstance(scalings[i], bool) or not isinstance(scalings[i], numbers.Real):
            raise TypeError(f"scalings[{i}] must be a Python float, got {type(scalings[i]).__name__}")

    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    n_out, k = weight.shape
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., in_features={k}), got a 0-d tensor")
    if x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., {k}) to match weight (N={n_out}, K={k}), got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"bias must have shape ({n_out},) to match weight, got {tuple(bias.shape)}")
    for i in range(n):
        a, b = lora_a[i], lora_b[i]
        if a.dim() != 2 or a.shape[0] < 1 or a.shape[1] != k:
            raise ValueError(f"lora_a[{i}] must have shape (r, {k}) with r >= 1, got {tuple(a.shape)}")
        if tuple(b.shape) != (n_out, a.shape[0]):
            raise ValueError(
                f"lora_b[{i}] must have shape ({n_out}, {a.shape[0]}) to match lora_a[{i}], got {tuple(b.shape)}"
            )

    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and value.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {value.dtype}")
    if n:
        dtype = lora_a[0].dtype
        fp32_adapters = dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)
        if dtype != x.dtype and not fp32_adapters:
            raise TypeError(
                f"lora_a and lora_b must have x's dtype {x.dtype} (or float32 with float16 / bfloat16 x), got {dtype}"
            )
        for name, tensors in (("lora_a", lora_a), ("lora_b", lora_b)):
            for i, t in enumerate(tensors):
                if t.dtype != dtype:
                    raise TypeError(f"{name}[{i}] must have lora_a[0]'s dtype {dtype}: one dtype for all adapters")

    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and value.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {value.device}")
    for name, tensors in (("lora_a", lora_a), ("lora_b", lora_b)):
        for i, t in enumerate(tensors):
            if t.device != x.device:
                raise ValueError(f"{name}[{i}] must be on x's device {x.device}, got {t.device}")
    _check_adapter_ids(adapter_ids, x, n)


def _check_adapter_ids(adapter_ids, x, n):
    if adapter_ids.dtype.is_floating_point or adapter_ids.dtype.is_complex or adapter_ids.dtype == torch.bool:
        raise TypeError(f"adapter_ids must be an integer tensor, got {adapter_ids.dtype}")
    leading = tuple(x.shape[:-1])
    if tuple(adapter_ids.shape) != leading and (x.dim() < 2 or tuple(adapter_ids.shape) != leading[:1]):
        raise ValueError(
            f"adapter_ids must have x's leading shape {leading} (one adapter per row) or {leading[:1]} "
            f"(one per batch entry), got {tuple(adapter_ids.shape)}"
        )
    if adapter_ids.device not in (x.device, torch.device("cpu")):
        raise ValueError(f"adapter_ids must be on x's device {x.device} or on the CPU, got {adapter_ids.device}")
    if adapter_ids.numel():
        low, high = (int(v) for v in torch.aminmax(adapter_ids.to(torch.int64)))
        if low < -1 or high >= n:
            raise ValueError(
                f"adapter_ids must be -1 (base only) or an adapter index in [0, {n}), got values in [{low}, {high}]"
            )


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scalings: Sequence[float],
    adapter_ids: torch.Tensor,
) -> torch.Tensor:
    """The LoRA linear layer with a different adapter for every row, fused:
    y_i = W x_i + bias + scalings[a] * lora_b[a] @ lora_a[a] @ x_i with
    a = adapter_ids[i]; a = -1 leaves row i to the base layer.

    x: (..., K); weight: (N, K); bias: (N,) or None; lora_a[a]: (r_a, K);
    lora_b[a]: (N, r_a), ranks free to differ; scalings[a]: a float;
    adapter_ids: integers in [-1, len(lora_a)), of x's leading shape (one per
    row) or of its first dimension (one per batch entry), on x's device or
    on the CPU (then checking it costs no device sync).
    Returns y: (..., N) in x's dtype. Differentiable in x, weight, bias and
    every adapter; an adapter with no rows gets no gradient.

    weight and bias share x's dtype; all adapters share one dtype, x's or
    float32 (PEFT's default on bf16 / fp16 models), in which case the LoRA
    branch computes in float32. The rows are never reordered: the kernels
    group them by adapter internally and write y in the caller's order.
    """
    check_multi_inputs(x, weight, bias, lora_a, lora_b, scalings, adapter_ids)
    backend = MULTI_BACKENDS[dispatch.select(x)]
    leading = x.shape[:-1]
    if tuple(adapter_ids.shape) != tuple(leading):  # one per batch entry: broadcast over the rest
        adapter_ids = adapter_ids.reshape(-1, *[1] * (len(leading) - 1)).expand(leading)
    # Kept where they are: ids on the CPU are grouped there, with no device sync.
    ids = adapter_ids.reshape(-1)
    x2d = x.reshape(-1, x.shape[-1])  # a view where the strides allow one
    y = MultiLoRALinearFunction.apply(
        x2d, weight, bias, ids, tuple(float(s) for s in scalings), backend, *lora_a, *lora_b
    )
    return y.reshape(*leading, weight.shape[0])
