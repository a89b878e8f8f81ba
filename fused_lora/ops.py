"""The primitives as `torch.library` custom ops, and the one autograd formula
over them, for one adapter and for many.

    fused_lora::lora_forward(x, W, bias?, A[], B[], s, p[], seed?, ids?, order?, starts?, backend, Wspec, Wparts[],
                             c?, keep_z)                                               -> (y, H, z)
    fused_lora::lora_grad_x(dY, W, A[], B[], s, p[], seed?, ids?, order?, starts?, backend, Wspec, Wparts[])
                                                                                       -> (dX, G)
    fused_lora::lora_grad_g(dY, W, A[], B[], s, ids?, order?, starts?, backend, Wspec, Wparts[]) -> G
    fused_lora::lora_grad_a(x, G, A[], B[], s, p[], seed?, ids?, order?, starts?, backend)        -> dA[]
    fused_lora::lora_grad_b(dY, H, A[], B[], s, ids?, order?, starts?, backend)                   -> dB[]

    x: (M, K)  W: (N, K)  bias: (N,)  A[i]: (r_i, K)  B[i]: (N, r_i)  y, dY: (M, N)
    s: (n,) the scalings, a float tensor on x's device;  p[i]: dropout probabilities
    H, G: (M, max r_i) in the adapters' dtype;  seed: a 0-d int64 CPU tensor, or None
    ids / order / starts: the rows of a multi-adapter call (`batch.Rows`); None for one adapter
    backend: "auto" | "triton" | "torch", as requested when the forward ran
    Wspec, Wparts: "dense" and [] for a tensor W; for a quantized base, W is its
    packed data and these the rest (QuantizedWeight.spec() / parts())
    c: DoRA's (N,) column scale m / ||W + s B A|| (y = c * z + bias with
    z = x W^T + s H B^T; its gradient is sum_m dY * z, so z is kept (keep_z)
    when c requires grad), or None; z: (M, N), or (0,) when not kept

Why `custom_op` (+ `register_fake`, `register_autograd`) and not `triton_op`:
Inductor cannot fuse much into a GEMM with a LoRA epilogue anyway, the
launchers autotune and allocate in Python, the CPU path is not Triton at all,
and `triton_op`'s fake tracing reaches the launchers' `data_ptr` and fails on
CPU under the interpreter. The ops stay opaque to the compiler.

The backend requested when the forward runs (or is traced) is an argument of
every op, saved for the backward: a forward under `with set_backend(...)`
has its backward on the same backend, whose dropout mask is the forward's.
The dropout seed is a tensor: drawn with `torch.randint`, a graph node under
torch.compile (an int would need `.item()`, a graph break).

Eager calls skip the dispatcher, because each trip through a Python custom
op costs tens of microseconds of host time (bench/overhead.py): the
functional API calls `LoRAFunction` (the same implementations and backward
formula) when gradients are needed, and `forward` itself otherwise.
"""

import contextlib
import functools
from typing import NamedTuple

import torch
from torch import Tensor

from . import backends
from .batch import Adapters, Rows
from .kernels.adapters import padded_rows
from .quantized import QuantizedWeight

DENSE = "dense"

# ---- the implementations: run the requested backend's primitive --------------------


def _outside_autocast(fn):
    """The functional API has cast the inputs already: an autocast region
    around the call must not recast the backends' own matmuls (fp32 adapters
    would drop to bf16)."""

    @functools.wraps(fn)
    def run(first, *args):
        if _autocasting(first):
            with torch.autocast(first.device.type, enabled=False):
                return fn(first, *args)
        return fn(first, *args)

    return run


def _autocasting(t: Tensor) -> bool:
    return torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(t.device.type)


def _seed(seed: Tensor | None) -> int:
    return 0 if seed is None else int(seed.item())  # a CPU scalar: no device sync


def _rows(ids, order, starts) -> Rows | None:
    return None if ids is None else Rows(ids, order, starts)


def _weight(weight: Tensor, spec: str, parts: list[Tensor]):
    """The base weight: the tensor, or the QuantizedWeight it is the data of."""
    return weight if spec == DENSE else QuantizedWeight.from_spec(weight, spec, parts)


def weight_args(weight) -> tuple[Tensor, str, list[Tensor]]:
    """(tensor, spec, parts) for the ops: the inverse of _weight."""
    if isinstance(weight, QuantizedWeight):
        return weight.data, weight.spec(), weight.parts()
    return weight, DENSE, []


