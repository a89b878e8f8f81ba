"""The fused primitives as `torch.library` custom ops, so that torch.compile
traces models of LoRALinear layers as one graph (fullgraph=True).

    fused_lora::lora_forward(x, W, bias?, A, B, s, p, seed?) -> (y, H)
    fused_lora::lora_grad_x(dY, W, A, B, s, p, seed?)       -> (dX, G)
    fused_lora::lora_grad_g(dY, W, A, B, s)                 -> G
    fused_lora::lora_grad_a(x, G, p, seed?)                 -> dA
    fused_lora::lora_grad_b(dY, H, s)                       -> dB

    x: (M, K)  W: (N, K)  bias: (N,)  A: (R, K)  B: (N, R)  y, dY: (M, N)
    H, G: (M, R) in the adapters' dtype;  seed: a 0-d int64 CPU tensor, or None

Why `custom_op` (+ `register_fake`, `register_autograd`) and not `triton_op`:
Inductor cannot fuse much into a GEMM with a LoRA epilogue anyway, the
launchers autotune and allocate in Python, the CPU path is not Triton at all,
and `triton_op`'s fake tracing reaches the launchers' `data_ptr` and fails on
CPU under the interpreter (TESTING.md). The ops stay opaque to the compiler.

The backend is picked inside each op, when it runs (`dispatch.select`): a
compiled graph holds `fused_lora::lora_forward`, never a backend, so
set_backend after compiling still decides.

The dropout seed is a tensor: lora_linear draws it with `torch.randint`, a
graph node under torch.compile (an int would need `.item()`, a graph break),
and the op reads it on the host, where a CPU tensor costs no device sync.

Eager calls skip the dispatcher, because each trip through a Python custom
op costs tens of microseconds of host time (bench/overhead.py): lora_linear
calls `LoRALinearFunction` (the same implementations, setup_context and
backward as the op's autograd) when gradients are needed, and `forward`
itself otherwise. Compiled code goes through the ops, which Dynamo and
AOTAutograd trace; tests/test_ops.py checks that both routes agree.
"""

import functools
from types import SimpleNamespace

import torch
from torch import Tensor

from . import dispatch


def _seed(seed: Tensor | None) -> int:
    return 0 if seed is None else int(seed.item())  # a CPU scalar: no device sync


def _outside_autocast(fn):
    """lora_linear has cast the inputs already: an autocast region around the
    call must not recast the backends' own matmuls (fp32 adapters would drop
    to bf16). Decides on the first argument's device."""

    @functools.wraps(fn)
    def run(first, *args):
        if torch.is_autocast_enabled(first.device.type):
            with torch.autocast(first.device.type, enabled=False):
                return fn(first, *args)
        return fn(first, *args)

    return run


# ---- the implementations: pick a backend when called, run its primitive ------------


@_outside_autocast
def forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """y = x W^T + bias + s * H B^T, H = dropout(x) A^T. x: (M, K) -> y: (M, N), H: (M, R)."""
    backend = dispatch.select(x)
    return backend.forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p=dropout_p, seed=_seed(seed))


