"""Inputs, poisoning and the tolerance gate shared by the tests."""

import math

import torch

from fused_lora.kernels.common import INTERPRETED
from fused_lora.reference import TOLERANCES


def tolerance(dtype, kind="forward"):
    forward, gradients = TOLERANCES[dtype]
    return forward if kind == "forward" else gradients


def assert_matches_reference(out, ref, dtype, kind="forward", name="output"):
    """out (any dtype/device) against a float64 reference, within the gate."""
    tol = tolerance(dtype, kind)
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    assert torch.isfinite(out).all(), f"{name}: non-finite values (an unwritten or out-of-bounds element)"
    if ref.numel() == 0:
        return
    err = (out - ref).abs()
    bound = tol * ref.abs().max() + tol * ref.abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{name} ({dtype}, {kind}): error {err.flatten()[worst]:.3g} at flat index {worst} "
        f"exceeds {bound.flatten()[worst]:.3g} (max|ref| {ref.abs().max():.3g})"
    )


def padded(t, pad=3):
    """t copied into the middle of a NaN-filled buffer: a non-contiguous view
    whose out-of-bounds neighbours are NaN, so a stray read shows up."""
    if t.dim() == 0:
        return t.clone()
    buf = torch.full([s + 2 * pad for s in t.shape], math.nan, dtype=t.dtype, device=t.device)
    view = buf[tuple(slice(pad, pad + s) for s in t.shape)]
    view.copy_(t)
    return view


def poisoned(shape, dtype, device):
    """An output buffer full of NaN: an element the kernel fails to write stays NaN."""
    return torch.full(shape, math.nan, dtype=dtype, device=device)


def lora_inputs(m, k, n, r, dtype, adapter_dtype=None, device="cpu", bias=True):
    """Fresh random x (m, k), W (n, k), bias (n,), A (r, k), B (n, r).

    Scaled like a trained layer (unit-variance outputs) and never zero: B is
    random, not the zero a fresh LoRA layer starts with."""
    adapter_dtype = adapter_dtype or dtype

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dt)

    return dict(
        x=randn(m, k),
        weight=randn(n, k, scale=max(k, 1) ** -0.5),
        bias=randn(n) if bias else None,
        lora_a=randn(r, k, scale=max(k, 1) ** -0.5, dt=adapter_dtype),
        lora_b=randn(n, r, scale=r**-0.5, dt=adapter_dtype),
    )


def interpreted_or_cuda(device):
    """True where the Triton backend can run for tensors on `device`."""
    return device == "cuda" or INTERPRETED