def _weight_shape(weight: Tensor, spec: str) -> tuple[int, int]:
    return tuple(weight.shape) if spec == DENSE else QuantizedWeight.shape_of(spec)


@_outside_autocast
def forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: list[Tensor],
    lora_b: list[Tensor],
    scalings: Tensor,
    dropout_p: list[float],
    seed: Tensor | None,
    ids: Tensor | None,
    order: Tensor | None,
    starts: Tensor | None,
    backend: str,
    weight_spec: str,
    weight_parts: list[Tensor],
    column_scale: Tensor | None,
    keep_z: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """y = x W^T + bias + s_a * H B_a^T, H = dropout(x) A_a^T per row (with
    DoRA: y = c * (x W^T + s H B^T) + bias): x (M, K) -> y (M, N), H (M, max r), z."""
    out = run_forward(x, weight, bias, lora_a, lora_b, scalings, dropout_p, seed, ids, order, starts, backend,
                      weight_spec, weight_parts, column_scale, keep_z)  # fmt: skip
    return out if keep_z else (*out, x.new_empty((0,)))


@_outside_autocast
def run_forward(x, weight, bias, lora_a, lora_b, scalings, dropout_p, seed, ids, order, starts, backend, weight_spec,
                weight_parts, column_scale, keep_z):  # fmt: skip
    """forward's work: (y, H), and z when keep_z (the eager inference route
    calls it directly, without allocating an empty z)."""
    adapters = Adapters(lora_a, lora_b, scalings, dropout_p)
    weight = _weight(weight, weight_spec, weight_parts)
    return backends.select(x, backend).forward(
        x, weight, bias, adapters, _rows(ids, order, starts), _seed(seed), column_scale=column_scale, keep_z=keep_z
    )


@_outside_autocast
def grad_x(
    grad_y: Tensor,
    weight: Tensor,
    lora_a: list[Tensor],
    lora_b: list[Tensor],
    scalings: Tensor,
    dropout_p: list[float],
    seed: Tensor | None,
    ids: Tensor | None,
    order: Tensor | None,
    starts: Tensor | None,
    backend: str,
    weight_spec: str,
    weight_parts: list[Tensor],
) -> tuple[Tensor, Tensor]:
    """dX = dY W + D (G A_a) (M, K) and G = s_a dY B_a (M, max r), in one launch."""
    adapters = Adapters(lora_a, lora_b, scalings, dropout_p)
    rows, weight = _rows(ids, order, starts), _weight(weight, weight_spec, weight_parts)
    return backends.select(grad_y, backend).grad_x(grad_y, weight, adapters, rows, _seed(seed), compute_dx=True)


@_outside_autocast
def grad_g(
    grad_y: Tensor,
    weight: Tensor,
    lora_a: list[Tensor],
    lora_b: list[Tensor],
    scalings: Tensor,
    ids: Tensor | None,
    order: Tensor | None,
    starts: Tensor | None,
    backend: str,
    weight_spec: str,
    weight_parts: list[Tensor],
) -> Tensor:
    """G = s_a dY B_a (M, max r) alone, for training A without dX."""
    adapters = Adapters(lora_a, lora_b, scalings, [0.0] * len(lora_a))
    rows, weight = _rows(ids, order, starts), _weight(weight, weight_spec, weight_parts)
    return backends.select(grad_y, backend).grad_x(grad_y, weight, adapters, rows, compute_dx=False)[1]


@_outside_autocast
def grad_a(
    x: Tensor,
    g: Tensor,
    lora_a: list[Tensor],
    lora_b: list[Tensor],
    scalings: Tensor,
    dropout_p: list[float],
    seed: Tensor | None,
    ids: Tensor | None,
    order: Tensor | None,
    starts: Tensor | None,
    backend: str,
) -> list[Tensor]:
    """dA_a = G_a^T dropout(x_a): (r_a, K) per adapter, reduced over its rows."""
    adapters = Adapters(lora_a, lora_b, scalings, dropout_p)
    return backends.select(x, backend).grad_a(x, g, adapters, _rows(ids, order, starts), _seed(seed))