@_outside_autocast
def grad_x(
    grad_y: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """dX = dY W + D (G A): (M, K) and G = s * dY B: (M, R), in one launch."""
    backend = dispatch.select(grad_y)
    return backend.backward_dx(
        grad_y, weight, lora_a, lora_b, scaling, compute_dx=True, dropout_p=dropout_p, seed=_seed(seed)
    )


@_outside_autocast
def grad_g(grad_y: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """G = s * dY B: (M, R) alone, for training A without dX."""
    return dispatch.select(grad_y).backward_dx(grad_y, weight, lora_a, lora_b, scaling, compute_dx=False)[1]


@_outside_autocast
def grad_a(x: Tensor, g: Tensor, dropout_p: float, seed: Tensor | None) -> Tensor:
    """dA = G^T dropout(x): (R, K), reduced over M."""
    return dispatch.select(x).grad_a(x, g, dropout_p=dropout_p, seed=_seed(seed))


@_outside_autocast
def grad_b(grad_y: Tensor, h: Tensor, scaling: float) -> Tensor:
    """dB = s * dY^T H: (N, R), reduced over M."""
    return dispatch.select(grad_y).grad_b(grad_y, h, scaling)


# ---- the same as custom ops, each with a fake: shapes and dtypes, symbolic in M ----

lora_forward = torch.library.custom_op("fused_lora::lora_forward", forward, mutates_args=())
lora_grad_x = torch.library.custom_op("fused_lora::lora_grad_x", grad_x, mutates_args=())
lora_grad_g = torch.library.custom_op("fused_lora::lora_grad_g", grad_g, mutates_args=())
lora_grad_a = torch.library.custom_op("fused_lora::lora_grad_a", grad_a, mutates_args=())
lora_grad_b = torch.library.custom_op("fused_lora::lora_grad_b", grad_b, mutates_args=())


@lora_forward.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
    m = x.shape[0]
    return x.new_empty((m, weight.shape[0])), x.new_empty((m, lora_a.shape[0]), dtype=lora_a.dtype)


@lora_grad_x.register_fake
def _(grad_y, weight, lora_a, lora_b, scaling, dropout_p, seed):
    m = grad_y.shape[0]
    return grad_y.new_empty((m, weight.shape[1])), grad_y.new_empty((m, lora_a.shape[0]), dtype=lora_b.dtype)


@lora_grad_g.register_fake
def _(grad_y, weight, lora_a, lora_b, scaling):
    return grad_y.new_empty((grad_y.shape[0], lora_a.shape[0]), dtype=lora_b.dtype)


@lora_grad_a.register_fake
def _(x, g, dropout_p, seed):
    return g.new_empty((g.shape[1], x.shape[1]))


@lora_grad_b.register_fake
def _(grad_y, h, scaling):
    return h.new_empty((grad_y.shape[1], h.shape[1]))


# ---- autograd: one formula, over the ops (compiled) or the implementations (eager) ----

OPS = SimpleNamespace(grad_x=lora_grad_x, grad_g=lora_grad_g, grad_a=lora_grad_a, grad_b=lora_grad_b)
IMPLEMENTATIONS = SimpleNamespace(grad_x=grad_x, grad_g=grad_g, grad_a=grad_a, grad_b=grad_b)


def _setup_context(ctx, inputs, output):
    """Save x (only if A or W needs a gradient), W, A, B, the small H (only if
    B does) and the seed; the dropout mask is regenerated, never saved."""
    x, weight, _, lora_a, lora_b, scaling, dropout_p, seed = inputs
    _, h = output
    _, need_w, _, need_a, need_b = ctx.needs_input_grad[:5]
    ctx.save_for_backward(x if (need_a or need_w) else None, weight, lora_a, lora_b, h if need_b else None, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.mark_non_differentiable(h)  # H is for the backward only
    ctx.set_materialize_grads(False)  # so no zero dH is allocated for it


def _backward_over(prims: SimpleNamespace):
    def backward(ctx, grad_y, _grad_h):
        """Backward (dY: (M, N)):
        G  = s * dY B          (M, R)   formed with dX, in one launch
        dX = dY W + D (G A)    (M, K)   D = mask / (1 - p), or 1 without dropout
        dA = G^T d             (R, K)   dL/dA = s * B^T dY^T d
        dB = s * dY^T H        (N, R)   dL/dB = s * dY^T (d A^T)
        dW = dY^T x,  dbias = sum_m dY  (plain torch, only when required)
        """
        if grad_y is None:  # y did not reach the loss
            return (None,) * 8
        x, weight, lora_a, lora_b, h, seed = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        s, p = ctx.scaling, ctx.dropout_p
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:
            grad_x, g = prims.grad_x(grad_y, weight, lora_a, lora_b, s, p, seed)
        elif need_a:
            g = prims.grad_g(grad_y, weight, lora_a, lora_b, s)
        if need_a:
            grad_a = prims.grad_a(x, g, p, seed)
        if need_b:
            grad_b = prims.grad_b(grad_y, h, s)
        if need_w:
            grad_w = torch.mm(grad_y.t(), x)
        if need_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None

    return backward


lora_forward.register_autograd(_backward_over(OPS), setup_context=_setup_context)


class LoRALinearFunction(torch.autograd.Function):
    """lora_forward's autograd for eager calls, without the dispatcher's
    Python layers: the same implementations, setup_context and backward."""

    @staticmethod
    def forward(ctx, *inputs):
        # setup_context inside forward: a separate staticmethod makes every
        # apply() bind arguments through inspect.signature (slow).
        output = forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward_over(IMPLEMENTATIONS))
