"""Which backend runs the fused primitives.

    CUDA tensors                     -> Triton kernels, compiled
    CPU tensors, TRITON_INTERPRET=1  -> the same kernels, interpreted
    CPU tensors otherwise            -> the torch backend

`set_backend("torch" | "triton" | "auto")` forces a choice, as a call or as a
context manager; the FUSED_LORA_BACKEND environment variable does the same
for a whole process (a set_backend call wins over it).
"""

import os
from types import ModuleType

import torch

from . import torch_backend, triton_backend
from .kernels.common import INTERPRETED

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


def backend_name() -> str:
    """The requested backend: set_backend's, else FUSED_LORA_BACKEND's, else "auto"."""
    if _forced is not None:
        return _forced
    return _check_name(os.environ.get("FUSED_LORA_BACKEND", "auto"), "FUSED_LORA_BACKEND")


def select(x: torch.Tensor) -> ModuleType:
    """The backend module for an op on x's device (raises if forced to an
    impossible one)."""
    name = backend_name()
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