@_outside_autocast
def grad_b(
    grad_y: Tensor,
    h: Tensor,
    lora_a: list[Tensor],
    lora_b: list[Tensor],
    scalings: Tensor,
    ids: Tensor | None,
    order: Tensor | None,
    starts: Tensor | None,
    backend: str,
) -> list[Tensor]:
    """dB_a = s_a dY_a^T H_a: (N, r_a) per adapter, reduced over its rows."""
    adapters = Adapters(lora_a, lora_b, scalings, [0.0] * len(lora_a))
    return backends.select(grad_y, backend).grad_b(grad_y, h, adapters, _rows(ids, order, starts))


# ---- the same as custom ops, each with a fake: shapes and dtypes, symbolic in M ----

lora_forward = torch.library.custom_op("fused_lora::lora_forward", forward, mutates_args=())
lora_grad_x = torch.library.custom_op("fused_lora::lora_grad_x", grad_x, mutates_args=())
lora_grad_g = torch.library.custom_op("fused_lora::lora_grad_g", grad_g, mutates_args=())
lora_grad_a = torch.library.custom_op("fused_lora::lora_grad_a", grad_a, mutates_args=())
lora_grad_b = torch.library.custom_op("fused_lora::lora_grad_b", grad_b, mutates_args=())


def _skinny(like, lora_a):
    """An (M, max r) tensor in the adapters' dtype (H or G), with the
    backends' layout: rows 16-byte aligned."""
    width = max((a.shape[0] for a in lora_a), default=0)
    return padded_rows(like.shape[0], width, lora_a[0].dtype if lora_a else like.dtype, like.device)


@lora_forward.register_fake
def _(x, weight, bias, lora_a, lora_b, *args):
    n = _weight_shape(weight, args[-4])[0]
    z = x.new_empty((x.shape[0], n) if args[-1] else (0,))
    return x.new_empty((x.shape[0], n)), _skinny(x, lora_a), z


@lora_grad_x.register_fake
def _(grad_y, weight, lora_a, *args):
    k = _weight_shape(weight, args[-2])[1]
    return grad_y.new_empty((grad_y.shape[0], k)), _skinny(grad_y, lora_a)


@lora_grad_g.register_fake
def _(grad_y, weight, lora_a, *_):
    return _skinny(grad_y, lora_a)


@lora_grad_a.register_fake
def _(x, g, lora_a, *_):
    return [torch.empty_like(a) for a in lora_a]


@lora_grad_b.register_fake
def _(grad_y, h, lora_a, lora_b, *_):
    return [torch.empty_like(b) for b in lora_b]


# ---- autograd: one formula, over the ops (compiled) or the implementations (eager) ----


def save_for_backward(ctx, inputs, output, needs):
    """Save x (only if an A or W needs a gradient), W, the adapters, the
    small H (only if a B does), the seed, the rows, and DoRA's column scale
    and z; the dropout mask is regenerated, never saved. `needs`: (x, W,
    bias, any A, any B, c)."""
    x, weight, _, lora_a, lora_b, scalings, dropout_p, seed, ids, order, starts, backend, spec, parts, c, _ = inputs
    _, h, z = output
    _, need_w, _, need_a, need_b, need_c = needs
    saved = (x if (need_a or need_w) else None, weight, h if need_b else None, seed, ids, order, starts, scalings)
    ctx.save_for_backward(*saved, c, z if need_c else None, *lora_a, *lora_b, *parts)
    ctx.dropout_p, ctx.backend, ctx.count, ctx.weight_spec = dropout_p, backend, len(lora_a), spec


class _Saved:
    """What the backward reads from ctx, unpacked once."""

    def __init__(self, ctx):
        self.x, self.weight, self.h, self.seed, ids, order, starts, self.scalings, self.c, self.z, *rest = (
            ctx.saved_tensors
        )
        n = ctx.count
        self.lora_a, self.lora_b, self.weight_parts = rest[:n], rest[n : 2 * n], rest[2 * n :]
        self.rows, self.dropout_p, self.backend, self.weight_spec = (
            (ids, order, starts),
            ctx.dropout_p,
            ctx.backend,
            ctx.weight_spec,
        )


