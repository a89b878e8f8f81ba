"""The input checks of the functional API, one set for one adapter and for
many: a TypeError / ValueError that names the argument and what was
expected, raised before any kernel runs. Nothing is converted."""

import math
import numbers

import torch

from .quantized import QuantizedWeight

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def require_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _require_dim(name, tensor, dim, expected):
    if tensor.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {expected}, got shape {tuple(tensor.shape)}")


def is_real(value) -> bool:
    """A real number that is not a bool; plain floats and ints skip the slow
    abstract-class isinstance (this runs on every call)."""
    return type(value) in (float, int) or (not isinstance(value, bool) and isinstance(value, numbers.Real))


def check_scaling(name: str, value) -> None:
    """A finite real number: NaN or infinity would turn every output NaN."""
    if not is_real(value):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def check_scaling_tensor(name: str, value: torch.Tensor, shapes: tuple, x: torch.Tensor) -> None:
    """A float tensor of one of these shapes on x's device. Its values are
    not read here (that would sync a GPU): a layer checks them where they
    are set."""
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {value.dtype}")
    if value.requires_grad:
        raise ValueError(f"{name} must not require grad: a scaling is data (lora_alpha / r), not a parameter")
    if tuple(value.shape) not in shapes:
        raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))}, got {tuple(value.shape)}")
    if value.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {value.device}")


def check_dropout(name: str, dropout_p) -> None:
    if not is_real(dropout_p) or not 0 <= dropout_p < 1:
        raise ValueError(f"{name} must be a float in [0, 1), got {dropout_p!r}")


def check_seed(seed) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31):
        raise ValueError(f"seed must be None or an int in [0, 2**31), got {seed!r}")


def _is_weight(value) -> bool:
    return isinstance(value, torch.Tensor | QuantizedWeight)


def _inputs_ok(x, weight, bias, lora_a, lora_b, scalings, dropout_p) -> bool:
    """The common case of check_inputs, checked fast (this runs on every call,
    and a call's host time matters at decode sizes): True means every check
    passes; False sends the call through the checks that name the problem."""
    tensor = torch.Tensor
    if not (isinstance(x, tensor) and isinstance(weight, tensor) and x.dim() >= 1 and weight.dim() == 2):
        return False
    n, k = weight.shape
    dtype, device = x.dtype, x.device
    if x.shape[-1] != k or dtype not in FLOAT_DTYPES or weight.dtype != dtype or weight.device != device:
        return False
    if bias is not None and not (
        isinstance(bias, tensor) and bias.shape == (n,) and bias.dtype == dtype and bias.device == device
    ):
        return False
    if not lora_a:
        return True
    if not isinstance(lora_a[0], tensor):
        return False
    adapter_dtype = lora_a[0].dtype
    if adapter_dtype != dtype and not (adapter_dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16)):
        return False
    for i in range(len(lora_a)):
        a, b = lora_a[i], lora_b[i]
        if not (isinstance(a, tensor) and isinstance(b, tensor) and a.dim() == 2 and b.dim() == 2):
            return False
        r = a.shape[0]
        if r < 1 or a.shape[1] != k or b.shape != (n, r) or a.dtype != adapter_dtype or b.dtype != adapter_dtype:
            return False
        p = dropout_p[i]
        if a.device != device or b.device != device or type(p) not in (float, int) or not 0 <= p < 1:
            return False
        if scalings is not None and not (type(scalings[i]) is float and math.isfinite(scalings[i])):
            return False
    return True


