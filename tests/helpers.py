"""Inputs, poisoning and the tolerance gate shared by the tests (plain
functions; fixtures live in conftest.py)."""

import math

import torch

from fused_lora.reference import TOLERANCES, tolerance_check

# (x / W dtype, adapter dtype): same dtype, and PEFT's fp32 adapters on 16-bit x.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]
PAIR_IDS = ["fp32", "fp16", "bf16", "bf16-fp32A", "fp16-fp32A"]


def tolerance(dtype, kind="forward"):
    forward, gradients = TOLERANCES[dtype]
    return forward if kind == "forward" else gradients


def assert_matches_reference(out, ref, dtype, kind="forward", name="output"):
    """out (any dtype / device) against a float64 reference, within the gate
    of TOLERANCES: |out - ref| <= tol * max|ref| + tol * |ref|."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    ok, message = tolerance_check(out, ref, dtype, kind)
    assert ok, f"{name}: {message}"


def assert_error_near_torch(out, torch_out, ref, factor=2.0, name="output"):
    """The second look: our error against the float64 reference is at most
    `factor` times PyTorch's own, computed in the same dtype."""
    ours = (out.detach().double().cpu() - ref.detach().double().cpu()).abs().max()
    theirs = (torch_out.detach().double().cpu() - ref.detach().double().cpu()).abs().max()
    assert ours <= factor * theirs + 1e-12, f"{name}: error {ours:.3g} vs torch's {theirs:.3g}"


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


def randn(*shape, scale=1.0, dtype=torch.float32, device="cpu"):
    """Fresh random values drawn in float64, then rounded to dtype."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def lora_inputs(m, k, n, r, dtype, adapter_dtype=None, device="cpu", bias=True):
    """Fresh random x (m, k), W (n, k), bias (n,), A (r, k), B (n, r).

    Scaled like a trained layer (unit-variance outputs) and never zero: B is
    random, not the zero a fresh LoRA layer starts with."""
    adapter_dtype = adapter_dtype or dtype
    return dict(
        x=randn(m, k, dtype=dtype, device=device),
        weight=randn(n, k, scale=max(k, 1) ** -0.5, dtype=dtype, device=device),
        bias=randn(n, dtype=dtype, device=device) if bias else None,
        lora_a=randn(r, k, scale=max(k, 1) ** -0.5, dtype=adapter_dtype, device=device),
        lora_b=randn(n, r, scale=r**-0.5, dtype=adapter_dtype, device=device),
    )


def assign(m, n, assignment):
    """adapter_ids (m,) int64 for n adapters, in random row order. uniform:
    every adapter and -1 alike; skewed: 80% of rows on one adapter; one: all
    rows on the last adapter; base: no adapter at all."""
    if assignment == "base" or n == 0:
        return torch.full((m,), -1, dtype=torch.int64)
    if assignment == "one":
        return torch.full((m,), n - 1, dtype=torch.int64)
    ids = torch.randint(-1, n, (m,))
    if assignment == "skewed":
        ids = torch.where(torch.rand(m) < 0.8, n // 2, ids)
    return ids


def multi_inputs(m, k, n, ranks, dtype, adapter_dtype=None, assignment="uniform", bias=True, device="cpu"):
    """x (m, k), W (n, k), bias (n,), adapters A_a (r_a, k), B_a (n, r_a)
    (random B: never the zero a fresh adapter starts with), their scalings
    and adapter_ids (m,)."""
    adapter_dtype = adapter_dtype or dtype
    return dict(
        x=randn(m, k, dtype=dtype, device=device),
        weight=randn(n, k, scale=max(k, 1) ** -0.5, dtype=dtype, device=device),
        bias=randn(n, dtype=dtype, device=device) if bias else None,
        lora_a=[randn(r, k, scale=max(k, 1) ** -0.5, dtype=adapter_dtype, device=device) for r in ranks],
        lora_b=[randn(n, r, scale=r**-0.5, dtype=adapter_dtype, device=device) for r in ranks],
        scalings=[0.5 + 0.25 * i for i in range(len(ranks))],
        adapter_ids=assign(m, len(ranks), assignment).to(device),
    )


def f64(t):
    return None if t is None else t.detach().to("cpu", torch.float64)