class _OpPrimitives:
    """The backward's primitives as custom ops (what a compiled graph records)."""

    def __init__(self, saved: _Saved):
        self.s = saved

    def grad_x(self, grad_y, compute_dx):
        s = self.s
        common = (s.lora_a, s.lora_b, s.scalings)
        tail = (*s.rows, s.backend, s.weight_spec, s.weight_parts)
        if compute_dx:
            return lora_grad_x(grad_y, s.weight, *common, s.dropout_p, s.seed, *tail)
        return None, lora_grad_g(grad_y, s.weight, *common, *tail)

    def grad_a(self, g):
        s = self.s
        return lora_grad_a(s.x, g, s.lora_a, s.lora_b, s.scalings, s.dropout_p, s.seed, *s.rows, s.backend)

    def grad_b(self, grad_y):
        s = self.s
        return lora_grad_b(grad_y, s.h, s.lora_a, s.lora_b, s.scalings, *s.rows, s.backend)


class _EagerPrimitives:
    """The same primitives called on the backend directly, the adapters, rows
    and weight built once (eager: a call's host time matters)."""

    def __init__(self, saved: _Saved, like: Tensor):
        self.s = saved
        self.backend = backends.select(like, saved.backend)
        self.adapters = Adapters(saved.lora_a, saved.lora_b, saved.scalings, saved.dropout_p)
        self.rows, self.seed = _rows(*saved.rows), _seed(saved.seed)
        self.weight = _weight(saved.weight, saved.weight_spec, saved.weight_parts)

    def grad_x(self, grad_y, compute_dx):
        return self.backend.grad_x(grad_y, self.weight, self.adapters, self.rows, self.seed, compute_dx=compute_dx)

    def grad_a(self, g):
        return self.backend.grad_a(self.s.x, g, self.adapters, self.rows, self.seed)

    def grad_b(self, grad_y):
        return self.backend.grad_b(grad_y, self.s.h, self.adapters, self.rows)


def backward_formula(saved: _Saved, grad_y, needs, prims):
    """Backward (dY: (M, N)); each adapter's terms sum over its own rows:
    G  = s_a dY B_a          (M, R)   formed with dX, in one launch
    dX = dY W + D (G A_a)    (M, K)   D = mask / (1 - p), or 1 without dropout
    dA_a = G_a^T d_a         (r_a, K) dL/dA = s B^T dY^T d
    dB_a = s_a dY_a^T H_a    (N, r_a) dL/dB = s dY^T (d A^T)
    dW = dY^T x,  dbias = sum_m dY  (plain torch, only when required)
    DoRA (column scale c): dc = sum_m dY * z, and the terms above take
    dY * c in place of dY (n, in c = m / n, is a constant of the backward).
    Returns (dX, dW, dbias, [dA_a], [dB_a], dc); a gradient not needed is None."""
    need_x, need_w, need_bias, need_a, need_b, need_c = needs
    grad_x = grad_w = grad_bias = grads_a = grads_b = grad_c = None
    c = saved.c
    lora_dy = grad_y  # what G and dB are formed from
    wide = torch.promote_types(grad_y.dtype, torch.float32)
    if need_c:
        grad_c = (grad_y.to(wide) * saved.z.to(wide)).sum(0).to(c.dtype)
    if need_bias:
        grad_bias = grad_y.sum(0)
    if c is not None:
        scaled = grad_y.to(wide) * c
        grad_y = scaled.to(grad_y.dtype)
        # fp32 adapters on 16-bit x keep the fp32 dY * c (rounding it first would cost their precision)
        lora_dy = scaled if saved.lora_a and saved.lora_a[0].dtype == torch.float32 else grad_y
    if need_x or need_a:
        grad_x, g = prims.grad_x(grad_y, need_x)
        if need_a and lora_dy is not grad_y:
            g = prims.grad_x(lora_dy, False)[1]
    if need_a:
        grads_a = prims.grad_a(g)
    if need_b:
        grads_b = prims.grad_b(lora_dy)
    if need_w:
        grad_w = torch.mm(grad_y.t(), saved.x)
    return grad_x, grad_w, grad_bias, grads_a, grads_b, grad_c


def _needs(x, weight, bias, lora_a, lora_b, column_scale):
    """(x, W, bias, any A, any B, c): which gradients the backward computes."""
    return (
        x.requires_grad,
        weight.requires_grad,
        bias is not None and bias.requires_grad,
        any(a.requires_grad for a in lora_a),
        any(b.requires_grad for b in lora_b),
        column_scale is not None and column_scale.requires_grad,
    )


