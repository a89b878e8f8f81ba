"""The torch.library ops: `torch.library.opcheck` (schema, autograd
registration, fake tensors, AOT dispatch with dynamic shapes, which also
compares the registered backward with eager) for every op, on both backends
(the Triton one interpreted on CPU); and the op against the eager route."""

import pytest
import torch
from conftest import DEVICE
from helpers import assert_matches_reference, lora_inputs

from fused_lora import ops

# All four checks: on CPU they run with the torch backend and the interpreted
# Triton kernels alike; on a GPU with the compiled kernels.
CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")

DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "bf16+fp32-adapters": (torch.bfloat16, torch.float32),
}
# (M, dropout_p, bias): plain, dropout with bias absent, and no tokens at all.
CASES = {"plain": (5, 0.0, True), "dropout-nobias": (7, 0.3, False), "M=0": (0, 0.0, True)}


def _seed(p):
    return torch.tensor(1234) if p > 0 else None


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_opcheck_forward(backend, dtypes, case):
    m, p, bias = CASES[case]
    t = lora_inputs(m, 16, 12, 3, *DTYPES[dtypes], device=DEVICE, bias=bias)
    for name in ("x", "lora_a", "lora_b"):  # LoRA training: the autograd formula is exercised
        t[name].requires_grad_()
    args = (t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], 0.5, p, _seed(p))
    torch.library.opcheck(ops.lora_forward, args, test_utils=CHECKS)


def test_opcheck_forward_every_gradient(backend):
    t = lora_inputs(4, 16, 12, 2, torch.float32, device=DEVICE)
    args = [v.requires_grad_() for v in t.values()]
    torch.library.opcheck(ops.lora_forward, (*args, 1.5, 0.0, None), test_utils=CHECKS)


@pytest.mark.parametrize("dtypes", DTYPES)
def test_opcheck_backward_ops(backend, dtypes):
    dtype, adapter_dtype = DTYPES[dtypes]
    t = lora_inputs(6, 16, 12, 3, dtype, adapter_dtype, device=DEVICE)
    dy = torch.randn(6, 12, device=DEVICE).to(dtype)
    g = torch.randn(6, 3, device=DEVICE).to(adapter_dtype)
    h = torch.randn(6, 3, device=DEVICE).to(adapter_dtype)
    w, a, b = t["weight"], t["lora_a"], t["lora_b"]
    for op, args in (
        (ops.lora_grad_x, (dy, w, a, b, 0.5, 0.3, torch.tensor(7))),
        (ops.lora_grad_x, (dy, w, a, b, 0.5, 0.0, None)),
        (ops.lora_grad_g, (dy, w, a, b, 0.5)),
        (ops.lora_grad_a, (t["x"], g, 0.3, torch.tensor(7))),
        (ops.lora_grad_b, (dy, h, 0.5)),
    ):
        torch.library.opcheck(op, args, test_utils=CHECKS)


def test_op_and_eager_route_agree(backend):
    """The custom op (compiled route) and LoRALinearFunction (eager route)
    give the same y and gradients: they share one implementation."""
    t = lora_inputs(7, 16, 12, 3, torch.float32, device=DEVICE)
    results = []
    for call in (ops.lora_forward, ops.LoRALinearFunction.apply):
        leaves = {n: v.clone().requires_grad_() for n, v in t.items()}
        y, h = call(*leaves.values(), 0.5, 0.2, torch.tensor(11))
        assert not h.requires_grad, "H is for the backward only"
        y.backward(torch.ones_like(y))
        results.append([y, *(v.grad for v in leaves.values())])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)  # GPU atomics may reorder the dA, dB sums


def test_op_matches_reference(backend):
    """The op alone, through autograd, against the float64 reference."""
    from fused_lora.reference import lora_linear_reference

    t = lora_inputs(9, 16, 12, 3, torch.float32, device=DEVICE)
    leaves = {n: v.clone().requires_grad_() for n, v in t.items()}
    refs = {n: v.detach().double().cpu().requires_grad_() for n, v in t.items()}
    y, _ = ops.lora_forward(*leaves.values(), 0.5, 0.0, None)
    ref = lora_linear_reference(*refs.values(), 0.5)
    assert_matches_reference(y, ref, torch.float32)
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy.to(y))
    ref.backward(dy)
    for name in leaves:
        assert_matches_reference(leaves[name].grad, refs[name].grad, torch.float32, "gradients", name=f"d{name}")
