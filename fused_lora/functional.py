"""lora_linear() and multi_lora_linear(): autocast casting, the input
checks, the dropout seed and the row grouping, then the fused op (`ops`) by
one of three equivalent routes: the custom op when torch.compile traces (or
for meta tensors), its autograd Function when eager code needs gradients,
the bare implementation otherwise (inference pays no autograd host time).
One adapter is the case of many with no row ids."""

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch

from . import backends, ops
from .batch import UNSORTED_MAX_ROWS, group_rows
from .checks import check_adapter_ids, check_dropout, check_inputs, check_scaling_tensor, check_seed, require_tensor
from .quantized import QuantizedWeight


def _one_name(kind, _i):
    return kind


def _indexed_name(kind, i):
    return f"{'scalings' if kind == 'scaling' else kind}[{i}]"


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float | torch.Tensor,
    *,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """The LoRA linear layer, fused: y = x W^T + bias + scaling * (d A^T) B^T,
    d = dropout(x, dropout_p) on the LoRA branch only (d = x when dropout_p = 0).

    x: (..., K); weight: (N, K), a tensor or a QuantizedWeight (NF4 / FP8,
    decoded tile by tile inside the kernels); bias: (N,) or None; lora_a: (r, K);
    lora_b: (N, r); scaling: a finite float (lora_alpha / r in PEFT), or a
    float tensor of one element on x's device (a layer's: data, so a
    compiled graph serves any value; its value is not checked here).
    Returns y: (..., N) in x's dtype. Differentiable in every tensor argument.

    weight and bias share x's dtype; lora_a and lora_b share x's dtype or are
    float32 (PEFT's default for bf16 / fp16 models), in which case the LoRA
    branch computes in float32. All tensors on one device; meta tensors give
    a meta result, as nn.Linear does.

    Dropout keeps each element of x with probability 1 - dropout_p and scales
    it by 1 / (1 - dropout_p); the mask is a function of (seed, element
    index), drawn from torch's default generator when seed is None, and
    `dropout_mask` returns it. With dropout, CUDA graph capture raises: the
    seed is drawn on the host, so replays would repeat one mask.

    Under torch.autocast it casts as nn.Linear does: x, weight and bias to the
    autocast dtype, and y comes out in it; float32 adapters stay float32 (the
    LoRA branch in float32, as above), other adapters are cast too.
    Traceable by torch.compile(fullgraph=True), dynamic in the leading dims.
    """
    if isinstance(x, torch.Tensor) and _autocasting(x):
        x, weight, bias, (lora_a,), (lora_b,) = _autocast(x, weight, bias, [lora_a], [lora_b])
    tensor = isinstance(scaling, torch.Tensor)
    check_inputs(x, weight, bias, [lora_a], [lora_b], None if tensor else [scaling], [dropout_p], names=_one_name)
    if tensor:
        check_scaling_tensor("scaling", scaling, ((), (1,)), x)
    scalings = _as_tensor(scaling if tensor else [scaling], x.device, lora_a.dtype)
    check_seed(seed)
    return _run(x, weight, bias, [lora_a], [lora_b], scalings, [dropout_p], seed, None)


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scalings: Sequence[float] | torch.Tensor,
    adapter_ids: torch.Tensor,
    *,
    dropout_p: float | Sequence[float] = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """The LoRA linear layer with a different adapter for every row, fused:
    y_i = W x_i + bias + scalings[a] * lora_b[a] @ lora_a[a] @ d_i with
    a = adapter_ids[i], d = dropout(x, dropout_p[a]); a = -1 leaves row i to
    the base layer.

    x: (..., K); weight: (N, K); bias: (N,) or None; lora_a[a]: (r_a, K);
    lora_b[a]: (N, r_a), ranks free to differ; scalings: finite floats, one
    per adapter, or an (n,) float tensor on x's device;
    dropout_p: one float for every adapter or one per adapter; adapter_ids:
    integers in [-1, len(lora_a)), of x's leading shape (one per row) or of
    its first dimension (one per batch entry), on x's device or on the CPU.
    Returns y: (..., N) in x's dtype. Differentiable in x, weight, bias and
    every adapter.

    An adapter with no rows in the batch gets None as its gradient in eager
    mode (the rows are counted on the host: free for CPU ids, one device
    sync for ids on a GPU), and zeros under torch.compile or CUDA graph
    capture, which cannot read the ids on the host. Under capture the ids
    must already be on the GPU (no host-to-device copy).

    Dtypes, devices, dropout, autocast and torch.compile as in lora_linear;
    all adapters share one dtype. The rows are never reordered: the kernels
    group them by adapter internally and write y in the caller's order.
    """
    for name, value in (("lora_a", lora_a), ("lora_b", lora_b), ("scalings", scalings)):
        if name == "scalings" and isinstance(value, torch.Tensor):
            continue
        if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list or tuple (one entry per adapter), got {type(value).__name__}")
        if len(value) != len(lora_a):
            raise ValueError(f"{name} must have one entry per adapter ({len(lora_a)}, as lora_a), got {len(value)}")
    n = len(lora_a)
    if isinstance(dropout_p, Sequence) and not isinstance(dropout_p, str):
        if len(dropout_p) != n:
            raise ValueError(f"dropout_p must be one float or one per adapter ({n}), got {len(dropout_p)}")
        dropout_p = list(dropout_p)
    else:
        check_dropout("dropout_p", dropout_p)
        dropout_p = [dropout_p] * n
    lora_a, lora_b = list(lora_a), list(lora_b)
    if isinstance(x, torch.Tensor) and _autocasting(x):
        x, weight, bias, lora_a, lora_b = _autocast(x, weight, bias, lora_a, lora_b)
    tensor = isinstance(scalings, torch.Tensor)
    check_inputs(x, weight, bias, lora_a, lora_b, None if tensor else scalings, dropout_p, names=_indexed_name)
    if tensor:
        check_scaling_tensor("scalings", scalings, ((n,),), x)
    scalings = _as_tensor(scalings, x.device, lora_a[0].dtype if n else x.dtype)
    check_seed(seed)
    check_adapter_ids(adapter_ids, x, n)
    leading = x.shape[:-1]
    if tuple(adapter_ids.shape) != tuple(leading):  # one per batch entry: broadcast over the rest
        adapter_ids = adapter_ids.reshape(-1, *[1] * (len(leading) - 1)).expand(leading)
    return _run(x, weight, bias, lora_a, lora_b, scalings, dropout_p, seed, adapter_ids.reshape(-1))