def check_inputs(x, weight, bias, lora_a, lora_b, scalings, dropout_p, *, names):
    """x: (..., K), weight: (N, K), bias: (N,) or None; lora_a[i]: (r_i, K),
    lora_b[i]: (N, r_i), scalings[i] (finite) and dropout_p[i] floats (or
    scalings None: a tensor, checked by check_scaling_tensor), all adapters
    of one dtype; `names(kind, i)` is how the error names adapter i's
    argument ("lora_a" for one adapter, "lora_a[1]" for many)."""
    if _inputs_ok(x, weight, bias, lora_a, lora_b, scalings, dropout_p):
        return
    require_tensor("x", x)
    if not _is_weight(weight):
        raise TypeError(f"weight must be a torch.Tensor or a QuantizedWeight, got {type(weight).__name__}")
    if isinstance(weight, QuantizedWeight) and any(t.requires_grad for t in (weight.data, *weight.parts())):
        raise ValueError("weight: a QuantizedWeight is a frozen base; none of its tensors may require grad")
    if bias is not None:
        require_tensor("bias", bias)
    for i in range(len(lora_a)):
        require_tensor(names("lora_a", i), lora_a[i])
        require_tensor(names("lora_b", i), lora_b[i])
        if scalings is not None:
            check_scaling(names("scaling", i), scalings[i])
        check_dropout(names("dropout_p", i), dropout_p[i])

    if len(weight.shape) != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., in_features={k}), got a 0-d tensor")
    if x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., {k}) to match weight (N={n}, K={k}), got {tuple(x.shape)}")
    if bias is not None:
        _require_dim("bias", bias, 1, f"(out_features={n},)")
        if bias.shape[0] != n:
            raise ValueError(f"bias must have shape ({n},) to match weight, got {tuple(bias.shape)}")
    for i, (a, b) in enumerate(zip(lora_a, lora_b, strict=True)):
        a_name, b_name = names("lora_a", i), names("lora_b", i)
        _require_dim(a_name, a, 2, f"(r, in_features={k})")
        r = a.shape[0]
        if r < 1:
            raise ValueError(f"{a_name} must have rank r >= 1 rows, got shape {tuple(a.shape)}")
        if a.shape[1] != k:
            raise ValueError(f"{a_name} must have shape (r, {k}) to match weight, got {tuple(a.shape)}")
        _require_dim(b_name, b, 2, f"(out_features={n}, r={r})")
        if tuple(b.shape) != (n, r):
            raise ValueError(f"{b_name} must have shape ({n}, {r}) to match weight and {a_name}, got {tuple(b.shape)}")

    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and value.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {value.dtype}")
    if lora_a:
        dtype = lora_a[0].dtype
        for i, (a, b) in enumerate(zip(lora_a, lora_b, strict=True)):
            for name, t in ((names("lora_a", i), a), (names("lora_b", i), b)):
                if t.dtype != dtype:
                    raise TypeError(
                        f"{name} must have {names('lora_a', 0)}'s dtype {dtype}: one dtype for all adapters"
                    )
        fp32_adapters = dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)
        if dtype != x.dtype and not fp32_adapters:
            raise TypeError(
                f"lora_a and lora_b must have x's dtype {x.dtype} (or float32 with float16 / bfloat16 x), got {dtype}"
            )

    tensors = [("weight", weight), ("bias", bias)]
    tensors += [(names(kind, i), t) for kind, ts in (("lora_a", lora_a), ("lora_b", lora_b)) for i, t in enumerate(ts)]
    for name, value in tensors:
        if value is not None and value.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {value.device}")


def check_adapter_ids(adapter_ids, x, num_adapters: int) -> None:
    """Integers in [-1, num_adapters) of x's leading shape or its first
    dimension, on x's device or the CPU. The value range is checked on the
    host (free for CPU ids, a device sync for ids on a GPU) except under
    torch.compile or CUDA graph capture, where the host cannot read the ids:
    there a device-side assert checks it."""
    require_tensor("adapter_ids", adapter_ids)
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
    if not adapter_ids.numel() or adapter_ids.device.type == "meta":
        return
    if cannot_read_on_host(adapter_ids):
        torch._assert_async(((adapter_ids >= -1) & (adapter_ids < num_adapters)).all(), "adapter_ids out of range")
        return
    low, high = (int(v) for v in torch.aminmax(adapter_ids.to(torch.int64)))
    if low < -1 or high >= num_adapters:
        raise ValueError(
            f"adapter_ids must be -1 (base only) or an adapter index in [0, {num_adapters}), "
            f"got values in [{low}, {high}]"
        )


def cannot_read_on_host(t: torch.Tensor) -> bool:
    """True under torch.compile, and for a GPU tensor during CUDA graph
    capture: reading its values on the host would break the graph."""
    if torch.compiler.is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()
