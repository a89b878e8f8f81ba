"""Which backend runs the primitives.

    CUDA tensors                     -> Triton kernels, compiled
    CPU tensors, TRITON_INTERPRET=1  -> the same kernels, interpreted
    CPU tensors otherwise            -> the torch backend

`set_backend("torch" | "triton" | "auto")` forces a choice, as a call or as a
context manager; the FUSED_LORA_BACKEND environment variable does the same
for a whole process (a set_backend call wins over it). The choice is read
when a forward runs and travels with it: its backward runs on the same
backend even outside the `with set_backend(...)` block (the dropout mask of
each backend is its own).
"""

import os
from types import ModuleType

import torch

from ..kernels.common import INTERPRETED
from . import torch_backend, triton_backend

BACKENDS = ("auto", "triton", "torch")
_forced: str | None = None


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name


class set_backend:  # noqa: N801 - used like a function
    """Force the backend: `set_backend("torch")` for the rest of the process,
    or `with set_backend("torch"): ...` for a block only. `set_backend(None)`
    lifts the choice (FUSED_LORA_BACKEND, else "auto", decides again)."""

    def __init__(self, name: str | None):
        global _forced
        self._previous = _forced
        _forced = None if name is None else _check_name(name, "backend")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _forced
        _forced = self._previous


def requested() -> str:
    """The requested backend: set_backend's, else FUSED_LORA_BACKEND's, else "auto"."""
    if _forced is not None:
        return _forced
    return _check_name(os.environ.get("FUSED_LORA_BACKEND", "auto"), "FUSED_LORA_BACKEND")


def select(x: torch.Tensor, name: str | None = None) -> ModuleType:
    """The backend module that runs `name` (default: the requested one) on
    x's device; raises if that is impossible."""
    name = requested() if name is None else name
    triton_can_run = x.is_cuda or INTERPRETED
    if name == "torch" or (name == "auto" and not triton_can_run):
        return torch_backend
    if not triton_can_run:
        raise RuntimeError(
            f"the triton backend needs CUDA tensors or TRITON_INTERPRET=1 at import; got tensors on {x.device}"
        )
    if x.dtype == torch.float64 and not INTERPRETED:
        raise TypeError("float64 runs on the torch backend only: use set_backend('torch') for float64 on a GPU")
    return triton_backend