def dora_weight_norm(weight, lora_a, lora_b, scaling, weight_norm_sq=None) -> torch.Tensor:
    """n (N,) fp32: the row norms ||W_j + s B_j A|| that DoRA divides by,
    without forming W + s B A: ||W_j||^2 + 2 s (W A^T)_j . B_j +
    s^2 B_j (A A^T) B_j^T, from the skinny products W A^T (N x r) and A A^T
    (r x r). weight_norm_sq: ||W_j||^2, which does not change while W is
    frozen (a layer caches it). Detached: DoRA treats n as a constant."""
    with torch.no_grad():
        w = weight.dequantize() if isinstance(weight, QuantizedWeight) else weight
        wide = torch.promote_types(w.dtype, torch.float32)
        # A scaling tensor stays on the device (no host sync): a 0-d factor.
        s = scaling.reshape(()).to(wide) if isinstance(scaling, torch.Tensor) else float(scaling)
        a, b = lora_a.to(wide), lora_b.to(wide)
        if weight_norm_sq is None:
            weight_norm_sq = w.to(wide).square().sum(1)
        wa = torch.mm(w.to(wide), a.t())  # fp32: n keeps fp32 precision whatever W's dtype
        norm_sq = weight_norm_sq + 2 * s * (wa * b).sum(1) + s * s * (torch.mm(b, torch.mm(a, a.t())) * b).sum(1)
        return norm_sq.clamp_min(0).sqrt()


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float | torch.Tensor,
    magnitude: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    weight_norm_sq: torch.Tensor | None = None,
    weight_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA (weight-decomposed LoRA), as PEFT computes it:

        y = (m / n) * (x W^T + s (x A^T) B^T) + bias,   n_j = ||W_j + s B_j A||

    with n a constant of the backward (as PEFT and the DoRA paper have it).
    magnitude: m (N,), trainable; other arguments as lora_linear's. The
    column scale m / n is applied in the fused kernel's epilogue, and z (the
    unscaled output) is kept for m's gradient, sum_i dY_ij z_ij / n_j, when m
    requires grad (as PEFT's autograd keeps as much). weight_norm_sq:
    ||W_j||^2 when known (a layer caches it); weight_norm: n itself when
    known (a layer caches it while W, A, B and the scaling are unchanged).

    With dropout (dropout_p > 0; a layer passes it in training mode only),
    PEFT's form y = x W^T + bias + (m/n - 1) (d W^T) + (m/n) s (d A^T) B^T,
    d = dropout(x): composed from torch's dropout, x W^T + bias, and the
    fused op on d with the column scale m/n - 1 (two M x N x K GEMMs, as
    PEFT's), not fused into one kernel.
    """
    check_dropout("dropout_p", dropout_p)
    require_tensor("magnitude", magnitude)
    n_out = weight.shape[0]
    if tuple(magnitude.shape) != (n_out,) or not magnitude.is_floating_point():
        raise ValueError(f"magnitude must be a float tensor of shape ({n_out},), got {tuple(magnitude.shape)}")
    norm = dora_weight_norm(weight, lora_a, lora_b, scaling, weight_norm_sq) if weight_norm is None else weight_norm
    column_scale = magnitude.to(norm.dtype) / norm  # fp32 (fp64 for fp64 inputs), as n
    if dropout_p == 0:
        return _dora(x, weight, bias, lora_a, lora_b, scaling, column_scale)
    # As PEFT: the dropped input, and the terms computed from it, in the adapters' dtype.
    w = weight.dequantize() if isinstance(weight, QuantizedWeight) else weight
    d = torch.nn.functional.dropout(x.to(lora_a.dtype), dropout_p)
    w_lora = w.to(lora_a.dtype)
    # (c - 1) (d W^T) + c s (d A^T) B^T = (c - 1) * z_d + s (d A^T) B^T with z_d = d W^T + s (d A^T) B^T:
    # one fused GEMM on d with the column scale c - 1 (m's gradient flows through it), and two skinny ones.
    update = _dora(d, w_lora, None, lora_a, lora_b, scaling, column_scale - 1)
    lora_d = torch.nn.functional.linear(torch.nn.functional.linear(d, lora_a), lora_b) * scaling
    return torch.nn.functional.linear(x, w, bias) + (update + lora_d).to(x.dtype)


def _dora(x, weight, bias, lora_a, lora_b, scaling, column_scale):
    tensor = isinstance(scaling, torch.Tensor)
    check_inputs(x, weight, bias, [lora_a], [lora_b], None if tensor else [scaling], [0.0], names=_one_name)
    scalings = _as_tensor(scaling if tensor else [scaling], x.device, lora_a.dtype)
    return _run(x, weight, bias, [lora_a], [lora_b], scalings, [0.0], None, None, column_scale)


def _run(x, weight, bias, lora_a, lora_b, scalings, dropout_p, seed, adapter_ids, column_scale=None):
    """Checked inputs -> y: the seed, the rows, then the op by its route."""
    compiling = torch.compiler.is_compiling()
    seed_tensor = None
    if any(p > 0 for p in dropout_p):
        if x.is_cuda and not compiling and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "LoRA dropout cannot be captured in a CUDA graph: the seed is drawn on the host, so every replay "
                "would reuse the mask of the capture (use eval mode, or dropout 0)"
            )
        # A 0-d CPU tensor: under torch.compile the draw is a graph node, not a `.item()` graph break.
        seed_tensor = torch.randint(0, 2**31 - 1, ()) if seed is None else torch.tensor(seed)
    rows, present = (None, None, None), None
    if adapter_ids is not None:
        if adapter_ids.device != x.device and x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise ValueError("adapter_ids must be on the GPU during CUDA graph capture (no host-to-device copy)")
        # Compiled graphs always sort: one graph for every number of tokens.
        sort = compiling or adapter_ids.numel() > UNSORTED_MAX_ROWS
        grouped = group_rows(adapter_ids, len(lora_a), x.device, sort=sort)
        rows = (grouped.ids, grouped.order, grouped.starts)
        if adapter_ids.device.type == "cpu" and not compiling:
            counts = torch.bincount(adapter_ids.to(torch.int64) + 1, minlength=len(lora_a) + 1).tolist()
            present = [c > 0 for c in counts[1:]]
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # a view where the strides allow one
    data, spec, parts = ops.weight_args(weight)
    keep_z = column_scale is not None and column_scale.requires_grad and torch.is_grad_enabled()
    args = (x2d, data, bias, lora_a, lora_b, scalings, [float(p) for p in dropout_p], seed_tensor, *rows,
            backends.requested(), spec, parts, column_scale, keep_z)  # fmt: skip
    if compiling or x.device.type == "meta":
        y, _, _ = ops.lora_forward(*args)  # the custom op: Dynamo and AOTAutograd trace it; meta runs its fake
    elif torch.is_grad_enabled() and _any_requires_grad(x, weight, bias, lora_a, lora_b, column_scale):
        if _plain_torch(x, data, spec, lora_a, seed_tensor, rows, column_scale):
            y = backends.torch_backend.autograd_forward(x2d, data, bias, lora_a[0], lora_b[0], scalings)
            return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])
        plan = ops.Plan(args[6], seed_tensor, *rows, args[11], spec, keep_z, present)
        y, _ = ops.LoRAFunction.apply(plan, x2d, data, bias, scalings, column_scale, *lora_a, *lora_b, *parts)
    else:
        y, _ = ops.run_forward(*args)  # inference: no graph to record, the implementation alone
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def _plain_torch(x, data, spec, lora_a, seed, rows, column_scale) -> bool:
    """One adapter of the inputs' dtype over a dense W, no dropout, no DoRA,
    no autocast, on the torch backend: torch's autograd records the ops (the
    shortest training step on a CPU). Mixed dtypes keep the package's own
    backward, whose roundings a compiled graph reproduces exactly."""
    return (
        len(lora_a) == 1
        and lora_a[0].dtype == x.dtype
        and not torch._C._is_any_autocast_enabled()
        and seed is None
        and rows[0] is None
        and column_scale is None
        and spec == ops.DENSE
        and backends.select(x) is backends.torch_backend
    )


def _as_tensor(scalings, device, adapter_dtype) -> torch.Tensor:
    """The scalings as the ops take them: an (n,) float tensor on the device
    (fp64 for fp64 adapters, else fp32). Floats are turned into one once per
    distinct value (cached): no host-to-device copy per call."""
    if isinstance(scalings, torch.Tensor):
        return scalings if scalings.dim() == 1 else scalings.reshape(-1)
    dtype = torch.float64 if adapter_dtype == torch.float64 else torch.float32
    values = tuple(float(s) for s in scalings)
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _cached_tensor(values, dtype, device)


@functools.lru_cache(maxsize=1024)
def _cached_tensor(values, dtype, device):
    return torch.tensor(values, dtype=dtype, device=device)


def _any_requires_grad(x, weight, bias, lora_a, lora_b, column_scale=None) -> bool:
    return (
        x.requires_grad
        or (column_scale is not None and column_scale.requires_grad)
        or (isinstance(weight, torch.Tensor) and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
        or any(a.requires_grad for a in lora_a)
        or any(b.requires_grad for b in lora_b)
    )


def _autocasting(x: torch.Tensor) -> bool:
    # The process-wide flag first: one call, no device object, when autocast is off everywhere.
    return torch._C._is_any_autocast_enabled() and x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)


def _autocast(x, weight, bias, lora_a, lora_b):
    """Cast as autocast casts nn.Linear's inputs: x, weight and bias to the
    autocast dtype (float64 and non-float tensors stay as they are). float32
    adapters stay float32, so the LoRA branch computes in float32 as it does
    for PEFT's fp32 adapters on a bf16 model; other adapters are cast too."""
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        if isinstance(t, QuantizedWeight):  # decoded straight into the autocast dtype
            return dataclasses.replace(t, dtype=dtype) if t.dtype != torch.float64 else t
        castable = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if castable else t

    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in (*lora_a, *lora_b)):
        lora_a, lora_b = [cast(a) for a in lora_a], [cast(b) for b in lora_b]
    return cast(x), cast(weight), cast(bias), lora_a, lora_b


def dropout_mask(shape, dropout_p: float, seed: int, device="cpu") -> torch.Tensor:
    """The bool mask (True = kept) that lora_linear applies to an x of this
    shape (..., K) with this dropout_p and seed, on the backend that would run
    for a float32 x on `device`."""
    check_dropout("dropout_p", dropout_p)
    check_seed(seed)
    *leading, k = shape
    m = math.prod(leading)
    backend = backends.select(torch.empty(0, device=device))
    return backend.dropout_mask(m, k, float(dropout_p), seed, torch.device(device)).reshape(shape)