def _op_setup_context(ctx, inputs, output):
    # needs_input_grad is flat here (list inputs are unflattened for the
    # backward only): ask the inputs themselves.
    ctx.needs = _needs(*inputs[:5], inputs[14])
    save_for_backward(ctx, inputs, output, ctx.needs)
    ctx.mark_non_differentiable(output[1], output[2])  # H and z are for the backward only
    ctx.set_materialize_grads(False)  # so no zero dH is allocated for it


def _op_backward(ctx, grad_y, _grad_h, _grad_z):
    """The registered backward: under torch.compile or CUDA graph capture the
    rows cannot be read on the host, so an adapter without rows gets zeros."""
    weight_parts = [None] * (len(ctx.saved_tensors) - 10 - 2 * ctx.count)
    if grad_y is None:  # y did not reach the loss
        return (None,) * 13 + (weight_parts, None, None)
    need_a, need_b = ctx.needs_input_grad[3:5]
    saved = _Saved(ctx)
    grad_x, grad_w, grad_bias, grads_a, grads_b, grad_c = backward_formula(
        saved, grad_y, ctx.needs, _OpPrimitives(saved)
    )
    grads_a = [g if need else None for g, need in zip(grads_a or [None] * ctx.count, need_a, strict=True)]
    grads_b = [g if need else None for g, need in zip(grads_b or [None] * ctx.count, need_b, strict=True)]
    return grad_x, grad_w, grad_bias, grads_a, grads_b, *(None,) * 8, weight_parts, grad_c, None


lora_forward.register_autograd(_op_backward, setup_context=_op_setup_context)


class Plan(NamedTuple):
    """What an eager call passes LoRAFunction besides the tensors autograd
    tracks (fewer arguments to apply: each one costs host time)."""

    dropout_p: list[float]
    seed: Tensor | None
    ids: Tensor | None
    order: Tensor | None
    starts: Tensor | None
    backend: str
    weight_spec: str
    keep_z: bool
    present: list[bool] | None  # which adapters have rows; None: read from the rows when needed


class LoRAFunction(torch.autograd.Function):
    """lora_forward's autograd for eager calls, without the dispatcher's
    Python layers: the same implementations, saved tensors and formula.
    Autograd only sees tensors passed directly, so the adapters and the
    weight's parts come last, flattened: apply(plan, x, W, bias, s, c, *A,
    *B, *Wparts). `plan.present` decides which adapters get None (no rows)
    rather than zeros."""

    FIRST_ADAPTER = 6  # the index of A_0 in apply's arguments

    @staticmethod
    def forward(ctx, plan, x, weight, bias, scalings, column_scale, *tensors):
        n = len(plan.dropout_p)
        lora_a, lora_b, parts = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        inputs = (x, weight, bias, lora_a, lora_b, scalings, plan.dropout_p, plan.seed, plan.ids, plan.order,
                  plan.starts, plan.backend, plan.weight_spec, parts, column_scale, plan.keep_z)  # fmt: skip
        y, h, *z = run_forward(*inputs)
        ctx.needs, ctx.present = _needs(x, weight, bias, lora_a, lora_b, column_scale), plan.present
        save_for_backward(ctx, inputs, (y, h, z[0] if z else None), ctx.needs)
        ctx.mark_non_differentiable(h)
        ctx.set_materialize_grads(False)
        return y, h

    @staticmethod
    def backward(ctx, grad_y, _grad_h):
        n, first = ctx.count, LoRAFunction.FIRST_ADAPTER
        if grad_y is None:
            return (None,) * len(ctx.needs_input_grad)
        saved = _Saved(ctx)
        with torch.autocast(grad_y.device.type, enabled=False) if _autocasting(grad_y) else contextlib.nullcontext():
            grads = backward_formula(saved, grad_y, ctx.needs, _EagerPrimitives(saved, grad_y))
        grad_x, grad_w, grad_bias, grads_a, grads_b, grad_c = grads
        present = ctx.present
        if present is None and saved.rows[0] is not None and not _capturing(grad_y):
            present = Rows(*saved.rows).present(n)  # eager: an adapter without rows gets None
        grads = [*(grads_a or [None] * n), *(grads_b or [None] * n)]
        grads = [
            g if need and (present is None or present[i % n]) else None
            for i, (g, need) in enumerate(zip(grads, ctx.needs_input_grad[first : first + 2 * n], strict=True))
        ]
        parts = [None] * (len(ctx.needs_input_grad) - first - 2 * n)
        return None, grad_x, grad_w, grad_bias, None, grad_c, *grads, *parts


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()
