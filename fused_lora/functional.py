"""lora_linear(): autocast casting, input checks, the dropout seed, then the
fused op (`ops`: backend dispatch and the autograd formula) by one of three
equivalent routes: the custom op when torch.compile traces, its autograd
Function when eager code needs gradients, the bare implementation otherwise
(inference pays no autograd host time)."""

import math
import numbers

import torch

from . import dispatch, ops

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _require_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _require_dim(name, tensor, dim, expected):
    if tensor.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {expected}, got shape {tuple(tensor.shape)}")


def _is_real(value) -> bool:
    """A real number that is not a bool; plain floats and ints skip the slow
    abstract-class isinstance (this runs on every call)."""
    return type(value) in (float, int) or (not isinstance(value, bool) and isinstance(value, numbers.Real))


def check_dropout(dropout_p, seed):
    if not _is_real(dropout_p) or not 0 <= dropout_p < 1:
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
    if not _is_real(scaling):
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
    `dropout_mask` returns it. With dropout, CUDA graph capture raises: the
    seed is drawn on the host, so replays would repeat one mask.

    Under torch.autocast it casts as nn.Linear does: x, weight and bias to the
    autocast dtype, and y comes out in it; float32 adapters stay float32 (the
    LoRA branch in float32, as above), other adapters are cast too.
    Traceable by torch.compile(fullgraph=True), dynamic in the leading dims.
    """
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        x, weight, bias, lora_a, lora_b = _autocast(x.device.type, x, weight, bias, lora_a, lora_b)
    check_inputs(x, weight, bias, lora_a, lora_b, scaling)
    check_dropout(dropout_p, seed)
    seed_tensor = None
    if dropout_p > 0:
        if x.is_cuda and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "lora_linear with dropout_p > 0 cannot be captured in a CUDA graph: the seed is drawn on the "
                "host, so every replay would reuse the mask of the capture (use eval mode, or dropout_p=0)"
            )
        # A 0-d CPU tensor: under torch.compile the draw is a graph node, not a `.item()` graph break.
        seed_tensor = torch.randint(0, 2**31 - 1, ()) if seed is None else torch.tensor(seed)
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # a view where the strides allow one
    args = (x2d, weight, bias, lora_a, lora_b, float(scaling), float(dropout_p), seed_tensor)
    if torch.compiler.is_compiling():
        y, _ = ops.lora_forward(*args)  # the custom op: Dynamo and AOTAutograd trace it
    elif torch.is_grad_enabled() and _any_requires_grad(x, weight, bias, lora_a, lora_b):
        y, _ = ops.LoRALinearFunction.apply(*args)  # the op's autograd, without the dispatcher's host time
    else:
        y, _ = ops.forward(*args)  # inference: no graph to record, the implementation alone
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def _any_requires_grad(x, weight, bias, lora_a, lora_b) -> bool:
    return (
        x.requires_grad
        or weight.requires_grad
        or lora_a.requires_grad
        or lora_b.requires_grad
        or (bias is not None and bias.requires_grad)
    )


def _autocast(device_type, x, weight, bias, lora_a, lora_b):
    """Cast as autocast casts nn.Linear's inputs: x, weight and bias to the
    autocast dtype (float64 and non-float tensors stay as they are). float32
    adapters stay float32, so the LoRA branch computes in float32 as it does
    for PEFT's fp32 adapters on a bf16 model; other adapters are cast too."""
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        castable = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if castable else t

    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in (lora_a, lora_b)):
        lora_a, lora_b = cast(lora_a), cast(lora_b)
    return cast(x), cast(weight), cast(bias), lora_a, lora_b


def dropout_mask(shape, dropout_p: float, seed: int, device="cpu") -> torch.Tensor:
    """The bool mask (True = kept) that lora_linear applies to an x of this
    shape (..., K) with this dropout_p and seed, on the backend that would run
    for a float32 x on `device`."""
    check_dropout(dropout_p, seed)
    *leading, k = shape
    m = math.prod(leading)
    backend = dispatch.select(torch.empty(0, device=device))
    return backend.dropout_mask(m, k, float(dropout_p), seed, torch.device(device)).reshape(shape)
